"""The one owner of the in-flight limit: per-backend limits (fixed or adaptive) under a shared bound.

`InFlightLimits.from_config` builds it once from the config; the runner asks `has_room(backend)` and
`take(backend)` to start a request, reports each outcome (`report_success`, `report_overload`,
`report_error`), waits out retries with `retry_wait` and gives permits back with `release`. The limit's
history and the reorder window it implies come from here too. Decisions are plain method calls with no
awaiting, so `gym_collect.concurrency.sim` drives the same object in simulated time.
"""

from __future__ import annotations

import asyncio
import difflib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from gym_collect.concurrency.limiter import AdaptiveLimit, AdaptiveLimitConfig
from gym_collect.concurrency.spec import AUTO, parse_parallelism

if TYPE_CHECKING:
    from gym_collect.config import CollectConfig

log = logging.getLogger(__name__)

REORDER_WINDOW_PER_SLOT = 32
MIN_REORDER_WINDOW, MAX_REORDER_WINDOW = 4096, 65536
PARKED_PER_SLOT = 1  # requests waiting to retry, per request the backend's limit allows in flight
HISTORY_MAX_POINTS = 1000


class _Backend:
    """One backend's pool: its limit (fixed, adaptive or None), requests in flight, requests parked
    between retries, and retries waiting for a permit (served before new requests)."""

    __slots__ = ("adaptive", "fixed", "in_flight", "parked", "waiters")

    def __init__(self, level: AdaptiveLimit | int | None) -> None:
        self.adaptive = level if isinstance(level, AdaptiveLimit) else None
        self.fixed = level if isinstance(level, int) else None
        self.in_flight = 0
        self.parked = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    @property
    def limit(self) -> int | None:
        return self.adaptive.limit if self.adaptive is not None else self.fixed


class InFlightLimits:
    """Requests in flight per backend and in all; the gate, the feedback and the history in one object.

    Args:
        backend_of: agent name -> backend key (agents not listed are their own backend, with no limit of
            their own). Requests for one backend share its limit; a backend at its limit never holds back
            another's requests.
        levels: backend key -> `AdaptiveLimit` (auto), an int (fixed), or None (no limit of its own).
        shared: requests in flight in all (an int `num_samples_in_parallel`, or the connector's bound).
        clock: monotonic seconds, for `report_*` calls that do not pass `now_s`.

    Requests between retries are parked: they hold no permit (a 429's `Retry-After` does not idle a slot),
    new requests for their backend start only while in-flight + parked < 2 * limit, and a parked request
    gets its permit back before any new request of its backend. Lowering a limit never evicts; in-flight
    converges down to it. Single event loop; not thread-safe.
    """

    def __init__(
        self,
        backend_of: Mapping[str, str],
        levels: Mapping[str, AdaptiveLimit | int | None],
        shared: int | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._backend_of = dict(backend_of)
        self._backends = {key: _Backend(level) for key, level in levels.items()}
        self.shared = shared
        self.clock = clock
        self.in_flight = 0
        self.max_in_flight = 0
        self._changed: asyncio.Event | None = None
        self._history: list[tuple[float, int]] = []
        self._hist_stride = 1
        self._hist_changes = 0
        self._published = self.limit

    @classmethod
    def from_config(cls, cfg: CollectConfig, agent_urls: Mapping[str, str],
                    connection_limits: tuple[int, int] | None = None) -> InFlightLimits:
        """From `num_samples_in_parallel`, `auto.*` and the connector limits (`connection_limits`: the
        client's (in all, per host), default the config's); each agent is its own backend (the one place to
        change when environment servers front several agents)."""
        spec = parse_parallelism(cfg.num_samples_in_parallel)
        for named in spec.by_agent:  # a warning, not an error: a shard may hold no row of some agent
            if named not in agent_urls:
                close = difflib.get_close_matches(named, list(agent_urls), n=1, cutoff=0.5)
                hint = f"did you mean {close[0]!r}?" if close else f"this run's agents: {', '.join(sorted(agent_urls))}"
                log.warning("num_samples_in_parallel.%s limits nothing: no row of this run goes to an agent of that "
                            "name; %s", named, hint)
        backend_of = {agent: agent for agent in agent_urls}
        levels: dict[str, AdaptiveLimit | int | None] = {}
        for agent, backend in backend_of.items():
            level = spec.level(agent)
            if level == AUTO:
                auto = AdaptiveLimitConfig(initial=cfg.auto.initial, min=cfg.auto.min, max=cfg.auto.max)
                levels[backend] = AdaptiveLimit(auto)
            else:
                levels[backend] = level if isinstance(level, int) else None
        hosts = len(set(agent_urls.values())) or 1
        limit, per_host = connection_limits or (cfg.global_aiohttp_connector_limit,
                                                cfg.global_aiohttp_connector_limit_per_host)
        bound = min(limit, per_host * hosts)
        shared = bound if spec.shared is None else min(spec.shared, bound)
        return cls(backend_of, levels, shared)

    @property
    def backends(self) -> list[str]:
        """The backend keys known so far."""
        return list(self._backends)

    def backend_of(self, agent: str) -> str:
        """The backend key of an agent's requests."""
        return self._backend_of.get(agent, agent)

    def limit_of(self, backend: str) -> int | None:
        """A backend's own limit now (None: none of its own)."""
        pool = self._backends.get(backend)
        return None if pool is None else pool.limit

    def adaptive(self, backend: str) -> AdaptiveLimit | None:
        """A backend's adaptive limit, when it has one."""
        pool = self._backends.get(backend)
        return None if pool is None else pool.adaptive

    def in_flight_of(self, backend: str) -> int:
        """Requests of a backend in flight now."""
        return self._pool(backend).in_flight

    @property
    def limit(self) -> int | None:
        """Requests in flight allowed in all now: the shared bound, or the sum of the backends' limits when
        lower (None: no bound at all)."""
        limits = [pool.limit for pool in self._backends.values()]
        total = None if not limits or None in limits else sum(x for x in limits if x is not None)
        if self.shared is None:
            return total
        return self.shared if total is None else min(total, self.shared)

    def backend_names(self) -> Iterable[str]:
        """The backend keys known so far, as a live view (no copy)."""
        return self._backends.keys()

    def has_room(self, backend: str) -> bool:
        """True when a new request for `backend` may start now."""
        pool = self._backends.get(backend) or self._pool(backend)
        if pool.waiters or (self.shared is not None and self.in_flight >= self.shared):
            return False
        limit = pool.limit
        return limit is None or (pool.in_flight < limit and pool.in_flight + pool.parked < 2 * limit)

    def take(self, backend: str) -> None:
        """Start a request for `backend` (the caller checked `has_room`)."""
        self._take(self._pool(backend))

    def release(self, backend: str) -> None:
        """A request of `backend` ended (whatever the outcome): its permit goes to a waiting retry or a new
        request. RuntimeError if none was in flight."""
        pool = self._pool(backend)
        if pool.in_flight <= 0:
            raise RuntimeError(f"InFlightLimits.release({backend!r}) with no request in flight")
        pool.in_flight -= 1
        self.in_flight -= 1
        self._wake()

    async def wait_for_change(self) -> None:
        """Return after the next release or limit change (the dispatcher waits here when nothing can start)."""
        if self._changed is None:
            self._changed = asyncio.Event()
        self._changed.clear()
        await self._changed.wait()

    def park(self, backend: str) -> None:
        """A request of `backend` waits to retry: its permit is given back and it counts as parked."""
        self.release(backend)
        self._pool(backend).parked += 1

    def can_resume(self, backend: str) -> bool:
        """True when a parked request of `backend` may take a permit now (retries go before new requests)."""
        pool = self._pool(backend)
        return self._shared_room() and (pool.limit is None or pool.in_flight < pool.limit)

    def resume(self, backend: str) -> None:
        """A parked request takes a permit again (the caller checked `can_resume`)."""
        pool = self._pool(backend)
        pool.parked -= 1
        self._take(pool)

    async def retry_wait(self, backend: str, wait_s: float) -> None:
        """`park`, sleep `wait_s` seconds, then take a permit again before any new request of the backend
        (FIFO among retries). On every path out (cancellation included) the caller holds a permit again,
        so its one `release` balances."""
        pool = self._pool(backend)
        self.park(backend)
        granted = False
        try:
            await asyncio.sleep(wait_s)
            if not pool.waiters and self.can_resume(backend):
                self.resume(backend)
                granted = True
                return
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            pool.waiters.append(fut)
            try:
                await fut  # `_wake` un-parks and takes the permit before waking us
            finally:
                granted = fut.done() and not fut.cancelled()
                if not granted and fut in pool.waiters:
                    pool.waiters.remove(fut)
        finally:
            if not granted:
                self.resume(backend)  # leaving early: hold a permit for a moment so `release` balances

    def report_success(self, backend: str, latency_s: float, cost: float | None = None,
                       now_s: float | None = None) -> None:
        """A success of `backend`: latency (s) of its last attempt, its cost in work units (tokens from
        `response.usage`, None when it says nothing). Call before `release`."""
        pool = self._pool(backend)
        if pool.adaptive is not None:
            now = self.clock() if now_s is None else now_s
            before = pool.adaptive.limit
            if pool.adaptive.on_success(latency_s, pool.in_flight, now, cost) > before:
                self._wake()
            self._changed_limits(now)

    def report_overload(self, backend: str, now_s: float | None = None) -> None:
        """429, 5xx or a timeout from `backend`: its adaptive limit backs off."""
        pool = self._pool(backend)
        if pool.adaptive is not None:
            now = self.clock() if now_s is None else now_s
            pool.adaptive.on_overload(now)
            self._changed_limits(now)

    def report_error(self, backend: str, now_s: float | None = None) -> None:
        """A failure that says nothing about load (4xx, reset): no change."""
        pool = self._pool(backend)
        if pool.adaptive is not None:
            pool.adaptive.on_error(self.clock() if now_s is None else now_s)

    @property
    def history(self) -> list[tuple[float, int]]:
        """(now_s, total limit) at each change of `limit` while some backend is adaptive, decimated to
        `HISTORY_MAX_POINTS` (every 2nd, then 4th, ... change once full). A copy."""
        return list(self._history)

    def history_since(self, started_s: float) -> list[tuple[float, int]]:
        """`history` as (seconds since `started_s`, limit) from the initial limit at 0.0; empty when no
        backend is adaptive."""
        if not any(pool.adaptive is not None for pool in self._backends.values()):
            return []
        first = self._initial_limit()
        points = [(round(max(0.0, t - started_s), 3), limit) for t, limit in self._history]
        return [(0.0, first), *points] if first is not None else points

    def reorder_window(self) -> int:
        """Held rollouts at most for `output_order=input`: 32 per slot of the largest possible limit in
        all, within [4096, 65536]."""
        slots = 0
        for pool in self._backends.values():
            if pool.adaptive is not None:
                slots += pool.adaptive.config.max
            elif pool.fixed is not None:
                slots += pool.fixed
            else:
                slots = MAX_REORDER_WINDOW
                break
        if self.shared is not None:
            slots = min(slots, self.shared)
        return min(MAX_REORDER_WINDOW, max(MIN_REORDER_WINDOW, REORDER_WINDOW_PER_SLOT * slots))

    def _initial_limit(self) -> int | None:
        total = 0
        for pool in self._backends.values():
            initial = pool.adaptive.config.initial if pool.adaptive is not None else pool.fixed
            if initial is None:
                return self.shared
            total += initial
        return total if self.shared is None else min(total, self.shared)

    def _pool(self, backend: str) -> _Backend:
        pool = self._backends.get(backend)
        if pool is None:
            pool = self._backends[backend] = _Backend(None)
        return pool

    def _shared_room(self) -> bool:
        return self.shared is None or self.in_flight < self.shared

    def _take(self, pool: _Backend) -> None:
        pool.in_flight += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _wake(self) -> None:
        # Retries waiting for a permit first, then the dispatcher.
        for pool in self._backends.values():
            while pool.waiters and self._shared_room() and (pool.limit is None or pool.in_flight < pool.limit):
                fut = pool.waiters.popleft()
                if not fut.done():
                    pool.parked -= 1
                    self._take(pool)
                    fut.set_result(None)
        if self._changed is not None:
            self._changed.set()

    def _changed_limits(self, now_s: float) -> None:
        limit = self.limit
        if limit != self._published:
            self._published = limit
            if limit is not None:
                self._record(now_s, limit)

    def _record(self, now_s: float, limit: int) -> None:
        self._hist_changes += 1
        if self._hist_changes % self._hist_stride == 0:
            if len(self._history) >= HISTORY_MAX_POINTS:
                self._history = self._history[1::2]
                self._hist_stride *= 2
            self._history.append((now_s, limit))
