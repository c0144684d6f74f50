"""The dispatch budget: pure, with an injected clock, then a real run that stops dispatching in time."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from gym_collect.collect import EXIT_OK, EXIT_STOPPED, collect
from gym_collect.deadline import DispatchDeadline
from gym_collect.sim_agent import SimAgent, SimAgentConfig
from tests.conftest import config, make_rows, pairs, read_jsonl, write_rows


def run(deadline: DispatchDeadline, now: list[float], step_s: float, n: int = 100) -> list[int]:
    taken = []
    for item in deadline.limit(iter(range(n))):
        taken.append(item)
        now[0] += step_s
    return taken


def test_a_fixed_margin_stops_dispatch_before_the_deadline() -> None:
    now, reasons = [0.0], []
    deadline = DispatchDeadline(10.0, 3.0, lambda: (0, 0.0), reasons.append, clock=lambda: now[0])
    assert run(deadline, now, 1.0) == list(range(7))  # stops once 3 s or less are left
    assert len(reasons) == 1 and reasons[0].startswith("dispatch budget spent")


def test_expired_stays_expired_and_reports_once() -> None:
    now, reasons = [0.0], []
    deadline = DispatchDeadline(10.0, 2.0, lambda: (0, 0.0), reasons.append, clock=lambda: now[0])
    assert not deadline.expired()
    now[0] = 8.0
    assert deadline.expired() and deadline.expired()
    assert run(deadline, now, 1.0) == [] and len(reasons) == 1


def test_the_adaptive_margin_is_the_observed_p75_after_five_rollouts() -> None:
    now, observed = [0.0], [0]
    deadline = DispatchDeadline(10.0, None, lambda: (observed[0], 4.0), lambda r: None, clock=lambda: now[0])
    assert deadline.margin_s() == 0.0
    observed[0] = 5
    assert deadline.margin_s() == 4.0 and len(run(deadline, now, 1.0)) == 6


def test_no_budget_and_no_slurm_end_time_means_no_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLURM_JOB_END_TIME", raising=False)
    deadline = DispatchDeadline.from_settings(None, None, 30.0, lambda: (0, 0.0), lambda r: None)
    assert deadline.deadline is None and len(run(deadline, [0.0], 1.0)) == 100
    monkeypatch.setenv("SLURM_JOB_END_TIME", "1")  # long past: nothing starts
    assert run(DispatchDeadline.from_settings(None, None, 0.0, lambda: (0, 0.0), lambda r: None), [0.0], 1.0) == []


async def test_a_spent_dispatch_budget_leaves_the_rest_for_resume(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(40))
    out = tmp_path / "out.jsonl"
    async with SimAgent(SimAgentConfig(capacity=2, service_time_s=0.1, service_sigma=0.0)) as sim:
        first = await collect(config(inp, out, sim.url, num_samples_in_parallel=2, dispatch_budget_s=0.5,
                                     drain_margin_s=0.0))
        written = len(read_jsonl(out))
        second = await collect(config(inp, out, sim.url, num_samples_in_parallel=2, resume=True))
    assert first.exit_code == EXIT_STOPPED and 0 < written < 40
    assert first.metrics is not None and first.metrics["stopped"].startswith("dispatch budget spent")
    assert second.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(out))) == [(t, 0) for t in range(40)]


@pytest.mark.parametrize("lenient", [False, True])
async def test_a_run_its_dispatch_budget_ended_is_scored_with_what_never_started_as_zeros(
        tmp_path: Path, lenient: bool) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(40))
    out = tmp_path / "out.jsonl"
    async with SimAgent(SimAgentConfig(capacity=2, service_time_s=0.1, service_sigma=0.0)) as sim:
        result = await collect(config(inp, out, sim.url, num_samples_in_parallel=2, dispatch_budget_s=0.5,
                                      drain_margin_s=0.0, count_missing_rollouts_as_zero=True,
                                      require_complete=False if lenient else None))
    written = read_jsonl(out)
    assert 0 < len(written) < 40
    assert result.exit_code == (EXIT_OK if lenient else EXIT_STOPPED)  # 0.7's rule under require_complete=false
    [entry] = orjson.loads(out.with_name("out_aggregate_metrics.json").read_bytes())
    tasks = entry["group_level_metrics"]
    assert len(tasks) == 40  # every materialized rollout scored: the ones that never started as zeros
    never_started = {t for t in range(40)} - {t for t, _ in pairs(written)}
    assert all(g["mean/reward"] == 0.0 for g in tasks if g["_ng_task_index"] in never_started)
