"""AdaptiveLimit in simulated time (no sleeping, no network)."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.concurrency.limiter import AdaptiveLimit, AdaptiveLimitConfig
from gym_collect.concurrency.sim import SimBackend, SimResult, simulate_closed_loop

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
