"""The main job against a real agent server on 127.0.0.1: limits, sharding, selection, merges, formats."""

from __future__ import annotations

from pathlib import Path

import pytest

from gym_collect.collect import collect
from gym_collect.sim_agent import SimAgent, SimAgentConfig
from tests.conftest import NEMO_GYM_DATA, config, make_rows, nemo_pairs, pairs, read_jsonl, write_rows


async def test_in_flight_never_exceeds_and_reaches_num_samples_in_parallel(tmp_path: Path) -> None:
    async with SimAgent(SimAgentConfig(capacity=64, service_time_s=0.03)) as sim:
        inp = write_rows(tmp_path / "in.jsonl", make_rows(60))
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, num_samples_in_parallel=5))
    assert result.exit_code == 0
    assert sim.stats.max_in_flight == 5
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(i, 0) for i in range(60)]


async def test_unset_parallelism_is_bounded_by_the_connector_per_host_limit(tmp_path: Path) -> None:
    async with SimAgent(SimAgentConfig(capacity=64, service_time_s=0.03)) as sim:
        inp = write_rows(tmp_path / "in.jsonl", make_rows(60))
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url,
                                      global_aiohttp_connector_limit_per_host=4))
    assert result.exit_code == 0
    assert sim.stats.max_in_flight == 4
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 60


async def test_shards_concatenated_equal_a_single_run(tmp_path: Path, sim: SimAgent) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(30))
    await collect(config(inp, tmp_path / "single.jsonl", sim.url, num_repeats=2, num_samples_in_parallel=8))
    await collect(config(inp, tmp_path / "a.jsonl", sim.url, end_idx=13, num_repeats=2))
    await collect(config(inp, tmp_path / "b.jsonl", sim.url, start_idx=13, num_repeats=2))
    joined = (tmp_path / "a.jsonl").read_bytes() + (tmp_path / "b.jsonl").read_bytes()
    (tmp_path / "cat.jsonl").write_bytes(joined)
    single, cat = read_jsonl(tmp_path / "single.jsonl"), read_jsonl(tmp_path / "cat.jsonl")
    assert len(cat) == len(single) == 60
    assert sorted(pairs(cat)) == sorted(pairs(single))
    by_pair = {(r["_ng_task_index"], r["_ng_rollout_index"]): r for r in single}
    for row in cat:
        twin = by_pair[(row["_ng_task_index"], row["_ng_rollout_index"])]
        assert row["responses_create_params"] == twin["responses_create_params"]
        assert row["reward"] == twin["reward"]


async def test_input_order_output_is_in_task_rollout_order(tmp_path: Path) -> None:
    async with SimAgent(SimAgentConfig(capacity=16, service_time_s=0.01, service_sigma=1.0, seed=3)) as sim:
        inp = write_rows(tmp_path / "in.jsonl", make_rows(50))
        await collect(config(inp, tmp_path / "out.jsonl", sim.url, num_repeats=3, num_samples_in_parallel=16,
                             output_order="input", reorder_window=8))
    assert pairs(read_jsonl(tmp_path / "out.jsonl")) == [(t, r) for t in range(50) for r in range(3)]


async def test_limit_and_repeats_aabbcc(tmp_path: Path, sim: SimAgent) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(20))
    result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, start_idx=4, limit=3, num_repeats=2,
                                  num_samples_in_parallel=1))
    assert result.exit_code == 0
    assert pairs(read_jsonl(tmp_path / "out.jsonl")) == [(4, 0), (4, 1), (5, 0), (5, 1), (6, 0), (6, 1)]
    assert result.metrics is not None and result.metrics["rollouts"]["expected"] == 6


async def test_responses_create_params_are_merged_into_each_row(tmp_path: Path, sim: SimAgent) -> None:
    rows = [{"responses_create_params": {"input": "hi", "temperature": 1.0, "max_output_tokens": 9}}]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    await collect(config(inp, tmp_path / "out.jsonl", sim.url,
                         responses_create_params={"temperature": 0.25, "top_p": 0.5}))
    sent = sim.stats.bodies_last[(0, 0)]
    assert sent["responses_create_params"] == {"input": "hi", "temperature": 0.25, "max_output_tokens": 9,
                                               "top_p": 0.5}
    assert sent["agent_ref"] == {"name": "sim_agent"}
    (written,) = read_jsonl(tmp_path / "out.jsonl")
    assert written["responses_create_params"]["temperature"] == 0.25


async def test_rows_go_to_their_own_agent_unless_agent_name_reroutes_them(tmp_path: Path) -> None:
    rows = [*make_rows(3), *make_rows(3, agent_ref={"type": "responses_api_agents", "name": "other"})]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    async with SimAgent(agent_names=("sim_agent",)) as first, SimAgent(agent_names=("other",)) as second:
        first.config.service_time_s = second.config.service_time_s = 0.0
        cfg = config(inp, tmp_path / "out.jsonl", first.url, agent_name=None, agents={"other": second.url})
        assert (await collect(cfg)).exit_code == 0
        assert sorted(k[0] for k in first.stats.succeeded) == [0, 1, 2]
        assert sorted(k[0] for k in second.stats.succeeded) == [3, 4, 5]
        written = {r["_ng_task_index"]: r.get("agent_ref") for r in read_jsonl(tmp_path / "out.jsonl")}
        assert written[0] is None  # sent as it is to agent_url
        assert written[4] == {"type": "responses_api_agents", "name": "other"}
        # NeMo Gym 0.7: agent_name is agent_map._default and re-routes every row, own agent_ref or not
        cfg = config(inp, tmp_path / "all.jsonl", first.url, agents={"other": second.url})
        assert (await collect(cfg)).exit_code == 0
    assert {r["agent_ref"]["name"] for r in read_jsonl(tmp_path / "all.jsonl")} == {"sim_agent"}


async def test_agents_resolved_through_the_head_server(tmp_path: Path) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0.0), agent_names=("my_agent",)) as sim:
        inp = write_rows(tmp_path / "in.jsonl", make_rows(5))
        cfg = config(inp, tmp_path / "out.jsonl", None, agent_name="my_agent", head_server_url=sim.url)
        assert (await collect(cfg)).exit_code == 0
    assert len(read_jsonl(tmp_path / "out.jsonl")) == 5


EXAMPLES = sorted((NEMO_GYM_DATA / "nemo_gym_examples").glob("*__example.jsonl")) + sorted(
    (NEMO_GYM_DATA / "nemo_gym_datasets").glob("*.jsonl"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.name for p in EXAMPLES])
async def test_every_nemo_gym_example_input_goes_through(tmp_path: Path, example: Path) -> None:
    named = _agent_names(example)
    async with SimAgent(SimAgentConfig(service_time_s=0.0)) as sim:
        cfg = config(example, tmp_path / "out.jsonl", None, head_server_url=sim.url, num_samples_in_parallel=16,
                     agent_name=None if named else "sim_agent")
        sim.agent_names = ("sim_agent", *named)
        result = await collect(cfg)
    assert result.exit_code == 0
    rollouts = read_jsonl(tmp_path / "out.jsonl")
    expected = nemo_pairs(example)
    assert sorted(pairs(rollouts)) == sorted(expected)
    source = dict(zip(expected, read_jsonl(example), strict=True))
    for rollout in rollouts:
        row = source[(rollout["_ng_task_index"], rollout["_ng_rollout_index"])]
        assert rollout["responses_create_params"] == row["responses_create_params"]
        assert rollout["response"]["object"] == "response" and "reward" in rollout


def _agent_names(path: Path) -> list[str]:
    return sorted({r["agent_ref"]["name"] for r in read_jsonl(path) if "agent_ref" in r})


async def test_runner_never_exceeds_a_lowered_limit(tmp_path: Path) -> None:
    """Lower the gate's limit mid-run: once in-flight work has drained to it, the agent never sees more."""
    from gym_collect.client import AgentClient
    from gym_collect.concurrency.limits import InFlightLimits
    from gym_collect.metrics import Progress, RunMetrics
    from gym_collect.nemo.routing import RowRouter
    from gym_collect.nemo.rows import RequestBuilder
    from gym_collect.reader import JsonlRows, RowSelection, iter_requests
    from gym_collect.retry import RetryPolicy
    from gym_collect.runner import FailureBudget, Runner
    from gym_collect.writer import LineFile, OutputPaths, RolloutWriter, write_json_atomic

    inp = write_rows(tmp_path / "in.jsonl", make_rows(300))
    paths = OutputPaths(tmp_path / "out.jsonl")
    gate = InFlightLimits({"sim_agent": "sim_agent"}, {"sim_agent": 16}, None)

    class LowerAfter60(Progress):
        finished, lowered, drained = 0, False, False

        def update(self) -> None:  # called after each rollout's permit is released
            self.finished += 1
            if self.finished == 60:
                gate.shared, self.lowered = 3, True
            if self.lowered and not self.drained and gate.in_flight <= 3:
                sim.stats.reset()
                self.drained = True

    async with (
        SimAgent(SimAgentConfig(capacity=64, service_time_s=0.02, service_sigma=0.5)) as sim,
        AgentClient(connector_limit=100, connector_limit_per_host=100, connect_timeout_s=2,
                    request_timeout_s=10) as client,
    ):
        with LineFile(paths.output) as out, LineFile(paths.failures) as failures:
            runner = Runner(client=client, agent_urls={"sim_agent": sim.url},
                            writer=RolloutWriter(out, failures, ordered=False, window=1024),
                            metrics=RunMetrics(300), progress=LowerAfter60(300, 0, enabled=False),
                            policy=RetryPolicy(), limits=gate, budget=FailureBudget(),
                            write_status=lambda doc: write_json_atomic(paths.status, doc), run_key="k",
                            status_every_s=1.0)
            builder = RequestBuilder(RowRouter(agent_map=None, fan_out=None, unnamed_agent="sim_agent"),
                                     lambda *keys: 1, {})
            await runner.run(iter_requests(JsonlRows(inp, RowSelection()), builder, lambda t, r: False))
    assert sim.stats.max_in_flight <= 3
    assert sim.stats.requests > 100
    assert sorted(pairs(read_jsonl(paths.output))) == [(i, 0) for i in range(300)]


def test_rate_over_the_last_minute_uses_an_injected_clock() -> None:
    from gym_collect.metrics import RunMetrics

    now = [0.0]
    metrics = RunMetrics(1000, clock=lambda: now[0])
    for t in range(1, 181):
        now[0] = float(t)
        metrics.succeeded += 10 if t <= 90 else 2
        rate = metrics.rate_last_minute()
        if t == 30:
            assert rate == 10.0  # younger than a minute: since the start
        if t == 180:
            assert rate == 2.0  # the last minute only
