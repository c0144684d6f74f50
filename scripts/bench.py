"""Benchmark of `collect_rollouts` ("Fast at any scale"): five figures, each a ratio measured in one run so
machine noise cancels, printed as a table with its target and PASS/MISS.

The simulated agent (`python -m gym_collect.sim_agent`) runs in its own process on 127.0.0.1 and
`collect_rollouts` runs as a real subprocess (`python -m gym_collect ... progress=false`), exactly as a user
runs it. CPU and peak RSS are the collector process's own (`os.wait4` rusage; psutil samples while it runs).
The collector and the bare baseline both run on asyncio's default loop (collect_rollouts always does); the
simulated agent, a model of the backend, runs on uvloop when it is installed.

Figures:
  1. capacity ratio: rollouts/s achieved / backend capacity (capacity / service time), for capacity 64 at
     100 ms with num_samples_in_parallel=64 (640/s) and capacity 256 at 200 ms with 256 (1280/s), real
     NeMo Gym rows (ns_tools__compmath_test.jsonl replicated), ~12 s each. The rate is the metrics file's
     succeeded / wall_time_s (from the end of the input scan to the output closed: interpreter, Hydra and
     the scan excluded); the end-to-end rate (process spawn to exit) is shown too, and, as a reference for
     what the harness allows, the bare baseline's rate in the same set-up (a fresh sim with the same
     capacity and service time; first request to output closed). 1c (informational) is the collector's
     rate over that same span (the metrics file's active_rollouts_per_s) / the baseline's. Target >= 0.97.
  2. overhead ratio: CPU seconds per rollout of the collector / of `scripts/baseline_collector.py` (a bare
     aiohttp + orjson loop under a semaphore), service time 0, ~1.5 KB answers, parallelism 64, small
     synthetic rows, both on asyncio's default loop. Whole-process CPU, start-up included, medians of 3
     interleaved pairs (1 with --quick), the collector with `disable_aggregation=true` (the baseline's job);
     the steady-state ratio (CPU while the output grows) and the CPU aggregation adds (a third run per pair,
     aggregation on, as by default) are in the notes. Target <= 1.5.
  3. memory ratio: peak RSS at 1,000,000 rows / at 10,000 rows (parallelism 64, service time 0, small
     synthetic rows, kernel high-water mark). Targets: ratio <= 1.2 and < 150 MB at 1M rows. 3c: the same at
     1M rows of which one line in 100 repeats an earlier one (NeMo Gym's shared task indices), ratio <= 1.2.
  4. start-up: seconds from spawning `collect_rollouts` (256 real rows) to the first `POST /run` reaching a
     tiny aiohttp server inside this script (wall clock at spawn vs at the request; median of 3).
     Target < 1.0 s.
  5. order cost: rollouts/s with output_order=input / with output_order=completion, lognormal service times
     (median 50 ms, sigma 1; the same time per row in both runs), capacity 64, parallelism 64.
     Target >= 0.95.
Main job (folded in): rollouts/s at capacity 64 / 100 ms / parallelism 64 against the backend's 640/s
(from figure 1), and peak RSS at 10,000 and 200,000 rows (ratio <= 1.2).

Command line (the full run takes ~5-6 minutes on 2 cores; --quick scales every size down, < 60 s):
    python scripts/bench.py [--quick] [--json PATH] [--only capacity,overhead,memory,startup,order]
                            [--workdir DIR]
Exit code 0 when every run completed (PASS or MISS alike), 1 when a run failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from _benchlib import (
    ChildRun,
    SimServer,
    baseline_cmd,
    collector_cmd,
    count_lines,
    machine,
    read_metrics,
    run_child,
    write_real_rows,
    write_small_rows,
)
from aiohttp import web

GROUPS = ("capacity", "overhead", "memory", "startup", "order")
PARALLELISM = 64
DUPLICATE_EVERY = 100  # memory 3c: one line in 100 repeats an earlier one
ANSWER_PAD_BYTES = 700  # sim answers to the small rows are ~850 bytes without padding: ~1.5 KB with it


@dataclass(frozen=True)
class Plan:
    """Sizes of one benchmark run."""

    capacity_batches: tuple[int, int]  # rows = capacity x batches, for capacity 64 and 256
    overhead_rows: int
    overhead_repeats: int  # interleaved baseline/collector pairs; the medians are compared
    memory_rows: tuple[int, int, int]  # small (base), main-job, large
    startup_repeats: int
    order_rows: int


FULL = Plan((125, 60), 20_000, 3, (10_000, 200_000, 1_000_000), 3, 8_000)
QUICK = Plan((16, 8), 3_000, 1, (2_000, 10_000, 20_000), 1, 1_500)


@dataclass
class Figure:
    """One line of the table: a measured value against its target."""

    key: str
    label: str
    value: float
    unit: str
    target: str
    passed: bool | None  # None: informational, no target
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


def check(value: float, target: str) -> bool:
    """`value` against a target written `>= x`, `<= x`, `< x` or `> x`."""
    op, bound = target.split()
    ops: dict[str, Callable[[float, float], bool]] = {
        ">=": float.__ge__, "<=": float.__le__, "<": float.__lt__, ">": float.__gt__}
    return ops[op](float(value), float(bound))


class Bench:
    """Runs the phases in a work directory and collects their figures."""

    def __init__(self, workdir: Path, plan: Plan) -> None:
        self.dir = workdir
        self.plan = plan
        self.figures: list[Figure] = []

    def collector(self, name: str, input_path: Path, url: str, parallelism: int = PARALLELISM,
                  **extra: Any) -> tuple[ChildRun, dict[str, Any], Path]:
        """One `collect_rollouts` run; returns the child's measurements, its metrics file and output path."""
        output = self.dir / f"{name}.jsonl"
        output.unlink(missing_ok=True)
        run = run_child(collector_cmd(input_path, output, url, parallelism, **extra),
                        cwd=self.dir, log_path=self.dir / f"{name}.log", watch=output)
        if run.exit_code != 0:
            raise RuntimeError(f"collect_rollouts ({name}) exited {run.exit_code}:\n{run.log[-3000:]}")
        return run, read_metrics(output), output

    def baseline(self, name: str, input_path: Path, url: str,
                 parallelism: int = PARALLELISM) -> tuple[ChildRun, dict[str, Any], Path]:
        """One `scripts/baseline_collector.py` run; returns the child's measurements, its summary line
        (`rollouts`, `wall_s`, `active_s`) and its output path."""
        output = self.dir / f"{name}.jsonl"
        output.unlink(missing_ok=True)
        run = run_child(baseline_cmd(input_path, output, url, parallelism), cwd=self.dir,
                        log_path=self.dir / f"{name}.log", watch=output)
        if run.exit_code != 0:
            raise RuntimeError(f"baseline_collector ({name}) exited {run.exit_code}:\n{run.log[-3000:]}")
        summary: dict[str, Any] = orjson.loads(run.log.strip().splitlines()[-1])
        return run, summary, output

    def sim(self, name: str, **flags: Any) -> SimServer:
        return SimServer(self.dir / f"{name}.sim.log", **flags)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        mark = "" if figure.passed is None else ("PASS" if figure.passed else "MISS")
        print(f"  {figure.label}: {figure.value:.3f} {figure.unit} {mark}", flush=True)

    # 1. capacity ------------------------------------------------------------------------------------------
    def capacity(self) -> None:
        versus: dict[int, float] = {}
        for capacity, service_s, batches in ((64, 0.1, self.plan.capacity_batches[0]),
                                             (256, 0.2, self.plan.capacity_batches[1])):
            rows = capacity * batches
            backend = capacity / service_s
            name = f"capacity{capacity}"
            input_path = write_real_rows(self.dir / f"{name}_in.jsonl", rows)
            with self.sim(f"{name}_baseline", capacity=capacity, service_time_s=service_s, service_sigma=0) as sim:
                _, base, _ = self.baseline(f"{name}_baseline", input_path, sim.url, capacity)
            with self.sim(name, capacity=capacity, service_time_s=service_s, service_sigma=0) as sim:
                run, metrics, _ = self.collector(name, input_path, sim.url, capacity)
            succeeded, wall_s = metrics["rollouts"]["succeeded"], metrics["wall_time_s"]
            rate = succeeded / wall_s
            e2e = succeeded / run.wall_s
            active = metrics.get("active_rollouts_per_s")
            active_text = f"first request to output closed {active / backend:.3f}; " if active else ""
            base_rate = base["rollouts"] / base["active_s"]
            versus[capacity] = (active or rate) / base_rate  # both from the first request to the output closed
            lat = metrics["latency_s"]
            label = f"1{'ab'[capacity == 256]} capacity ratio, {capacity} @ {service_s * 1000:.0f} ms, p={capacity}"
            self.add(Figure(
                f"capacity_{capacity}", label, rate / backend, "", ">= 0.97", check(rate / backend, ">= 0.97"),
                [f"{rate:.1f}/s of {backend:.0f}/s: {succeeded} rows in the metrics file's wall_time_s "
                 f"{wall_s:.2f} s (input scan done to output closed; ideal {batches * service_s:.1f} s); "
                 f"{active_text}end-to-end {e2e:.1f}/s = {e2e / backend:.3f} ({run.wall_s:.2f} s spawn to exit); "
                 f"bare baseline {base_rate / backend:.3f} = {base_rate:.1f}/s (first request to output closed, "
                 f"fresh sim with the same capacity and service time, run just before); "
                 f"latency p50 {lat['p50']:.3f} p99 {lat['p99']:.3f} s"],
                {"rows": succeeded, "rollouts_per_s": rate, "backend_per_s": backend, "wall_time_s": wall_s,
                 "active_rollouts_per_s": active, "end_to_end_s": run.wall_s, "end_to_end_per_s": e2e,
                 "end_to_end_ratio": e2e / backend, "baseline_per_s": base_rate, "baseline_ratio": base_rate / backend,
                 "latency_s": lat, "collector_cpu_s": run.cpu_s},
            ))
            if capacity == 64:
                self.add(Figure(
                    "main_job_rate", "main job: rollouts/s vs backend 640/s (64 @ 100 ms, p=64)", rate, "/s",
                    f">= {0.97 * backend:.0f}", check(rate, f">= {0.97 * backend:.0f}"),
                    [f"{rate:.1f} rollouts/s against the backend's {backend:.0f}/s ({rate / backend:.3f}), "
                     f"end-to-end {e2e:.1f}/s; the bare baseline reaches {base_rate:.1f}/s"],
                    {"rollouts_per_s": rate, "backend_per_s": backend, "baseline_per_s": base_rate},
                ))
        self.add(Figure(
            "capacity_vs_baseline", "1c capacity, collector / bare baseline (lower of 1a, 1b)", min(versus.values()),
            "", "", None,
            [", ".join(f"capacity {c}: {v:.3f}" for c, v in versus.items()) + " (informational: collector "
             "rollouts/s / bare baseline rollouts/s, both counted from the first request to the output closed, "
             "each against a fresh sim with the same capacity and service time: the share of what this sim and "
             "machine allow a bare client that the collector reaches)"],
            {"by_capacity": {str(c): v for c, v in versus.items()}},
        ))

    # 2. overhead ------------------------------------------------------------------------------------------
    def overhead(self) -> None:
        rows = self.plan.overhead_rows
        input_path = write_small_rows(self.dir / "overhead_in.jsonl", rows)
        ours: list[ChildRun] = []
        theirs: list[ChildRun] = []
        aggregating: list[ChildRun] = []
        with self.sim("overhead", capacity=PARALLELISM, service_time_s=0, service_sigma=0,
                      response_pad_bytes=ANSWER_PAD_BYTES) as sim:
            for rep in range(self.plan.overhead_repeats):  # interleaved, so drifting load hits both alike
                base, _, base_out = self.baseline(f"overhead_baseline{rep}", input_path, sim.url)
                # the baseline's job: collection (the aggregation after it is measured on its own below)
                run, metrics, output = self.collector(f"overhead_collector{rep}", input_path, sim.url,
                                                      disable_aggregation="true")
                written, base_rows = metrics["rollouts"]["succeeded"], count_lines(base_out)
                if written != rows or base_rows != rows:
                    raise RuntimeError(f"overhead lost rows: collector {written}, baseline {base_rows} of {rows}")
                answer_bytes = output.stat().st_size / rows
                theirs.append(base)
                ours.append(run)
                aggregating.append(self.collector(f"overhead_aggregating{rep}", input_path, sim.url)[0])
        ours_s = statistics.median(r.cpu_s for r in ours) / rows
        aggregation_s = statistics.median(r.cpu_s for r in aggregating) / rows - ours_s
        theirs_s = statistics.median(r.cpu_s for r in theirs) / rows
        ratio = ours_s / theirs_s
        steady_ours = _median([r.steady_cpu_per_row_s(rows) for r in ours])
        steady_theirs = _median([r.steady_cpu_per_row_s(rows) for r in theirs])
        steady = steady_ours / steady_theirs if steady_ours and steady_theirs else None
        steady_text = (f"{steady:.2f} ({steady_ours * 1e6:.0f} vs {steady_theirs * 1e6:.0f} us/rollout)"
                       if steady and steady_ours and steady_theirs else "n/a")
        self.add(Figure(
            "overhead", "2 overhead ratio, CPU/rollout vs bare baseline", ratio, "", "<= 1.5", check(ratio, "<= 1.5"),
            [f"both on asyncio: collector {ours_s * 1e6:.0f} us/rollout, baseline {theirs_s * 1e6:.0f} us/rollout "
             f"(medians of {len(ours)}: {', '.join(f'{r.cpu_s / rows * 1e6:.0f}' for r in ours)} vs "
             f"{', '.join(f'{r.cpu_s / rows * 1e6:.0f}' for r in theirs)}); {rows} rows, {answer_bytes:.0f} B "
             f"answers; wall {statistics.median(r.wall_s for r in ours):.1f} vs "
             f"{statistics.median(r.wall_s for r in theirs):.1f} s; steady-state ratio (start-up and shutdown "
             f"excluded) {steady_text}",
             f"aggregation (default on; the simulated agent answers /aggregate_metrics for {rows} tasks) adds "
             f"{aggregation_s * 1e6:.0f} us/rollout of the collector's CPU, not in the ratio (the baseline does "
             "not aggregate)"],
            {"rows": rows, "answer_bytes": answer_bytes,
             "collector_cpu_s": [r.cpu_s for r in ours], "baseline_cpu_s": [r.cpu_s for r in theirs],
             "collector_wall_s": [r.wall_s for r in ours], "baseline_wall_s": [r.wall_s for r in theirs],
             "collector_cpu_per_rollout_s": ours_s, "baseline_cpu_per_rollout_s": theirs_s,
             "steady_collector_cpu_per_rollout_s": steady_ours, "steady_baseline_cpu_per_rollout_s": steady_theirs,
             "steady_ratio": steady, "aggregation_cpu_per_rollout_s": aggregation_s},
        ))

    # 3. memory --------------------------------------------------------------------------------------------
    def memory(self) -> None:
        peaks: dict[int, ChildRun] = {}
        small, mid, large = self.plan.memory_rows
        # the largest size once more with one line in DUPLICATE_EVERY repeating an earlier one (keyed -large)
        for rows in (*sorted(set(self.plan.memory_rows)), -large):
            input_path = write_small_rows(self.dir / f"memory{rows}_in.jsonl", abs(rows),
                                          repeat_every=DUPLICATE_EVERY if rows < 0 else None)
            with self.sim(f"memory{rows}", capacity=PARALLELISM, service_time_s=0, service_sigma=0) as sim:
                run, metrics, output = self.collector(f"memory{rows}", input_path, sim.url)
            if metrics["rollouts"]["succeeded"] != abs(rows):
                raise RuntimeError(f"memory run wrote {metrics['rollouts']['succeeded']} of {abs(rows)} rows")
            peaks[rows] = run
            print(f"  memory at {abs(rows)} rows{' with duplicate lines' if rows < 0 else ''}: peak "
                  f"{run.peak_rss_mb:.1f} MB (polled {run.polled_peak_rss_mb:.1f}), {abs(rows) / run.wall_s:.0f} "
                  f"rows/s, {run.wall_s:.1f} s", flush=True)
            output.unlink()
            input_path.unlink()
        per_size = {(str(rows) if rows > 0 else f"{-rows} with duplicate lines"): {
            "peak_rss_mb": r.peak_rss_mb, "polled_peak_rss_mb": r.polled_peak_rss_mb, "wall_s": r.wall_s,
            "cpu_s": r.cpu_s, "first_output_s": r.first_output_s()} for rows, r in peaks.items()}
        for key, label, big in (("memory", "3 memory ratio, peak RSS", large),
                                ("main_job_memory", "main job: memory ratio, peak RSS", mid)):
            ratio = peaks[big].peak_rss_mb / peaks[small].peak_rss_mb
            first = peaks[big].first_output_s()
            self.add(Figure(
                key, f"{label} {big // 1000}k / {small // 1000}k rows", ratio, "", "<= 1.2", check(ratio, "<= 1.2"),
                [f"{peaks[small].peak_rss_mb:.1f} MB at {small} rows, {peaks[big].peak_rss_mb:.1f} MB at {big} rows; "
                 f"first output {first if first is None else round(first, 2)} s after spawn at {big} rows"],
                {"sizes": per_size},
            ))
        ratio = peaks[-large].peak_rss_mb / peaks[small].peak_rss_mb
        self.add(Figure(
            "memory_duplicates", f"3c memory ratio with duplicate lines, peak RSS {large // 1000}k / {small // 1000}k",
            ratio, "", "<= 1.2", check(ratio, "<= 1.2"),
            [f"{peaks[-large].peak_rss_mb:.1f} MB at {large} rows, one line in {DUPLICATE_EVERY} a copy of an "
             f"earlier one ({large // DUPLICATE_EVERY} duplicated lines, each task index's rollouts counted)"],
            {"rows": large, "duplicate_every": DUPLICATE_EVERY, "peak_rss_mb": peaks[-large].peak_rss_mb},
        ))
        abs_mb = peaks[large].peak_rss_mb
        self.add(Figure(
            "memory_abs", f"3b peak RSS at {large // 1000}k rows", abs_mb, "MB", "< 150", check(abs_mb, "< 150"),
            [f"{abs_mb:.1f} MB ({large} rows at {large / peaks[large].wall_s:.0f} rows/s, "
             f"{peaks[large].wall_s:.0f} s)"], {"rows": large, "peak_rss_mb": abs_mb},
        ))

    # 4. start-up ------------------------------------------------------------------------------------------
    def startup(self) -> None:
        input_path = write_real_rows(self.dir / "startup_in.jsonl", 256)
        times: list[float] = []
        with FirstRequestServer() as server:
            for i in range(self.plan.startup_repeats):
                server.first_at = None
                run, _, _ = self.collector(f"startup{i}", input_path, server.url)
                if server.first_at is None:
                    raise RuntimeError("start-up run sent no request")
                times.append(server.first_at - run.spawned_at)
        value = statistics.median(times)
        self.add(Figure(
            "startup", "4 start-up, spawn to first request", value, "s", "< 1.0", check(value, "< 1.0"),
            [f"runs: {', '.join(f'{t:.3f}' for t in times)} s (median shown), 256 real rows"], {"runs_s": times},
        ))

    # 5. order cost ----------------------------------------------------------------------------------------
    def order(self) -> None:
        rows = self.plan.order_rows
        input_path = write_real_rows(self.dir / "order_in.jsonl", rows)
        rates: dict[str, float] = {}
        for order in ("completion", "input"):
            with self.sim(f"order_{order}", capacity=PARALLELISM, service_time_s=0.05, service_sigma=1.0,
                          seed=7) as sim:
                _, metrics, _ = self.collector(f"order_{order}", input_path, sim.url, output_order=order)
            rates[order] = metrics["rollouts"]["succeeded"] / metrics["wall_time_s"]
        ratio = rates["input"] / rates["completion"]
        self.add(Figure(
            "order", "5 order cost, input / completion rollouts/s", ratio, "", ">= 0.95", check(ratio, ">= 0.95"),
            [f"input {rates['input']:.1f}/s, completion {rates['completion']:.1f}/s ({rows} rows, lognormal "
             f"median 50 ms sigma 1: mean 82 ms, backend ~{PARALLELISM / 0.0824:.0f}/s)"], {"rollouts_per_s": rates},
        ))


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


class FirstRequestServer:
    """A tiny aiohttp server in a thread: echoes `POST /run` bodies and records `first_at`, the wall-clock
    time (`time.time()`) of the first request since `first_at` was last set to None."""

    def __init__(self) -> None:
        self.first_at: float | None = None
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> FirstRequestServer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("first-request server did not start")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/run", self._run)
        runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())
        handlers = asyncio.all_tasks(self._loop)  # keep-alive handlers of connections the clients left open
        for task in handlers:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*handlers, return_exceptions=True))
        self._loop.close()

    async def _run(self, request: web.Request) -> web.Response:
        if self.first_at is None:
            self.first_at = time.time()
        return web.Response(body=await request.read(), content_type="application/json")


def render(figures: list[Figure], info: dict[str, Any], mode: str, duration_s: float) -> str:
    """The printed report: machine line, table (figure, measured, target, result), then notes."""
    loops = ("collector and baseline on asyncio; sim agent on uvloop" if info["uvloop"]
             else "collector, baseline and sim agent on asyncio")
    lines = [
        f"gym_collect benchmark ({mode}, {duration_s:.0f} s)",
        f"machine: {info['cpu_model']}, {info['cores']} cores, {info['memory_gib']} GiB, Python {info['python']} "
        f"({loops}), "
        f"load average {info['load_average_1m']} at start, {info['load_average_end_1m']} at end; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        f"inputs: real NeMo Gym rows ({Path(info['real_rows']).name}, replicated) for figures 1, 4 and 5; small "
        "synthetic rows for 2 and 3; parallelism 64 unless noted",
        "",
    ]
    rows = [("figure", "measured", "target", "result")]
    for f in figures:
        value = f"{f.value:.3f}" if f.unit in ("", "s") else f"{f.value:.1f}"
        unit = f" {f.unit}" if f.unit else ""
        target = f.target + unit if f.target else "-"
        result = "-" if f.passed is None else ("PASS" if f.passed else "MISS")
        rows.append((f.label, value + unit, target, result))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    if mode == "quick":
        lines += ["", "quick mode: every size is scaled down, so start-up and ramp effects weigh more; the figures are "
                  "indicative only (the targets apply to the full run)"]
    lines += ["", "notes:"]
    for f in figures:
        lines += [f"  {f.label}: {note}" for note in f.notes]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="scale every size down (CI, < 60 s)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument("--only", default=",".join(GROUPS), help=f"comma list of {', '.join(GROUPS)}")
    parser.add_argument("--workdir", type=Path, help="keep inputs, outputs and logs here (default: a temp dir)")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # clean up children on kill
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    if unknown := sorted(set(groups) - set(GROUPS)):
        parser.error(f"--only: unknown {unknown}; choose from {', '.join(GROUPS)}")
    plan = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    info = machine()
    started, started_at = time.monotonic(), datetime.now(UTC).isoformat(timespec="seconds")
    with tempfile.TemporaryDirectory(prefix="gym_collect_bench_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        bench = Bench(workdir, plan)
        print(f"running {', '.join(groups)} ({mode}) in {workdir}", flush=True)
        try:
            for group in groups:
                getattr(bench, group)()
        except (RuntimeError, TimeoutError, OSError) as exc:
            print(f"bench failed in a run: {exc}", file=sys.stderr)
            return 1
    duration_s = time.monotonic() - started
    info["load_average_end_1m"] = round(os.getloadavg()[0], 2)
    print()
    print(render(bench.figures, info, mode, duration_s))
    if args.json:
        doc = {"started_at": started_at, "mode": mode, "duration_s": duration_s, "command": sys.argv,
               "machine": info, "plan": asdict(plan), "figures": [asdict(f) for f in bench.figures]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
        print(f"\nresults written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
