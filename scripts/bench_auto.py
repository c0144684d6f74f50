"""Benchmark of `num_samples_in_parallel=auto` against the best fixed level, on three simulated backends.

Each scenario runs the collector in this process against the simulated agent on 127.0.0.1 and prints ratios
measured in this one run:

- gpu: a GPU-like backend (capacity C=32, 100 ms service, service time stretched past C, no rejections).
  auto rollouts/s / best fixed level's (of C/2, C, 2C), and auto p99 / unloaded p99 (fixed at C/4).
  Targets: >= 0.90 and <= 2.0.
- rate_limited: a cloud API answering 429 (Retry-After 1 s) past C=32. auto rollouts/s / best fixed, and
  the share of requests answered 429. Targets: >= 0.90 and < 1%.
- halving: a GPU-like backend whose capacity halves from 64 to 32 at t=30 s (8 s with --quick). auto
  rollouts/s / best fixed (of 32 and 64), and seconds until the limit is within 1.6x of the new capacity.
  Targets: >= 0.90, <= 30 s.

    python scripts/bench_auto.py            # about 8 minutes
    python scripts/bench_auto.py --quick    # about 1 minute, rougher figures
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gym_collect.collect import collect
from gym_collect.config import AutoConfig, CollectConfig
from gym_collect.sim_agent import SimAgent, SimAgentConfig

SCENARIOS = ("gpu", "rate_limited", "halving")


@dataclass
class Run:
    label: str
    rollouts_per_s: float
    p99_s: float
    share_429: float
    limit_history: list[tuple[float, int]]
    sim_started_offset_s: float


async def run_once(work: Path, label: str, sim_cfg: SimAgentConfig, parallel: int | str, rows: int) -> Run:
    """One collection of `rows` rows at `parallel` against a fresh simulated agent."""
    inp = work / f"{label}.in.jsonl"
    inp.write_bytes(b"".join(orjson.dumps({"responses_create_params": {"input": f"q{i}"}}) + b"\n"
                             for i in range(rows)))
    async with SimAgent(sim_cfg) as sim:
        sim_started = time.monotonic()
        cfg = CollectConfig(input_jsonl_fpath=str(inp), output_jsonl_fpath=str(work / f"{label}.jsonl"),
                            agent_name="sim_agent", agent_url=sim.url, num_samples_in_parallel=parallel,
                            auto=AutoConfig(initial=16, min=1, max=1024), progress=False, overwrite=True,
                            max_attempts=20, backoff_initial_s=0.05, backoff_max_s=1.0)
        collector_started = time.monotonic()
        result = await collect(cfg)
        requests = max(1, sim.stats.requests)
        share_429 = sim.stats.statuses[429] / requests
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


async def bench(quick: bool, scenarios: set[str]) -> list[tuple[str, float | None, str, bool]]:
    seconds = 8 if quick else 30
    work = Path(tempfile.mkdtemp(prefix="gym_collect_bench_auto_"))
    figures: list[tuple[str, float | None, str, bool]] = []

    rows = int(320 * seconds)
    if "gpu" in scenarios:
        figures += await bench_gpu(work, rows, seconds)
    if "rate_limited" in scenarios:
        figures += await bench_rate_limited(work, rows)
    if "halving" in scenarios:
        figures += await bench_halving(work, seconds)
    return figures


async def bench_gpu(work: Path, rows: int, seconds: float) -> list[tuple[str, float | None, str, bool]]:
    figures: list[tuple[str, float | None, str, bool]] = []
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


async def bench_rate_limited(work: Path, rows: int) -> list[tuple[str, float | None, str, bool]]:
    figures: list[tuple[str, float | None, str, bool]] = []
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


async def bench_halving(work: Path, seconds: float) -> list[tuple[str, float | None, str, bool]]:
    figures: list[tuple[str, float | None, str, bool]] = []
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (rougher figures)")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--scenario", action="append", choices=SCENARIOS, help="run only these (repeatable)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    figures = asyncio.run(bench(args.quick, set(args.scenario or SCENARIOS)))
    print(f"{'figure':<58} {'value':>8}  {'target':<8} result")
    for name, value, target, ok in figures:
        shown = "n/a" if value is None else f"{value:.3f}"
        print(f"{name:<58} {shown:>8}  {target:<8} {'PASS' if ok else 'MISS'}")
    if args.json:
        args.json.write_bytes(orjson.dumps([{"figure": n, "value": v, "target": t, "pass": ok}
                                            for n, v, t, ok in figures], option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
