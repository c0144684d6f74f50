"""`tune_parallelism`: find `num_samples_in_parallel` by the doubling sweep people run by hand.

Start at `tune.start`, run a step of rows at each level, double until throughput gains less than
`tune.min_gain`, drops, or errors appear (more than `tune.max_error_rate` of attempts), and recommend
`tune.recommend_fraction` of the knee: the last level that still gained. Each step is an ordinary
collection over the next rows of the input, written to `<stem>_tune/step-NN-pLEVEL.jsonl`, so nothing
collected is thrown away; the recommended command starts after the rows the sweep used.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import itertools
import logging
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gym_collect.cli import COMMAND_ARGS, hydra_command
from gym_collect.collect import collect
from gym_collect.config import CollectConfig
from gym_collect.errors import GymCollectError
from gym_collect.reader import count_rows
from gym_collect.redact import REDACTED
from gym_collect.writer import write_json_atomic

log = logging.getLogger("gym_collect.tune")

MIN_ROWS_PER_PARALLEL_SLOT = 3


@dataclass
class Step:
    """One level of the sweep: rollouts/s from its first request to its end (set-up excluded), latency in
    seconds, errors (retries + failures) per attempt."""

    parallelism: int
    rows: int
    rollouts_per_s: float
    p50_s: float
    p99_s: float
    error_rate: float
    output: str
    knee: bool = False


@dataclass
class TuneReport:
    """The sweep's steps, the knee level, the recommendation and why the sweep stopped."""

    steps: list[Step]
    knee: int
    recommended: int
    stop_reason: str
    next_start_idx: int
    validation: Step | None = None
    input_end: int | None = None  # the row index the input (or end_idx) ends at


def next_level(steps: Sequence[Step], min_gain: float, max_error_rate: float) -> str | None:
    """Why the sweep should stop after `steps`, or None to go on doubling."""
    last = steps[-1]
    if last.error_rate > max_error_rate:
        return f"errors appeared at {last.parallelism} ({last.error_rate:.1%} of attempts)"
    if len(steps) < 2:
        return None
    gain = last.rollouts_per_s / max(steps[-2].rollouts_per_s, 1e-9) - 1
    if gain < 0:
        return f"throughput dropped at {last.parallelism} ({gain:+.1%})"
    if gain < min_gain:
        return f"throughput gained only {gain:+.1%} at {last.parallelism} (min_gain {min_gain:.0%})"
    return None


def choose_knee(steps: Sequence[Step], min_gain: float, max_error_rate: float) -> int:
    """The last level that gained at least `min_gain` over the one before it without errors (else the first)."""
    knee = steps[0].parallelism
    for before, after in itertools.pairwise(steps):
        if after.error_rate > max_error_rate or after.rollouts_per_s < before.rollouts_per_s * (1 + min_gain):
            break
        knee = after.parallelism
    return knee


async def sweep(cfg: CollectConfig) -> TuneReport:
    """Run the doubling sweep (and the optional validation run) described in the module docstring.

    Raises `GymCollectError` from the underlying collections (bad config, input, agents, output).
    """
    _, output = cfg.require_paths()
    folder = output.with_name(output.stem + "_tune")
    tune, steps = cfg.tune, list[Step]()
    level, offset, reason = tune.start, cfg.start_idx, "reached tune.max_level"
    total = count_rows(cfg.require_paths()[0])
    total = total if cfg.end_idx is None else min(total, cfg.end_idx)
    while level <= tune.max_level:
        if offset >= total:
            reason = "the input ran out of rows"
            break
        rows = max(tune.rows_per_step, MIN_ROWS_PER_PARALLEL_SLOT * level)
        step = await _run_step(cfg, folder / f"step-{len(steps) + 1:02d}-p{level}.jsonl", level, offset, rows)
        if step.rows == 0:
            reason = "the input ran out of rows"
            break
        steps.append(step)
        offset += step.rows
        log.info("parallelism %d: %.2f rollouts/s, p99 %.3f s, %.1f%% errors", level, step.rollouts_per_s,
                 step.p99_s, 100 * step.error_rate)
        stop = next_level(steps, tune.min_gain, tune.max_error_rate)
        if stop is not None:
            reason = stop
            break
        level *= 2
    if not steps:
        raise GymCollectError("tune_parallelism: no rows to sweep over; check the input and start_idx")
    knee = choose_knee(steps, tune.min_gain, tune.max_error_rate)
    for step in steps:
        step.knee = step.parallelism == knee
    recommended = max(1, round(tune.recommend_fraction * knee))
    report = TuneReport(steps, knee, recommended, reason, offset, input_end=total)
    if tune.validate_rows and offset < total:
        report.validation = await _run_step(cfg, folder / f"validate-p{recommended}.jsonl", recommended, offset,
                                            tune.validate_rows)
        report.next_start_idx += report.validation.rows
    return report


async def _run_step(cfg: CollectConfig, output: Path, level: int, start: int, rows: int) -> Step:
    end = start + rows if cfg.end_idx is None else min(cfg.end_idx, start + rows)
    step_cfg = dataclasses.replace(cfg, output_jsonl_fpath=str(output), num_samples_in_parallel=level,
                                   start_idx=start, end_idx=end, limit=None, resume=False, resume_from_cache=False,
                                   overwrite=True, disable_aggregation=True)
    result = await collect(step_cfg)
    metrics: dict[str, Any] = result.metrics or {}
    counts = metrics.get("rollouts", {})
    attempts = max(1, metrics.get("attempts", 0))
    errors = metrics.get("retries", 0) + counts.get("failed", 0)
    latency = metrics.get("latency_s", {})
    rows_done = counts.get("expected", 0) // cfg.num_repeats
    return Step(level, rows_done, metrics.get("active_rollouts_per_s", 0.0),
                latency.get("p50", 0.0), latency.get("p99", 0.0), min(1.0, errors / attempts), str(output))


def write_report(report: TuneReport, output: Path) -> list[Path]:
    """Write `<stem>_tune.json`, `<stem>_tune.csv` and, with matplotlib installed, `<stem>_tune.png`."""
    base = output.with_name(output.stem + "_tune")
    write_json_atomic(base.with_suffix(".json"), dataclasses.asdict(report))
    with base.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[field.name for field in dataclasses.fields(Step)])
        writer.writeheader()
        writer.writerows(dataclasses.asdict(step) for step in report.steps)
    written = [base.with_suffix(".json"), base.with_suffix(".csv")]
    try:
        from gym_collect.tune_plot import plot_sweep
    except ImportError:
        log.info("matplotlib is not installed: no plot (pip install 'gym_collect[plot]')")
        return written
    plot_sweep(report, base.with_suffix(".png"))
    return [*written, base.with_suffix(".png")]


def format_report(report: TuneReport, args: Sequence[str]) -> str:
    """The table (parallelism, rollouts/s, p50, p99, error rate, knee) and the command line that collects the
    rest of the input at the recommended parallelism: `args` (the user's, secrets shown as `<redacted>`),
    quoted for a POSIX shell; or, when the sweep used every row, a line saying so."""
    lines = [f"{'parallelism':>11}  {'rollouts/s':>10}  {'p50 s':>8}  {'p99 s':>8}  {'errors':>7}",
             *(f"{s.parallelism:>11}  {s.rollouts_per_s:>10.2f}  {s.p50_s:>8.3f}  {s.p99_s:>8.3f}  "
               f"{s.error_rate:>7.1%}{'  <- knee' if s.knee else ''}" for s in report.steps)]
    lines.append(f"Stopped: {report.stop_reason}. Knee: {report.knee}; recommended num_samples_in_parallel="
                 f"{report.recommended}.")
    if report.validation is not None:
        v = report.validation
        lines.append(f"Validation at {v.parallelism}: {v.rollouts_per_s:.2f} rollouts/s, p99 {v.p99_s:.3f} s, "
                     f"{v.error_rate:.1%} errors over {v.rows} rows.")
    if report.input_end is not None and report.next_start_idx >= report.input_end:
        lines.append(f"Next: nothing is left: the sweep collected every row up to {report.input_end}; use "
                     f"num_samples_in_parallel={report.recommended} for the next input")
        return "\n".join(lines)
    command = ["collect_rollouts", *args, f"num_samples_in_parallel={report.recommended}",
               f"start_idx={report.next_start_idx}"]
    lines.append(f"Next: {shlex.join(command)}")
    if any(REDACTED in arg for arg in args):
        lines.append(f"(secrets are shown as {REDACTED}: give them as you did here)")
    return "\n".join(lines)


def _tune_job(cfg: CollectConfig) -> int:
    report = asyncio.run(sweep(cfg))
    paths = write_report(report, cfg.require_paths()[1])
    skip = ("tune.", "num_samples_in_parallel", "start_idx", "hydra.job.name")
    print(format_report(report, [a for a in COMMAND_ARGS if not a.lstrip("+").startswith(skip)]))
    print("Wrote " + ", ".join(str(p) for p in paths))
    return 0


main = hydra_command("tune_parallelism", _tune_job)
"""Console entry point: `tune_parallelism KEY=VALUE ...` (the keys of `collect_rollouts`, plus `tune.*`)."""

if __name__ == "__main__":
    main()
