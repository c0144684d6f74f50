"""The metrics document: rollouts flagged `mask_sample` are counted, left out of the field statistics, and the
count survives merging shards."""

from __future__ import annotations

from typing import Any

import orjson

from gym_collect.merge import merge_metrics
from gym_collect.metrics import RunMetrics


def rollout(task: int, reward: float, **fields: Any) -> dict[str, Any]:
    return {"_ng_task_index": task, "_ng_rollout_index": 0, "agent_ref": {"name": "agent"}, "reward": reward,
            **fields}


def test_masked_rollouts_are_counted_and_left_out_of_the_means() -> None:
    m = RunMetrics(expected=4, clock=lambda: 1.0)
    m.add_success("agent", 0.5, rollout(0, 1.0, solved=True, response={"usage": {"output_tokens": 8}}))
    m.add_success("agent", 0.5, rollout(1, 0.0, solved=False, mask_sample=True))
    m.add_prior(rollout(2, 0.0, solved=False, response={"usage": {"output_tokens": 4}}))
    m.add_prior(rollout(3, 9.0, mask_sample=1))
    snap = orjson.loads(orjson.dumps(m.snapshot()))
    assert snap["rollouts"]["masked"] == 2 and snap["rollouts"]["succeeded"] == 2
    fields = snap["fields"]["agent"]
    assert fields["reward"]["count"] == 2 and fields["reward"]["mean"] == 0.5
    assert fields["solved"]["mean"] == 0.5 and fields["output_tokens"]["mean"] == 6.0
    assert "mask_sample" not in fields
    assert "Means exclude 2 rollouts flagged mask_sample (they are in the output)" in m.summary_lines()


def test_no_masked_line_without_masked_rollouts() -> None:
    m = RunMetrics(expected=1, clock=lambda: 1.0)
    m.add_success("agent", 0.5, rollout(0, 1.0))
    assert m.snapshot()["rollouts"]["masked"] == 0
    assert not any("mask_sample" in line for line in m.summary_lines())


def test_masked_count_sums_across_shards() -> None:
    shards = []
    for masks in ([True, False], [True, True, False]):
        m = RunMetrics(expected=len(masks), clock=lambda: 1.0)
        for i, mask in enumerate(masks):
            m.add_success("agent", 0.1, rollout(i, float(i), mask_sample=mask))
        shards.append(orjson.loads(orjson.dumps(m.snapshot())))
    merged = merge_metrics(shards)
    assert merged["rollouts"]["masked"] == 3  # type: ignore[index]
    assert merged["fields"]["agent"]["reward"]["count"] == 2  # type: ignore[index]


def test_a_run_that_measured_no_latency_says_so_instead_of_zeros() -> None:
    idle = RunMetrics(expected=4)
    idle.add_prior({"agent_ref": {"name": "a"}, "reward": 1.0})  # a resume with nothing left to send
    assert "Latency s: none measured (no rollout answered in this run)" in idle.summary_lines()
    busy = RunMetrics(expected=4)
    busy.add_success("a", 0.25, {"reward": 1.0})
    assert any(line.startswith("Latency s: p50 0.25") for line in busy.summary_lines())


def test_summary_means_are_read_whole_and_never_as_an_exponent_below_a_trillion() -> None:
    from gym_collect.metrics import _mean

    assert [_mean(v) for v in (59999.5, 0.70012, 434.94865, 12345678.25, -20000.0)] == [
        "59999.5", "0.7001", "434.9", "12345678.2", "-20000.0"]
