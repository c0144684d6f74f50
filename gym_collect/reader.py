"""Lazy JSONL rows with their indices, and the rollout requests built from them.

Row `i` is the i-th non-blank line of the file, 0-based (NeMo Gym's task index). A UTF-8 BOM and CRLF line
ends are accepted. Selection is `[start_idx, end_idx)`, then `limit`; each row gives `num_repeats`
requests in the pattern aabbcc.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson

from gym_collect.errors import InputError
from gym_collect.nemo.indices import TaskIndexer, stamped_task
from gym_collect.nemo.routing import UNNAMED_AGENT, RouteKey
from gym_collect.nemo.rows import RequestBuilder

BOM = b"\xef\xbb\xbf"
DIGEST_SIZE = 16
STAT_EVERY_ROWS = 1024
BLOCK_LINES = 1024  # a block of the input checked whole before any of its rows is sent (`_Blocks`)
BLOCK_BYTES = 1 << 20
T = TypeVar("T")


@dataclass(slots=True)
class Row:
    """One input row: `index` is its row index (0-based, non-blank lines), `raw` its line; for a selected
    row `data` is the parsed object, or None with `error` saying why not. Rows before the selection
    (`selected` False, `data` None) are yielded only when asked for (`include_prefix`)."""

    index: int
    line_no: int
    data: dict[str, Any] | None
    error: str | None = None
    raw: bytes = b""
    selected: bool = True


@dataclass(slots=True)
class RolloutRequest:
    """One unit of work: the body to `POST /run` for (task_index, rollout_index).

    `seq` is the position in input order among the requests of this run (for ordered output).
    `error` is set (and `body` empty) for a bad input row that is recorded as a failure, never sent.
    """

    seq: int
    task_index: int
    rollout_index: int
    agent_ref: dict[str, Any] | None
    body: bytes
    error: str | None = None
    stamps: dict[str, Any] | None = None  # fields of the row set on its result (NeMo Gym's task_source...)
    route: str | None = None  # the routing key, when it is not the `agent_ref` name (episode requests)
    attempt: int = 0  # NeMo Gym's `_ng_attempt_index`: attempts of this pair in earlier runs
    # the agent this request goes to (`UNNAMED_AGENT` for rows sent to `agent_url` as they are, without an
    # `agent_ref`); set once, read at every step of the request's life
    agent_name: str = field(init=False)

    def __post_init__(self) -> None:
        self.agent_name = self.route if self.route is not None else (
            UNNAMED_AGENT if self.agent_ref is None else str(self.agent_ref["name"]))


@dataclass(frozen=True, slots=True)
class RowSelection:
    """The selected rows: `[start_idx, end_idx)` of the file's rows, at most `limit` of them."""

    start_idx: int = 0
    end_idx: int | None = None
    limit: int | None = None

    @property
    def stop_idx(self) -> int | None:
        """Exclusive end of the selection once `limit` is applied, or None for "to the end of the file"."""
        ends = [e for e in (self.end_idx, None if self.limit is None else self.start_idx + self.limit) if e is not None]
        return min(ends) if ends else None


class JsonlRows:
    """The selected rows of a JSONL file, read lazily: memory is one line at a time.

    With `expected` (what the check pass saw), iteration also watches the file: a row is given only once the
    block of lines it is in matched the check pass's CRC-32 (`_Blocks`), so no row is sent as it was not
    checked; it stops early and sets `change` at a block that differs, when the file's size or modification
    time moved (checked every `STAT_EVERY_ROWS` rows), or when the file ends too soon. Raises `InputError`
    (`file:line: reason`) when the file cannot be opened; bad rows are yielded with `error` set, so the caller
    decides between stopping and skipping.
    """

    def __init__(
        self, path: Path, selection: RowSelection, expected: InputSnapshot | None = None, *,
        read_to_end: bool = False, include_prefix: bool = False,
    ) -> None:
        self.path = path
        self.selection = selection
        self.expected = expected
        self.read_to_end = read_to_end
        self.include_prefix = include_prefix
        self.change: str | None = None
        self.totals: FileTotals | None = None

    def __iter__(self) -> Iterator[Row]:
        start, stop = self.selection.start_idx, self.selection.stop_idx
        expected = self.expected
        # the whole file's fingerprint is computed only when reading to its end (the check pass); later passes
        # check the selection block by block with CRC-32 (zlib), 5x cheaper than BLAKE2b per byte
        digest = hashlib.blake2b(digest_size=DIGEST_SIZE) if self.read_to_end else None
        seen = 0
        index = -1
        blocks = _Blocks(stop, expected.block_crcs if expected is not None else None, record=self.read_to_end)
        with _open_input(self.path) as f:
            for line_no, raw in blocks.lines(f):
                if digest is not None:
                    digest.update(raw)
                if line_no == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                if not raw.strip():
                    continue
                index += 1
                if index < start:
                    if self.include_prefix:
                        yield Row(index, line_no, None, None, raw, False)
                    continue
                if stop is not None and index >= stop:
                    break
                seen += 1
                if expected is not None and seen % STAT_EVERY_ROWS == 0 and self._moved(expected):
                    return
                yield _parse_row(raw, index, line_no)
                if stop is not None and index + 1 >= stop:
                    break
            if blocks.mismatch is not None:
                self.change = blocks.mismatch
                return
            if digest is not None:
                size = f.tell()
                for raw in f:
                    digest.update(raw)
                    size += len(raw)
                    index += bool(raw.strip())
                self.totals = FileTotals(index + 1, size, digest.hexdigest(), blocks.recorded)
        if expected is not None and self.change is None:
            if seen < expected.num_rows:
                self.change = f"it now ends after {seen} of the {expected.num_rows} selected rows"
            else:
                self._moved(expected)

    def check_unchanged(self) -> str | None:
        """Why the file differs from `expected` now (size, modification time), or None; sets `change`."""
        if self.expected is not None and self.change is None:
            self._moved(self.expected)
        return self.change

    def _moved(self, expected: InputSnapshot) -> bool:
        try:
            info = self.path.stat()
        except OSError as exc:
            self.change = f"it can no longer be read ({exc.strerror})"
            return True
        if (info.st_size, info.st_mtime_ns, info.st_ino) != (expected.size, expected.mtime_ns, expected.inode):
            self.change = f"its size or modification time changed ({expected.size} -> {info.st_size} bytes)"
            return True
        return False

    def location(self, row: Row) -> str:
        """`file:line` of a row, for messages."""
        return f"{self.path}:{row.line_no}"


def count_rows(path: Path) -> int:
    """The number of rows (non-blank lines) in a JSONL file; raises `InputError` if it cannot be read."""
    with _open_input(path) as f:
        return sum(1 for raw in f if raw.strip() and raw.strip() != BOM)


def shard_range(num_rows: int, num_shards: int, shard_id: int) -> tuple[int, int]:
    """Contiguous, balanced `[start, end)` of shard `shard_id` of `num_shards` over `num_rows` rows.

    Shard sizes differ by at most one row; shard 0 starts at 0 and the last one ends at `num_rows`.
    """
    return num_rows * shard_id // num_shards, num_rows * (shard_id + 1) // num_shards


class _Blocks:
    """The file's lines in blocks that end on a row once they hold `BLOCK_LINES` lines or `BLOCK_BYTES` bytes (a
    longer line is a block of its own), or at the last selected row (row index `stop - 1`), so that every pass
    cuts the same blocks from the same bytes.

    With `record` (the check pass), each block's CRC-32 is appended to `recorded`. With `expected` (the check
    pass's CRCs), a block's lines are given only once the whole block was read and its CRC matched: a row
    edited, truncated or appended after the check pass is never sent, and `mismatch` says why the lines
    stopped. With neither, the lines as they are. Memory: one block; four bytes a block for the CRCs.
    """

    def __init__(self, stop: int | None, expected: array[int] | None = None, record: bool = False) -> None:
        self.stop, self.expected, self.record = stop, expected, record
        self.recorded: array[int] = array("I")
        self.mismatch: str | None = None

    def lines(self, f: BinaryIO) -> Iterator[tuple[int, bytes]]:
        """(line number from 1, raw line) of `f`, block by block."""
        if self.expected is None and not self.record:
            yield from enumerate(f, 1)
            return
        block: list[tuple[int, bytes]] = []
        count = crc = size = 0
        through_row: int | None = None  # the block's CRC through its last non-blank line
        index = -1  # row index of the last non-blank line read
        for line_no, raw in enumerate(f, 1):
            crc, size, count = zlib.crc32(raw, crc), size + len(raw), count + 1
            is_row = bool((raw[len(BOM):] if line_no == 1 and raw.startswith(BOM) else raw).strip())
            if is_row:
                index += 1
                through_row = crc
            last = self.stop is not None and index + 1 >= self.stop
            # a block ends on a row, so blank lines after the last row belong to none, whichever pass cuts it
            closing = is_row and (count >= BLOCK_LINES or size >= BLOCK_BYTES or last)
            if self.expected is None:  # recording: the CRC is kept before the line is given (a reader may stop)
                if closing:
                    self.recorded.append(crc)
                    count = crc = size = 0
                    through_row = None
                yield line_no, raw
                continue
            block.append((line_no, raw))
            if closing:
                if not self._verified(crc):
                    return
                yield from block
                block, count, crc, size, through_row = [], 0, 0, 0, None
                if last:
                    return
        # the last block ends at the last row, as a pass that stops there cuts it; blank lines after it are no row
        if through_row is not None:
            if self.expected is None:
                self.recorded.append(through_row)
            elif self._verified(through_row):
                yield from block

    def _verified(self, crc: int) -> bool:
        n = len(self.recorded)
        assert self.expected is not None
        if n >= len(self.expected) or self.expected[n] != crc:
            self.mismatch = ("the selected rows' content differs from the check at start (block "
                             f"{n + 1} of {len(self.expected)} of the input, which was not sent)")
            return False
        self.recorded.append(crc)
        return True


@dataclass(frozen=True)
class FileTotals:
    """What reading a file to its end found: rows (non-blank lines), bytes, the BLAKE2b-128 digest (hex) of the
    whole file and the CRC-32 of each block through the last selected row (`_Blocks`)."""

    rows: int
    size: int
    fingerprint: str
    block_crcs: array[int] = field(default_factory=lambda: array("I"))


@dataclass(frozen=True)
class InputSnapshot:
    """The input as the check pass saw it; it fixes the run's selection.

    `num_rows` selected rows of `total_rows`; `size`, `mtime_ns`, `inode` from `stat`; `fingerprint` a
    BLAKE2b-128 hex digest of every byte, `block_crcs` the CRC-32 of each block through the last selected row
    (`_Blocks`; compared within one run only).
    """

    num_rows: int
    total_rows: int
    size: int
    mtime_ns: int
    inode: int
    fingerprint: str
    block_crcs: array[int] = field(default_factory=lambda: array("I"), repr=False)

    @property
    def identity(self) -> dict[str, Any]:
        """The input's identity for the run manifest: its size and fingerprint, not its path."""
        return {"size": self.size, "fingerprint": self.fingerprint}


@dataclass
class ScanResult:
    """What the pre-flight passes over the input found.

    `route_keys` counts the selected rows per `RouteKey`; `prefix_keys` are the keys of rows before the
    selection that share a task index with it (their rollouts count first); `task_range` is the lowest and
    highest task index of the selection; `indexer` carries NeMo Gym's task indices to the dispatch pass.
    """

    num_rows: int
    route_keys: Counter[RouteKey]
    bad_rows: int
    snapshot: InputSnapshot | None = None
    indexer: TaskIndexer | None = None
    prefix_keys: set[RouteKey] = field(default_factory=set)
    task_range: tuple[int, int] = (0, -1)


def scan(
    rows: JsonlRows,
    builder: RequestBuilder,
    on_bad_row: str,
    checkpoint: Callable[[], None] | None = None,
) -> ScanResult:
    """Check every selected row before any request is sent, fingerprint the whole file in the same pass, and
    work out NeMo Gym's task indices (`gym_collect.nemo.indices`, two more passes over the rows up to the
    selection's end).

    Returns the row count, the rows per `RouteKey` (routing before `task_source` resolution), and the
    `InputSnapshot` that fixes the selection. `checkpoint` is called every `STAT_EVERY_ROWS` rows (it may
    raise to abandon the scan). Raises `InputError` at the first bad row when `on_bad_row == "fail"` or when
    the file changes while it is read, and `ConfigError` when a row cannot be routed.
    """
    checkpoint = checkpoint or (lambda: None)
    before = _stat_input(rows.path)
    reader = JsonlRows(rows.path, rows.selection, read_to_end=True, include_prefix=True)
    indexer = TaskIndexer(_capacity(rows.path, rows.selection))
    result = ScanResult(0, Counter(), 0, indexer=indexer)
    for row in _checkpointed(iter(reader), checkpoint):
        indexer.observe_line(row.raw, stamped_task(row.raw, row.data))
        if not row.selected:
            continue
        result.num_rows += 1
        if row.data is None:
            if on_bad_row == "fail":
                raise InputError(
                    f"{reader.location(row)}: {row.error}; fix the line, or pass on_bad_row=skip to record it "
                    "as a failure and go on"
                )
            result.bad_rows += 1
            continue
        result.route_keys[builder.check(row.data, reader.location(row))] += 1
    after = _stat_input(rows.path)
    totals = reader.totals
    assert totals is not None
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or totals.size != after.st_size:
        raise InputError(f"{rows.path}: the input changed while it was being checked; rerun once it is complete")
    result.snapshot = InputSnapshot(
        result.num_rows, totals.rows, after.st_size, after.st_mtime_ns, after.st_ino, totals.fingerprint,
        totals.block_crcs,
    )
    _index_pass(rows, result, builder, checkpoint)
    return result


def _index_pass(rows: JsonlRows, result: ScanResult, builder: RequestBuilder, checkpoint: Callable[[], None]) -> None:
    """Pass 2 (task indices, candidate repeats) and, when the selection starts later, the keys of the earlier
    rows that may share a task index with it."""
    indexer = result.indexer
    assert indexer is not None
    start = rows.selection.start_idx
    stop = start + result.num_rows
    if not indexer.stamped and indexer.candidate_lines:
        indexer.confirm_lines(_checkpointed((row.raw for row in JsonlRows(rows.path, RowSelection(stop, stop),
                                                                           include_prefix=True)), checkpoint))
    if indexer.all_distinct:
        result.task_range = (start, start + result.num_rows - 1)
        return
    indexer.begin_pass()
    low, high = None, None
    every_row = JsonlRows(rows.path, RowSelection(stop, stop), include_prefix=True)  # [0, stop), unparsed
    for row in _checkpointed(iter(every_row), checkpoint):
        task = indexer.task(row.raw, stamped_task(row.raw, row.data))
        indexer.observe_task(task)
        if row.index >= start:
            low, high = min(task, task if low is None else low), max(task, task if high is None else high)
    result.task_range = (low, high) if low is not None and high is not None else (0, -1)
    if start == 0 or not indexer.candidate_tasks:
        return
    indexer.begin_pass()
    for row in JsonlRows(rows.path, RowSelection(start, start), include_prefix=True):
        task = indexer.task(row.raw, stamped_task(row.raw, None))
        if indexer.may_repeat(task):
            data = _parsed(row.raw)
            if data is not None:
                result.prefix_keys.add(builder.check(data, rows.location(row)))


def iter_requests(
    rows: JsonlRows,
    builder: RequestBuilder,
    is_done: Callable[[int, int], bool],
    bad_row_rollouts: int = 1,
    indexer: TaskIndexer | None = None,
    interleave: bool = False,
    attempt_of: Callable[[int, int], int] | None = None,
    materialize: bool = False,
) -> Iterator[RolloutRequest]:
    """Rollout requests in input order (aabbcc), skipping (task, rollout) pairs for which `is_done` is true.

    Task and rollout indices are NeMo Gym's (`indexer`, from `scan`; without one, the row index and rollouts
    from 0). Bodies come from `builder` (NeMo Gym's materialization); a bad row (`on_bad_row=skip`) gives
    `bad_row_rollouts` requests with `error` set, recorded as failures and never sent. With `interleave`
    (NeMo Gym's `interleave_repeats`: abcabc, a stable sort by rollout index) the rows are read once per
    rollout index, each pass sending that index only. `attempt_of(task, rollout)` gives a retried pair's
    `_ng_attempt_index` (set in its body and on its request). With `materialize`, an episode request's body
    is its flat row instead (NeMo Gym's materialized input of a taskset row).
    """
    state = _Dispatch(attempt_of=attempt_of, materialize=materialize)
    if not interleave:
        yield from _dispatch_pass(rows, builder, is_done, bad_row_rollouts, indexer, state, None)
        return
    round_ = 0
    while round_ <= state.max_rollout or round_ == 0:
        yield from _dispatch_pass(rows, builder, is_done, bad_row_rollouts, indexer, state, round_)
        round_ += 1


@dataclass
class _Dispatch:
    seq: int = 0
    max_rollout: int = -1
    attempt_of: Callable[[int, int], int] | None = None
    materialize: bool = False


def _dispatch_pass(rows: JsonlRows, builder: RequestBuilder, is_done: Callable[[int, int], bool],
                   bad_row_rollouts: int, indexer: TaskIndexer | None, state: _Dispatch,
                   only: int | None) -> Iterator[RolloutRequest]:
    """One pass over the rows: the requests of every rollout index, or of rollout index `only`."""
    if indexer is not None:
        indexer.begin_pass()
    for row in rows:
        if indexer is None:
            task, first = row.index, 0
        else:
            task = indexer.task(row.raw, stamped_task(row.raw, row.data))
            first = indexer.rollout_base(task)
        if not row.selected:
            assert indexer is not None
            indexer.add_rollouts(task, partial(_rollouts_of, builder, row, rows.location(row)))
            continue

        def skip(rollout: int, task: int = task) -> bool:
            return (only is not None and rollout != only) or is_done(task, rollout)

        if row.data is None:
            count = bad_row_rollouts
            for r in range(first, first + count):
                if not skip(r):
                    yield RolloutRequest(state.seq, task, r, None, b"", f"{rows.location(row)}: {row.error}")
                    state.seq += 1
        else:
            where = rows.location(row)
            key = builder.router.key(row.data, where)
            count = builder.rollouts(key)
            stamps = builder.result_stamps(row.data) or None
            attempt_of = state.attempt_of
            try:
                for r, agent, ref, body, attempt in builder.build(row.data, task, where, skip, first, key,
                                                                   attempt_of=attempt_of,
                                                                   materialize=state.materialize):
                    yield RolloutRequest(state.seq, task, r, ref, body, stamps=stamps,
                                         route=agent if ref is None else None, attempt=attempt)
                    state.seq += 1
            except TypeError as exc:  # orjson reads 1024 levels of nesting but writes at most 255
                if "Recursion limit" not in str(exc):
                    raise
                raise InputError(f"{where}: the row cannot be written as a request ({exc}: it is nested more than "
                                 "255 levels deep); flatten it") from None
        state.max_rollout = max(state.max_rollout, first + count - 1)
        if indexer is not None:
            indexer.add_rollouts(task, count)


def _checkpointed(items: Iterator[T], checkpoint: Callable[[], None]) -> Iterator[T]:
    """`items`, calling `checkpoint` every `STAT_EVERY_ROWS` of them."""
    for count, item in enumerate(items, 1):
        if count % STAT_EVERY_ROWS == 0:
            checkpoint()
        yield item


def _rollouts_of(builder: RequestBuilder, row: Row, where: str) -> int:
    data = _parsed(row.raw)
    return 1 if data is None else builder.rollouts(builder.check(data, where))


def _parsed(raw: bytes) -> dict[str, Any] | None:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _capacity(path: Path, selection: RowSelection) -> int:
    """Rows the index filters are sized for: the selection's end, or the file's line count."""
    if selection.stop_idx is not None:
        return selection.stop_idx
    with _open_input(path) as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b"")) + 1


def _parse_row(raw: bytes, index: int, line_no: int) -> Row:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = "not valid UTF-8" if "UTF-8" in str(exc) else f"not valid JSON ({exc})"
        return Row(index, line_no, None, reason, raw)
    if not isinstance(data, dict):
        return Row(index, line_no, None, f"not a JSON object (a {type(data).__name__})", raw)
    return Row(index, line_no, data, None, raw)


def _stat_input(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: input file not found; check input_jsonl_fpath") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the input file ({exc.strerror})") from exc


def _open_input(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise InputError(f"{path}: input file not found; check input_jsonl_fpath") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read the input file ({exc.strerror})") from exc
