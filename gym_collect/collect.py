"""One collection run from a typed config: check the paths, lock the output, scan the input, resolve agents,
prepare the outputs, dispatch, write the metrics. `collect_rollouts`, `tune_parallelism`, tests and
benchmarks all come through here. Signals are handled phase by phase (`gym_collect.shutdown`).

Exit codes (`RunResult.exit_code`) follow from what the output holds at the end, not from how the run ended:
    0   every selected (task, rollout) is in the output
    2   config, input or output error (what is written stays whole), or the input changed during the run
    3   finished, but some selected rollouts are not in the output (failed, or answered `_ng_no_persist`)
    4   stopped early: the failure budget (`max_failures` / `max_failure_rate`) or the dispatch budget
        (`dispatch_budget_s`, a Slurm job's end) was spent
    130 interrupted by SIGINT/SIGTERM/SIGHUP (rerun with `resume=true` to finish)
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gym_collect.client import AgentClient, socket_budget
from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.config import CollectConfig
from gym_collect.deadline import ADAPTIVE_MARGIN_PERCENTILE, DispatchDeadline
from gym_collect.deadline import REASON as DISPATCH_BUDGET
from gym_collect.errors import GymCollectError, InputError
from gym_collect.metrics import Progress, RunMetrics
from gym_collect.nemo.failures import PriorAttempts, max_rollout_attempts
from gym_collect.nemo.head import HeadDocument, fetch_head_document
from gym_collect.nemo.keys import notices
from gym_collect.nemo.routing import UNNAMED_AGENT, Route, RowRouter, needs_head, resolve_routes, warn_overrides
from gym_collect.nemo.rows import PromptConfig, RequestBuilder
from gym_collect.reader import (
    JsonlRows,
    RowSelection,
    ScanResult,
    count_rows,
    iter_requests,
    scan,
    shard_range,
)
from gym_collect.redact import display_url, url_secrets
from gym_collect.resume import check_materialized, check_resumable, run_key
from gym_collect.retry import RetryPolicy
from gym_collect.runner import FAILURE_STOPS_RUN, FailureBudget, Runner
from gym_collect.shutdown import EXIT_INTERRUPTED, Interrupted, Shutdown, note_signal
from gym_collect.writer import DoneSet, OutputPaths, RunOutputs, check_input_file, count_done, followed
from gym_collect.writer.paths import check_output_folder, check_output_paths

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_FAILURES, EXIT_STOPPED = 0, 2, 3, 4
ROUTING_KEYS = ("agent_map", "fan_out", "environment_server_name", "prompt_config", "num_repeats_add_seed")


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
    """The row range of this run: shard `shard_id` of the input's first `limit` rows (all without one) with
    `num_shards`, else `start_idx`/`end_idx`, then at most `limit` rows."""
    if cfg.num_shards is not None and cfg.shard_id is not None:
        start, end = shard_range(_sharded_rows(cfg, input_path), cfg.num_shards, cfg.shard_id)
        return RowSelection(start, end)
    return RowSelection(cfg.start_idx, cfg.end_idx, cfg.limit)


def _sharded_rows(cfg: CollectConfig, input_path: Path) -> int:
    """The rows the shards of `num_shards` split between them: the input's, or its first `limit`."""
    rows = count_rows(input_path)
    return rows if cfg.limit is None else min(rows, cfg.limit)


def run_collect(cfg: CollectConfig) -> int:
    """Run `collect(cfg)` on a new event loop with signal handling, for the command line; the exit code.

    A signal that arrives outside the run's own handling (before its loop starts or after it ended)
    gives exit 130 only when the run had not finished. Raises `GymCollectError` for setup problems.
    """
    result: RunResult | None = None

    async def main() -> None:
        nonlocal result
        result = await collect(cfg, handle_signals=True)

    try:
        asyncio.run(main())
    except KeyboardInterrupt as exc:  # includes `Interrupted` (SIGTERM, SIGHUP)
        note_signal(str(exc) or "SIGINT")
        if result is None:
            log.error("Interrupted (%s) before the run started; nothing was collected", str(exc) or "SIGINT")
            return EXIT_INTERRUPTED
    assert result is not None
    return result.exit_code


async def collect(cfg: CollectConfig, *, handle_signals: bool = False) -> RunResult:
    """Run one collection as configured (see the module docstring for exit codes).

    Raises `GymCollectError` subclasses for setup problems and output write failures (exit code in
    `.exit_code`); failed rollouts are data, not exceptions. With `handle_signals`, SIGINT/SIGTERM/SIGHUP
    are handled as `gym_collect.shutdown` describes.
    """
    with Shutdown(handle_signals) as shutdown:
        try:
            return await _collect(cfg, shutdown)
        except (asyncio.CancelledError, Interrupted):
            if shutdown.signal_name is None:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            output = ("overwrite=true had already removed the earlier output" if shutdown.output_removed
                      else "the output is as it was")
            log.error("Interrupted by %s during start-up: nothing was sent; %s", shutdown.signal_name, output)
            return RunResult(EXIT_INTERRUPTED, None)


async def _collect(cfg: CollectConfig, shutdown: Shutdown) -> RunResult:
    input_path, output_path = cfg.require_paths()
    if cfg.num_shards is not None and cfg.shard_id is not None:
        output_path = shard_output_path(output_path, cfg.num_shards, cfg.shard_id)
    output_path = followed(output_path)
    paths = OutputPaths(output_path)
    check_input_file(input_path)
    selection = plan_selection(cfg, input_path)
    builder = _request_builder(cfg)
    for line in notices(cfg):
        log.warning("%s", line)
    if cfg.dry_run:
        return await _dry_run(cfg, paths, input_path, selection, builder, shutdown)

    with RunOutputs(paths, reads=[input_path]) as outputs:
        found = await _scan(input_path, selection, builder, cfg, shutdown)
        snapshot = found.snapshot
        assert snapshot is not None
        start = selection.start_idx
        rows = JsonlRows(input_path, RowSelection(start, start + found.num_rows), expected=snapshot,
                         include_prefix=True)
        definition = _definition(cfg, found, start)

        async with AsyncExitStack() as stack:
            client = await stack.enter_async_context(_client(cfg))
            routes, rollouts_by_agent = await _routes(cfg, stack, client, builder, found)
            expected, per_row = _expected(cfg, builder, found)
            done = _done_set(found, per_row)
            metrics = RunMetrics(expected)
            for url in sorted({route.url for route in routes.values()}):
                await client.probe(url)
            resuming = cfg.resume and bool(outputs.existing())
            if resuming:
                check_resumable(outputs.recorded_definition(), definition, paths.manifest,
                                materialized=paths.materialized_inputs.exists())
            attempts = PriorAttempts(max_rollout_attempts(), retry_terminal_timeouts=cfg.retry_terminal_timeouts,
                                     retry_terminal=not cfg.keep_permanent_failures)
            sharding = {"num_shards": cfg.num_shards, "input_rows": min(snapshot.total_rows, cfg.limit or
                        snapshot.total_rows)} if cfg.num_shards is not None else None  # what the shards hold together
            prior = outputs.prepare(
                done, resume=cfg.resume, overwrite=cfg.overwrite, on_prior_rollout=metrics.add_prior,
                on_prior_failure=attempts.add,
            )
            shutdown.output_removed = prior.removed
            await _materialize(outputs, rows, builder, cfg, found, shutdown, check=resuming)
            outputs.commit({"input_path": str(input_path.resolve()), "definition": definition,
                                    **({"sharding": sharding} if sharding else {})})
            gated = _gated_not_done(attempts, done)
            if resuming:
                log.info("Resuming: %d rollouts already written, %d failure records (history kept), %d rollouts "
                         "that failed before are not retried (terminal, or %d attempts)", prior.rollouts,
                         prior.failure_records, gated, attempts.max_attempts)
            if prior.duplicates:
                log.warning("%s holds %d duplicate or out-of-range rollouts; they are left as they are",
                            paths.output, prior.duplicates)
            metrics.skipped_resume = done.count
            urls = {agent: route.url for agent, route in routes.items()}
            limits = InFlightLimits.from_config(cfg, urls, client.connection_limits)
            writer = outputs.open_writer(ordered=cfg.output_order == "input",
                                         window=cfg.reorder_window or limits.reorder_window())
            skipped = [0]

            def is_done(task: int, rollout: int) -> bool:
                if done.is_done(task, rollout):
                    skipped[0] += 1
                    return True
                return attempts.gated(task, rollout)

            def stop_dispatch(reason: str) -> None:
                metrics.stopped_reason = metrics.stopped_reason or reason
                log.warning("Stopping dispatch: %s; the rollouts in flight finish, resume=true does the rest", reason)

            deadline = DispatchDeadline.from_settings(
                cfg.dispatch_budget_s, cfg.drain_margin_s, cfg.shutdown_grace_s,
                lambda: (metrics.succeeded, metrics.latency.percentile(ADAPTIVE_MARGIN_PERCENTILE)), stop_dispatch)
            requests = deadline.limit(iter_requests(rows, builder, is_done, _bad_row_rollouts(cfg), found.indexer,
                                                    interleave=cfg.interleave_repeats,
                                                    attempt_of=attempts.attempt_index if attempts.attempts else None))
            log.info("Collecting %d rollouts (%d rows, %d already done%s) from %s into %s",
                     expected - done.count - gated, found.num_rows, done.count,
                     f", {gated} not retried" if gated else "", input_path, output_path)
            with Progress(expected, done.count, cfg.progress) as progress:
                runner = Runner(
                    client=client, agent_urls=urls, result_fields={a: r.stamps for a, r in routes.items()},
                    writer=writer, metrics=metrics, progress=progress,
                    policy=RetryPolicy(cfg.max_attempts, cfg.backoff_initial_s, cfg.backoff_max_s),
                    limits=limits, rollouts_by_agent=rollouts_by_agent, deadline=deadline,
                    budget=FailureBudget(cfg.max_failures, cfg.max_failure_rate, cfg.min_rollouts_for_failure_rate),
                    write_status=outputs.write_status, run_key=run_key(definition),
                    status_every_s=cfg.status_every_s, record_failures=cfg.route_failures_to_sidecar is not False,
                )
                shutdown.running(lambda reason: runner.stop(reason, cfg.shutdown_grace_s))
                try:
                    await runner.run(requests)
                finally:
                    shutdown.finishing()
            metrics.stop_clock()
            # a run its dispatch budget ended is scored, as 0.7 scores it (`rollout_collection.py:2826-2910`)
            stopped = metrics.stopped_reason is not None and not metrics.stopped_reason.startswith(DISPATCH_BUDGET)
            if not (cfg.disable_aggregation or cfg.dry_run or stopped or shutdown.signal_name):
                await _aggregate(cfg, client, paths, routes, shutdown)
            metrics.relabel({key: label for key, route in routes.items()
                             if (label := route.label(key) or route.environment_server) not in (None, key)})
        change = rows.check_unchanged()
        in_output = skipped[0] + writer.written
        document = metrics.snapshot(limits.history_since(metrics.started))
        document["rollouts"]["in_output"] = in_output
        document["rollouts"]["missing"] = expected - in_output
        document["input_changed"] = change
        outputs.write_metrics(document)
    for line in metrics.summary_lines():
        log.info("%s", line)
    log.info("Wrote %s and %s", paths.output, paths.metrics)
    code = _exit_code(cfg, metrics, in_output, expected, change)
    _explain(code, paths, input_path, expected - in_output, metrics, change, (gated, attempts.max_attempts))
    return RunResult(code, document, output_path)


async def _aggregate(cfg: CollectConfig, client: AgentClient, paths: OutputPaths, routes: Mapping[str, Route],
                     shutdown: Shutdown) -> None:
    """`aggregate_run` as a task a signal stops (`Shutdown.aggregating`); then the finishing phase again."""
    # imported here: its metric code costs ~60 ms of start-up, which runs with disable_aggregation=true skip
    from gym_collect.nemo.aggregation import aggregate_run, targets_from_routes

    aggregation = asyncio.ensure_future(aggregate_run(
        client.session, paths, targets_from_routes(routes),
        count_failure_classes_as_zero=cfg.count_failure_classes_as_zero,
        count_missing_rollouts_as_zero=cfg.count_missing_rollouts_as_zero,
        timeout_s=cfg.aggregate_timeout_s, redact=client.redact))
    shutdown.aggregating(aggregation.cancel)
    try:
        await aggregation
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if not aggregation.cancelled() or (current is not None and current.cancelling()):
            raise  # the run itself is cancelled, not just its aggregation
        log.warning("Aggregate metrics not written to %s (interrupted)", paths.aggregate_metrics)
    finally:
        shutdown.finishing()


async def _materialize(outputs: RunOutputs, rows: JsonlRows, builder: RequestBuilder, cfg: CollectConfig,
                       found: ScanResult, shutdown: Shutdown, *, check: bool) -> None:
    """Write `<stem>_materialized_inputs.jsonl` before dispatch: every `/run` body of the selection in
    (task, rollout) order, as NeMo Gym 0.7 does (`rollout_collection.py:2430-2439`), streamed in a worker
    thread. On resume an existing one is compared with this run's bodies instead (`check_materialized`)."""
    def bodies() -> Iterator[bytes]:
        never = lambda task, rollout: False  # noqa: E731
        for n, request in enumerate(iter_requests(rows, builder, never, 0, found.indexer,
                                                  interleave=cfg.interleave_repeats, materialize=True)):
            if n % 1024 == 0:
                shutdown.check()
            if request.error is None:
                yield request.body

    recorded = outputs.materialized_records() if check else None
    if recorded is not None:
        await asyncio.to_thread(check_materialized, recorded, bodies(), outputs.paths.materialized_inputs)
    else:
        await asyncio.to_thread(outputs.write_materialized, (body + b"\n" for body in bodies()))


def _definition(cfg: CollectConfig, found: ScanResult, start: int) -> dict[str, Any]:
    """What fixes a run's requests (the manifest's `definition`, compared on resume): the input's identity, the
    row range, and every setting that changes a body or where it goes."""
    assert found.snapshot is not None
    return {
        "input": found.snapshot.identity,
        "start_idx": start,
        "stop_idx": start + found.num_rows,
        "num_repeats": cfg.num_repeats,
        "responses_create_params": cfg.responses_create_params,
        "agent_name": cfg.agent_name,
        **{key: value for key in ROUTING_KEYS if (value := getattr(cfg, key))},
    }


def _gated_not_done(attempts: PriorAttempts, done: DoneSet) -> int:
    return sum(1 for task, rollout in {*attempts.terminal, *attempts.attempts} if attempts.gated(task, rollout)
               and not done.is_done(task, rollout))


def _request_builder(cfg: CollectConfig) -> RequestBuilder:
    router = RowRouter(agent_map=cfg.agent_map, fan_out=cfg.fan_out,
                       unnamed_agent=UNNAMED_AGENT if cfg.agent_url and not cfg.agent_name else None,
                       environment_server=cfg.environment_server_name,
                       taskset_routes=cfg.environment_server_routes,
                       tasksets_only=cfg.environment_routing_mode == "taskset")
    prompt = PromptConfig.load(cfg.prompt_config) if cfg.prompt_config else None
    return RequestBuilder(router, cfg.repeats_for, cfg.responses_create_params, add_seed=cfg.num_repeats_add_seed,
                          prompt=prompt)


def _done_set(found: ScanResult, per_row: int) -> DoneSet:
    """The done set over the selection's task range (sparse caller task indices go to its overflow set)."""
    low, high = found.task_range
    span = high - low + 1
    return DoneSet(low, span if span <= 4 * found.num_rows + 1024 else 0, per_row)


def _bad_row_rollouts(cfg: CollectConfig) -> int:
    return cfg.repeats_for(None) or 1


def _expected(cfg: CollectConfig, builder: RequestBuilder, found: ScanResult) -> tuple[int, int]:
    """(rollouts the selection gets, the most any row gets)."""
    per_key = {key: builder.rollouts(key) for key in found.route_keys}
    bad = _bad_row_rollouts(cfg) if found.bad_rows else 0
    total = sum(count * per_key[key] for key, count in found.route_keys.items()) + found.bad_rows * bad
    return total, max([bad, *per_key.values()], default=1) or 1


async def _routes(cfg: CollectConfig, stack: AsyncExitStack, client: AgentClient, builder: RequestBuilder,
                  found: ScanResult) -> tuple[dict[str, Route], Counter[str]]:
    """Resolve routing once: `task_source`s, then a `Route` for every agent; and the rollouts per agent."""
    router, keys = builder.router, [*found.route_keys, *found.prefix_keys]
    direct = dict(cfg.agents)
    sim_url = await _start_sim_agent(stack, cfg, found) if cfg.sim.enabled else None
    head: HeadDocument | None = None
    named = {t for k in keys for t in k.targets if t}
    head_url = sim_url or cfg.head_server_url
    assert head_url is not None
    if sim_url is None and needs_head(named, keys, agent_url=cfg.agent_url, direct=direct,
                                      environment_server=cfg.environment_server_name):
        head = await fetch_head_document(client, head_url, cfg.connect_timeout_s)
    elif sim_url is not None and any("" in k.targets for k in keys):
        head = await fetch_head_document(client, sim_url, cfg.connect_timeout_s)
    router.resolve(keys, head)
    warn_overrides(keys)
    by_agent: Counter[str] = Counter()
    seen: set[str] = set()
    for key, count in found.route_keys.items():
        for agent in router.targets(key):
            by_agent[agent] += count * (cfg.repeats_for(agent, key.basis) or 0)
            seen.update(k for k in (agent, key.basis) if k is not None)
    if isinstance(cfg.num_repeats, dict) and (unknown := sorted(set(cfg.num_repeats) - seen - {"_default"})):
        log.warning("num_repeats dict contains agent names that never appeared in input rows (possible typo?): %s",
                    unknown)  # 0.7's warning (`rollout_collection.py:2224-2230`)
    if sim_url is not None:
        return {agent: Route(sim_url) for agent in by_agent}, by_agent
    routes = resolve_routes(by_agent, agent_name=cfg.agent_name, agent_url=cfg.agent_url, direct=direct, head=head,
                            environment_server=cfg.environment_server_name)
    if head is not None:
        log.info("Routed %d agent(s) through the head server at %s", len(routes), head.source)
    return routes, by_agent


async def _scan(
    input_path: Path, selection: RowSelection, builder: RequestBuilder, cfg: CollectConfig, shutdown: Shutdown
) -> ScanResult:
    """The check pass, in a worker thread so that signals are answered while it reads a large file."""
    found = await asyncio.to_thread(scan, JsonlRows(input_path, selection), builder, cfg.on_bad_row,
                                    shutdown.check)
    if found.bad_rows:
        log.warning("%d bad input rows will be recorded as failures (on_bad_row=skip)", found.bad_rows)
    assert found.snapshot is not None
    if found.num_rows == 0:
        total = found.snapshot.total_rows
        if cfg.num_shards is not None and total < cfg.num_shards:
            log.warning("Shard %s of %d holds no rows (the input has %d rows): nothing to collect", cfg.shard_id,
                        cfg.num_shards, total)
        else:
            what = "has no rows" if total == 0 else f"has {total} rows, none in the selection"
            raise InputError(
                f"{input_path}: {what} (start_idx={selection.start_idx}, end_idx={selection.end_idx}, "
                f"limit={selection.limit}); check the file and the range"
            )
    return found


def _client(cfg: CollectConfig) -> AgentClient:
    soft, sockets = socket_budget()
    limit = min(cfg.global_aiohttp_connector_limit, sockets)
    per_host = min(cfg.global_aiohttp_connector_limit_per_host, limit)
    in_flight = cfg.auto.max if cfg.is_auto else cfg.parallelism_limit
    if limit < cfg.global_aiohttp_connector_limit and (in_flight is None or in_flight > limit):
        log.info("Open-file limit %d: at most %d connections at once (global_aiohttp_connector_limit=%d lowered)",
                 soft, limit, cfg.global_aiohttp_connector_limit)
    return AgentClient(
        connector_limit=limit,
        connector_limit_per_host=per_host,
        connect_timeout_s=cfg.connect_timeout_s,
        request_timeout_s=cfg.request_timeout_s,
        headers=cfg.headers,
        secrets=url_secrets([cfg.agent_url, cfg.head_server_url, *cfg.agents.values()]),
    )


async def _start_sim_agent(stack: AsyncExitStack, cfg: CollectConfig, found: ScanResult) -> str:
    from gym_collect.sim_agent import SimAgent, SimAgentConfig

    names = {t for key in found.route_keys for t in key.targets if t} | {s for k in found.route_keys
                                                                         if k.task_source for s in [k.task_source]}
    sim_config = SimAgentConfig(capacity=cfg.sim.capacity, service_time_s=cfg.sim.service_time_s,
                                service_sigma=cfg.sim.service_sigma, mode=cfg.sim.mode)
    sim = await stack.enter_async_context(SimAgent(sim_config, agent_names=sorted(names)))
    log.info("Started the simulated agent at %s (capacity %d, %.3f s service time) for %s", sim.url,
             cfg.sim.capacity, cfg.sim.service_time_s, ", ".join(sorted(names)))
    return sim.url


async def _dry_run(cfg: CollectConfig, paths: OutputPaths, input_path: Path, selection: RowSelection,
                   builder: RequestBuilder, shutdown: Shutdown) -> RunResult:
    """Check everything a run would check and print the plan; send no request, write no file."""
    check_output_paths(paths, [input_path])
    check_output_folder(paths)
    found = await _scan(input_path, selection, builder, cfg, shutdown)
    assert found.snapshot is not None
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(_client(cfg))
        routes, by_agent = await _routes(cfg, stack, client, builder, found)
        expected, per_row = _expected(cfg, builder, found)
        lines = [
            "Dry run: nothing is sent and nothing is written.",
            f"Input {input_path}: rows [{selection.start_idx}, {selection.start_idx + found.num_rows}) of "
            f"{found.snapshot.total_rows}: {expected} rollouts"
            + (f" ({found.bad_rows} bad rows become failures)" if found.bad_rows else ""),
        ]
        refused = False  # the real run would not start
        for name, count in sorted(by_agent.items()):
            route = routes[name]
            reach = "the simulated agent"
            if not cfg.sim.enabled:
                try:
                    await client.probe(route.url, attempts=1)
                    reach = "reachable"
                except GymCollectError:
                    reach, refused = "NOT reachable", True
            via = f" via environment server {route.environment_server}" if route.environment_server else ""
            label = "rows without agent_ref" if name == UNNAMED_AGENT else f"agent {name}"
            lines.append(f"  {label}: {count} rollouts -> POST {display_url(route.url)}/run{via} ({reach})")
    done = _done_set(found, per_row)
    existing = [p for p in (paths.output, paths.failures) if p.exists() and p.stat().st_size > 0]
    lines.append(f"Output {paths.output} (side files {paths.output.stem}_*.json[l] beside it)")
    if existing and cfg.resume:
        try:
            marked, gated = _resume_plan(cfg, paths, input_path, found, builder, selection.start_idx, done)
            lines.append(f"Resume: {marked} rollouts already written would be skipped, {gated} that failed before "
                         f"would not be retried, {expected - marked - gated} would be collected")
        except GymCollectError as exc:
            refused, lines = True, [*lines, f"Resume would be refused: {exc}"]
    elif existing and not cfg.overwrite:
        refused = True
        lines.append(f"{existing[0]} exists and is not empty: the run would be refused without resume=true "
                     "or overwrite=true")
    elif existing:
        lines.append("overwrite=true: the existing output and its side files would be removed first")
    if refused:
        lines.append("The run would not start (exit code 2): see above")
    print("\n".join(lines), flush=True)
    return RunResult(EXIT_ERROR if refused else EXIT_OK, None, paths.output)


def _resume_plan(cfg: CollectConfig, paths: OutputPaths, input_path: Path, found: ScanResult,
                 builder: RequestBuilder, start: int, done: DoneSet) -> tuple[int, int]:
    """For a dry run: what resuming would find, reading only (rollouts already written, rollouts whose earlier
    failures it would leave), after the checks a resume makes; raises what the run would raise."""
    outputs = RunOutputs(paths, reads=[input_path])  # not entered: no lock, nothing written
    recorded = outputs.recorded_definition()
    check_resumable(recorded, _definition(cfg, found, start), paths.manifest,
                    materialized=paths.materialized_inputs.exists())
    materialized = outputs.materialized_records()
    if recorded is None and materialized is not None:
        rows = JsonlRows(input_path, RowSelection(start, start + found.num_rows), include_prefix=True)
        never = lambda task, rollout: False  # noqa: E731
        requests = iter_requests(rows, builder, never, 0, found.indexer, interleave=cfg.interleave_repeats,
                                 materialize=True)
        bodies = (r.body for r in requests if r.error is None)
        check_materialized(materialized, bodies, paths.materialized_inputs)
    marked = count_done(paths, done)
    attempts = PriorAttempts(max_rollout_attempts(), retry_terminal_timeouts=cfg.retry_terminal_timeouts,
                             retry_terminal=not cfg.keep_permanent_failures)
    for pair, record in outputs.failure_records():
        attempts.add(pair, record)
    return marked, _gated_not_done(attempts, done)


def _exit_code(cfg: CollectConfig, metrics: RunMetrics, in_output: int, expected: int,
               input_change: str | None) -> int:
    """The exit code (module docstring). NeMo Gym 0.7's own rule applies when its keys ask for it: with
    `route_failures_to_sidecar=true` or `require_complete=false`, a finished run that wrote at least one
    rollout exits 0 however many are missing (`rollout_collection.py:1069-1084, 2831-2839`)."""
    if input_change is not None:
        return EXIT_ERROR
    if in_output == expected:
        return EXIT_OK
    reason = metrics.stopped_reason
    if reason is not None and not reason.startswith(DISPATCH_BUDGET):
        stopped = reason.startswith(("failure budget", FAILURE_STOPS_RUN))
        return EXIT_STOPPED if stopped else EXIT_INTERRUPTED
    lenient = cfg.require_complete is False or (cfg.route_failures_to_sidecar and cfg.require_complete is None)
    if lenient and in_output > 0:
        return EXIT_OK
    return EXIT_STOPPED if reason is not None else EXIT_FAILURES


def _explain(code: int, paths: OutputPaths, input_path: Path, missing: int, metrics: RunMetrics,
             change: str | None, gated: tuple[int, int]) -> None:
    """One line saying why the exit code is not 0, and what to do. `gated`: (rollouts whose earlier failures
    resume does not retry, the attempts allowed across runs)."""
    if change is not None:
        log.error("%s changed during the run (%s): the rollouts written are of the rows as they were at start; "
                  "restore the input and rerun with resume=true, or start over with overwrite=true", input_path, change)
    elif code == EXIT_FAILURES:
        parts = [f"{metrics.failed} failed (see {paths.failures})" if metrics.failed else "",
                 f"{metrics.not_persisted} answered _ng_no_persist" if metrics.not_persisted else ""]
        reasons = ", ".join(p for p in parts if p)
        held, max_attempts = gated
        for_good = (f"failed in earlier runs for good (terminal, or {max_attempts} attempts): resume=true leaves "
                    "them; keep_permanent_failures=false retries terminal ones, a larger "
                    "NEMO_GYM_MAX_ROLLOUT_ATTEMPTS the others, and a bad input row needs fixing first")
        if not reasons:
            log.error("%d selected rollouts are not in %s: they %s", missing, paths.output, for_good)
            return
        more = f"; {held} more {for_good}" if held else ""
        log.error("%d selected rollouts are not in %s: %s; rerun with resume=true to retry them (terminal failures "
                  "only with keep_permanent_failures=false)%s", missing, paths.output, reasons, more)
    elif code in (EXIT_STOPPED, EXIT_INTERRUPTED):
        log.error("Stopped (%s) with %d selected rollouts not in %s; rerun with resume=true to finish",
                  metrics.stopped_reason, missing, paths.output)

