"""Mergeable statistics: merging equals one pass, percentiles stay within the bound, dicts round-trip."""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.nemo.default_metrics import default_aggregate_metrics
from gym_collect.stats import FieldStats, LatencyHistogram, NumericFieldStats

durations = st.one_of(st.just(0.0), st.floats(min_value=1e-9, max_value=1e5), st.floats(min_value=0.0,
                                                                                         max_value=10.0))
values = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
FAST = settings(max_examples=150, deadline=None)


def histogram(xs: list[float], relative_error: float = 0.01) -> LatencyHistogram:
    h = LatencyHistogram(relative_error)
    for x in xs:
        h.record(x)
    return h


def nearest_rank(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[max(1, math.ceil(Fraction(q) * len(ordered) / 100)) - 1]


@FAST
@given(st.lists(durations, max_size=200), st.data())
def test_histogram_merge_of_halves_equals_one_pass(xs: list[float], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(xs)))
    merged = histogram(xs[:cut])
    merged.merge(histogram(xs[cut:]))
    whole = histogram(xs)
    a, b = merged.to_dict(), whole.to_dict()
    assert math.isclose(a.pop("sum_s"), b.pop("sum_s"), rel_tol=1e-12)  # type: ignore[arg-type]
    assert a == b


@FAST
@given(st.lists(durations, min_size=1, max_size=300), st.floats(min_value=0.0, max_value=100.0))
def test_percentile_within_relative_error(xs: list[float], q: float) -> None:
    exact = nearest_rank(xs, q)
    got = histogram(xs).percentile(q)
    assert abs(got - exact) <= 0.01 * exact * (1 + 1e-9)


@FAST
@given(st.lists(durations, min_size=1, max_size=100))
def test_extremes_exact_and_summary(xs: list[float]) -> None:
    h = histogram(xs)
    assert h.percentile(100) == max(xs)
    assert h.percentile(0) == min(xs)
    s = h.summary()
    assert set(s) == {"p50", "p90", "p99", "max", "mean"}
    assert s["max"] == max(xs)
    assert math.isclose(s["mean"], math.fsum(xs) / len(xs), rel_tol=1e-9, abs_tol=1e-300)
    assert min(xs) <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]


@FAST
@given(st.lists(durations, max_size=100), st.sampled_from([0.01, 0.005, 0.05]))
def test_histogram_round_trips_through_json(xs: list[float], relative_error: float) -> None:
    h = histogram(xs, relative_error)
    d = orjson.loads(orjson.dumps(h.to_dict()))
    back = LatencyHistogram.from_dict(d)
    assert back.to_dict() == h.to_dict()
    qs = (0, 1, 50, 99.9, 100)
    assert [back.percentile(q) for q in qs] == [h.percentile(q) for q in qs]


def test_empty_histogram() -> None:
    h = LatencyHistogram()
    assert h.count == 0 and h.percentile(50) == 0.0
    assert h.summary() == {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    h.merge(LatencyHistogram())
    assert LatencyHistogram.from_dict(h.to_dict()).count == 0


def test_memory_is_bounded_by_buckets() -> None:
    h = LatencyHistogram()
    for i in range(20_000):  # 1 ms .. 1 h, log-uniform
        h.record(1e-3 * 3.6e6 ** (i / 19_999))
    assert len(h.to_dict()["buckets"]) <= 800  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, -math.inf])
def test_record_rejects_bad_durations(bad: float) -> None:
    with pytest.raises(ValueError):
        LatencyHistogram().record(bad)


def test_histogram_argument_errors() -> None:
    with pytest.raises(ValueError):
        LatencyHistogram(0.0)
    with pytest.raises(ValueError):
        LatencyHistogram(0.01).merge(LatencyHistogram(0.02))
    with pytest.raises(ValueError):
        LatencyHistogram().percentile(101)


GOOD = histogram([0.0, 0.5, 1.0, 2.0]).to_dict()


@pytest.mark.parametrize("change", [
    {"buckets": {"x": 1}},
    {"buckets": {"3": 0}},
    {"buckets": []},
    {"count": 7},
    {"count": True},
    {"relative_error": 2.0},
    {"min_s": "0"},
    {"min_s": 5.0},
    {"sum_s": math.nan},
])
def test_histogram_from_dict_rejects_malformed(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        LatencyHistogram.from_dict({**GOOD, **change})
    with pytest.raises(ValueError):
        LatencyHistogram.from_dict({k: v for k, v in GOOD.items() if k != "buckets"})


def field_stats(xs: list[float]) -> FieldStats:
    fs = FieldStats()
    for x in xs:
        fs.add(x)
    return fs


@FAST
@given(st.lists(values, max_size=200), st.data())
def test_field_stats_merge_equals_one_pass(xs: list[float], data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(xs)))
    merged = field_stats(xs[:cut])
    merged.merge(field_stats(xs[cut:]))
    whole = field_stats(xs)
    scale = max((abs(x) for x in xs), default=0.0)
    assert (merged.count, merged.min, merged.max) == (whole.count, whole.min, whole.max)
    # 1e-9 relative to the data's scale: relative to the mean itself is meaningless when the mean is ~0.
    assert math.isclose(merged.mean, whole.mean, rel_tol=1e-9, abs_tol=1e-9 * scale)
    assert math.isclose(merged.m2, whole.m2, rel_tol=1e-9, abs_tol=1e-9 * len(xs) * scale * scale)
    if xs:  # and both agree with exact rational arithmetic
        exact_mean = sum(map(Fraction, xs)) / len(xs)
        exact_m2 = sum((Fraction(x) - exact_mean) ** 2 for x in xs)
        assert math.isclose(whole.mean, float(exact_mean), rel_tol=1e-9, abs_tol=1e-9 * scale)
        assert math.isclose(merged.m2, float(exact_m2), rel_tol=1e-9, abs_tol=1e-9 * len(xs) * scale * scale)
        exact_std = math.sqrt(float(exact_m2) / (len(xs) - 1)) if len(xs) > 1 else 0.0  # ddof=1
        assert math.isclose(merged.std, exact_std, rel_tol=1e-6, abs_tol=1e-6 * scale)


@FAST
@given(st.lists(values, max_size=50))
def test_field_stats_round_trip(xs: list[float]) -> None:
    fs = field_stats(xs)
    d = fs.to_dict()
    assert d["std"] == fs.std
    back = FieldStats.from_dict(orjson.loads(orjson.dumps(d)))
    assert back.to_dict() == d


def test_field_stats_errors_and_edges() -> None:
    with pytest.raises(ValueError):
        FieldStats().add(math.nan)
    with pytest.raises(ValueError):
        FieldStats.from_dict({"count": 1, "mean": 0.0, "min": 0.0, "max": 0.0, "m2": -1.0})
    with pytest.raises(ValueError):
        FieldStats.from_dict({"count": 1, "mean": 0.0, "min": 0.0})
    empty = FieldStats()
    assert empty.std == 0.0 and empty.to_dict()["count"] == 0
    empty.merge(field_stats([3.0]))
    assert (empty.count, empty.mean, empty.min, empty.max, empty.std) == (1, 3.0, 3.0, 3.0, 0.0)
    assert field_stats([1.0, 3.0]).std == math.sqrt(2.0)  # sample deviation: m2 = 2 over n - 1 = 1


def test_numeric_field_stats_selects_nemo_gyms_fields() -> None:
    stats = NumericFieldStats()
    assert stats.add_rollout("a", {"reward": 1.0, "tokens": 10, "terminated": True, "_ng_task_index": 3,
                                   "_private": 1, "info": {"x": 1.0}, "name": "x", "nan": math.nan,
                                   "inf": math.inf, "huge": 10**400, "mask_sample": False, "total_tokens": 99,
                                   "response": {"usage": {"input_tokens": 5, "output_tokens": 7, "total_tokens": 12,
                                                          "input_tokens_details": {"cached_tokens": 2}}}})
    assert stats.add_rollout("a", {"reward": 0.0, "tokens": 20, "terminated": False, "mask_sample": 0})
    assert not stats.add_rollout("a", {"reward": 5.0, "tokens": 1000, "mask_sample": True})
    assert not stats.add_rollout("c", {"reward": 5.0, "mask_sample": "yes"})
    stats.add_rollout("b", {"reward": 0.5, "response": {"usage": None}})
    d = stats.to_dict()
    assert set(d) == {"a", "b"}  # nothing under an agent whose every rollout is masked
    assert set(d["a"]) == {"reward", "tokens", "terminated", "input_tokens", "output_tokens", "total_tokens"}
    assert d["a"]["reward"]["mean"] == 0.5 and d["a"]["reward"]["std"] == math.sqrt(0.5)
    assert d["a"]["tokens"]["max"] == 20.0 and d["a"]["tokens"]["count"] == 2
    assert d["a"]["terminated"]["mean"] == 0.5
    assert d["a"]["total_tokens"]["mean"] == 12.0  # response.usage wins, as in NeMo Gym
    assert d["b"]["reward"]["count"] == 1 and d["b"]["reward"]["std"] == 0.0


rollouts = st.lists(st.tuples(
    st.sampled_from(["a", "b"]), values, st.one_of(st.none(), st.booleans(), st.integers(-50, 50)),
    st.one_of(st.none(), st.integers(0, 10**6)), st.sampled_from([None, False, True])), max_size=60)


def rollout(reward: float, extra: int | bool | None, tokens: int | None, mask: bool | None) -> dict[str, Any]:
    r: dict[str, Any] = {"reward": reward, "_ng_task_index": 0}
    if extra is not None:
        r["extra"] = extra
    if tokens is not None:
        r["response"] = {"usage": {"output_tokens": tokens}}
    if mask is not None:
        r["mask_sample"] = mask
    return r


@FAST
@given(rollouts, st.data())
def test_numeric_field_stats_merge_and_round_trip(rows: list[tuple[str, float, Any, Any, Any]],
                                                  data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(rows)))
    left, right, whole = NumericFieldStats(), NumericFieldStats(), NumericFieldStats()
    for i, (agent, *fields) in enumerate(rows):
        (left if i < cut else right).add_rollout(agent, rollout(*fields))
        whole.add_rollout(agent, rollout(*fields))
    left.merge(NumericFieldStats.from_dict(orjson.loads(orjson.dumps(right.to_dict()))))
    got, want = left.to_dict(), whole.to_dict()
    assert set(got) == set(want)
    for agent, fields in want.items():
        assert set(got[agent]) == set(fields)
        for key, w in fields.items():
            g = got[agent][key]
            assert (g["count"], g["min"], g["max"]) == (w["count"], w["min"], w["max"])
            assert math.isclose(g["mean"], w["mean"], rel_tol=1e-9, abs_tol=1e-3)
            assert math.isclose(g["std"], w["std"], rel_tol=1e-6, abs_tol=1e-3)


@FAST
@given(rollouts)
def test_numeric_field_stats_agree_with_nemo_gyms_agent_metrics(rows: list[tuple[str, float, Any, Any, Any]]) -> None:
    """The same fields, rows and statistics as NeMo Gym's agent-level `mean/`, `std/`, `min/`, `max/` metrics
    (computed here by `default_aggregate_metrics`, itself checked against NeMo Gym in tests/nemo_gym)."""
    stats = NumericFieldStats()
    records = [{**rollout(*fields), "_ng_task_index": i} for i, (_, *fields) in enumerate(rows)]
    for record in records:
        stats.add_rollout("agent", record)
    ours = stats.to_dict().get("agent", {})
    theirs = default_aggregate_metrics(records)["agent_metrics"]
    assert set(ours) == {key.removeprefix("mean/") for key in theirs if key.startswith("mean/")}
    for name, s in ours.items():
        assert math.isclose(s["mean"], theirs[f"mean/{name}"], rel_tol=1e-9, abs_tol=1e-6)
        assert (s["min"], s["max"]) == (theirs[f"min/{name}"], theirs[f"max/{name}"])
        if s["count"] > 1:
            assert math.isclose(s["std"], theirs[f"std/{name}"], rel_tol=1e-6, abs_tol=1e-6)


def test_numeric_field_stats_from_dict_rejects_malformed() -> None:
    with pytest.raises(ValueError):
        NumericFieldStats.from_dict({"a": [1, 2]})
    with pytest.raises(ValueError):
        NumericFieldStats.from_dict({"a": {"reward": {"count": -1}}})
