"""The permit gate every request passes: FIFO permits whose count can change at run time."""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import AbstractAsyncContextManager
from types import TracebackType


class ConcurrencyGate:
    """At most `limit` holders at once; `limit` can change at run time (`None` = unlimited).

    Lowering the limit never evicts holders, but no new holder enters until `in_flight < limit`, so in-flight
    never exceeds the limit in force when a holder entered and converges down to a lowered limit. Waiters are
    served first come, first served (a newcomer never overtakes a queued waiter) and are futures woken by
    `release` or by raising the limit: nothing polls. Single event loop; not thread-safe.
    """

    def __init__(self, limit: int | None) -> None:
        """Raises ValueError if `limit` is not None and < 1."""
        self._limit = _check_gate_limit(limit)
        self._in_flight = 0
        self._max_in_flight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int | None:
        """Current maximum number of holders; None = unlimited."""
        return self._limit

    @limit.setter
    def limit(self, value: int | None) -> None:
        """Raising the limit admits waiters at once; lowering it only stops admissions. ValueError if < 1."""
        self._limit = _check_gate_limit(value)
        self._wake()

    @property
    def in_flight(self) -> int:
        """Number of permits currently held."""
        return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """Peak of `in_flight` since construction."""
        return self._max_in_flight

    @property
    def waiting(self) -> int:
        """Number of tasks queued in `acquire`."""
        return len(self._waiters)

    async def acquire(self) -> None:
        """Wait for a permit (FIFO). Cancellation-safe: a cancelled waiter holds no permit afterwards."""
        if not self._waiters and self._has_room():
            self._take()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                # The permit was granted just before the cancellation landed: hand it on.
                self.release()
            elif fut in self._waiters:  # _wake may have popped it already
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Return a permit and admit the next waiter(s). RuntimeError if no permit is held."""
        if self._in_flight <= 0:
            raise RuntimeError("ConcurrencyGate.release() called with no permit held")
        self._in_flight -= 1
        self._wake()

    def slot(self) -> AbstractAsyncContextManager[None]:
        """`async with gate.slot(): ...` holds one permit for the block, released on every path."""
        return _Slot(self)

    def _has_room(self) -> bool:
        return self._limit is None or self._in_flight < self._limit

    def _take(self) -> None:
        self._in_flight += 1
        self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _wake(self) -> None:
        # Permits are counted when granted, so a woken task that has not run yet already holds its permit.
        while self._waiters and self._has_room():
            fut = self._waiters.popleft()
            if not fut.done():
                self._take()
                fut.set_result(None)


class _Slot(AbstractAsyncContextManager[None]):
    __slots__ = ("_gate",)

    def __init__(self, gate: ConcurrencyGate) -> None:
        self._gate = gate

    async def __aenter__(self) -> None:
        await self._gate.acquire()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._gate.release()


def _check_gate_limit(limit: int | None) -> int | None:
    if limit is not None and limit < 1:
        raise ValueError(f"gate limit must be >= 1 or None, got {limit}")
    return limit
