"""A closed-loop simulation of the in-flight limits against modelled backends, in simulated time (no
sleeping), for tests and benchmarks: the same `InFlightLimits`, `AdaptiveLimit` and `Backlog` the runner
uses decide what is read and what starts."""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gym_collect.concurrency.backlog import DEFAULT_PER_BACKEND, Backlog
from gym_collect.concurrency.limiter import AdaptiveLimit
from gym_collect.concurrency.limits import InFlightLimits


@dataclass
class SimBackend:
    """Modelled backend for `simulate` (all times in simulated seconds).

    A request's work is `service_time_s` times a log-normal factor of median 1 and shape `jitter_sigma`
    (drawn per attempt) times one of shape `task_sigma` (drawn per task: heavy-tailed, task-determined
    lengths). `model`: "fifo" serves `capacity` requests at once, more wait in a FIFO queue; "shared" serves
    all at once by processor sharing (continuous batching), the backend delivering min(n, C) seconds of work
    per second to n requests, or with `degrade` > 0, C / (1 + degrade * (n - C) / C) past C (preemption and
    recomputation, as vLLM does when its KV cache is full). `reject_over_capacity`: past C requests are
    answered 429 after `reject_latency_s` (rate-limited API). `report_usage`: successes report their work as
    a cost of `tokens_per_s` tokens per second of work (as `response.usage` does), else no cost.
    `capacity_changes`: (time_s, capacity) steps (work in service is never evicted);
    `service_time_changes`: (time_s, service_time_s) steps, for requests sent later.
    """

    capacity: int
    service_time_s: float = 0.1
    jitter_sigma: float = 0.0
    reject_over_capacity: bool = False
    reject_latency_s: float = 0.005
    capacity_changes: Sequence[tuple[float, int]] = ()
    service_time_changes: Sequence[tuple[float, float]] = ()
    seed: int = 0
    model: str = "fifo"
    degrade: float = 0.0
    task_sigma: float = 0.0
    report_usage: bool = False
    tokens_per_s: float = 1000.0

    def __post_init__(self) -> None:
        if self.model not in ("fifo", "shared"):
            raise ValueError(f"model must be 'fifo' or 'shared', got {self.model!r}")
        if self.capacity < 1 or self.degrade < 0 or self.task_sigma < 0 or self.jitter_sigma < 0:
            raise ValueError("need capacity >= 1 and degrade, task_sigma, jitter_sigma >= 0")

    def delivered(self, n: int, capacity: int) -> float:
        """Seconds of work per second delivered to `n` requests in service (model "shared")."""
        if n <= capacity:
            return float(n)
        return capacity / (1.0 + self.degrade * (n - capacity) / capacity)


@dataclass
class SimResult:
    """Outcome of a simulation: successes as (done_s, latency_s), 429 times (s), the limit in all as
    (time_s, limit) at changes; `backends` and `work_s` give each success's backend and work (s);
    `peak_backlog` the most rows read and not started held in memory at once."""

    successes: list[tuple[float, float]]
    overloads: list[float]
    limits: list[tuple[float, int]]
    backends: list[str] = dataclasses.field(default_factory=list)
    work_s: list[float] = dataclasses.field(default_factory=list)
    serving: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    peak_backlog: int = 0

    def served_per_s(self, start_s: float, end_s: float) -> float:
        """Seconds of work the backends delivered per second during [start_s, end_s), finished or not (the
        tokens/s a GPU produces), from `serving`: (time_s, work rate in all) at each change."""
        total, steps = 0.0, [*self.serving, (end_s, 0.0)]
        for (t0, rate), (t1, _) in itertools.pairwise(steps):
            total += rate * max(0.0, min(t1, end_s) - max(t0, start_s))
        return total / (end_s - start_s)

    def work_per_s(self, start_s: float, end_s: float, backend: str | None = None) -> float:
        """Seconds of work completed per second in [start_s, end_s) (of one backend, or all)."""
        total = sum(w for (t, _), b, w in zip(self.successes, self.backends, self.work_s, strict=True)
                    if start_s <= t < end_s and (backend is None or b == backend))
        return total / (end_s - start_s)

    def throughput_per_s(self, start_s: float, end_s: float) -> float:
        """Successes per second completed in [start_s, end_s)."""
        return sum(start_s <= t < end_s for t, _ in self.successes) / (end_s - start_s)

    def latency_quantile_s(self, q: float, start_s: float, end_s: float) -> float:
        """q-quantile (0..1, nearest rank) of success latency (s) completed in [start_s, end_s)."""
        lats = sorted(lat for t, lat in self.successes if start_s <= t < end_s)
        return lats[min(len(lats) - 1, int(q * len(lats)))] if lats else math.nan

    def overload_fraction(self, start_s: float, end_s: float) -> float:
        """429s / (429s + successes) in [start_s, end_s)."""
        bad = sum(start_s <= t < end_s for t in self.overloads)
        good = sum(start_s <= t < end_s for t, _ in self.successes)
        return bad / max(1, bad + good)

    def limit_at(self, t_s: float) -> int:
        """Limit in force at time t_s."""
        current = self.limits[0][1]
        for when_s, value in self.limits:
            if when_s > t_s:
                break
            current = value
        return current

    def limit_durations_s(self, start_s: float, end_s: float) -> dict[int, float]:
        """Seconds each limit value was in force during [start_s, end_s)."""
        steps = [(start_s, self.limit_at(start_s))] + [(t, v) for t, v in self.limits if start_s < t < end_s]
        durations: dict[int, float] = {}
        for (t0, value), (t1, _) in zip(steps, [*steps[1:], (end_s, 0)], strict=True):
            durations[value] = durations.get(value, 0.0) + t1 - t0
        return durations

    def limit_quantile(self, q: float, start_s: float, end_s: float) -> int:
        """Time-weighted q-quantile (0..1) of the limit over [start_s, end_s)."""
        durations = self.limit_durations_s(start_s, end_s)
        target, acc = q * sum(durations.values()), 0.0
        for value in sorted(durations):
            acc += durations[value]
            if acc >= target:
                return value
        return max(durations)

    def limit_share(self, low: float, high: float, start_s: float, end_s: float) -> float:
        """Share (0..1) of [start_s, end_s) during which low <= limit <= high."""
        durations = self.limit_durations_s(start_s, end_s)
        return sum(d for v, d in durations.items() if low <= v <= high) / max(sum(durations.values()), 1e-12)



_DONE, _TICK, _REJECT, _RESEND, _SET_CAPACITY, _SET_SERVICE = range(6)


@dataclasses.dataclass
class _Request:
    task: int
    backend: str
    work_s: float = 0.0
    sent_s: float = 0.0


class _Served:
    """One modelled backend's state: FIFO slots and queue, or the processor-sharing clock."""

    def __init__(self, cfg: SimBackend) -> None:
        self.cfg = cfg
        self.capacity = cfg.capacity
        self.service_time_s = cfg.service_time_s
        self.rng = random.Random(cfg.seed)
        self.busy = 0
        self.queue: deque[_Request] = deque()
        self.shared: list[tuple[float, int, _Request]] = []  # (virtual finish, id, request)
        self.virtual_s = 0.0
        self.stamp_s = 0.0
        self.version = 0
        self.retries: deque[_Request] = deque()

    def work_for(self, task: int) -> float:
        cfg = self.cfg
        work = self.service_time_s
        if cfg.jitter_sigma > 0.0:
            work *= math.exp(self.rng.gauss(0.0, cfg.jitter_sigma))
        if cfg.task_sigma > 0.0:
            work *= math.exp(random.Random(cfg.seed * 1_000_003 + task).gauss(0.0, cfg.task_sigma))
        return work

    def rate(self) -> float:
        n = len(self.shared)
        return self.cfg.delivered(n, self.capacity) / n if n else 1.0

    def serving(self) -> float:
        return self.cfg.delivered(len(self.shared), self.capacity) if self.shared else float(self.busy)

    def advance(self, now_s: float) -> None:
        self.virtual_s += (now_s - self.stamp_s) * self.rate()
        self.stamp_s = now_s


def simulate(
    backends: dict[str, SimBackend],
    limits: InFlightLimits,
    seconds: float,
    pattern: Sequence[str] | None = None,
    retry_wait_s: float = 0.0,
    read_ahead_per_backend: int = DEFAULT_PER_BACKEND,
) -> SimResult:
    """Closed-loop clients keep as many requests in flight as `limits` allow, for `seconds` of simulated
    time; deterministic for given seeds. No clock, no asyncio.

    Rows arrive in `pattern`'s order of backend keys, repeated without end (default: the keys of
    `backends` in turn), through a `Backlog` holding `read_ahead_per_backend` rows a backend in memory (the
    rest in its spill file), as the runner dispatches them; `SimResult.peak_backlog` is the most it held in
    memory.
    Successes are reported to `limits` with their latency (from the attempt's send, queueing included) and,
    when the backend reports usage, their cost; 429s as overloads. After a 429 the request parks for
    `retry_wait_s` and retries before new requests, as the runner's retries do; with 0 it is dropped and its
    permit goes to the next request at once (the harshest case for 429 counts).
    """
    served = {key: _Served(cfg) for key, cfg in backends.items()}
    order = list(pattern) if pattern is not None else list(backends)
    rows = Backlog[_Request](limits, read_ahead_per_backend)
    events: list[tuple[float, int, int, str, Any]] = []
    result = SimResult(successes=[], overloads=[], limits=[])
    seq = itertools.count()
    next_row = 0

    def push(time_s: float, kind: int, backend: str, value: Any) -> None:
        heapq.heappush(events, (time_s, next(seq), kind, backend, value))

    def reschedule(state: _Served, backend: str, now_s: float) -> None:
        state.version += 1
        if state.shared:
            delay = max(0.0, (state.shared[0][0] - state.virtual_s) / state.rate())
            push(now_s + delay, _TICK, backend, state.version)

    def send(request: _Request, now_s: float) -> None:
        state = served[request.backend]
        request.sent_s = now_s
        request.work_s = state.work_for(request.task)
        cfg = state.cfg
        if cfg.reject_over_capacity and state.busy >= state.capacity:
            push(now_s + cfg.reject_latency_s, _REJECT, request.backend, request)
        elif cfg.model == "shared":
            state.advance(now_s)
            heapq.heappush(state.shared, (state.virtual_s + request.work_s, next(seq), request))
            reschedule(state, request.backend, now_s)
        elif state.busy < state.capacity:
            state.busy += 1
            push(now_s + request.work_s, _DONE, request.backend, request)
        else:
            state.queue.append(request)

    def succeed(request: _Request, now_s: float) -> None:
        cfg = served[request.backend].cfg
        latency_s = now_s - request.sent_s
        cost = request.work_s * cfg.tokens_per_s if cfg.report_usage else None
        limits.report_success(request.backend, latency_s, max(cost, 1e-9) if cost is not None else None, now_s)
        limits.release(request.backend)
        result.successes.append((now_s, latency_s))
        result.backends.append(request.backend)
        result.work_s.append(request.work_s)

    def admit(now_s: float) -> None:
        nonlocal next_row
        for backend, state in served.items():
            while state.retries and limits.can_resume(backend):
                limits.resume(backend)
                send(state.retries.popleft(), now_s)
        while True:
            while rows.wants_more():
                backend = order[next_row % len(order)]
                rows.add(next_row, backend, _Request(next_row, backend))
                next_row += 1
            pick = rows.next_startable()
            if pick is None:
                break
            limits.take(pick[1])
            send(rows.pop(pick[1]), now_s)
        limit = limits.limit
        if limit is not None and (not result.limits or result.limits[-1][1] != limit):
            result.limits.append((now_s, limit))
        rate = sum(state.serving() for state in served.values())
        if not result.serving or result.serving[-1][1] != rate:
            result.serving.append((now_s, rate))

    for key, cfg in backends.items():
        for when_s, cap in cfg.capacity_changes:
            push(when_s, _SET_CAPACITY, key, cap)
        for when_s, service_s in cfg.service_time_changes:
            push(when_s, _SET_SERVICE, key, service_s)
    with rows:  # removes its spill files
        admit(0.0)
        while events and events[0][0] <= seconds:
            now_s, _, kind, backend, value = heapq.heappop(events)
            state = served[backend]
            if kind == _SET_SERVICE:
                state.service_time_s = value
            elif kind == _SET_CAPACITY:
                state.advance(now_s)
                state.capacity = int(value)
                reschedule(state, backend, now_s)
            elif kind == _RESEND:
                state.retries.append(value)
            elif kind == _DONE:
                state.busy -= 1
                succeed(value, now_s)
            elif kind == _TICK:
                if value != state.version:
                    continue
                state.advance(now_s)
                while state.shared and state.shared[0][0] <= state.virtual_s + 1e-9:
                    succeed(heapq.heappop(state.shared)[2], now_s)
                reschedule(state, backend, now_s)
            else:
                result.overloads.append(now_s)
                limits.report_overload(backend, now_s)
                if retry_wait_s > 0.0:
                    limits.park(backend)
                    push(now_s + retry_wait_s, _RESEND, backend, value)
                else:
                    limits.release(backend)
            while state.queue and state.busy < state.capacity:
                state.busy += 1
                request = state.queue.popleft()
                push(now_s + request.work_s, _DONE, backend, request)
            admit(now_s)
    result.peak_backlog = rows.peak_in_memory
    return result


def simulate_closed_loop(
    backend: SimBackend, limiter: AdaptiveLimit | int, seconds: float, retry_wait_s: float = 0.0
) -> SimResult:
    """`simulate` with one backend whose limit is `limiter` (an int: a fixed limit)."""
    limits = InFlightLimits({"backend": "backend"}, {"backend": limiter}, None)
    return simulate({"backend": backend}, limits, seconds, retry_wait_s=retry_wait_s)
