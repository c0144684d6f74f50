"""The in-flight limits as pure objects: slow start, the work-normalized signal, each backend regime in
simulated time, per-backend limits, parsing `num_samples_in_parallel`; then the runner against two real
simulated agents on 127.0.0.1 (no head-of-line blocking; more in `test_dispatch`)."""

from __future__ import annotations

import asyncio
import math
import random
from pathlib import Path

import pytest

from gym_collect.collect import collect
from gym_collect.concurrency.cost import usage_cost
from gym_collect.concurrency.limiter import AdaptiveLimit, AdaptiveLimitConfig
from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.concurrency.sim import SimBackend, SimResult, simulate, simulate_closed_loop
from gym_collect.concurrency.slow_start import SlowStart
from gym_collect.concurrency.spec import ParallelismSpec, parse_parallelism
from gym_collect.config import CollectConfig
from gym_collect.errors import ConfigError
from gym_collect.sim_agent import SimAgent, SimAgentConfig
from tests.conftest import read_jsonl, write_rows

# ------------------------------------------------------------------------------------------ slow start


def test_slow_start_doubles_per_round_trip_then_stops_near_capacity() -> None:
    rtt_s, capacity = 60.0, 512
    limiter = AdaptiveLimit(AdaptiveLimitConfig(initial=16, max=4096))
    result = simulate_closed_loop(SimBackend(capacity, rtt_s, model="shared"), limiter, 30 * rtt_s)
    assert [result.limit_at(k * rtt_s + 1.0) for k in range(1, 5)] == [32, 64, 128, 256]  # per round trip
    limiter = AdaptiveLimit(AdaptiveLimitConfig(initial=16, max=4096))
    result = simulate_closed_loop(SimBackend(capacity, rtt_s, 0.2, model="shared", seed=1), limiter, 30 * rtt_s)
    assert not limiter.in_slow_start
    assert 0.9 * capacity <= result.limit_quantile(0.5, 15 * rtt_s, 30 * rtt_s) <= 1.3 * capacity


def test_slow_start_ignores_task_length_when_usage_gives_the_work() -> None:
    # Heavy-tailed latencies that are all task length (cost-proportional), no queue: with costs, slow
    # start keeps doubling; the same latencies without costs look like queueing noise.
    rng = random.Random(3)
    with_cost = SlowStart()
    est, now = 16.0, 0.0
    for _ in range(300):
        work = math.exp(rng.gauss(0.0, 1.2))
        now += 60.0 / est  # completions come at in-flight / mean latency per second
        est, done = with_cost.on_success(est, 60.0 * work, 1000.0 * work, int(est), now, 1e9)
        assert done is None
    assert est >= 300


def test_slow_start_exits_on_delay_with_the_no_queue_estimate() -> None:
    start = SlowStart(min_round_samples=8)
    est, now, exit_ = 8.0, 0.0, None
    capacity = 40
    while exit_ is None:
        latency = 0.1 * max(1.0, est / capacity)
        now += latency / est
        est, exit_ = start.on_success(est, latency, 1.0, int(est), now, 1e9)
    assert exit_.reason == "delay"
    assert exit_.base_u == pytest.approx(0.1)
    assert exit_.no_queue is not None and 0.8 * capacity <= exit_.no_queue <= 1.3 * capacity


def test_overload_ends_slow_start_and_backs_off() -> None:
    limiter = AdaptiveLimit(AdaptiveLimitConfig(initial=20))
    for i in range(10):
        limiter.on_success(0.1, 20, 0.01 * i)
    assert limiter.in_slow_start and limiter.limit == 30
    limiter.on_overload(1.0)
    assert not limiter.in_slow_start and limiter.limit == 27


def test_cost_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AdaptiveLimit(AdaptiveLimitConfig()).on_success(0.1, 1, 0.0, cost=0.0)


def test_usage_cost_reads_response_usage() -> None:
    usage = {"input_tokens": 10, "output_tokens": 90, "total_tokens": 100}
    assert usage_cost({"response": {"usage": usage}}) == 100.0
    assert usage_cost({"response": {"usage": {"total_tokens": 7}}}) == 7.0
    assert usage_cost({"response": {"usage": {"input_tokens": 0, "output_tokens": 0}}}) is None
    assert usage_cost({"reward": 1.0}) is None


# --------------------------------------------------------------------------- regimes in simulated time


def _auto() -> AdaptiveLimit:
    return AdaptiveLimit(AdaptiveLimitConfig(initial=16, max=1024))


def _run(backends: dict[str, SimBackend], levels: dict[str, AdaptiveLimit | int | None], seconds: float,
         shared: int | None = None, pattern: list[str] | None = None) -> SimResult:
    return simulate(backends, InFlightLimits({k: k for k in backends}, levels, shared), seconds, pattern)


def test_long_heavy_tailed_rollouts_reach_the_fixed_optimum_within_ten_medians() -> None:
    median_s, seconds = 20.0, 2400.0
    backend = SimBackend(128, median_s, model="shared", task_sigma=1.2, report_usage=True, seed=21)
    best = simulate_closed_loop(backend, 128, seconds).work_per_s(0.0, seconds)
    auto = simulate_closed_loop(backend, _auto(), seconds)
    assert auto.work_per_s(0.0, seconds) >= 0.93 * best
    served = simulate_closed_loop(backend, 128, seconds).served_per_s(seconds / 2, seconds)
    window_s = 2 * median_s
    reach = next(t for t in range(int(window_s), int(seconds), 5) if auto.served_per_s(t - window_s, t) >= 0.9 * served)
    assert reach <= 10 * median_s


def test_degrading_backend_keeps_the_limit_at_its_knee() -> None:
    backend = SimBackend(32, 0.1, 0.2, model="shared", degrade=0.5, seed=22)
    seconds = 200.0
    best = simulate_closed_loop(backend, 32, seconds)
    past = simulate_closed_loop(backend, 128, seconds)
    auto = simulate_closed_loop(backend, _auto(), seconds)
    assert past.throughput_per_s(0.0, seconds) < 0.6 * best.throughput_per_s(0.0, seconds)  # it degrades
    assert auto.throughput_per_s(0.0, seconds) >= 0.93 * best.throughput_per_s(0.0, seconds)
    assert auto.limit_quantile(0.5, 20.0, seconds) <= 1.2 * 32


def test_rate_limited_retries_park_without_a_permit() -> None:
    backend = SimBackend(32, 0.1, 0.2, reject_over_capacity=True, seed=23)
    seconds = 200.0
    best = simulate_closed_loop(SimBackend(32, 0.1, 0.2, seed=23), 32, seconds)
    auto = simulate_closed_loop(backend, _auto(), seconds, retry_wait_s=1.0)
    assert auto.overload_fraction(0.0, seconds) < 0.01
    assert auto.throughput_per_s(0.0, seconds) >= 0.95 * best.throughput_per_s(0.0, seconds)


def test_capacity_halving_is_followed_within_ten_round_trips() -> None:
    backend = SimBackend(64, 0.1, 0.2, model="shared", degrade=0.5, capacity_changes=[(60.0, 32)], seed=24)
    auto = simulate_closed_loop(backend, _auto(), 120.0)
    within = next(t for t, v in auto.limits if t >= 60.0 and v <= 1.5 * 32)
    assert within - 60.0 <= 10 * auto.latency_quantile_s(0.5, 60.0, 120.0)


def test_two_backends_get_a_limit_each() -> None:
    backends = {"small": SimBackend(16, 0.1, 0.2, model="shared", degrade=0.5, seed=25),
                "big": SimBackend(128, 0.1, 0.2, model="shared", degrade=0.5, seed=26)}
    pattern = ["small"] + ["big"] * 8
    seconds = 120.0
    pair = _run(backends, {"small": 16, "big": 128}, seconds, pattern=pattern).throughput_per_s(0.0, seconds)
    small, big = _auto(), _auto()
    auto = _run(backends, {"small": small, "big": big}, seconds, pattern=pattern)
    assert auto.throughput_per_s(0.0, seconds) >= 0.93 * pair
    assert small.limit <= 24 and big.limit >= 100


# ------------------------------------------------------------------------------------- limits and spec


def test_shared_bound_and_parked_retries() -> None:
    limits = InFlightLimits({"a": "a", "b": "b"}, {"a": 2, "b": None}, shared=3)
    limits.take("a")
    limits.take("a")
    assert not limits.has_room("a") and limits.has_room("b") and limits.limit == 3
    limits.park("a")
    limits.park("a")
    assert limits.has_room("a")  # parked requests hold no permit
    limits.take("a")
    limits.take("a")
    limits.park("a")
    assert not limits.has_room("a")  # 1 in flight + 3 parked: twice the limit
    assert limits.can_resume("a")
    limits.resume("a")
    assert limits.in_flight == 2 and not limits.can_resume("a")
    limits.take("b")
    assert not limits.has_room("b")  # the shared bound
    with pytest.raises(RuntimeError):
        InFlightLimits({}, {}, None).release("x")


async def test_retry_wait_gives_the_permit_back_and_retries_go_first() -> None:
    limits = InFlightLimits({"a": "a"}, {"a": 1}, shared=None)
    limits.take("a")
    retry = asyncio.create_task(limits.retry_wait("a", 0.0))
    await asyncio.sleep(0)
    assert limits.in_flight == 0  # parked, permit given back
    limits.take("a")  # a new request took it meanwhile
    await asyncio.sleep(0)
    assert not retry.done() and not limits.has_room("a")  # the retry now waits, ahead of new requests
    limits.release("a")
    await retry
    assert limits.in_flight_of("a") == 1
    limits.take("a")  # over the limit on purpose, to see a cancelled waiter still hold a permit
    cancelled = asyncio.create_task(limits.retry_wait("a", 0.0))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert limits.in_flight_of("a") == 2  # the caller's one release balances


def test_history_and_reorder_window() -> None:
    adaptive = AdaptiveLimit(AdaptiveLimitConfig(initial=16, max=64))
    limits = InFlightLimits({"a": "a", "b": "b"}, {"a": adaptive, "b": 8}, shared=None)
    assert limits.limit == 24
    limits.take("a")
    limits.report_overload("a", now_s=5.0)
    assert limits.history == [(5.0, 22)]
    assert limits.history_since(4.0) == [(0.0, 24), (1.0, 22)]
    assert limits.reorder_window() == 4096
    assert InFlightLimits({"a": "a"}, {"a": 4}, None).history_since(0.0) == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, ParallelismSpec()),
        (64, ParallelismSpec(shared=64)),
        ("64", ParallelismSpec(shared=64)),
        ("auto", ParallelismSpec(per_backend="auto")),
        ({"_default": "auto", "small": 4}, ParallelismSpec(None, "auto", {"small": 4})),
        ({"big": "auto"}, ParallelismSpec(None, None, {"big": "auto"})),
    ],
)
def test_parse_parallelism(value: object, expected: ParallelismSpec) -> None:
    assert parse_parallelism(value) == expected
    assert parse_parallelism(parse_parallelism(value).to_config_value()) == expected


@pytest.mark.parametrize("value", [0, -1, "fast", True, 2.5, {"_default": None}, {"a": 0}])
def test_parse_parallelism_rejects(value: object) -> None:
    with pytest.raises(ConfigError, match="num_samples_in_parallel"):
        parse_parallelism(value)


def test_config_builds_one_limit_per_backend() -> None:
    cfg = CollectConfig(num_samples_in_parallel={"_default": "auto", "small": 4})
    assert cfg.is_auto and cfg.parallelism_limit is None
    limits = InFlightLimits.from_config(cfg, {"small": "http://h:1", "big": "http://h:2"})
    assert limits.limit_of("small") == 4 and limits.adaptive("big") is not None
    assert limits.shared == min(cfg.global_aiohttp_connector_limit, 2 * cfg.global_aiohttp_connector_limit_per_host)


def test_a_limit_for_an_agent_the_run_does_not_have_is_a_warning_naming_the_closest(
        caplog: pytest.LogCaptureFixture) -> None:
    cfg = CollectConfig(num_samples_in_parallel={"my_agent": 8, "smal_env": 2})
    limits = InFlightLimits.from_config(cfg, {"my_agent": "http://h:1", "small_env": "http://h:2"})
    assert limits.limit_of("my_agent") == 8 and limits.limit_of("small_env") is None
    assert "num_samples_in_parallel.smal_env limits nothing" in caplog.text
    assert "did you mean 'small_env'" in caplog.text


# ------------------------------------------------------------------------------------- the real thing


@pytest.mark.parametrize("order", ["completion", "input"])
async def test_runner_dispatches_per_backend_without_head_of_line_blocking(tmp_path: Path, order: str) -> None:
    rows = [{"responses_create_params": {"input": f"q{i}"}, "agent_ref": {"name": "small" if i % 4 == 0 else "big"}}
            for i in range(40)]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    small_cfg = SimAgentConfig(capacity=1, service_time_s=0.05, seed=1)
    big_cfg = SimAgentConfig(capacity=64, service_time_s=0.0, seed=2)
    async with SimAgent(small_cfg, agent_names=["small"]) as small, SimAgent(big_cfg, agent_names=["big"]) as big:
        cfg = CollectConfig(input_jsonl_fpath=str(inp), output_jsonl_fpath=str(tmp_path / "out.jsonl"),
                            agents={"small": small.url, "big": big.url}, progress=False, output_order=order,
                            num_samples_in_parallel={"small": 1, "_default": "auto"})
        result = await collect(cfg)
        assert small.stats.max_in_flight == 1
    assert result.exit_code == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(r["_ng_task_index"] for r in out) == list(range(40))
    names = [r["agent_ref"]["name"] for r in out]
    if order == "input":
        assert [r["_ng_task_index"] for r in out] == list(range(40))
    else:  # the big backend's 30 rows did not wait behind the small one's 10 (one at a time)
        assert names.index("small", names.index("small") + 1) > names.index("big") + 20
