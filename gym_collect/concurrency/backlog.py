"""Requests read from the input and not yet started, queued by backend, so that a backend at its limit never
holds back another's rows, in memory that does not grow with the input:

    input ──(read while a backend has room, nothing queued and rows left)──┬─> backend a: memory ≤ N, then spill
                                                                            └─> backend b: memory ≤ N, then spill
    start: of the backends with room, the queue whose head comes first in input order

Each backend holds up to `per_backend` requests in memory; past that, its requests go to its `SpillQueue` (a
temporary file) and come back in order as the memory drains. Rows are read only for a backend that could
start one now and has none queued, so with one backend, or with every backend busy, nothing piles up; a
backend waiting for its rows lets the reader run ahead past the others', which then wait on disk. Disk use
is the pickled requests read past a backend's memory and not started: with rows interleaved and one backend
far faster than another, up to the slower backend's share of the input's requests.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Generic, TypeVar

from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.concurrency.spill import SpillQueue

T = TypeVar("T")

DEFAULT_PER_BACKEND = 256


@dataclass
class _Queue(Generic[T]):
    """One backend's requests in input order: the oldest in `memory`, the rest in `spill` (while `spill` holds
    any, `memory` does too)."""

    spill: SpillQueue[tuple[int, T]]
    memory: deque[tuple[int, T]] = field(default_factory=deque)

    def __len__(self) -> int:
        return len(self.memory) + self.spill.size


class Backlog(Generic[T]):
    """Items read and not yet started, by backend (module docstring). A context manager: leaving it
    removes the spill files.

    Args:
        limits: the in-flight limits that say which backend has room.
        per_backend: items a backend holds in memory, at most (>= 1); memory is this times the backends.
        remaining: backend -> items still to come from the input for it (counted down by `add`), so a backend
            whose rows are all read does not keep the reader going; None: unknown, every backend of `limits`
            may get more.
        max_span: read only while the next item's sequence number would be less than `max_span` past the
            lowest one queued (with output in input order, the reorder window: an item further on could not
            start before the queued one, and waiting for it would hold back what frees it). None: no bound.
        folder: where spill files go (default: `TMPDIR`).

    `add` takes items in increasing sequence numbers. Raises `OutputError` when a spill file cannot be written.
    Single event loop; not thread-safe.
    """

    def __init__(self, limits: InFlightLimits, per_backend: int = DEFAULT_PER_BACKEND, *,
                 remaining: Mapping[str, int] | None = None, max_span: int | None = None,
                 folder: Path | None = None) -> None:
        if per_backend < 1 or (max_span is not None and max_span < 1):
            raise ValueError(f"per_backend and max_span must be >= 1, got {per_backend} and {max_span}")
        self.limits = limits
        self.per_backend = per_backend
        self.max_span = max_span
        self.folder = folder
        self.size = 0  # items queued, in memory and spilled
        self.in_memory = 0
        self.peak_in_memory = 0
        self._remaining = None if remaining is None else dict(remaining)
        self._queues: dict[str, _Queue[T]] = {}
        self._last_seq: int | None = None

    def __enter__(self) -> Backlog[T]:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def spilled(self) -> int:
        """Items queued on disk now."""
        return self.size - self.in_memory

    def queued(self, backend: str) -> int:
        """Items of `backend` queued now."""
        queue = self._queues.get(backend)
        return 0 if queue is None else len(queue)

    def in_memory_of(self, backend: str) -> int:
        """Items of `backend` held in memory now (at most `per_backend`)."""
        queue = self._queues.get(backend)
        return 0 if queue is None else len(queue.memory)

    def add(self, seq: int, backend: str, item: T, *, counted: bool = True) -> None:
        """Queue an item read from the input; `counted`: it is one of `remaining`'s for its backend."""
        queue = self._queues.get(backend)
        if queue is None:
            queue = self._queues[backend] = _Queue(SpillQueue(self.folder))
        if queue.spill.size or len(queue.memory) >= self.per_backend:
            queue.spill.put((seq, item))
        else:
            queue.memory.append((seq, item))
            self.in_memory += 1
            self.peak_in_memory = max(self.peak_in_memory, self.in_memory)
        self.size += 1
        self._last_seq = seq
        if counted and self._remaining is not None and backend in self._remaining:
            self._remaining[backend] -= 1

    def wants_more(self) -> bool:
        """True when the next item should be read now: nothing is queued, or a backend that has room and
        rows left has nothing queued (within `max_span`)."""
        if self.size == 0:
            return True
        if self.max_span is not None and self._last_seq is not None:
            lowest = min(queue.memory[0][0] for queue in self._queues.values() if queue.memory)
            if self._last_seq + 1 - lowest >= self.max_span:
                return False
        queues, has_room = self._queues, self.limits.has_room
        for backend in self._awaited():
            queue = queues.get(backend)
            if (queue is None or not queue.memory) and has_room(backend):  # memory empty: spill empty too
                return True
        return False

    def next_startable(self) -> tuple[int, str] | None:
        """(seq, backend) of the first item that may start now, or None."""
        best: tuple[int, str] | None = None
        for backend, queue in self._queues.items():
            if queue.memory and (best is None or queue.memory[0][0] < best[0]) and self.limits.has_room(backend):
                best = (queue.memory[0][0], backend)
        return best

    def pop(self, backend: str) -> T:
        """Remove and return the first queued item of `backend`; refills its memory from its spill file once
        half of it has drained."""
        queue = self._queues[backend]
        _, item = queue.memory.popleft()
        self.size -= 1
        self.in_memory -= 1
        if queue.spill.size and len(queue.memory) <= self.per_backend // 2:
            back = queue.spill.take(self.per_backend - len(queue.memory))
            queue.memory.extend(back)
            self.in_memory += len(back)
        return item

    def close(self) -> None:
        """Drop what is queued and remove the spill files. Idempotent."""
        for queue in self._queues.values():
            queue.spill.close()
        self._queues.clear()
        self.size = self.in_memory = 0

    def _awaited(self) -> Iterable[str]:
        """The backends that may still get items from the input."""
        if self._remaining is None:
            return self.limits.backend_names()
        return (backend for backend, left in self._remaining.items() if left > 0)
