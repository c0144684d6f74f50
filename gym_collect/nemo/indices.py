"""NeMo Gym 0.7's task and rollout indices, in bounded memory and in agreement across shards.

NeMo Gym 0.7 (`nemo_gym/rollout_collection.py:2155-2192`): a row's own `_ng_task_index` is kept; any other
row gets `row_to_task_idx.setdefault(<the line's text>, len(row_to_task_idx))`, so byte-identical lines
share one task index and the others are numbered densely in order of first appearance; `_ng_rollout_index`
counts per task index over the whole run (a duplicated line, or two rows stamped alike, continue the count).

This tool numbers as if one run went over the whole file from its first row, so that any shard
(`start_idx`/`end_idx`, `num_shards`) gets the indices the single run gives. Instead of NeMo Gym's dict of
every line, it keeps two Bloom filters (Bloom, "Space/time trade-offs in hash coding with allowable errors",
CACM 1970) of 12 bits per row, and exact state only for lines and task indices that may repeat:

    pass 1  every line up to the selection's end: a line hash seen before (per the filter) is a candidate
            duplicate; candidates are exact for every true duplicate, plus ~1% false positives; when no row
            is stamped, the lines are read again (hashed, not parsed) to drop the false positives, so that a
            file of distinct lines, the common case, needs no pass 2
    pass 2  the same lines: task indices assigned in a stream (a dense counter, and a map for candidate
            lines only); task indices seen before (second filter) are candidate repeats
    then    dispatch reads the lines again, assigns the same task indices, and keeps a rollout counter
            only for candidate repeats; every other task starts at rollout 0
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import orjson

TASK_INDEX_KEY = b'"_ng_task_index"'
BITS_PER_KEY, PROBES = 12, 4  # false positives (1 - e^(-4/12))^4 = 0.8%, with few probes (each costs)
MASK_64 = (1 << 64) - 1
TASK_SALT = "task"


class BloomFilter:
    """A Bloom filter over 64-bit keys (already hashed): `add` returns whether the key may have been there.

    Sized for `capacity` keys at `BITS_PER_KEY` bits each and `PROBES` probes; bits are `bytearray`, probes by
    double hashing
    (Kirsch and Mitzenmacher, "Less hashing, same performance", 2006).
    """

    def __init__(self, capacity: int) -> None:
        n = max(capacity, 64)
        self.bits = max(512, BITS_PER_KEY * n)
        self.probes = PROBES
        self._array = bytearray((self.bits + 7) // 8)

    def add(self, key: int) -> bool:
        """Insert `key`; True when every probed bit was already set (seen before, or a false positive)."""
        h1, h2 = key & 0xFFFFFFFF, (key >> 32) | 1
        seen = True
        array, bits = self._array, self.bits
        for i in range(self.probes):
            bit = (h1 + i * h2) % bits
            byte, mask = bit >> 3, 1 << (bit & 7)
            if not array[byte] & mask:
                seen = False
                array[byte] |= mask
        return seen


def line_key(raw: bytes) -> int:
    """A 64-bit hash of a line as NeMo Gym keys it (its text with a `\\n` end, as text mode reads CRLF).

    Python's own (SipHash) `hash`: fast, and stable within the process, the only place keys are compared.
    """
    if raw.endswith(b"\r\n"):
        raw = raw[:-2] + b"\n"
    return hash(raw) & MASK_64


def task_key(task: int) -> int:
    """A 64-bit hash of a task index, for the task filter (spread, so nearby indices probe far apart)."""
    return hash((TASK_SALT, task)) & MASK_64


def stamped_task(raw: bytes, data: dict[str, object] | None) -> int | None:
    """The row's own `_ng_task_index`, or None; parses `raw` only when it mentions the key."""
    if data is None:
        if TASK_INDEX_KEY not in raw:
            return None
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        data = parsed if isinstance(parsed, dict) else {}
    value = data.get("_ng_task_index")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class TaskIndexer:
    """Assigns NeMo Gym 0.7's task and rollout indices over the rows `[0, stop)` of a file (module docstring).

    Use: `observe_line` for every row (pass 1), then `begin_pass` and `task` for every row (pass 2, with
    `observe_task`), then `begin_pass` and `task` again while dispatching, with `rollout_base` /
    `add_rollouts`. Positions are row indices (non-blank lines), fed in order.
    """

    def __init__(self, rows: int) -> None:
        self._lines = BloomFilter(rows)
        self._tasks = BloomFilter(rows)
        self.candidate_lines: set[int] = set()
        self.candidate_tasks: set[int] = set()
        self.stamped = False
        self._dense = 0
        self._line_tasks: dict[int, int] = {}
        self._next_rollout: dict[int, int] = {}

    def observe_line(self, raw: bytes, stamp: int | None) -> None:
        """Pass 1: note an unstamped line, marking it a candidate duplicate if it may have been seen."""
        if stamp is None:
            key = line_key(raw)
            if self._lines.add(key):
                self.candidate_lines.add(key)
        else:
            self.stamped = True

    def confirm_lines(self, raws: Iterable[bytes]) -> None:
        """After pass 1, when no row is stamped: keep as candidate duplicates only the lines seen at least twice
        among `raws` (the rows up to the selection's end, read again, unparsed). The Bloom filter's false
        positives go, so a file of distinct lines is known to be one (`all_distinct`: no pass 2, and no line
        hashed while dispatching); memory: a counter per candidate."""
        counts: Counter[int] = Counter()
        candidates = self.candidate_lines
        for raw in raws:
            key = line_key(raw)
            if key in candidates:
                counts[key] += 1
        self.candidate_lines = {key for key, count in counts.items() if count > 1}

    @property
    def all_distinct(self) -> bool:
        """After pass 1: no row is stamped and no line repeats, so task indices are row indices, each once
        (pass 2 can be skipped)."""
        return not self.stamped and not self.candidate_lines

    def begin_pass(self) -> None:
        """Start a pass over the rows from the first one (pass 2, or dispatch)."""
        self._dense = 0
        self._line_tasks = {}
        self._next_rollout = {}

    def task(self, raw: bytes, stamp: int | None) -> int:
        """The task index of the next row: its stamp, else its line's first task index, else the next one."""
        if stamp is not None:
            return stamp
        key = line_key(raw) if self.candidate_lines else 0
        if key in self.candidate_lines:
            task = self._line_tasks.get(key)
            if task is None:
                task = self._line_tasks[key] = self._dense
                self._dense += 1
            return task
        self._dense += 1
        return self._dense - 1

    def observe_task(self, task: int) -> None:
        """Pass 2: note a task index, marking it a candidate repeat if it may have been seen."""
        if self._tasks.add(task_key(task)):
            self.candidate_tasks.add(task)

    def may_repeat(self, task: int) -> bool:
        """True when rows before or after may share this task index (then its rollouts are counted)."""
        return task in self.candidate_tasks

    def rollout_base(self, task: int) -> int:
        """The first rollout index of the next row of `task` (0 for a task seen once)."""
        return self._next_rollout.get(task, 0)

    def add_rollouts(self, task: int, count: int | Callable[[], int]) -> None:
        """Count `count` rollouts for `task` (a callable is only called when the task may repeat)."""
        if task in self.candidate_tasks:
            n = count() if callable(count) else count
            self._next_rollout[task] = self._next_rollout.get(task, 0) + n
