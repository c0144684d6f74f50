"""Lazy JSONL rows with their indices, and the rollout requests built from them.

Row `i` is the i-th non-blank line of the file, 0-based (NeMo Gym's task index). A UTF-8 BOM and CRLF line
ends are accepted. Selection is `[start_idx, end_idx)`, then `limit`; each row gives `num_repeats`
requests in the pattern aabbcc.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from gym_collect.errors import ConfigError, InputError

BOM = b"\xef\xbb\xbf"
TASK_INDEX_KEY = "_ng_task_index"
ROLLOUT_INDEX_KEY = "_ng_rollout_index"
AGENT_REF_KEY = "agent_ref"
RESPONSES_CREATE_PARAMS_KEY = "responses_create_params"
UNNAMED_AGENT = "(agent_url)"  # routing key of rows without `agent_ref` when only `agent_url` is given
DIGEST_SIZE = 16
STAT_EVERY_ROWS = 1024


@dataclass(slots=True)
class Row:
    """One selected input row: `data` is the parsed object, or None with `error` saying why not."""

    task_index: int
    line_no: int
    data: dict[str, Any] | None
    error: str | None = None


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

    @property
    def agent_name(self) -> str:
        """The name of the agent this request goes to (`UNNAMED_AGENT` for rows sent to `agent_url` as they
        are, without an `agent_ref`)."""
        return UNNAMED_AGENT if self.agent_ref is None else str(self.agent_ref["name"])


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

    With `expected` (what the check pass saw), iteration also watches the file: it stops early and sets
    `change` when the file's size or modification time moved (checked every `STAT_EVERY_ROWS` rows), or
    when the bytes up to the last selected row differ from the check pass's (`selection_digest`), or the
    file ends too soon. Raises `InputError` (`file:line: reason`) when the file cannot be opened; bad rows
    are yielded with `error` set, so the caller decides between stopping and skipping.
    """

    def __init__(
        self, path: Path, selection: RowSelection, expected: InputSnapshot | None = None, *, read_to_end: bool = False
    ) -> None:
        self.path = path
        self.selection = selection
        self.expected = expected
        self.read_to_end = read_to_end
        self.change: str | None = None
        self.totals: FileTotals | None = None

    def __iter__(self) -> Iterator[Row]:
        start, stop = self.selection.start_idx, self.selection.stop_idx
        expected = self.expected
        digest = hashlib.blake2b(digest_size=DIGEST_SIZE)
        through_selection = digest.copy()  # the bytes up to the end of the last selected row's line
        seen = 0
        task_index = -1
        with _open_input(self.path) as f:
            for line_no, raw in enumerate(f, 1):
                digest.update(raw)
                if line_no == 1 and raw.startswith(BOM):
                    raw = raw[len(BOM):]
                if not raw.strip():
                    continue
                task_index += 1
                if task_index < start:
                    continue
                if stop is not None and task_index >= stop:
                    break
                seen += 1
                if expected is not None and seen % STAT_EVERY_ROWS == 0 and self._moved(expected):
                    return
                yield _parse_row(raw, task_index, line_no)
                through_selection = digest.copy()
                if stop is not None and task_index + 1 >= stop:
                    break
            selection_digest = through_selection.hexdigest()
            if self.read_to_end:
                size = f.tell()
                for raw in f:
                    digest.update(raw)
                    size += len(raw)
                    task_index += bool(raw.strip())
                self.totals = FileTotals(task_index + 1, size, selection_digest, digest.hexdigest())
        if expected is not None and self.change is None:
            if seen < expected.num_rows:
                self.change = f"it now ends after {seen} of the {expected.num_rows} selected rows"
            elif selection_digest != expected.selection_digest:
                self.change = "the selected rows' content differs from the check at start"
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


@dataclass(frozen=True)
class FileTotals:
    """What reading a file to its end found: rows (non-blank lines), bytes, and BLAKE2b-128 digests of the
    bytes through the last selected row and of the whole file."""

    rows: int
    size: int
    selection_digest: str
    fingerprint: str


@dataclass(frozen=True)
class InputSnapshot:
    """The input as the check pass saw it; it fixes the run's selection.

    `num_rows` selected rows of `total_rows`; `size`, `mtime_ns`, `inode` from `stat`; `fingerprint` a
    BLAKE2b-128 hex digest of every byte, `selection_digest` of the bytes through the last selected row.
    """

    num_rows: int
    total_rows: int
    size: int
    mtime_ns: int
    inode: int
    fingerprint: str
    selection_digest: str

    @property
    def identity(self) -> dict[str, Any]:
        """The input's identity for the run manifest: its size and fingerprint, not its path."""
        return {"size": self.size, "fingerprint": self.fingerprint}


@dataclass
class ScanResult:
    """What the pre-flight pass over the selection found."""

    num_rows: int
    agent_rows: Counter[str]
    bad_rows: int
    snapshot: InputSnapshot | None = None

    @property
    def agent_names(self) -> set[str]:
        """The agents the selected rows go to."""
        return set(self.agent_rows)


def scan(
    rows: JsonlRows,
    default_agent: str | None,
    on_bad_row: str,
    checkpoint: Callable[[], None] | None = None,
) -> ScanResult:
    """Check every selected row before any request is sent, and fingerprint the whole file in the same pass.

    Returns the row count, the agent names the rows need, and the `InputSnapshot` that fixes the selection.
    `checkpoint` is called every `STAT_EVERY_ROWS` rows (it may raise to abandon the scan). Raises
    `InputError` at the first bad row when `on_bad_row == "fail"` or when the file changes while it is
    read, and `ConfigError` when a row has no `agent_ref` and `agent_name` is unset.
    """
    before = _stat_input(rows.path)
    reader = JsonlRows(rows.path, rows.selection, read_to_end=True)
    result = ScanResult(0, Counter(), 0)
    for row in reader:
        result.num_rows += 1
        if checkpoint is not None and result.num_rows % STAT_EVERY_ROWS == 0:
            checkpoint()
        if row.data is None:
            if on_bad_row == "fail":
                raise InputError(
                    f"{reader.location(row)}: {row.error}; fix the line, or pass on_bad_row=skip to record it "
                    "as a failure and go on"
                )
            result.bad_rows += 1
            continue
        result.agent_rows[agent_name_of(row.data, default_agent, reader.location(row))] += 1
    after = _stat_input(rows.path)
    totals = reader.totals
    assert totals is not None
    if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or totals.size != after.st_size:
        raise InputError(f"{rows.path}: the input changed while it was being checked; rerun once it is complete")
    result.snapshot = InputSnapshot(
        result.num_rows, totals.rows, after.st_size, after.st_mtime_ns, after.st_ino, totals.fingerprint,
        totals.selection_digest,
    )
    return result


def agent_name_of(data: dict[str, Any], default_agent: str | None, where: str) -> str:
    """The agent a row goes to: its own `agent_ref.name`, else `default_agent`.

    Raises `ConfigError` when there is neither.
    """
    ref = data.get(AGENT_REF_KEY)
    if isinstance(ref, dict) and isinstance(ref.get("name"), str):
        return ref["name"]  # type: ignore[no-any-return]
    if default_agent is None:
        raise ConfigError(
            f"{where}: the row has no agent_ref.name, and neither agent_name nor agent_url is set: pass "
            "agent_name=NAME (an agent the head server knows) or agent_url=URL"
        )
    return default_agent


def iter_requests(
    rows: JsonlRows,
    num_repeats: int,
    default_agent: str | None,
    responses_create_params: dict[str, Any],
    is_done: Callable[[int, int], bool],
) -> Iterator[RolloutRequest]:
    """Rollout requests in input order (aabbcc), skipping (task, rollout) pairs for which `is_done` is true.

    Each body is the row with `responses_create_params` shallow-merged with the overrides, `agent_ref` the
    row's own or `{"name": default_agent}`, and `_ng_task_index`/`_ng_rollout_index` set; serialized
    with orjson.
    """
    seq = 0
    for row in rows:
        todo = [r for r in range(num_repeats) if not is_done(row.task_index, r)]
        if not todo:
            continue
        if row.data is None:
            ref = None if default_agent in (None, UNNAMED_AGENT) else {"name": default_agent}
            for r in todo:
                yield RolloutRequest(seq, row.task_index, r, ref, b"", f"{rows.location(row)}: {row.error}")
                seq += 1
            continue
        data = row.data
        agent = agent_name_of(data, default_agent, rows.location(row))
        own = data.get(AGENT_REF_KEY)
        if agent == UNNAMED_AGENT:
            ref = None
        else:
            if not (isinstance(own, dict) and own.get("name") == agent):
                data[AGENT_REF_KEY] = {**(own if isinstance(own, dict) else {}), "name": agent}
            ref = data[AGENT_REF_KEY]
        if responses_create_params:
            own = data.get(RESPONSES_CREATE_PARAMS_KEY)
            data[RESPONSES_CREATE_PARAMS_KEY] = {**(own if isinstance(own, dict) else {}), **responses_create_params}
        data[TASK_INDEX_KEY] = row.task_index
        for r in todo:
            data[ROLLOUT_INDEX_KEY] = r
            yield RolloutRequest(seq, row.task_index, r, ref, orjson.dumps(data))
            seq += 1


def _parse_row(raw: bytes, task_index: int, line_no: int) -> Row:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = "not valid UTF-8" if "UTF-8" in str(exc) else f"not valid JSON ({exc})"
        return Row(task_index, line_no, None, reason)
    if not isinstance(data, dict):
        return Row(task_index, line_no, None, f"not a JSON object (a {type(data).__name__})")
    return Row(task_index, line_no, data)


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
