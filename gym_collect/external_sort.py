"""A stable sort of more items than memory should hold: sorted runs spilled to temporary files, then a k-way
merge of the runs (external merge sort, Knuth, TAOCP vol. 3, §5.4.1; GNU sort works the same way).

    add() ─> buffer ──(full)──> sort, spill as run 0, 1, 2, ...  ─┐
                                                                 ├─> sorted(): heapq.merge of the runs
             buffer at the end, sorted in memory (the last run) ─┘    (at most `fan_in` files open)
"""

from __future__ import annotations

import heapq
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

T = TypeVar("T")

DEFAULT_FAN_IN = 64  # runs merged at once, so at most this many files are open
READ_BUFFER_BYTES = 1 << 16  # per open run during the merge


def _one(item: object) -> int:
    return 1


class ExternalSorter(Generic[T]):
    """Collects items with `add`, then yields them once from `sorted()` in the order of
    `sorted(items, key=key)` (stable: items with equal keys keep the order they were added in).

    Memory: the buffer holds items up to a total `size` of `max_buffer` (default: `max_buffer` items), plus
    one item and a `READ_BUFFER_BYTES` read buffer per run during the merge. When the buffer is full it is
    sorted and written to a temporary file (a run) under `folder` (default: the system's temporary folder,
    `TMPDIR`); when more than `fan_in` runs exist they are first merged `fan_in` at a time. Items and keys
    must be picklable; spilled items are read back as copies.

    Context manager: leaving it (or `close()`) removes the temporary files. Raises `OSError` when a run
    cannot be written or read, `ValueError` when `sorted()` is called twice or `add` after it.
    """

    def __init__(self, key: Callable[[T], Any], *, max_buffer: int, size: Callable[[T], int] = _one,
                 fan_in: int = DEFAULT_FAN_IN, folder: Path | None = None) -> None:
        if max_buffer < 1 or fan_in < 2:
            raise ValueError(f"max_buffer must be >= 1 and fan_in >= 2, got {max_buffer} and {fan_in}")
        self.key = key
        self.size = size
        self.max_buffer = max_buffer
        self.fan_in = fan_in
        self.folder = folder
        self.spilled_runs = 0  # runs written to disk, for tests and logs
        self._buffer: list[T] = []
        self._buffered = 0
        self._runs: list[Path] = []
        self._tmp: Path | None = None
        self._done = False

    def __enter__(self) -> ExternalSorter[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Remove the temporary files (the sorted stream cannot be read further)."""
        self._buffer.clear()
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def add(self, item: T) -> None:
        """Add one item; spills the buffer as a sorted run when it is full."""
        if self._done:
            raise ValueError("ExternalSorter.add after sorted()")
        self._buffer.append(item)
        self._buffered += self.size(item)
        if self._buffered >= self.max_buffer:
            self._buffer.sort(key=self.key)
            self._runs.append(self._write_run(self._buffer))
            self._buffer, self._buffered = [], 0

    def extend(self, items: Iterable[T]) -> None:
        """`add` each item."""
        for item in items:
            self.add(item)

    def sorted(self) -> Iterator[T]:
        """Every item added, in key order, stable; once."""
        if self._done:
            raise ValueError("ExternalSorter.sorted() called twice")
        self._done = True
        self._buffer.sort(key=self.key)
        while len(self._runs) + 1 > self.fan_in:
            # The merged run replaces the earliest runs in place, so equal keys keep their order.
            first, rest = self._runs[:self.fan_in], self._runs[self.fan_in:]
            merged = self._write_run(heapq.merge(*map(self._read_run, first), key=self.key))
            for path in first:
                path.unlink()
            self._runs = [merged, *rest]
        buffer, self._buffer = self._buffer, []
        yield from heapq.merge(*map(self._read_run, self._runs), buffer, key=self.key)

    def _write_run(self, items: Iterable[T]) -> Path:
        if self._tmp is None:
            self._tmp = Path(tempfile.mkdtemp(prefix="gym_collect_sort_", dir=self.folder))
        path = self._tmp / f"run-{self.spilled_runs:06d}"
        with path.open("wb") as f:
            for item in items:
                f.write(pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL))
        self.spilled_runs += 1
        return path

    @staticmethod
    def _read_run(path: Path) -> Iterator[T]:
        # One `pickle.load` per item: a shared Unpickler would keep every item in its memo.
        with path.open("rb", buffering=READ_BUFFER_BYTES) as f:
            while True:
                try:
                    yield pickle.load(f)  # our own temporary file, written above
                except EOFError:
                    return
