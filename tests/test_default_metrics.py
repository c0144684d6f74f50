"""NeMo Gym's default aggregate metrics, computed locally: hand-checked cases and properties (no NeMo Gym here;
tests/nemo_gym/test_default_metrics.py compares with NeMo Gym's own function)."""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.nemo.default_metrics import default_aggregate_metrics, verify_response
from gym_collect.sample_stats import median, quantile, sample_std, t_quantile

FAST = settings(max_examples=100, deadline=None)
T_975_DF1 = 12.706204736174694  # scipy.stats.t.ppf(0.975, 1)


def row(task: int, rollout: int, **fields: Any) -> dict[str, Any]:
    return {"_ng_task_index": task, "_ng_rollout_index": rollout, "agent_ref": {"name": "a"}, **fields}


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-15)


def test_two_tasks_two_repeats_by_hand() -> None:
    rows = [row(0, 0, reward=1.0, tokens=10), row(0, 1, reward=0.0, tokens=20),
            row(1, 0, reward=0.5, tokens=30), row(1, 1, reward=0.5, tokens=40, ok=True)]
    got = default_aggregate_metrics(iter(rows))

    g0, g1 = got["group_level_metrics"]
    assert g0["_ng_task_index"] == 0 and g1["_ng_task_index"] == 1
    assert (g0["mean/reward"], g0["median/reward"]) == (0.5, 0.5)
    assert close(g0["std/reward"], math.sqrt(0.5))  # ddof=1
    assert g0["max/tokens"] == 20.0 and type(g0["max/tokens"]) is float  # `reward` is float: every column is
    assert g1["std/reward"] == 0.0
    assert g1["mean/ok"] == 1.0 and "std/ok" not in g1  # one value in a two-row task: no deviation
    assert [i["rollout_id"] for i in g1["rollout_infos"]] == ["1:0", "1:1"]
    assert g1["rollout_infos"][1] == {"rollout_id": "1:1", "_ng_task_index": 1, "_ng_rollout_index": 1,
                                      "reward": 0.5, "tokens": 40, "ok": 1}
    assert (g1["num_rollouts"], g1["expected_num_rollouts"], g1["missing_num_rollouts"]) == (2, 2, 0)
    assert g1["reward_profile_completion_pct"] == 100.0 and g1["sample"] == {"agent_ref": {"name": "agent"}}

    agent = got["agent_metrics"]
    assert close(agent["std/reward"], math.sqrt(1 / 6)) and close(agent["std/tokens"], math.sqrt(500 / 3))
    assert (agent["mean/tokens"], agent["median/tokens"], agent["num_repeats"]) == (25.0, 25.0, 2)
    assert agent["mean_across_repeats/mean/reward"] == 0.5 and agent["se_across_repeats/mean/reward"] == 0.25
    assert close(agent["ci_high_95_across_repeats/mean/reward"], 0.5 + T_975_DF1 * 0.25)
    assert agent["std_across_repeats/mean/ok"] == 0.0 and "ci_low_95_across_repeats/mean/ok" not in agent
    assert got["key_metrics"] == {k: v for k, v in agent.items() if k.startswith("mean/")}

    r0, r1 = got["repeat_level_metrics"]
    assert (r0["_ng_rollout_index"], r0["sample_count"], r0["missing_count"]) == (0, 2, 0)
    assert (r0["mean/reward"], r0["sem/reward"], r0["p25/reward"], r0["p75/reward"]) == (0.75, 0.25, 0.625, 0.875)
    assert close(r0["ci_low_95/reward"], 0.75 - T_975_DF1 * 0.25)
    assert r1["mean/ok"] == 1.0 and r1["std/ok"] == 0.0 and "ci_low_95/ok" not in r1
    assert got["perf_summary"] is None


def test_single_rollout_keeps_ints_and_has_no_repeat_level() -> None:
    got = default_aggregate_metrics([row(3, 0, reward=1, solved=True, response={"usage": {"input_tokens": 7}})])
    agent = got["agent_metrics"]
    assert agent["max/reward"] == 1 and type(agent["max/reward"]) is int  # every column int64 in pandas
    assert agent["std/reward"] == 0.0 and agent["mean/solved"] == 1.0 and agent["mean/input_tokens"] == 7.0
    assert agent["num_repeats"] == 1 and got["repeat_level_metrics"] == []
    assert got["group_level_metrics"][0]["rollout_infos"][0]["rollout_id"] == "3:0"


def test_empty_input_is_nemo_gyms_empty_document() -> None:
    assert default_aggregate_metrics([]) == {"group_level_metrics": [], "agent_metrics": {}, "key_metrics": {},
                                             "perf_summary": None, "repeat_level_metrics": []}


def test_masked_rows_are_counted_not_measured() -> None:
    rows = [row(0, 0, reward=1.0, mask_sample=True), row(0, 1, reward=0.0, mask_sample=False),
            row(1, 0, reward=0.4, mask_sample=1), row(1, 1, reward=0.2, mask_sample="yes"), row(2, 0, reward=0.6)]
    got = default_aggregate_metrics(rows)
    coverage = {"coverage/measured_rollouts": 2, "coverage/masked_rollouts": 3, "coverage/measured_tasks": 2,
                "coverage/fully_masked_tasks": 1}
    assert got["agent_metrics"]["mean/reward"] == 0.3 and "mean/mask_sample" not in got["agent_metrics"]
    assert coverage.items() <= got["agent_metrics"].items() and coverage.items() <= got["key_metrics"].items()
    assert [g["_ng_task_index"] for g in got["group_level_metrics"]] == [0, 2]
    assert got["agent_metrics"]["num_repeats"] == 2  # masked rollout indices count


def test_every_row_masked() -> None:
    got = default_aggregate_metrics([row(0, 0, reward=1.0, mask_sample=True)])
    coverage = {"coverage/measured_rollouts": 0, "coverage/masked_rollouts": 1, "coverage/measured_tasks": 0,
                "coverage/fully_masked_tasks": 1}
    assert got == {"group_level_metrics": [], "agent_metrics": coverage, "key_metrics": coverage,
                   "perf_summary": None, "repeat_level_metrics": []}


@pytest.mark.parametrize(("rows", "message"), [
    ([row(0, 0, reward=1.0), row(0, 0, reward=0.0)], "duplicate"),
    ([row(0, 0, reward=1.0, mask_sample=True), row(0, 0, reward=0.0)], "masked and scored"),
    ([row(0, 0, reward=1.0), row(1, 0, reward=0.0), row(0, 1, reward=1.0)], "not consecutive"),
    ([row(0, 0, reward=1.0, response="text")], "response must be an object"),
    ([row(0, 0, reward=1.0, response={"usage": [1, 2]})], "response.usage must be an object"),
])
def test_rejects_what_nemo_gym_cannot_aggregate(rows: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        default_aggregate_metrics(rows)


def test_verify_response_strips_as_the_collector_does() -> None:
    rollout = {"reward": 1.0, "responses_create_params": {}, "ng_trajectory": [], "ng_agent_observations": [],
               "ng_model_call_capture": {}, "ng_perf": {"num_turns": 2},
               "response": {"output": ["long"], "usage": {"input_tokens": 3}, "incomplete_details": None}}
    assert verify_response(rollout) == {"reward": 1.0, "ng_perf": {"num_turns": 2},
                                        "response": {"usage": {"input_tokens": 3}}}
    assert verify_response({"reward": 0.0, "response": {"output": []}}) == {"reward": 0.0}


def test_perf_summary_from_ng_perf() -> None:
    rows = [row(0, 0, reward=1.0, ng_perf={"prompt_tokens": 10, "completion_tokens": 6, "num_turns": 2,
                                          "total_latency_ms": 100.0, "token_observability_coverage": 1.0}),
            row(0, 1, reward=0.0, ng_perf={"prompt_tokens": 20, "completion_tokens": 3, "num_turns": 3,
                                          "total_latency_ms": 300.0, "token_observability_coverage": 0}),
            row(1, 0, reward=0.0)]
    perf = default_aggregate_metrics(rows)["perf_summary"]
    assert perf["overall_observability_coverage"] == 2 / 3 and perf["token_observability_coverage"] == 1 / 3
    assert (perf["mean_prompt_tokens"], perf["median_prompt_tokens"], perf["total_prompt_tokens"]) == (15, 15, 30)
    assert (perf["min_num_turns"], perf["max_num_turns"], perf["std_num_turns"]) == (2, 3, 0.5)
    assert perf["mean_tokens_per_turn"] == 2.0 and perf["total_latency_p90_ms"] == 280.0
    assert "mean_reasoning_tokens" not in perf


field_values = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000),
                         st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))


@st.composite
def runs(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Rows sorted by (task, rollout): random subsets of a task x repeat grid, fields that come and go."""
    tasks, repeats = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    rows = []
    for t in range(tasks):
        for r in range(repeats):
            if draw(st.booleans()) and draw(st.booleans()):
                continue  # a missing rollout
            fields = {name: v for name in ("reward", "x", "flag") if (v := draw(field_values)) is not None}
            if draw(st.integers(0, 5)) == 0:
                fields["mask_sample"] = True
            if draw(st.booleans()):
                fields["response"] = {"usage": {"output_tokens": draw(st.integers(0, 99))}}
            rows.append(row(t, r, **fields))
    return rows


@FAST
@given(runs(), st.randoms(use_true_random=False))
def test_order_within_and_of_tasks_does_not_matter(rows: list[dict[str, Any]], rng: random.Random) -> None:
    groups: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["_ng_task_index"], []).append(r)
    order = list(groups.values())
    rng.shuffle(order)
    for group in order:
        rng.shuffle(group)
    shuffled = [r for group in order for r in group]
    assert default_aggregate_metrics(iter(shuffled)) == default_aggregate_metrics(rows)


@FAST
@given(runs())
def test_run_wide_statistics_are_the_stdlibs(rows: list[dict[str, Any]]) -> None:
    got = orjson.loads(orjson.dumps(default_aggregate_metrics(rows)))  # JSON-safe
    scored = [r for r in rows if not r.get("mask_sample")]
    for name in ("reward", "x", "flag", "output_tokens"):
        xs = [float(v) for r in scored if (v := {**r, **r.get("response", {}).get("usage", {})}.get(name))
              is not None]
        if not xs:
            assert f"mean/{name}" not in got["agent_metrics"]
            continue
        agent = got["agent_metrics"]
        assert math.isclose(agent[f"mean/{name}"], statistics.fmean(xs), rel_tol=1e-12, abs_tol=1e-9)
        assert agent[f"median/{name}"] == statistics.median(xs)
        if len(xs) > 1:
            assert math.isclose(agent[f"std/{name}"], statistics.stdev(xs), rel_tol=1e-9, abs_tol=1e-6)
    if scored:
        assert got["agent_metrics"]["num_repeats"] == len({r["_ng_rollout_index"] for r in rows})
    else:
        assert "num_repeats" not in got["agent_metrics"]


@FAST
@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=2, max_size=60))
def test_sample_statistics_match_the_stdlib(xs: list[float]) -> None:
    ordered = sorted(xs)
    m = math.fsum(xs) / len(xs)
    assert median(ordered) == statistics.median(xs)
    assert math.isclose(sample_std(ordered, m), statistics.stdev(xs), rel_tol=1e-9, abs_tol=1e-6)
    # statistics' "inclusive" method is the same linear interpolation between closest ranks
    for q, want in zip((0.25, 0.5, 0.75), statistics.quantiles(xs, n=4, method="inclusive"), strict=True):
        assert math.isclose(quantile(ordered, q), want, rel_tol=1e-12, abs_tol=1e-9)


@pytest.mark.parametrize(("df", "want"), [  # scipy.stats.t.ppf(0.975, df), scipy 1.17.1
    (1, 12.706204736174694), (2, 4.302652729749462), (3, 3.1824463052837078), (10, 2.228138851986274),
    (30, 2.0422724563012378), (1000, 1.9623390808264083), (10**6, 1.959966356814107)])
def test_t_quantile_table(df: int, want: float) -> None:
    assert math.isclose(t_quantile(0.975, df), want, rel_tol=1e-13)
    assert t_quantile(0.025, df) == -t_quantile(0.975, df)


def test_t_quantile_rejects_out_of_range() -> None:
    assert t_quantile(0.5, 7) == 0.0
    for p, df in ((0.0, 3), (1.0, 3), (0.9, 0), (0.9, -1)):
        with pytest.raises(ValueError):
            t_quantile(p, df)


@FAST
@given(runs())
def test_spooled_groups_are_the_same_groups_without_holding_them(rows: list[dict[str, Any]]) -> None:
    held = default_aggregate_metrics(rows)
    spooled = default_aggregate_metrics(iter(rows), spool_groups=True)
    groups = spooled.pop("group_level_metrics")
    try:
        assert orjson.dumps(list(groups)) == orjson.dumps(held.pop("group_level_metrics"))  # ints and floats alike
        assert list(groups) == list(groups)  # read again from the start
    finally:
        groups.close()
    assert spooled == held


def test_spooled_groups_need_increasing_tasks() -> None:
    with pytest.raises(ValueError, match="come after task 1"):
        default_aggregate_metrics([row(1, 0, reward=1.0), row(0, 0, reward=0.0)], spool_groups=True)
