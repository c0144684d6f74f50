"""merge_rollouts: check that shard outputs cover the input exactly once, then concatenate them.

    shard files ──check_shards──> ShardCheck ──(ok?)──> rows, failures, metrics written to temp files
    (one streaming pass;          (who wrote each            in the output's folder, then os.replace'd
     a slot map of owners)         (task, rollout))          (a second streaming pass, lines copied verbatim)

A shard ``out/shard_0.jsonl`` may have ``out/shard_0_failures.jsonl`` (rollouts that failed for good: they
count as accounted for, but failed) and ``out/shard_0_metrics.json`` beside it. Memory is the slot map (one
byte per (task, rollout) seen, for up to 127 shards) plus, on the error path only, the
compressed ranges reported; rows are never held.

Errors follow ``gym_collect.errors``: ``MergeRefused`` (an ``InputError``: a gap, an overlap, a malformed
line, a missing shard file, a failure under ``--strict``), ``InputError`` (unreadable input), ``OutputError``
(cannot write, or the output would overwrite an input). In every case nothing is written and ``main``
returns the error's ``exit_code``, 2, as ``collect_rollouts`` does for input and output errors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from array import array
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson

from gym_collect.errors import ConfigError, GymCollectError, InputError, OutputError
from gym_collect.reader import count_rows
from gym_collect.stats import LatencyHistogram, NumericFieldStats

__all__ = ["MergeRefused", "ShardCheck", "ShardSummary", "TaskRun", "check_shards", "main", "merge_metrics",
           "merge_rollouts"]

log = logging.getLogger(__name__)

METRICS_SCHEMA = "gym_collect.metrics/1"
_COUNT_KEYS = ("expected", "succeeded", "failed", "skipped_resume", "not_persisted")
_CHUNK_TASKS = 1024
_SHOWN = 12  # ranges or groups shown per message line before "... N more"


def _sibling(path: Path, suffix: str) -> Path:
    """``dir/name.jsonl`` -> ``dir/name{suffix}``, e.g. ``_failures.jsonl``, ``_metrics.json``."""
    return path.with_name(path.stem + suffix)


class _Slots:
    """Owner code of each (task, rollout): 0 none, else a file code. Chunks of ``_CHUNK_TASKS`` tasks are
    allocated as tasks are first seen, so an unknown task range costs only what is seen."""

    def __init__(self, num_repeats: int, max_code: int) -> None:
        self.r = num_repeats
        self.typecode = "B" if max_code < 2**8 else "H" if max_code < 2**16 else "L"
        self.chunks: dict[int, array[int]] = {}

    def claim(self, task: int, rollout: int, code: int) -> int:
        """Set the owner if none; return the previous owner (0 if it was free)."""
        key, off = divmod(task, _CHUNK_TASKS)
        chunk = self.chunks.get(key)
        if chunk is None:
            chunk = self.chunks[key] = array(self.typecode, bytes(array(self.typecode).itemsize
                                                                  * _CHUNK_TASKS * self.r))
        i = off * self.r + rollout
        prev = chunk[i]
        if prev == 0:
            chunk[i] = code
        return prev

    def get(self, task: int, rollout: int) -> int:
        key, off = divmod(task, _CHUNK_TASKS)
        chunk = self.chunks.get(key)
        return 0 if chunk is None else chunk[off * self.r + rollout]

    def set(self, task: int, rollout: int, code: int) -> None:
        key, off = divmod(task, _CHUNK_TASKS)
        self.chunks[key][off * self.r + rollout] = code

    def runs(self, tasks: range, want: Callable[[int], bool]) -> list[TaskRun]:
        """Maximal runs of consecutive tasks with the same non-empty set of rollouts where ``want(owner)``.

        ``tasks`` must have step 1. Chunks never allocated are skipped whole, so a huge range costs
        O(len(tasks) / 1024) plus the tasks actually seen."""
        out: list[TaskRun] = []
        r = self.r
        all_free = tuple(range(r)) if want(0) else ()

        def extend(first: int, last: int, pattern: tuple[int, ...]) -> None:
            if out and out[-1].last == first - 1 and out[-1].rollouts == pattern:
                out[-1] = TaskRun(out[-1].first, last, pattern)
            else:
                out.append(TaskRun(first, last, pattern))

        t = tasks.start
        while t < tasks.stop:
            key = t // _CHUNK_TASKS
            end = min(tasks.stop, (key + 1) * _CHUNK_TASKS)
            chunk = self.chunks.get(key)
            if chunk is None:
                if all_free:
                    extend(t, end - 1, all_free)
                t = end
                continue
            for task in range(t, end):
                base = (task - key * _CHUNK_TASKS) * r
                pattern = tuple(j for j in range(r) if want(chunk[base + j]))
                if pattern:
                    extend(task, task, pattern)
            t = end
        return out


class _Runs:
    """Integers as [first, last] runs, extended in place while they arrive (nearly) in order."""

    __slots__ = ("runs",)

    def __init__(self) -> None:
        self.runs: list[list[int]] = []

    def add(self, t: int) -> None:
        if self.runs:
            last = self.runs[-1]
            if last[0] - 1 <= t <= last[1] + 1:
                last[0], last[1] = min(last[0], t), max(last[1], t)
                return
        self.runs.append([t, t])

    def normalized(self) -> list[tuple[int, int]]:
        out: list[list[int]] = []
        for a, b in sorted(self.runs):
            if out and a <= out[-1][1] + 1:
                out[-1][1] = max(out[-1][1], b)
            else:
                out.append([a, b])
        return [(a, b) for a, b in out]


def _ranges_text(runs: Sequence[tuple[int, int]]) -> str:
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs[:_SHOWN]]
    if len(runs) > _SHOWN:
        parts.append(f"... {len(runs) - _SHOWN} more ranges")
    return ", ".join(parts)


def _tasks_text(runs: Sequence[tuple[int, int]]) -> str:
    """``task 7`` or ``tasks 1-3, 7``."""
    word = "task" if len(runs) == 1 and runs[0][0] == runs[0][1] else "tasks"
    return f"{word} {_ranges_text(runs)}"


def _int_runs(values: Sequence[int]) -> list[tuple[int, int]]:
    runs = _Runs()
    for v in sorted(values):
        runs.add(v)
    return runs.normalized()


def _rollouts_text(rollouts: Sequence[int], num_repeats: int) -> str:
    if num_repeats == 1:
        return ""
    if len(rollouts) == num_repeats:
        return f" (all {num_repeats} rollouts)"
    word = "rollout" if len(rollouts) == 1 else "rollouts"
    return f" ({word} {_ranges_text(_int_runs(rollouts))})"


@dataclass(frozen=True)
class TaskRun:
    """Tasks ``first..last`` (inclusive), each with the same ``rollouts`` indices affected."""

    first: int
    last: int
    rollouts: tuple[int, ...]


@dataclass(frozen=True)
class ShardSummary:
    """One shard as checked. ``rows``: non-blank lines of the shard; ``failed_rows``: failure records that
    count (first per (task, rollout)); ``dropped_failure_rows``: failure records superseded by a success in
    the same shard, or repeated (e.g. after a resume); ``min_task``/``max_task`` over rows and failures."""

    path: Path
    failures_path: Path | None
    rows: int
    failed_rows: int
    dropped_failure_rows: int
    min_task: int | None
    max_task: int | None

    def span_text(self) -> str:
        if self.min_task is None:
            return f"{self.path} (no rows)"
        return f"{self.path} (tasks {self.min_task}-{self.max_task})"


@dataclass(frozen=True)
class ShardCheck:
    """Result of ``check_shards``: ``ok`` when every expected (task, rollout) is accounted for exactly once.

    ``shards`` are in merge order (smallest task first; shards without rows last). ``missing`` and
    ``duplicated`` (``(file_a, file_b, tasks as (first, last) runs, rollouts)``; ``file_a == file_b`` for a
    repeat inside one file) are structured; ``errors`` has one human-readable line per problem.
    """

    expected_tasks: range
    num_repeats: int
    shards: tuple[ShardSummary, ...]
    succeeded: int
    failed: int
    missing: tuple[TaskRun, ...]
    duplicated: tuple[tuple[Path, Path, tuple[tuple[int, int], ...], tuple[int, ...]], ...]
    errors: tuple[str, ...]
    _slots: _Slots = field(repr=False, compare=False)
    _codes: dict[int, Path] = field(repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return not self.errors

    def describe(self) -> str:
        """One message: what was checked, then either the counts or every problem found, one per line."""
        t = self.expected_tasks
        tasks = f"tasks {t.start}-{t.stop - 1}" if len(t) else "no tasks"
        head = f"{len(self.shards)} shards, {tasks} x {self.num_repeats} rollouts"
        if self.errors:
            return f"refused to merge {head}; nothing written:\n  " + "\n  ".join(self.errors)
        dropped = sum(s.dropped_failure_rows for s in self.shards)
        extra = f", {dropped} superseded or repeated failure records dropped" if dropped else ""
        return f"{head}: {self.succeeded} succeeded, {self.failed} failed{extra}"


class MergeRefused(InputError):
    """The shards do not cover the input exactly once (``check`` says how); nothing was written."""

    def __init__(self, check: ShardCheck) -> None:
        super().__init__(check.describe())
        self.check = check


class _BadLine(ValueError):
    pass


def _ids(line: bytes) -> tuple[int, int]:
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise _BadLine(f"invalid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise _BadLine(f"not a JSON object but {type(obj).__name__}")
    task, rollout = obj.get("_ng_task_index"), obj.get("_ng_rollout_index")
    if type(task) is not int or task < 0 or type(rollout) is not int or rollout < 0:
        raise _BadLine(f"_ng_task_index and _ng_rollout_index must be non-negative ints, "
                       f"got {task!r} and {rollout!r}")
    return task, rollout


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, line) of every non-blank line."""
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield lineno, line


def _lines_or_input_error(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        yield from _lines(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc


def check_shards(paths: Sequence[str | os.PathLike[str]], expected_tasks: range | None, num_repeats: int,
                 *, strict: bool = False) -> ShardCheck:
    """Check that the shards account for every (task, rollout) of ``expected_tasks`` x ``range(num_repeats)``
    exactly once, as a row or as a failure record, in one streaming pass.

    ``expected_tasks=None`` expects the contiguous range from the smallest to the largest task seen. With
    ``strict``, failure records are errors. A missing shard file is an error line, not an exception.
    Raises ConfigError if a path is given twice or ``num_repeats < 1``; InputError if a file cannot be read.
    """
    if num_repeats < 1:
        raise ConfigError(f"num_repeats must be >= 1, got {num_repeats}")
    shard_paths = [Path(p) for p in paths]
    seen_paths: set[Path] = set()
    for p in shard_paths:
        if p.resolve() in seen_paths:
            raise ConfigError(f"shard {p} is given twice")
        seen_paths.add(p.resolve())
    slots = _Slots(num_repeats, 2 * len(shard_paths) + 1)
    codes: dict[int, Path] = {}
    dups: dict[tuple[int, int], tuple[_Runs, set[int]]] = {}
    unexpected: dict[tuple[int, str], _Runs] = {}
    errors: list[str] = []
    summaries: list[tuple[int, ShardSummary]] = []
    succeeded = failed = 0
    low: int | None = None
    high: int | None = None

    for i, path in enumerate(shard_paths):
        fail_path = _sibling(path, "_failures.jsonl")
        out_code, fail_code = 2 * i + 1, 2 * i + 2
        codes[out_code], codes[fail_code] = path, fail_path
        if not path.is_file():
            errors.append(f"{path}: shard file not found")
            continue
        has_failures = fail_path.is_file()
        counts = {out_code: 0, fail_code: 0, -fail_code: 0}  # rows, kept failures, dropped failures
        s_low: int | None = None
        s_high: int | None = None
        for code in (out_code, fail_code) if has_failures else (out_code,):
            bad, first_bad = 0, ""
            for lineno, line in _lines_or_input_error(codes[code]):
                try:
                    task, rollout = _ids(line)
                except _BadLine as exc:
                    first_bad = first_bad or f"{codes[code]}:{lineno}: {exc}"
                    bad += 1
                    continue
                if code == out_code:
                    counts[code] += 1
                s_low = task if s_low is None else min(s_low, task)
                s_high = task if s_high is None else max(s_high, task)
                if expected_tasks is not None and task not in expected_tasks:
                    unexpected.setdefault((code, "task"), _Runs()).add(task)
                    continue
                if rollout >= num_repeats:
                    unexpected.setdefault((code, "rollout"), _Runs()).add(task)
                    continue
                prev = slots.claim(task, rollout, code)
                if prev == 0:
                    if code == out_code:
                        succeeded += 1
                    else:
                        failed += 1
                        counts[fail_code] += 1
                elif code == fail_code and prev in (out_code, fail_code):
                    counts[-fail_code] += 1
                else:
                    runs, rollouts = dups.setdefault((prev, code), (_Runs(), set()))
                    runs.add(task)
                    rollouts.add(rollout)
            if bad:
                more = f" (and {bad - 1} more bad lines in this file)" if bad > 1 else ""
                errors.append(first_bad + more)
        if s_low is not None and s_high is not None:
            low = s_low if low is None else min(low, s_low)
            high = s_high if high is None else max(high, s_high)
        summaries.append((i, ShardSummary(path, fail_path if has_failures else None, counts[out_code],
                                          counts[fail_code], counts[-fail_code], s_low, s_high)))

    if expected_tasks is None:
        expected_tasks = range(low, high + 1) if low is not None and high is not None else range(0)
    order = sorted(summaries, key=lambda s: (s[1].min_task is None, s[1].min_task or 0, s[0]))
    shards = tuple(s for _, s in order)
    t_text = f"{expected_tasks.start}-{expected_tasks.stop - 1}" if len(expected_tasks) else "(none)"
    for (code, kind), runs in unexpected.items():
        if kind == "task":
            errors.append(f"{codes[code]}: {_tasks_text(runs.normalized())} outside the expected "
                          f"tasks {t_text} (set by --input/--num-tasks/--start-idx)")
        else:
            errors.append(f"{codes[code]}: rollout index >= --num-repeats {num_repeats} at "
                          f"{_tasks_text(runs.normalized())}")
    duplicated = []
    dup_errors: list[str] = []
    for (a, b), (runs, rollouts) in dups.items():
        norm = runs.normalized()
        where = f"twice in {codes[a]}" if a == b else f"in both {codes[a]} and {codes[b]}"
        dup_errors.append(f"duplicated {_tasks_text(norm)}{_rollouts_text(sorted(rollouts), num_repeats)} "
                      f"{where}")
        duplicated.append((codes[a], codes[b], tuple(norm), tuple(sorted(rollouts))))
    missing: list[TaskRun] = []
    if len(expected_tasks) * num_repeats > succeeded + failed:
        missing = slots.runs(expected_tasks, lambda owner: owner == 0)
        errors.extend(_missing_lines(missing, shards, num_repeats))
    errors.extend(dup_errors)
    if strict and failed:
        failed_runs = slots.runs(expected_tasks, lambda owner: owner % 2 == 0 and owner != 0)
        files = ", ".join(str(s.failures_path) for s in shards if s.failed_rows)
        failed_tasks = _Runs()
        failed_tasks.runs = [[r.first, r.last] for r in failed_runs]
        errors.append(f"--strict: {failed} failed rollouts at {_tasks_text(failed_tasks.normalized())} "
                      f"in {files}")
    return ShardCheck(expected_tasks, num_repeats, shards, succeeded, failed, tuple(missing),
                      tuple(duplicated), tuple(errors), slots, codes)


def _missing_lines(missing: Sequence[TaskRun], shards: Sequence[ShardSummary], num_repeats: int) -> list[str]:
    """Group missing runs by (rollouts, where) and name the shards around or containing each gap."""
    spans = [(s.min_task, s.max_task, s) for s in shards if s.min_task is not None and s.max_task is not None]
    groups: dict[tuple[tuple[int, ...], str], list[tuple[int, int]]] = {}
    for run in missing:
        inside = [s.span_text() for lo, hi, s in spans if lo <= run.last and hi >= run.first]
        before = [(hi, s.span_text()) for lo, hi, s in spans if hi < run.first]
        after = [(lo, s.span_text()) for lo, hi, s in spans if lo > run.last]
        if inside:
            where = "inside " + ", ".join(inside)
        elif before and after:
            where = f"between {max(before)[1]} and {min(after)[1]}"
        elif before:
            where = f"after the last shard, {max(before)[1]}"
        elif after:
            where = f"before the first shard, {min(after)[1]}"
        else:
            where = "(no shard has any rows)"
        groups.setdefault((run.rollouts, where), []).append((run.first, run.last))
    lines = [f"missing {_tasks_text(runs)}{_rollouts_text(rollouts, num_repeats)} {where}"
             for (rollouts, where), runs in list(groups.items())[:_SHOWN]]
    if len(groups) > _SHOWN:
        lines.append(f"... and {len(groups) - _SHOWN} more groups of missing tasks")
    return lines


def _count(d: Mapping[str, object], key: str, what: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what}: {key!r} must be a non-negative int, got {v!r}")
    return v


def _object(d: Mapping[str, object], key: str, what: str) -> Mapping[str, object]:
    v = d.get(key)
    if not isinstance(v, Mapping):
        raise ValueError(f"{what}: {key!r} must be an object, got {type(v).__name__}")
    return v


@dataclass
class _Metrics:
    """The mergeable part of one ``<stem>_metrics.json`` (schema ``gym_collect.metrics/1``)."""

    rollouts: dict[str, int]
    attempts: int
    retries: int
    wall_time_s: float
    histogram: LatencyHistogram
    fields: NumericFieldStats
    by_agent: dict[str, dict[str, int]]
    failures_by_class: dict[str, int]

    @classmethod
    def empty(cls) -> _Metrics:
        return cls(dict.fromkeys(_COUNT_KEYS, 0), 0, 0, 0.0, LatencyHistogram(), NumericFieldStats(), {}, {})

    @classmethod
    def parse(cls, d: Mapping[str, object]) -> _Metrics:
        """Raises ValueError on a wrong schema, a missing key or a wrong type; unknown keys are ignored."""
        what = "metrics"
        if not isinstance(d, Mapping) or d.get("schema") != METRICS_SCHEMA:
            raise ValueError(f"{what}: not a {METRICS_SCHEMA!r} object")
        rollouts = _object(d, "rollouts", what)
        wall = d.get("wall_time_s")
        if isinstance(wall, bool) or not isinstance(wall, int | float) or not wall >= 0.0:
            raise ValueError(f"{what}: 'wall_time_s' must be a number >= 0, got {wall!r}")
        by_agent: dict[str, dict[str, int]] = {}
        for agent, counts in _object(d, "by_agent", what).items():
            if not isinstance(counts, Mapping):
                raise ValueError(f"{what}: by_agent[{agent!r}] must be an object")
            mine = by_agent[str(agent)] = {"succeeded": 0, "failed": 0}
            mine.update({str(k): _count(counts, k, f"{what} by_agent[{agent!r}]") for k in counts})
        failures = _object(d, "failures_by_class", what)
        return cls(
            rollouts={str(k): _count(rollouts, k, f"{what} rollouts") for k in (*_COUNT_KEYS, *rollouts)},
            attempts=_count(d, "attempts", what),
            retries=_count(d, "retries", what),
            wall_time_s=float(wall),
            histogram=LatencyHistogram.from_dict(_object(d, "latency_histogram", what)),
            fields=NumericFieldStats.from_dict(_object(d, "fields", what)),
            by_agent=by_agent,
            failures_by_class={str(k): _count(failures, k, f"{what} failures_by_class") for k in failures},
        )

    def merge(self, other: _Metrics) -> None:
        """Sum counts, merge histogram and field stats, max the wall time (shards run concurrently).
        Raises ValueError, before changing anything, if the histograms' relative errors differ."""
        self.histogram.merge(other.histogram)
        for k, n in other.rollouts.items():
            self.rollouts[k] = self.rollouts.get(k, 0) + n
        self.attempts += other.attempts
        self.retries += other.retries
        self.wall_time_s = max(self.wall_time_s, other.wall_time_s)
        self.fields.merge(other.fields)
        for agent, counts in other.by_agent.items():
            mine = self.by_agent.setdefault(agent, {"succeeded": 0, "failed": 0})
            for k, n in counts.items():
                mine[k] = mine.get(k, 0) + n
        for cls_name, n in other.failures_by_class.items():
            self.failures_by_class[cls_name] = self.failures_by_class.get(cls_name, 0) + n

    def to_dict(self, shards: Sequence[str], metrics_missing: Sequence[str]) -> dict[str, object]:
        succeeded = self.rollouts["succeeded"]
        return {
            "schema": METRICS_SCHEMA,
            "rollouts": dict(self.rollouts),
            "attempts": self.attempts,
            "retries": self.retries,
            "wall_time_s": self.wall_time_s,
            "rollouts_per_s": succeeded / self.wall_time_s if self.wall_time_s > 0 else 0.0,
            "latency_s": self.histogram.summary(),
            "latency_histogram": self.histogram.to_dict(),
            "fields": self.fields.to_dict(),
            "by_agent": {agent: dict(c) for agent, c in self.by_agent.items()},
            "failures_by_class": dict(self.failures_by_class),
            "shards": list(shards),
            "metrics_missing": list(metrics_missing),
        }


def merge_metrics(dicts: Sequence[Mapping[str, object]], *, shards: Sequence[str] = (),
                  metrics_missing: Sequence[str] = ()) -> dict[str, object]:
    """Merge shard metrics objects (schema ``gym_collect.metrics/1``) into one of the same schema.

    Counts are summed: ``rollouts.{expected,succeeded,failed,skipped_resume,not_persisted}`` (required) and
    any other int under ``rollouts`` (such as ``interrupted``), ``attempts``, ``retries``, ``by_agent``
    (every int counter; ``succeeded``/``failed`` default to 0) and ``failures_by_class``;
    ``fields`` merged exactly (Chan et al. 1979); ``latency_histogram`` merged and ``latency_s`` recomputed
    from it; ``wall_time_s`` is the max over shards, since shards run concurrently (shards run one after
    another would make this an underestimate); ``rollouts_per_s = rollouts.succeeded / wall_time_s``.
    ``shards`` and ``metrics_missing`` (shard files whose metrics were missing or unreadable) are recorded
    as given. Other top-level keys are ignored. Raises ValueError on a malformed object or on histograms
    with different relative errors.
    """
    acc: _Metrics | None = None
    for i, d in enumerate(dicts):
        try:
            parsed = _Metrics.parse(d)
            if acc is None:
                acc = parsed
            else:
                acc.merge(parsed)
        except ValueError as exc:
            raise ValueError(f"shard metrics #{i}: {exc}") from exc
    return (acc or _Metrics.empty()).to_dict(shards, metrics_missing)


def _load_metrics(check: ShardCheck) -> dict[str, object]:
    """Merge the metrics files of ``check.shards``, warning about and listing the missing or unreadable."""
    acc: _Metrics | None = None
    missing: list[str] = []
    for shard in check.shards:
        path = _sibling(shard.path, "_metrics.json")
        try:
            parsed = _Metrics.parse(orjson.loads(path.read_bytes()))
            if acc is None:
                acc = parsed
            else:
                acc.merge(parsed)
        except FileNotFoundError:
            log.warning("%s: no metrics file; the merged metrics leave this shard out", path)
            missing.append(str(shard.path))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable metrics (%s); the merged metrics leave this shard out", path, exc)
            missing.append(str(shard.path))
    return (acc or _Metrics.empty()).to_dict([str(s.path) for s in check.shards], missing)


def _write_temp(final: Path, fill: Callable[[BinaryIO], None]) -> Path:
    """Write ``final``'s content to a temp file beside it (same file system, for ``os.replace``)."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _copy_rows(check: ShardCheck, dst: BinaryIO) -> None:
    for shard in check.shards:
        n = 0
        for _, line in _lines(shard.path):
            dst.write(line if line.endswith(b"\n") else line + b"\n")
            n += 1
        if n != shard.rows:
            raise InputError(f"{shard.path} changed while merging ({shard.rows} rows checked, {n} copied)")


def _copy_failures(check: ShardCheck, dst: BinaryIO) -> None:
    """Copy failure records that count: the first per (task, rollout), unless a success superseded it."""
    emitted = len(check._codes) + 1
    by_path = {p: code for code, p in check._codes.items()}
    for shard in check.shards:
        if shard.failures_path is None:
            continue
        code = by_path[shard.failures_path]
        n = 0
        for _, line in _lines(shard.failures_path):
            if shard.dropped_failure_rows:
                task, rollout = _ids(line)
                if check._slots.get(task, rollout) != code:
                    continue
                check._slots.set(task, rollout, emitted)
            dst.write(line if line.endswith(b"\n") else line + b"\n")
            n += 1
        if n != shard.failed_rows:
            raise InputError(f"{shard.failures_path} changed while merging")


def merge_rollouts(paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *,
                   expected_tasks: range | None = None, num_repeats: int = 1,
                   strict: bool = False) -> ShardCheck:
    """Check the shards (``check_shards``), then write ``output``, ``<output stem>_failures.jsonl`` (only if
    any failure counts; a stale one is removed) and ``<output stem>_metrics.json``.

    Each file is written to a temp file in its folder and moved into place with ``os.replace``; the rows
    file last. Raises MergeRefused if the check fails; OutputError if an output path is one of the inputs
    or cannot be written (temp files are removed); InputError if a shard cannot be read or changes meanwhile.
    Nothing is written on any error. Returns the check.
    """
    out = Path(output)
    targets = (out, _sibling(out, "_failures.jsonl"), _sibling(out, "_metrics.json"))
    inputs = {q.resolve() for p in paths for q in (Path(p), _sibling(Path(p), "_failures.jsonl"),
                                                    _sibling(Path(p), "_metrics.json"))}
    for target in targets:
        if target.resolve() in inputs:
            raise OutputError(f"output {target} would overwrite an input file: choose another --output")
    check = check_shards(paths, expected_tasks, num_repeats, strict=strict)
    if not check.ok:
        raise MergeRefused(check)
    metrics = _load_metrics(check)
    blob = orjson.dumps(metrics, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    temps: list[tuple[Path, Path]] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temps.append((_write_temp(targets[0], lambda f: _copy_rows(check, f)), targets[0]))
        if check.failed:
            temps.append((_write_temp(targets[1], lambda f: _copy_failures(check, f)), targets[1]))
        temps.append((_write_temp(targets[2], lambda f: _write_all(f, blob)), targets[2]))
        for tmp, final in reversed(temps):  # the rows file last: once it is there, so is the rest
            os.replace(tmp, final)
        if not check.failed and targets[1].exists():
            log.info("removing %s, left by an earlier merge: no rollout failed this time", targets[1])
            targets[1].unlink()
    except OSError as exc:
        raise OutputError(f"cannot write {out} ({exc}); nothing merged") from exc
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    return check


def _write_all(f: BinaryIO, data: bytes) -> None:
    f.write(data)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge_rollouts",
        description="Check that shard outputs hold every (task, rollout) exactly once (as a row or in "
                    "<stem>_failures.jsonl), then concatenate them in task order, with their failures and "
                    "merged metrics. Exit 0 merged, 2 refused or failed (nothing written).")
    p.add_argument("shards", nargs="+", type=Path, help="shard output files (.jsonl)")
    p.add_argument("--output", required=True, type=Path, help="merged output file (.jsonl)")
    p.add_argument("--num-repeats", type=int, default=1, help="rollouts per task (default 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--input", type=Path, help="the full input JSONL: expects one task per non-blank line")
    g.add_argument("--num-tasks", type=int, help="number of tasks expected")
    p.add_argument("--start-idx", type=int, default=None,
                   help="index of the first expected task (default 0); needs --input or --num-tasks")
    p.add_argument("--strict", action="store_true",
                   help="refuse if any rollout failed (default: failures count as accounted for)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``merge_rollouts``; returns the exit code: 0 merged, 2 refused or failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.num_repeats < 1:
        parser.error("--num-repeats must be >= 1")
    if args.num_tasks is not None and args.num_tasks < 0:
        parser.error("--num-tasks must be >= 0")
    if args.start_idx is not None and (args.start_idx < 0 or (args.input is None and args.num_tasks is None)):
        parser.error("--start-idx must be >= 0 and needs --input or --num-tasks")
    logging.basicConfig(level=logging.INFO, format="merge_rollouts: %(levelname)s: %(message)s")
    start = args.start_idx or 0
    try:
        expected: range | None = None
        if args.input is not None:
            expected = range(start, start + count_rows(args.input))
        elif args.num_tasks is not None:
            expected = range(start, start + args.num_tasks)
        check = merge_rollouts(args.shards, args.output, expected_tasks=expected,
                               num_repeats=args.num_repeats, strict=args.strict)
    except GymCollectError as exc:
        print(f"merge_rollouts: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"merge_rollouts: merged {check.describe()} into {args.output}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
