"""How the simulated agent misbehaves: per-request fault draws, and the two capacity models that delay
requests past capacity (FIFO slots for ``queue``/``rate_limited``, processor sharing for ``gpu``).

Used by :mod:`gym_collect.sim_agent`; nothing here does I/O.
"""

import asyncio
import enum
import math
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from email.utils import formatdate


class Fault(enum.Enum):
    """A scripted misbehaviour, in the order its probability band is laid out on [0, 1)."""

    RESET = "reset"
    HANG = "hang"
    ERROR_500 = "500"
    RATE_LIMIT_429 = "429"
    NON_JSON = "non_json"


def draw_fault(u: float, rates: dict[Fault, float]) -> Fault | None:
    """The fault whose band holds ``u`` (uniform on [0, 1)); bands are consecutive, ``rates[f]`` wide, in
    :class:`Fault` order. ``None`` (no fault) past the last band. Rates must sum to <= 1.
    """
    edge = 0.0
    for fault in Fault:
        edge += rates.get(fault, 0.0)
        if u < edge:
            return fault
    return None


def retry_after_value(seconds: float, as_date: bool, now: float | None = None) -> str:
    """A ``Retry-After`` value: delta-seconds as ``f"{seconds:g}"`` (fractions are not RFC 9110 but common),
    or with ``as_date`` an IMF-fixdate (RFC 9110 §5.6.7) of ``now`` (epoch seconds, default wall clock)
    plus ``seconds``, rounded up to the whole second.
    """
    if as_date:
        return formatdate(math.ceil((time.time() if now is None else now) + seconds), usegmt=True)
    return f"{seconds:g}"


class FifoSlots:
    """``capacity()`` service slots, handed out first come first served; capacity may change at run time
    (a drop takes effect as slots are released). Cancellation-safe.
    """

    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self.busy = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is waiting; never blocks."""
        if not self._waiters and self.busy < self._capacity():
            self.busy += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in FIFO order."""
        if self.try_acquire():
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            with suppress(ValueError):
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give a slot back; hands it to the oldest waiter."""
        self.busy -= 1
        while self._waiters and self.busy < self._capacity():
            fut = self._waiters.popleft()
            if not fut.done():
                self.busy += 1
                fut.set_result(None)


class SharedProcessor:
    """Processor sharing (continuous batching): with ``n`` jobs in service each progresses at
    ``min(1, capacity() / n)`` seconds of work per second, so a lone job's time is stretched by
    ``max(1, n / capacity)`` while ``n`` holds, re-evaluated at every arrival and departure.

    ``degrade()`` > 0 makes throughput fall past capacity, as a GPU server does when it preempts and
    recomputes requests (vLLM when its KV cache is full): the ``n`` jobs then share
    ``C / (1 + degrade * (n - C) / C)`` seconds of work per second instead of ``C``.

    ``_work`` is the work a job present all along would have received by ``_stamp`` (loop time); a job is done
    when ``_work`` reaches its finish mark. One timer is armed for the earliest finish; nothing polls.
    """

    def __init__(self, capacity: Callable[[], int], degrade: Callable[[], float] = lambda: 0.0) -> None:
        self._capacity = capacity
        self._degrade = degrade
        self._finish: dict[asyncio.Future[None], float] = {}
        self._work = 0.0
        self._stamp = 0.0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_service(self) -> int:
        """Jobs now in service."""
        return len(self._finish)

    async def serve(self, work_s: float) -> None:
        """Return once ``work_s`` seconds of work have been served to this job. Cancellation-safe."""
        loop = asyncio.get_running_loop()
        self._advance(loop.time())
        fut = loop.create_future()
        self._finish[fut] = self._work + work_s
        self._arm(loop)
        try:
            await fut
        except asyncio.CancelledError:
            if fut in self._finish:
                self._advance(loop.time())
                del self._finish[fut]
                self._arm(loop)
            raise

    def work_rate(self, n: int) -> float:
        """Seconds of work per second each of ``n`` jobs in service receives."""
        capacity = self._capacity()
        if n <= capacity:
            return 1.0
        return capacity / n / (1.0 + self._degrade() * (n - capacity) / capacity)

    def _rate(self) -> float:
        return self.work_rate(len(self._finish))

    def _advance(self, now: float) -> None:
        self._work += (now - self._stamp) * self._rate()
        self._stamp = now

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._finish:
            delay = (min(self._finish.values()) - self._work) / self._rate()
            self._timer = loop.call_later(max(0.0, delay), self._on_timer, loop)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        self._advance(loop.time())
        for fut, end in list(self._finish.items()):
            if end <= self._work + 1e-6:
                del self._finish[fut]
                if not fut.done():
                    fut.set_result(None)
        self._arm(loop)
