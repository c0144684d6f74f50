"""One collection run from a typed config: check the input, resolve agents, prepare outputs, dispatch,
write the metrics. `collect_rollouts`, `tune_parallelism`, tests and benchmarks all come through here.

Exit codes (`RunResult.exit_code`):
    0  every selected rollout is in the output
    2  config, input or output error (nothing was sent, or writing failed; what is written stays whole)
    3  finished, but some rollouts failed (see `<stem>_failures.jsonl`)
    4  stopped early: the failure budget (`max_failures` / `max_failure_rate`) was spent
    130 interrupted by SIGINT/SIGTERM (rerun with `resume=true` to finish)
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gym_collect.agents import resolve_agents
from gym_collect.client import AgentClient
from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.config import CollectConfig
from gym_collect.metrics import Progress, RunMetrics
from gym_collect.reader import JsonlRows, RowSelection, count_rows, iter_requests, scan, shard_range
from gym_collect.resume import DoneSet, input_identity, prepare_outputs, run_key
from gym_collect.retry import RetryPolicy
from gym_collect.runner import FailureBudget, Runner
from gym_collect.writer import LineFile, OutputPaths, RolloutWriter, write_json_atomic

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURES, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 3, 4, 130  # 2: `GymCollectError.exit_code`


@dataclass
class RunResult:
    """How a run ended: the exit code and the metrics document (None when it never started)."""

    exit_code: int
    metrics: dict[str, Any] | None
    output_path: Path | None = None


def shard_output_path(output: Path, num_shards: int, shard_id: int) -> Path:
    """`rollouts.jsonl` -> `rollouts_shard-003-of-128.jsonl`: zero-padded so shard files sort in order."""
    width = max(2, len(str(num_shards - 1)))
    return output.with_name(f"{output.stem}_shard-{shard_id:0{width}d}-of-{num_shards:0{width}d}{output.suffix}")


def plan_selection(cfg: CollectConfig, input_path: Path) -> RowSelection:
    """The row range of this run: `num_shards`/`shard_id` if given, else `start_idx`/`end_idx`, then `limit`."""
    if cfg.num_shards is not None and cfg.shard_id is not None:
        start, end = shard_range(count_rows(input_path), cfg.num_shards, cfg.shard_id)
        return RowSelection(start, end, cfg.limit)
    return RowSelection(cfg.start_idx, cfg.end_idx, cfg.limit)


async def collect(cfg: CollectConfig, *, handle_signals: bool = False) -> RunResult:
    """Run one collection as configured. Raises `GymCollectError` subclasses for setup problems and for
    output write failures (exit code in `.exit_code`); failed rollouts are data, not exceptions."""
    input_path, output_path = cfg.require_paths()
    if cfg.num_shards is not None and cfg.shard_id is not None:
        output_path = shard_output_path(output_path, cfg.num_shards, cfg.shard_id)
    paths = OutputPaths(output_path)
    rows = JsonlRows(input_path, plan_selection(cfg, input_path))
    found = scan(rows, cfg.agent_name, cfg.on_bad_row)
    if found.bad_rows:
        log.warning("%d bad input rows will be recorded as failures (on_bad_row=skip)", found.bad_rows)
    definition = {
        "input": input_identity(input_path),
        "start_idx": rows.selection.start_idx,
        "stop_idx": rows.selection.start_idx + found.num_rows,
        "num_repeats": cfg.num_repeats,
        "responses_create_params": cfg.responses_create_params,
        "agent_name": cfg.agent_name,
    }
    done = DoneSet(rows.selection.start_idx, found.num_rows, cfg.num_repeats)
    expected = found.num_rows * cfg.num_repeats
    metrics = RunMetrics(expected)

    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(AgentClient(
            connector_limit=cfg.global_aiohttp_connector_limit,
            connector_limit_per_host=cfg.global_aiohttp_connector_limit_per_host,
            connect_timeout_s=cfg.connect_timeout_s,
            request_timeout_s=cfg.request_timeout_s,
            headers=cfg.headers,
        ))
        if cfg.sim.enabled:
            urls = await _start_sim_agent(stack, cfg, found.agent_names)
        else:
            urls = await resolve_agents(
                found.agent_names, client=client, agent_name=cfg.agent_name, agent_url=cfg.agent_url,
                agents=cfg.agents, head_server_url=cfg.head_server_url,
            )
        for url in sorted(set(urls.values())):
            await client.probe(url)
        prior = prepare_outputs(
            paths, definition, done, input_path=input_path, resume=cfg.resume, overwrite=cfg.overwrite,
            keep_permanent_failures=cfg.keep_permanent_failures, on_prior_rollout=metrics.add_prior,
        )
        if cfg.resume:
            log.info("Resuming: %d rollouts already written, %d failures kept, %d to redo", prior.rollouts,
                     prior.failures_kept, prior.failures_redone)
        if prior.duplicates:
            log.warning("%s holds %d duplicate or out-of-range rollouts; they are left as they are",
                        paths.output, prior.duplicates)
        metrics.skipped_resume = done.count
        limits = InFlightLimits.from_config(cfg, urls)
        window = cfg.reorder_window or limits.reorder_window()
        requests = iter_requests(rows, cfg.num_repeats, cfg.agent_name, cfg.responses_create_params, done.is_done)
        log.info("Collecting %d rollouts (%d rows x %d repeats, %d already done) from %s into %s",
                 expected - done.count, found.num_rows, cfg.num_repeats, done.count, input_path, output_path)
        with (
            LineFile(paths.output) as out,
            LineFile(paths.failures) as failures,
            Progress(expected, done.count, cfg.progress) as progress,
        ):
            writer = RolloutWriter(out, failures, ordered=cfg.output_order == "input", window=window)
            runner = Runner(
                client=client, agent_urls=urls, writer=writer, metrics=metrics, progress=progress,
                policy=RetryPolicy(cfg.max_attempts, cfg.backoff_initial_s, cfg.backoff_max_s),
                limits=limits,
                budget=FailureBudget(cfg.max_failures, cfg.max_failure_rate, cfg.min_rollouts_for_failure_rate),
                paths=paths, run_key=run_key(definition), status_every_s=cfg.status_every_s,
            )
            with _signals(runner, cfg.shutdown_grace_s, handle_signals):
                await runner.run(requests)
    if paths.failures.exists() and paths.failures.stat().st_size == 0:
        paths.failures.unlink()
    snapshot = metrics.snapshot(limits.history_since(metrics.started))
    write_json_atomic(paths.metrics, snapshot)
    for line in metrics.summary_lines():
        log.info("%s", line)
    log.info("Wrote %s and %s", paths.output, paths.metrics)
    return RunResult(_exit_code(metrics), snapshot, output_path)


async def _start_sim_agent(stack: AsyncExitStack, cfg: CollectConfig, names: set[str]) -> dict[str, str]:
    from gym_collect.sim_agent import SimAgent, SimAgentConfig

    sim_config = SimAgentConfig(capacity=cfg.sim.capacity, service_time_s=cfg.sim.service_time_s,
                                service_sigma=cfg.sim.service_sigma, mode=cfg.sim.mode)
    sim = await stack.enter_async_context(SimAgent(sim_config, agent_names=sorted(names)))
    log.info("Started the simulated agent at %s (capacity %d, %.3f s service time) for %s", sim.url,
             cfg.sim.capacity, cfg.sim.service_time_s, ", ".join(sorted(names)))
    return {name: sim.url for name in names}


def _exit_code(metrics: RunMetrics) -> int:
    reason = metrics.stopped_reason
    if reason is not None:
        return EXIT_STOPPED if reason.startswith("failure budget") else EXIT_INTERRUPTED
    return EXIT_FAILURES if metrics.failed else EXIT_OK


@contextmanager
def _signals(runner: Runner, grace_s: float, enabled: bool) -> Iterator[None]:
    """SIGINT/SIGTERM: stop dispatching and finish in-flight work within `grace_s`; a second one exits now."""
    if not enabled:
        yield
        return
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if runner.metrics.stopped_reason is not None:
            log.warning("Second signal: exiting now; every line written is whole, resume=true finishes the run")
            os._exit(EXIT_INTERRUPTED)
        runner.stop(f"interrupted by {signal.Signals(signum).name}", grace_s)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        yield
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

