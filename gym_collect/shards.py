"""Checking a set of shard outputs: every expected (task, rollout) accounted for exactly once.

A shard ``out/shard_0.jsonl`` may have ``out/shard_0_failures.jsonl`` beside it: rollouts that failed for
good count as accounted for, but failed. ``check_shards`` reads every file once, streaming, into a slot map
that records which file owns each (task, rollout); gaps and overlaps are then named as compressed task
ranges, with the shards around or containing them. Memory is the slot map (one byte per (task, rollout)
seen, for up to 126 shards) plus, on the error path only, the compressed ranges reported; rows are never
held. ``ShardCheck.row_lines`` and ``ShardCheck.failure_lines`` stream the lines that count a second time.

What is expected is either a rectangle, tasks x ``range(num_repeats)``, or the (task, rollout) pairs the
shards' ``<stem>_materialized_inputs.jsonl`` list (``materialized``): NeMo Gym 0.7's indices, where identical
lines share a task index, a caller's ``_ng_task_index`` is kept and a ``num_repeats`` map varies the rollouts
per task, so no rectangle describes them. Then the shards' row ranges (``row_ranges``, from their run
manifests) must tile the input's rows, since a shard that is missing altogether lists nothing.

Errors follow ``gym_collect.errors``: ``MergeRefused`` (an ``InputError``) carries a failed check;
``ConfigError`` for bad arguments; ``InputError`` for an unreadable shard or one that changed meanwhile.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from gym_collect.errors import ConfigError, InputError
from gym_collect.writer import OutputPaths

__all__ = ["MergeRefused", "ShardCheck", "ShardSummary", "TaskRun", "check_shards"]

_CHUNK_TASKS = 1024
_SHOWN = 12  # ranges or groups shown per message line before "... N more"


@dataclass(frozen=True)
class TaskRun:
    """Tasks ``first..last`` (inclusive), each with the same ``rollouts`` indices affected."""

    first: int
    last: int
    rollouts: tuple[int, ...]


class _Slots:
    """Owner code of each (task, rollout): 0 none, else a file code. Chunks of ``_CHUNK_TASKS`` tasks are
    allocated as tasks are first seen, so an unknown task range costs only what is seen."""

    def __init__(self, num_repeats: int, max_code: int) -> None:
        self.r = max(1, num_repeats)
        self.typecode = "B" if max_code < 2**8 else "H" if max_code < 2**16 else "L"
        self.chunks: dict[int, array[int]] = {}

    def claim(self, task: int, rollout: int, code: int, if_owner: int = 0) -> int:
        """Set the owner to ``code`` if it is ``if_owner`` (default: free); return the previous owner."""
        key, off = divmod(task, _CHUNK_TASKS)
        chunk = self.chunks.get(key)
        if chunk is None:
            chunk = self.chunks[key] = array(self.typecode, bytes(array(self.typecode).itemsize
                                                                  * _CHUNK_TASKS * self.r))
        i = off * self.r + rollout
        prev = chunk[i]
        if prev == if_owner:
            chunk[i] = code
        return prev

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


def _merged(runs: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[first, last] runs sorted, with overlapping or adjacent ones joined."""
    out: list[list[int]] = []
    for a, b in sorted(runs):
        if out and a <= out[-1][1] + 1:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


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
        return _merged((a, b) for a, b in self.runs)


def _ranges_text(runs: Sequence[tuple[int, int]]) -> str:
    parts = [str(a) if a == b else f"{a}-{b}" for a, b in runs[:_SHOWN]]
    if len(runs) > _SHOWN:
        parts.append(f"... {len(runs) - _SHOWN} more ranges")
    return ", ".join(parts)


def _tasks_text(runs: Sequence[tuple[int, int]]) -> str:
    """``task 7`` or ``tasks 1-3, 7``."""
    word = "task" if len(runs) == 1 and runs[0][0] == runs[0][1] else "tasks"
    return f"{word} {_ranges_text(runs)}"


def _rollouts_text(rollouts: Sequence[int], num_repeats: int) -> str:
    if num_repeats == 1:
        return ""
    if len(rollouts) == num_repeats:
        return f" (all {num_repeats} rollouts)"
    word = "rollout" if len(rollouts) == 1 else "rollouts"
    return f" ({word} {_ranges_text(_merged((r, r) for r in rollouts))})"


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
    expected_pairs: int | None = None  # how many the materialized inputs list, when they set what is expected

    @property
    def ok(self) -> bool:
        return not self.errors

    def describe(self) -> str:
        """One message: what was checked, then either the counts or every problem found, one per line."""
        t = self.expected_tasks
        tasks = f"tasks {t.start}-{t.stop - 1}" if len(t) else "no tasks"
        if self.expected_pairs is None:
            head = f"{len(self.shards)} shards, {tasks} x {self.num_repeats} rollouts"
        else:
            head = (f"{len(self.shards)} shards, {self.expected_pairs} (task, rollout) pairs of {tasks} listed by "
                    "their materialized inputs")
        if self.errors:
            return f"refused to merge {head}; nothing written:\n  " + "\n  ".join(self.errors)
        dropped = sum(s.dropped_failure_rows for s in self.shards)
        extra = f", {dropped} superseded or repeated failure records dropped" if dropped else ""
        return f"{head}: {self.succeeded} succeeded, {self.failed} failed{extra}"

    def row_lines(self) -> Iterator[bytes]:
        """Every row of ``shards`` in merge order, verbatim (the last may lack its newline).

        Raises InputError if a shard's row count changed since the check (OSError if it became unreadable)."""
        for shard in self.shards:
            n = 0
            for _, line in _lines(shard.path):
                yield line
                n += 1
            if n != shard.rows:
                raise InputError(f"{shard.path} changed while merging ({shard.rows} rows checked, {n} copied)")

    def failure_lines(self) -> Iterator[bytes]:
        """Failure records that count, verbatim, in merge order: the first per (task, rollout), unless a
        success superseded it. Call once per check: it marks the records it yields in the slot map.

        Raises InputError if a failures file changed since the check (OSError if it became unreadable)."""
        emitted = _emitted_code(len(self._codes) // 2)
        by_path = {p: code for code, p in self._codes.items()}
        for shard in self.shards:
            if shard.failures_path is None:
                continue
            code = by_path[shard.failures_path]
            n = 0
            for _, line in _lines(shard.failures_path):
                if shard.dropped_failure_rows and self._slots.claim(*_ids(line), emitted, if_owner=code) != code:
                    continue
                yield line
                n += 1
            if n != shard.failed_rows:
                raise InputError(f"{shard.failures_path} changed while merging")


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


def _expected_code(shards: int) -> int:
    """The slot owner code of a pair the materialized inputs list that no file has claimed yet."""
    return 2 * shards + 1


def _emitted_code(shards: int) -> int:
    """The slot owner code of a failure record `ShardCheck.failure_lines` has yielded."""
    return 2 * shards + 2


def check_shards(paths: Sequence[str | os.PathLike[str]], expected_tasks: range | None, num_repeats: int,
                 *, strict: bool = False, materialized: Sequence[Path] | None = None,
                 row_ranges: Sequence[tuple[int, int]] | None = None, rows: range | None = None) -> ShardCheck:
    """Check that the shards account for every expected (task, rollout) exactly once, as a row or as a
    failure record, in one streaming pass over each file.

    Expected are ``expected_tasks`` x ``range(num_repeats)`` (``expected_tasks=None``: the contiguous range
    from the smallest to the largest task seen), or with ``materialized`` (one path per shard, in the same
    order) the pairs those files list; ``expected_tasks`` and ``num_repeats`` are then not used. With
    ``row_ranges`` (each shard's ``[start_idx, stop_idx)`` of input rows, in the same order), rows between
    them that no shard covers are errors, and so are rows of ``rows`` (the whole input's, when known) outside
    them. With ``strict``, failure records are errors. A missing shard file is an error line, not an
    exception. Raises ConfigError if a path is given twice or ``num_repeats < 1``; InputError if a file
    cannot be read.
    """
    if num_repeats < 1:
        raise ConfigError(f"num_repeats must be >= 1, got {num_repeats}")
    shard_paths = [Path(p) for p in paths]
    seen_paths: set[Path] = set()
    for p in shard_paths:
        if p.resolve() in seen_paths:
            raise ConfigError(f"shard {p} is given twice")
        seen_paths.add(p.resolve())
    errors: list[str] = []
    expected_code = _expected_code(len(shard_paths))
    listed: _Listed | None = None
    if materialized is not None:
        listed = _Listed.read(materialized)
        num_repeats = listed.rollouts
        errors.extend(listed.errors)
    slots = _Slots(num_repeats, _emitted_code(len(shard_paths)))
    if listed is not None:
        listed.mark(slots, expected_code)
        errors.extend(listed.overlap_errors())
        expected_tasks = listed.tasks
    if row_ranges is not None:
        errors.extend(_row_gaps(shard_paths, row_ranges, rows))
    fresh = expected_code if listed is not None else 0  # the owner of a pair no file has claimed yet
    codes: dict[int, Path] = {}
    dups: dict[tuple[int, int], tuple[_Runs, set[int]]] = {}
    unexpected: dict[tuple[int, str], _Runs] = {}
    summaries: list[tuple[int, ShardSummary]] = []
    succeeded = failed = 0

    for i, path in enumerate(shard_paths):
        fail_path = OutputPaths(path).failures
        out_code, fail_code = 2 * i + 1, 2 * i + 2
        codes[out_code], codes[fail_code] = path, fail_path
        if not path.is_file():
            errors.append(f"{path}: shard file not found")
            continue
        has_failures = fail_path.is_file()
        rows_seen = kept = dropped = 0  # rows, failure records that count, failure records dropped
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
                    rows_seen += 1
                s_low = task if s_low is None else min(s_low, task)
                s_high = task if s_high is None else max(s_high, task)
                if expected_tasks is not None and task not in expected_tasks:
                    unexpected.setdefault((code, "task"), _Runs()).add(task)
                    continue
                if rollout >= num_repeats:
                    unexpected.setdefault((code, "rollout"), _Runs()).add(task)
                    continue
                prev = slots.claim(task, rollout, code, if_owner=fresh)
                if prev == fresh:
                    if code == out_code:
                        succeeded += 1
                    else:
                        failed += 1
                        kept += 1
                elif prev == 0:  # listed mode: inside the tasks' span, but not a listed pair
                    unexpected.setdefault((code, "rollout"), _Runs()).add(task)
                elif code == fail_code and prev in (out_code, fail_code):
                    dropped += 1
                else:
                    runs, rollouts = dups.setdefault((prev, code), (_Runs(), set()))
                    runs.add(task)
                    rollouts.add(rollout)
            if bad:
                more = f" (and {bad - 1} more bad lines in this file)" if bad > 1 else ""
                errors.append(first_bad + more)
        summaries.append((i, ShardSummary(path, fail_path if has_failures else None, rows_seen, kept, dropped,
                                          s_low, s_high)))

    if expected_tasks is None:
        seen = [t for _, s in summaries for t in (s.min_task, s.max_task) if t is not None]
        expected_tasks = range(min(seen), max(seen) + 1) if seen else range(0)
    order = sorted(summaries, key=lambda s: (s[1].min_task is None, s[1].min_task or 0, s[0]))
    shards = tuple(s for _, s in order)
    t_text = f"{expected_tasks.start}-{expected_tasks.stop - 1}" if len(expected_tasks) else "(none)"
    for (code, kind), runs in unexpected.items():
        if listed is not None:
            errors.append(f"{codes[code]}: {_tasks_text(runs.normalized())} hold rollouts that no shard's "
                          "materialized inputs list: these rows come from another run or input")
        elif kind == "task":
            errors.append(f"{codes[code]}: {_tasks_text(runs.normalized())} outside the expected "
                          f"tasks {t_text} (from --input/--num-tasks/--start-idx, else the shards' manifests)")
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
    expected_count = listed.count if listed is not None else len(expected_tasks) * num_repeats
    if expected_count > succeeded + failed:
        missing = slots.runs(expected_tasks, lambda owner: owner == fresh)
        errors.extend(_missing_lines(missing, shards, num_repeats))
    errors.extend(dup_errors)
    if strict and failed:
        failed_runs = slots.runs(expected_tasks, lambda owner: owner % 2 == 0 and 0 < owner < expected_code)
        files = ", ".join(str(s.failures_path) for s in shards if s.failed_rows)
        failed_tasks = _merged((r.first, r.last) for r in failed_runs)
        errors.append(f"--strict: {failed} failed rollouts at {_tasks_text(failed_tasks)} in {files}")
    return ShardCheck(expected_tasks, num_repeats, shards, succeeded, failed, tuple(missing),
                      tuple(duplicated), tuple(errors), slots, codes,
                      expected_pairs=listed.count if listed is not None else None)


class _Listed:
    """The (task, rollout) pairs the shards' materialized inputs list: their span of tasks, the most
    rollouts of one task, how many, and the problems found reading them."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = paths
        self.tasks = range(0)
        self.rollouts = 1
        self.count = 0
        self.errors: list[str] = []
        self._overlaps: dict[Path, tuple[_Runs, set[int]]] = {}

    @classmethod
    def read(cls, paths: Sequence[Path]) -> _Listed:
        """First pass: the span and the rollouts per task, so that the slot map can be sized."""
        listed = cls(paths)
        low = high = None
        for path in paths:
            for task, rollout in listed._pairs(path):
                low = task if low is None else min(low, task)
                high = task if high is None else max(high, task)
                listed.rollouts = max(listed.rollouts, rollout + 1)
        if low is not None and high is not None:
            listed.tasks = range(low, high + 1)
        return listed

    def mark(self, slots: _Slots, code: int) -> None:
        """Second pass: set every listed pair's owner to ``code``; a pair listed twice is an overlap."""
        for path in self.paths:
            for task, rollout in self._pairs(path, report=False):
                if slots.claim(task, rollout, code) == 0:
                    self.count += 1
                else:
                    runs, rollouts = self._overlaps.setdefault(path, (_Runs(), set()))
                    runs.add(task)
                    rollouts.add(rollout)

    def overlap_errors(self) -> list[str]:
        return [f"{path}: lists {_tasks_text(runs.normalized())}{_rollouts_text(sorted(rollouts), self.rollouts)} "
                "that an earlier shard's materialized inputs list too: the shards' selections overlap"
                for path, (runs, rollouts) in self._overlaps.items()]

    def _pairs(self, path: Path, report: bool = True) -> Iterator[tuple[int, int]]:
        bad, first_bad = 0, ""
        for lineno, line in _lines_or_input_error(path):
            try:
                yield _ids(line)
            except _BadLine as exc:
                first_bad = first_bad or f"{path}:{lineno}: {exc}"
                bad += 1
        if bad and report:
            more = f" (and {bad - 1} more bad lines in this file)" if bad > 1 else ""
            self.errors.append(first_bad + more)


def _row_gaps(paths: Sequence[Path], row_ranges: Sequence[tuple[int, int]], rows: range | None) -> list[str]:
    """Errors for the input rows that no shard's ``[start_idx, stop_idx)`` covers (within ``rows`` when
    given, else between the first and the last shard)."""
    spans = sorted(zip(row_ranges, paths, strict=True))
    errors: list[str] = []

    def gap(first: int, stop: int, where: str) -> None:
        if stop > first:
            what = f"row {first}" if stop - first == 1 else f"rows {first}-{stop - 1}"
            errors.append(f"input {what} {'is' if stop - first == 1 else 'are'} in no shard ({where}): run the "
                          "missing shard, or resume it, then merge again")

    if not spans:
        return errors
    if rows is not None:
        gap(rows.start, spans[0][0][0], f"before {spans[0][1]}")
    covered, last = spans[0][0][1], spans[0][1]  # rows covered so far: up to `covered`, by `last` at the end
    for (start, stop), path in spans[1:]:
        gap(covered, start, f"between {last} and {path}")
        if stop >= covered:
            covered, last = stop, path
    if rows is not None:
        gap(covered, rows.stop, f"after {last}")
    return errors


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
