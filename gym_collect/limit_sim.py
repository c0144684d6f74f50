"""A closed-loop simulation of an `AdaptiveLimit` against a modelled backend, in simulated time (no sleeping),
for tests and benchmarks of the adaptive limit."""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from gym_collect.limiter import AdaptiveLimit


@dataclass
class SimBackend:
    """Modelled backend for `simulate_closed_loop` (all times in simulated seconds).

    `capacity` requests are served at once, each taking `service_time_s` times a log-normal factor of
    median 1 and shape `jitter_sigma`; more wait in a FIFO queue (GPU-like) or, with
    `reject_over_capacity`, are answered 429 after `reject_latency_s` (rate-limited API).
    `capacity_changes` holds (time_s, capacity) steps (work in service is never evicted) and
    `service_time_changes` (time_s, service_time_s) steps, applying to requests that start service later.
    """

    capacity: int
    service_time_s: float = 0.1
    jitter_sigma: float = 0.0
    reject_over_capacity: bool = False
    reject_latency_s: float = 0.005
    capacity_changes: Sequence[tuple[float, int]] = ()
    service_time_changes: Sequence[tuple[float, float]] = ()
    seed: int = 0


@dataclass
class SimResult:
    """Outcome of `simulate_closed_loop`: successes as (done_s, latency_s), 429 times (s), limit trace."""

    successes: list[tuple[float, float]]
    overloads: list[float]
    limits: list[tuple[float, int]]

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


def simulate_closed_loop(
    backend: SimBackend, limiter: AdaptiveLimit | int, seconds: float, retry_wait_s: float = 0.0
) -> SimResult:
    """Closed-loop clients keep `limit` requests in flight for `seconds` of simulated time.

    A discrete-event simulation (deterministic for a given `backend.seed`); no clock, no asyncio.
    Successes feed `limiter.on_success(latency_s, in_flight, now_s)` and 429s `limiter.on_overload(now_s)`;
    an int `limiter` is a fixed limit. Latency counts from the attempt's send, queueing included. After a
    429 the request keeps its permit for `retry_wait_s` and is sent again, as the runner's retries do; with
    0 it gives the permit back at once and the next request goes out (the harshest case for 429 counts).
    """
    done, reject, set_capacity, set_service, resend = 0, 1, 2, 3, 4
    rng = random.Random(backend.seed)
    events: list[tuple[float, int, int, float]] = []  # (time_s, seq, kind, start_s or new value)
    capacity, service_time_s = backend.capacity, backend.service_time_s
    busy = in_flight = 0
    queue: deque[float] = deque()  # send times of requests waiting for a server
    result = SimResult(successes=[], overloads=[], limits=[])
    seq = itertools.count()

    def push(time_s: float, kind: int, value: float) -> None:
        heapq.heappush(events, (time_s, next(seq), kind, value))

    def serve(now_s: float, sent_s: float) -> None:
        nonlocal busy
        busy += 1
        jitter = math.exp(rng.gauss(0.0, backend.jitter_sigma)) if backend.jitter_sigma > 0.0 else 1.0
        push(now_s + service_time_s * jitter, done, sent_s)

    def send(now_s: float) -> None:
        if busy < capacity:
            serve(now_s, now_s)
        elif backend.reject_over_capacity:
            push(now_s + backend.reject_latency_s, reject, now_s)
        else:
            queue.append(now_s)

    def admit(now_s: float) -> None:
        nonlocal in_flight
        limit = limiter if isinstance(limiter, int) else limiter.limit
        if not result.limits or result.limits[-1][1] != limit:
            result.limits.append((now_s, limit))
        while in_flight < limit:
            in_flight += 1
            send(now_s)

    for when_s, cap in backend.capacity_changes:
        push(when_s, set_capacity, float(cap))
    for when_s, service_s in backend.service_time_changes:
        push(when_s, set_service, service_s)
    admit(0.0)
    while events and events[0][0] <= seconds:
        now_s, _, kind, value = heapq.heappop(events)
        if kind == set_service:
            service_time_s = value
        elif kind == set_capacity:
            capacity = int(value)
        elif kind == resend:
            send(now_s)
        elif kind == done:
            busy -= 1
            in_flight -= 1
            result.successes.append((now_s, now_s - value))
            if not isinstance(limiter, int):
                limiter.on_success(now_s - value, in_flight + 1, now_s)
        else:
            result.overloads.append(now_s)
            if not isinstance(limiter, int):
                limiter.on_overload(now_s)
            if retry_wait_s > 0.0:
                push(now_s + retry_wait_s, resend, 0.0)  # keeps its permit while it waits
            else:
                in_flight -= 1
        while queue and busy < capacity:
            serve(now_s, queue.popleft())
        admit(now_s)
    return result
