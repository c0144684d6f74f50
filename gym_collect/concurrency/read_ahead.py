"""Per-backend read-ahead: rows wait by backend, so a backend at its limit never holds back another's."""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from gym_collect.concurrency.limits import InFlightLimits

T = TypeVar("T")

DEFAULT_READ_AHEAD = 1024


class ReadAhead(Generic[T]):
    """Up to `capacity` items read from the input and not yet started, queued by backend.

    `next_startable()` is the item with the lowest sequence number among the backends with room in
    `limits`, so items start in input order as far as the limits allow. Memory: `capacity` items, whatever
    the input's size. Head-of-line blocking only when `capacity` items all wait for full backends.
    """

    def __init__(self, limits: InFlightLimits, capacity: int = DEFAULT_READ_AHEAD) -> None:
        if capacity < 1:
            raise ValueError(f"read-ahead capacity must be >= 1, got {capacity}")
        self.limits = limits
        self.capacity = capacity
        self._queues: dict[str, deque[tuple[int, T]]] = {}
        self.size = 0

    @property
    def full(self) -> bool:
        """True when no more items may be read."""
        return self.size >= self.capacity

    def add(self, seq: int, backend: str, item: T) -> None:
        """Queue an item read from the input (sequence numbers increase)."""
        self._queues.setdefault(backend, deque()).append((seq, item))
        self.size += 1

    def next_startable(self) -> tuple[int, str] | None:
        """(seq, backend) of the first item that may start now, or None."""
        best: tuple[int, str] | None = None
        for backend, queue in self._queues.items():
            if queue and (best is None or queue[0][0] < best[0]) and self.limits.has_room(backend):
                best = (queue[0][0], backend)
        return best

    def pop(self, backend: str) -> T:
        """Remove and return the first queued item of `backend`."""
        _, item = self._queues[backend].popleft()
        self.size -= 1
        return item
