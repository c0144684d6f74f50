"""ConcurrencyGate under asyncio load, and AdaptiveLimit in simulated time (no sleeping, no network)."""

from __future__ import annotations

import asyncio
import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.concurrency.gate import ConcurrencyGate
from gym_collect.concurrency.limiter import AdaptiveLimit, AdaptiveLimitConfig
from gym_collect.concurrency.sim import SimBackend, SimResult, simulate_closed_loop

# ---------------------------------------------------------------------------------------------- gate


async def _yield(times: int = 1) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


async def test_gate_never_exceeds_limit_under_random_raises_and_lowers() -> None:
    rng = random.Random(7)
    gate = ConcurrencyGate(8)
    peak_since_settle = 0
    stop = False

    async def worker() -> None:
        nonlocal peak_since_settle
        while not stop:
            async with gate.slot():
                peak_since_settle = max(peak_since_settle, gate.in_flight)
                await _yield(rng.randint(0, 3))
            await _yield()

    limits_set = [8]
    async with asyncio.TaskGroup() as tg:
        for _ in range(40):
            tg.create_task(worker())
        for _ in range(300):
            new = rng.randint(1, 24)
            gate.limit = new
            limits_set.append(new)
            while gate.in_flight > new:  # holders admitted under a higher limit leave; none enter meanwhile
                await _yield()
            peak_since_settle = gate.in_flight
            await _yield(rng.randint(1, 20))
            assert peak_since_settle <= new
        stop = True
    assert gate.in_flight == 0
    assert gate.max_in_flight <= max(limits_set)


async def test_gate_lowering_stops_admissions_without_evicting() -> None:
    gate = ConcurrencyGate(3)
    for _ in range(3):
        await gate.acquire()
    gate.limit = 1
    waiter = asyncio.create_task(gate.acquire())
    await _yield(3)
    gate.release()
    gate.release()
    await _yield(3)
    assert not waiter.done() and gate.in_flight == 1  # 3 -> 1 held; the waiter needs in_flight < 1
    gate.release()
    await waiter
    assert gate.in_flight == 1


async def test_gate_is_fifo_and_newcomers_do_not_overtake() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        async with gate.slot():
            order.append(i)
            await _yield()

    tasks = []
    for i in range(10):
        tasks.append(asyncio.create_task(take(i)))
        await _yield()  # each reaches its await before the next starts
    gate.release()
    tasks.append(asyncio.create_task(take(10)))  # arrives while 0..9 wait: must not jump the queue
    await asyncio.gather(*tasks)
    assert order == list(range(11))
    assert gate.in_flight == 0


async def test_gate_cancelled_waiter_leaks_no_permit() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    behind = asyncio.create_task(gate.acquire())
    await _yield()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert gate.waiting == 1
    gate.release()
    await behind  # the permit went past the cancelled waiter
    assert gate.in_flight == 1 and gate.waiting == 0
    gate.release()
    assert gate.in_flight == 0


async def test_gate_waiter_cancelled_after_grant_hands_the_permit_on() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    behind = asyncio.create_task(gate.acquire())
    await _yield()
    gate.release()  # grants the permit to `waiter`, which has not run yet
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await behind
    assert gate.in_flight == 1
    gate.release()
    assert gate.in_flight == 0 and gate.waiting == 0


async def test_gate_release_without_acquire_raises() -> None:
    gate = ConcurrencyGate(2)
    with pytest.raises(RuntimeError):
        gate.release()
    async with gate.slot():
        pass
    with pytest.raises(RuntimeError):
        gate.release()


async def test_gate_raising_the_limit_wakes_waiters() -> None:
    gate = ConcurrencyGate(1)
    await gate.acquire()
    waiters = [asyncio.create_task(gate.acquire()) for _ in range(3)]
    await _yield()
    assert gate.waiting == 3
    gate.limit = 3
    await _yield()
    assert [w.done() for w in waiters] == [True, True, False]
    gate.limit = None
    await asyncio.gather(*waiters)
    assert gate.in_flight == 4 and gate.max_in_flight == 4


async def test_gate_slot_releases_on_error_and_validates_limit() -> None:
    gate = ConcurrencyGate(None)
    with pytest.raises(KeyError):
        async with gate.slot():
            raise KeyError("x")
    assert gate.in_flight == 0
    with pytest.raises(ValueError):
        ConcurrencyGate(0)
    with pytest.raises(ValueError):
        gate.limit = -1


# ------------------------------------------------------------------------------------- adaptive limit

SERVICE_S = 0.1
SIGMA = 0.2  # log-normal spread of the service time


@functools.cache
def _fixed(capacity: int, level: int, seconds: float) -> SimResult:
    return simulate_closed_loop(SimBackend(capacity, SERVICE_S, SIGMA, seed=1), level, seconds)


def _auto(backend: SimBackend, seconds: float, **config: int) -> tuple[SimResult, AdaptiveLimit]:
    limiter = AdaptiveLimit(AdaptiveLimitConfig(**config))
    return simulate_closed_loop(backend, limiter, seconds), limiter


@pytest.mark.parametrize(
    ("capacity", "initial", "seconds"), [(32, 16, 90.0), (32, 512, 90.0), (128, 16, 45.0), (128, 512, 45.0)]
)
def test_limit_converges_near_capacity_of_a_queueing_backend(
    capacity: int, initial: int, seconds: float
) -> None:
    result, _ = _auto(SimBackend(capacity, SERVICE_S, SIGMA, seed=1), seconds, initial=initial)
    start = 20.0
    assert 0.9 * capacity <= result.limit_quantile(0.5, start, seconds) <= 1.6 * capacity
    assert result.limit_share(0.9 * capacity, 1.6 * capacity, start, seconds) >= 0.9
    # any fixed level >= capacity is best here; a fixed level of capacity / 2 never queues
    best = _fixed(capacity, capacity, seconds)
    unloaded = _fixed(capacity, capacity // 2, seconds)
    assert result.throughput_per_s(start, seconds) >= 0.9 * best.throughput_per_s(start, seconds)
    p99 = result.latency_quantile_s(0.99, start, seconds)
    assert p99 <= 2.0 * unloaded.latency_quantile_s(0.99, start, seconds)


def test_limit_follows_a_capacity_halving_within_30_s() -> None:
    backend = SimBackend(64, SERVICE_S, SIGMA, capacity_changes=[(60.0, 32)], seed=2)
    result, _ = _auto(backend, 120.0)
    assert result.limit_quantile(0.5, 30.0, 60.0) >= 0.9 * 64
    first_within = next(t for t, v in result.limits if t >= 60.0 and v <= 1.6 * 32)
    assert first_within - 60.0 <= 30.0
    assert result.limit_share(0.0, 1.6 * 32, 90.0, 120.0) >= 0.95
    assert result.limit_quantile(0.5, 90.0, 120.0) >= 0.9 * 32


@pytest.mark.parametrize(("before_s", "after_s"), [(SERVICE_S, 2 * SERVICE_S), (2 * SERVICE_S, SERVICE_S)])
def test_limit_relearns_a_shifted_service_time(before_s: float, after_s: float) -> None:
    backend = SimBackend(64, before_s, SIGMA, service_time_changes=[(60.0, after_s)], seed=3)
    result, limiter = _auto(backend, 150.0)
    assert limiter.rtt_noload_s == pytest.approx(after_s, rel=0.2)  # neither pinned low nor high
    assert result.limit_share(0.9 * 64, 1.6 * 64, 100.0, 150.0) >= 0.9


@pytest.mark.parametrize("retry_wait_s", [0.0, 1.0])  # re-send at once / hold the permit 1 s, as the runner
def test_rate_limited_backend_settles_under_capacity_with_few_429s(retry_wait_s: float) -> None:
    capacity, seconds = 32, 200.0
    backend = SimBackend(capacity, SERVICE_S, SIGMA, reject_over_capacity=True, seed=4)
    limiter = AdaptiveLimit(AdaptiveLimitConfig())
    result = simulate_closed_loop(backend, limiter, seconds, retry_wait_s=retry_wait_s)
    start = 30.0
    assert result.overload_fraction(start, seconds) < 0.01
    assert 0.8 * capacity <= result.limit_quantile(0.5, start, seconds) <= capacity
    best = simulate_closed_loop(SimBackend(capacity, SERVICE_S, SIGMA, seed=4), capacity, seconds)
    assert result.throughput_per_s(start, seconds) >= 0.9 * best.throughput_per_s(start, seconds)


def test_overload_decreases_once_per_cooldown() -> None:
    limiter = AdaptiveLimit(AdaptiveLimitConfig(initial=100, decrease_cooldown_s=1.0))
    for _ in range(50):  # one burst
        limiter.on_overload(10.0)
    assert limiter.limit == 90
    assert limiter.on_overload(10.5) == 90
    assert limiter.on_overload(11.0) == 81
    assert limiter.on_error(11.5) == 81
    assert limiter.history == [(10.0, 90), (11.0, 81)]


def test_overload_decreases_stop_at_min() -> None:
    limiter = AdaptiveLimit(AdaptiveLimitConfig(initial=4, min=2, max=8))
    for step in range(100):
        limiter.on_overload(float(step))
    assert limiter.limit == 2


def test_history_is_decimated_to_its_bound() -> None:
    limiter = AdaptiveLimit(
        AdaptiveLimitConfig(initial=1000, max=1000, decrease_cooldown_s=0.0, history_max_points=8)
    )
    for step in range(60):
        limiter.on_overload(float(step))
    history = limiter.history
    assert 4 <= len(history) <= 8
    assert history[0][0] >= 0.0 and history[-1][0] >= 40.0  # spans the run, at reduced resolution
    assert [t for t, _ in history] == sorted(t for t, _ in history)


@pytest.mark.parametrize(
    "bad",
    [
        {"min": 0},
        {"initial": 8, "min": 10},
        {"initial": 2000},
        {"rtt_tolerance": 0.9},
        {"smoothing": 0.0},
        {"backoff_ratio": 1.0},
        {"probe_ratio": 0.0},
        {"history_max_points": 1},
    ],
)
def test_config_rejects_invalid_values(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        AdaptiveLimitConfig(**bad)  # type: ignore[arg-type]


_event = st.one_of(
    st.tuples(
        st.just("success"),
        st.floats(0.0, 100.0, allow_nan=False),  # latency_s
        st.integers(0, 2000),  # in_flight
        st.floats(0.0, 5.0, allow_nan=False),  # time step (s)
    ),
    st.tuples(st.sampled_from(["overload", "error"]), st.just(0.0), st.just(0), st.floats(0.0, 5.0)),
)


@settings(max_examples=200, deadline=None)
@given(
    bounds=st.tuples(st.integers(1, 50), st.integers(0, 50), st.integers(0, 500)),
    events=st.lists(_event, max_size=400),
)
def test_any_sequence_keeps_the_limit_within_bounds(
    bounds: tuple[int, int, int], events: list[tuple[str, float, int, float]]
) -> None:
    low, extra_initial, extra_max = bounds
    config = AdaptiveLimitConfig(initial=low + extra_initial, min=low, max=low + extra_initial + extra_max)
    limiter = AdaptiveLimit(config)
    now = 0.0
    for kind, latency_s, in_flight, step_s in events:
        now += step_s
        if kind == "success":
            limit = limiter.on_success(latency_s, in_flight, now)
        elif kind == "overload":
            limit = limiter.on_overload(now)
        else:
            limit = limiter.on_error(now)
        assert limit == limiter.limit
        assert config.min <= limit <= config.max
    assert len(limiter.history) <= config.history_max_points


def test_on_success_rejects_a_negative_latency() -> None:
    limiter = AdaptiveLimit(AdaptiveLimitConfig())
    with pytest.raises(ValueError):
        limiter.on_success(-1.0, 1, 0.0)


def test_simulation_is_deterministic_and_fixed_levels_behave() -> None:
    backend = SimBackend(8, SERVICE_S, 0.0)
    under = simulate_closed_loop(backend, 4, 10.0)
    over = simulate_closed_loop(backend, 16, 10.0)
    assert under.latency_quantile_s(0.5, 1.0, 10.0) == pytest.approx(SERVICE_S)
    assert under.throughput_per_s(1.0, 10.0) == pytest.approx(4 / SERVICE_S, rel=0.02)
    assert over.throughput_per_s(1.0, 10.0) == pytest.approx(8 / SERVICE_S, rel=0.02)
    assert over.latency_quantile_s(0.5, 1.0, 10.0) == pytest.approx(2 * SERVICE_S)  # queued a full service
    one = simulate_closed_loop(
        SimBackend(8, SERVICE_S, 0.3, seed=5), AdaptiveLimit(AdaptiveLimitConfig()), 5.0
    )
    two = simulate_closed_loop(
        SimBackend(8, SERVICE_S, 0.3, seed=5), AdaptiveLimit(AdaptiveLimitConfig()), 5.0
    )
    assert one == two
