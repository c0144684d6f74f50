"""Benchmark of `num_samples_in_parallel=auto` against the best fixed level of a doubling sweep run in the
same benchmark, printing ratios measured in this one run.

Simulated time (`gym_collect.concurrency.sim`, the same `InFlightLimits`/`AdaptiveLimit`/`Backlog` the
runner uses; seconds of compute, hours of simulated time):

1. long: heavy-tailed task-determined rollouts (median 60 s, lognormal sigma 1.2, usage reported), a
   GPU-like backend of capacity 256, two hours: auto / best fixed rollouts/s (>= 0.95), and minutes until
   the trailing two-median throughput first reaches 90% of the best fixed level's (<= 10 medians).
2. degrading: capacity 32, 100 ms, throughput falls past capacity (degrade 0.5): ratio (>= 0.95) and p99 /
   unloaded p99 (<= 1.5).
3. rate_limited: 429 with Retry-After 1 s past 32: ratio (>= 0.95), share of requests answered 429 (< 1%).
4. two_backends: capacities 16 and 128 (degrading), rows interleaved 1 : 1: total / best pair of fixed
   per-backend limits (>= 0.95), total / best single shared fixed limit (>= 1.3; (16 + 128) / (2 * 16) =
   4.5 at most: with one shared limit the rows wait behind the small backend's); and, for reference,
   rows 1 : 8 (the capacities' own ratio, where one shared limit loses little).
5. halving: capacity 64 -> 32 (degrading): ratio (>= 0.95), round trips until the limit is within 1.5x
   of the new capacity (<= 10).

Real time, the collector against the simulated agent on 127.0.0.1 (`--realtime`), each simulated agent in its
own process as a real backend is (so the collector's event loop measures the backend, not its own load):
scenarios 2-4 at 100 ms,
and 6, the earlier short scenarios (gpu, rate_limited, halving; targets >= 0.90). Scenario 4's runs end at
a dispatch budget while both backends still have rows, and compare rollouts/s from the first request.

    python scripts/bench_auto.py                 # simulated scenarios 1-5, about 80 s
    python scripts/bench_auto.py --realtime      # and the real-time runs, about 20 minutes (--quick: shorter)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from _benchlib import SimServer

from gym_collect.collect import collect
from gym_collect.concurrency.limiter import AdaptiveLimit, AdaptiveLimitConfig
from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.concurrency.sim import SimBackend, SimResult, simulate
from gym_collect.config import AutoConfig, CollectConfig
from gym_collect.sim_agent import SimAgentConfig

Figure = tuple[str, float | None, str, bool]
SIM_SCENARIOS = ("long", "degrading", "rate_limited", "two_backends", "halving")


@dataclass
class Run:
    label: str
    rollouts_per_s: float
    p99_s: float
    share_429: float
    limit_history: list[tuple[float, int]]
    sim_started_offset_s: float


def sim_process(work: Path, label: str, config: SimAgentConfig, agent_names: Sequence[str] = ("sim_agent",),
                ) -> SimServer:
    """The simulated agent with `config` in its own process (as a real backend is): the collector's event loop
    then carries the collector alone, so the latency it measures is the backend's, not its own queueing."""
    defaults = SimAgentConfig()
    flags = {f.name: getattr(config, f.name) for f in dataclasses.fields(SimAgentConfig)
             if getattr(config, f.name) != getattr(defaults, f.name)}
    return SimServer(work / f"{label}.sim.log", agent_names=agent_names, **flags)


async def sim_stats(url: str) -> dict[str, Any]:
    """A simulated agent's traffic counters (`GET /stats`)."""
    async with aiohttp.ClientSession() as session, session.get(url + "/stats") as resp:
        stats: dict[str, Any] = await resp.json()
    return stats


async def run_once(work: Path, label: str, sim_cfg: SimAgentConfig, parallel: int | str, rows: int) -> Run:
    """One collection of `rows` rows at `parallel` against a fresh simulated agent in its own process."""
    inp = work / f"{label}.in.jsonl"
    inp.write_bytes(b"".join(orjson.dumps({"responses_create_params": {"input": f"q{i}"}}) + b"\n"
                             for i in range(rows)))
    with sim_process(work, label, sim_cfg) as sim:
        sim_started = time.monotonic()
        cfg = CollectConfig(input_jsonl_fpath=str(inp), output_jsonl_fpath=str(work / f"{label}.jsonl"),
                            agent_name="sim_agent", agent_url=sim.url, num_samples_in_parallel=parallel,
                            auto=AutoConfig(initial=16, min=1, max=1024), progress=False, overwrite=True,
                            max_attempts=20, backoff_initial_s=0.05, backoff_max_s=1.0)
        collector_started = time.monotonic()
        result = await collect(cfg)
        stats = await sim_stats(sim.url)
        share_429 = stats["statuses"].get("429", 0) / max(1, stats["requests"])
    metrics: dict[str, Any] = result.metrics or {}
    history = [(float(t), int(limit)) for t, limit in metrics.get("limit_history", [])]
    return Run(label, metrics["rollouts_per_s"], metrics["latency_s"]["p99"], share_429, history,
               collector_started - sim_started)


def follow_time_s(run: Run, halve_at_s: float, new_capacity: int) -> float | None:
    """Seconds after the halving until the limit first sits within 1.6x of the new capacity."""
    halve_at = halve_at_s - run.sim_started_offset_s
    for t, limit in run.limit_history:
        if t >= halve_at and limit <= 1.6 * new_capacity:
            return t - halve_at
    last = [limit for t, limit in run.limit_history if t < halve_at]
    if last and last[-1] <= 1.6 * new_capacity:
        return 0.0
    return None


async def bench_gpu(work: Path, rows: int, seconds: float) -> list[Figure]:
    figures: list[Figure] = []
    gpu = SimAgentConfig(capacity=32, service_time_s=0.1, service_sigma=0.2, mode="gpu", seed=1)
    fixed = [await run_once(work, f"gpu-p{p}", gpu, p, rows) for p in (16, 32, 64)]
    unloaded = await run_once(work, "gpu-p8", gpu, 8, int(80 * seconds / 2))
    auto = await run_once(work, "gpu-auto", gpu, "auto", rows)
    best = max(fixed, key=lambda r: r.rollouts_per_s)
    ratio = auto.rollouts_per_s / best.rollouts_per_s
    figures.append((f"gpu: auto / best fixed ({best.label}) rollouts/s", ratio, ">= 0.90", ratio >= 0.90))
    p99 = auto.p99_s / unloaded.p99_s
    figures.append(("gpu: auto p99 / unloaded p99", p99, "<= 2.0", p99 <= 2.0))
    return figures


async def bench_rate_limited(work: Path, rows: int) -> list[Figure]:
    figures: list[Figure] = []
    limited = SimAgentConfig(capacity=32, service_time_s=0.1, service_sigma=0.2, mode="rate_limited",
                             rate_limit_retry_after_s=1.0, seed=2)
    fixed = [await run_once(work, f"rl-p{p}", limited, p, rows) for p in (16, 32)]
    auto = await run_once(work, "rl-auto", limited, "auto", rows)
    best = max(fixed, key=lambda r: r.rollouts_per_s)
    ratio = auto.rollouts_per_s / best.rollouts_per_s
    figures.append((f"rate_limited: auto / best fixed ({best.label}) rollouts/s", ratio, ">= 0.90", ratio >= 0.90))
    figures.append(("rate_limited: share of requests answered 429 (%)", 100 * auto.share_429, "< 1",
                    auto.share_429 < 0.01))
    return figures


async def bench_halving(work: Path, seconds: float) -> list[Figure]:
    figures: list[Figure] = []
    halve_at = float(seconds)
    halving = SimAgentConfig(capacity=64, service_time_s=0.1, service_sigma=0.2, mode="gpu",
                             capacity_halve_at_s=halve_at, seed=3)
    rows = int(640 * halve_at + 320 * seconds * 2)
    fixed = [await run_once(work, f"half-p{p}", halving, p, rows) for p in (32, 64)]
    auto = await run_once(work, "half-auto", halving, "auto", rows)
    best = max(fixed, key=lambda r: r.rollouts_per_s)
    ratio = auto.rollouts_per_s / best.rollouts_per_s
    figures.append((f"halving: auto / best fixed ({best.label}) rollouts/s", ratio, ">= 0.90", ratio >= 0.90))
    follow = follow_time_s(auto, halve_at, 32)
    figures.append(("halving: seconds for the limit to follow", follow, "<= 30",
                    follow is not None and follow <= 30))
    return figures



# ------------------------------------------------------------------------------------ simulated time


def _auto() -> AdaptiveLimit:
    return AdaptiveLimit(AdaptiveLimitConfig(initial=16, min=1, max=1024))


def sim_run(backends: dict[str, SimBackend], levels: dict[str, AdaptiveLimit | int | None], seconds: float,
            shared: int | None = None, pattern: list[str] | None = None, retry_wait_s: float = 0.0) -> SimResult:
    """One simulated run: `levels` per backend key (each agent is its own backend)."""
    limits = InFlightLimits({key: key for key in backends}, levels, shared)
    return simulate(backends, limits, seconds, pattern=pattern, retry_wait_s=retry_wait_s)


def sim_long() -> list[Figure]:
    # Throughput is work completed per second (tokens/s): with heavy tails, rollouts/s rewards a level that
    # hoards long rollouts unfinished at the end. Rollouts/s is printed too, for reference. The ramp is read
    # on the work the backend serves (finished or not): completed work arrives in lumps of heavy tails.
    median_s, seconds = 60.0, 7200.0
    backend = {"gpu": SimBackend(256, median_s, model="shared", task_sigma=1.2, report_usage=True, seed=11)}
    fixed = {p: sim_run(backend, {"gpu": p}, seconds) for p in (64, 128, 256, 512, 1024)}
    best_p = max(fixed, key=lambda p: fixed[p].work_per_s(0.0, seconds))
    best = fixed[best_p].work_per_s(0.0, seconds)
    best_n = max(fixed, key=lambda p: fixed[p].throughput_per_s(0.0, seconds))
    auto = sim_run(backend, {"gpu": _auto()}, seconds)
    ratio = auto.work_per_s(0.0, seconds) / best
    ratio_n = auto.throughput_per_s(0.0, seconds) / fixed[best_n].throughput_per_s(0.0, seconds)
    window_s = 2 * median_s
    served = fixed[best_p].served_per_s(seconds / 2, seconds)
    reach = next((t for t in range(int(window_s), int(seconds), 10)
                  if auto.served_per_s(t - window_s, t) >= 0.9 * served), None)
    reach_medians = None if reach is None else reach / median_s
    return [
        (f"1 long: auto / best fixed ({best_p}) work/s, 2 h", ratio, ">= 0.95", ratio >= 0.95),
        ("1 long: medians until served work/s is 90% of best fixed", reach_medians, "<= 10",
         reach_medians is not None and reach_medians <= 10),
        (f"1 long: (reference) auto / best fixed ({best_n}) rollouts/s", ratio_n, "-", True),
    ]


def sim_degrading() -> list[Figure]:
    seconds = 300.0
    backend = {"gpu": SimBackend(32, 0.1, 0.2, model="shared", degrade=0.5, seed=12)}
    fixed = {p: sim_run(backend, {"gpu": p}, seconds) for p in (8, 16, 32, 64, 128)}
    best_p = max(fixed, key=lambda p: fixed[p].throughput_per_s(0.0, seconds))
    auto = sim_run(backend, {"gpu": _auto()}, seconds)
    ratio = auto.throughput_per_s(0.0, seconds) / fixed[best_p].throughput_per_s(0.0, seconds)
    p99 = auto.latency_quantile_s(0.99, 0.0, seconds) / fixed[8].latency_quantile_s(0.99, 0.0, seconds)
    return [(f"2 degrading: auto / best fixed ({best_p}) rollouts/s", ratio, ">= 0.95", ratio >= 0.95),
            ("2 degrading: auto p99 / unloaded p99 (fixed 8)", p99, "<= 1.5", p99 <= 1.5)]


def sim_rate_limited() -> list[Figure]:
    seconds = 300.0
    backend = {"api": SimBackend(32, 0.1, 0.2, reject_over_capacity=True, seed=13)}
    fixed = {p: sim_run(backend, {"api": p}, seconds, retry_wait_s=1.0) for p in (8, 16, 32, 64)}
    best_p = max(fixed, key=lambda p: fixed[p].throughput_per_s(0.0, seconds))
    auto = sim_run(backend, {"api": _auto()}, seconds, retry_wait_s=1.0)
    ratio = auto.throughput_per_s(0.0, seconds) / fixed[best_p].throughput_per_s(0.0, seconds)
    share = auto.overload_fraction(0.0, seconds)
    return [(f"3 rate_limited: auto / best fixed ({best_p}) rollouts/s", ratio, ">= 0.95", ratio >= 0.95),
            ("3 rate_limited: requests answered 429 (%)", 100 * share, "< 1", share < 0.01)]


def sim_two_backends() -> list[Figure]:
    backends = {"small": SimBackend(16, 0.1, 0.2, model="shared", degrade=0.5, seed=14),
                "big": SimBackend(128, 0.1, 0.2, model="shared", degrade=0.5, seed=15)}
    figures: list[Figure] = []
    # Rows 1:1 (the scenario), then 1:8 for reference: rows in the capacities' own ratio, where one shared
    # limit is not held back by the small backend and per-backend limits can gain little over it.
    for reference, pattern, seconds in ((False, ["small", "big"], 120.0), (True, ["small"] + ["big"] * 8, 60.0)):

        def rate(levels: dict[str, AdaptiveLimit | int | None], shared: int | None = None,
                 pattern: list[str] = pattern, seconds: float = seconds) -> float:
            return sim_run(backends, levels, seconds, shared, pattern).throughput_per_s(0.0, seconds)

        pairs = {(a, b): rate({"small": a, "big": b}) for a in (8, 16, 32) for b in (64, 128, 256)}
        shared = {p: rate({"small": None, "big": None}, p) for p in (16, 32, 64, 128, 256, 512)}
        best_pair = max(pairs, key=lambda k: pairs[k])
        best_shared = max(shared, key=lambda k: shared[k])
        auto = rate({"small": _auto(), "big": _auto()})
        to_pair, to_shared = auto / pairs[best_pair], auto / shared[best_shared]
        if reference:
            figures += [(f"4 (reference) rows 1:8: auto / best fixed pair {best_pair}", to_pair, "-", True),
                        (f"4 (reference) rows 1:8: auto / best shared fixed ({best_shared})", to_shared, "-", True)]
        else:
            figures += [
                (f"4 two backends: auto / best fixed pair {best_pair}", to_pair, ">= 0.95", to_pair >= 0.95),
                (f"4 two backends: auto / best shared fixed ({best_shared})", to_shared, ">= 1.3", to_shared >= 1.3),
            ]
    return figures


def sim_halving() -> list[Figure]:
    seconds, halve_s = 240.0, 120.0
    backend = {"gpu": SimBackend(64, 0.1, 0.2, model="shared", degrade=0.5, capacity_changes=[(halve_s, 32)],
                                 seed=16)}
    fixed = {p: sim_run(backend, {"gpu": p}, seconds) for p in (16, 32, 64, 128)}
    best_p = max(fixed, key=lambda p: fixed[p].throughput_per_s(0.0, seconds))
    auto = sim_run(backend, {"gpu": _auto()}, seconds)
    ratio = auto.throughput_per_s(0.0, seconds) / fixed[best_p].throughput_per_s(0.0, seconds)
    within = next((t for t, v in auto.limits if t >= halve_s and v <= 1.5 * 32), None)
    rtt_s = auto.latency_quantile_s(0.5, halve_s, seconds)
    rtts = None if within is None else (within - halve_s) / rtt_s
    return [(f"5 halving: auto / best fixed ({best_p}) rollouts/s", ratio, ">= 0.95", ratio >= 0.95),
            ("5 halving: round trips until the limit is within 1.5x of 32", rtts, "<= 10",
             rtts is not None and rtts <= 10)]


# ------------------------------------------------------------------------------- real time, new regimes


async def rt_degrading(work: Path, seconds: float) -> list[Figure]:
    cfg = SimAgentConfig(capacity=32, service_time_s=0.1, service_sigma=0.2, mode="gpu", degrade=0.5, seed=4)
    rows = int(320 * seconds)
    fixed = [await run_once(work, f"deg-p{p}", cfg, p, rows) for p in (16, 32, 64)]
    unloaded = await run_once(work, "deg-p8", cfg, 8, int(80 * seconds / 2))
    auto = await run_once(work, "deg-auto", cfg, "auto", rows)
    best = max(fixed, key=lambda r: r.rollouts_per_s)
    ratio = auto.rollouts_per_s / best.rollouts_per_s
    p99 = auto.p99_s / unloaded.p99_s
    return [(f"2 rt degrading: auto / best fixed ({best.label})", ratio, ">= 0.95", ratio >= 0.95),
            ("2 rt degrading: auto p99 / unloaded p99", p99, "<= 1.5", p99 <= 1.5)]


async def rt_two_backends(work: Path, seconds: float) -> list[Figure]:
    # Rows 1:1, more than the big backend serves in `seconds`: the dispatch budget ends each run while both
    # backends still have rows, so the rate is the total throughput while both are busy (to the end of the
    # file, the small backend's half would take 4.5 times as long as the big one's at best).
    rows = int(2 * 1600 * seconds)
    inp = work / "two.in.jsonl"
    inp.write_bytes(b"".join(orjson.dumps({"responses_create_params": {"input": f"q{i}"},
                                           "agent_ref": {"name": ("small", "big")[i % 2]}}) + b"\n"
                             for i in range(rows)))
    small = SimAgentConfig(capacity=16, service_time_s=0.1, service_sigma=0.2, mode="gpu", degrade=0.5, seed=5)
    big = SimAgentConfig(capacity=128, service_time_s=0.1, service_sigma=0.2, mode="gpu", degrade=0.5, seed=6)

    async def one(label: str, parallel: Any) -> float:
        with sim_process(work, f"{label}-small", small, ["small"]) as sim_s, \
                sim_process(work, f"{label}-big", big, ["big"]) as sim_b:
            cfg = CollectConfig(input_jsonl_fpath=str(inp), output_jsonl_fpath=str(work / f"{label}.jsonl"),
                                agents={"small": sim_s.url, "big": sim_b.url}, num_samples_in_parallel=parallel,
                                progress=False, overwrite=True, max_attempts=20, backoff_initial_s=0.05,
                                backoff_max_s=1.0, dispatch_budget_s=seconds, drain_margin_s=0.0)
            result = await collect(cfg)
        rate: float = (result.metrics or {})["active_rollouts_per_s"]
        return rate

    pair = await one("two-pair", {"small": 16, "big": 128})
    shared = {p: await one(f"two-p{p}", p) for p in (16, 32, 64, 128)}
    auto = await one("two-auto", "auto")
    best_shared = max(shared, key=lambda p: shared[p])
    return [("4 rt two backends: auto / fixed pair (16, 128)", auto / pair, ">= 0.95", auto / pair >= 0.95),
            (f"4 rt two backends: auto / best shared fixed ({best_shared})", auto / shared[best_shared], ">= 1.3",
             auto / shared[best_shared] >= 1.3)]


async def realtime(quick: bool, chosen: Sequence[str]) -> list[Figure]:
    """The real-time runs of the `chosen` scenarios (the short GPU-like one when all are chosen)."""
    seconds = 8 if quick else 30
    work = Path(tempfile.mkdtemp(prefix="gym_collect_bench_auto_"))
    rows = int(320 * seconds)
    runs = {"degrading": lambda: rt_degrading(work, seconds), "rate_limited": lambda: bench_rate_limited(work, rows),
            "two_backends": lambda: rt_two_backends(work, seconds), "gpu": lambda: bench_gpu(work, rows, seconds),
            "halving": lambda: bench_halving(work, seconds)}
    figures: list[Figure] = []
    for name, run in runs.items():
        if name in chosen or (name == "gpu" and set(SIM_SCENARIOS) <= set(chosen)):
            figures += await run()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--realtime", action="store_true", help="also the real-time runs against the sim agent")
    parser.add_argument("--quick", action="store_true", help="shorter real-time runs (rougher figures)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--scenario", action="append", choices=SIM_SCENARIOS,
                        help="only these (simulated, and in real time with --realtime)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    chosen = args.scenario or SIM_SCENARIOS
    runs = {"long": sim_long, "degrading": sim_degrading, "rate_limited": sim_rate_limited,
            "two_backends": sim_two_backends, "halving": sim_halving}
    figures = [figure for name in chosen for figure in runs[name]()]
    if args.realtime:
        figures += asyncio.run(realtime(args.quick, chosen))
    print(f"{'figure':<62} {'value':>8}  {'target':<8} result")
    for name, value, target, ok in figures:
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{name:<62} {shown:>8}  {target:<8} {'PASS' if ok else 'MISS'}")
    print(f"({time.monotonic() - started:.0f} s; load average {os.getloadavg()[0]:.2f})")
    if args.json:
        args.json.write_bytes(orjson.dumps([{"figure": n, "value": v, "target": t, "pass": ok}
                                            for n, v, t, ok in figures], option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
