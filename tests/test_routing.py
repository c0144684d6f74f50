"""NeMo Gym 0.7's routing and row materialization: head documents of 0.4/0.5 and 0.7 shapes, agent_map,
agent_name, task_source, fan_out, environment servers, num_repeats maps, seeds, prompt_config and 0.7's keys;
pure units, then end to end against the simulated agent's head document."""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.cli import normalize_overrides
from gym_collect.collect import collect
from gym_collect.config import CollectConfig, HeadServerConfig
from gym_collect.errors import ConfigError, InputError
from gym_collect.nemo.head import HeadDocument
from gym_collect.nemo.indices import TaskIndexer, line_key
from gym_collect.nemo.keys import NemoGymOnlyKeys, notices
from gym_collect.nemo.routing import Route, RowRouter, resolve_routes
from gym_collect.nemo.rows import PromptConfig, RequestBuilder
from gym_collect.sim_agent import SimAgent, SimAgentConfig
from tests.conftest import config, make_rows, nemo_pairs, pairs, read_jsonl, write_rows


def server(port: int, **extra: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": port, "entrypoint": "app.py", **extra}


def agent(port: int, resources: str | None = None) -> dict[str, Any]:
    ref = {"resources_server": {"type": "resources_servers", "name": resources}} if resources else {}
    return {"responses_api_agents": {"simple_agent": server(port, **ref)}}


def relay(port: int, agent_name: str) -> dict[str, Any]:
    ref = {"agent_server": {"type": "responses_api_agents", "name": agent_name}}
    return {"environment_servers": {"legacy_agent": server(port, **ref)}}


HEAD_05 = {"head_server": {"host": "127.0.0.1", "port": 11000}, "math_agent": agent(9001),
           "policy_model": {"responses_api_models": {"openai_model": server(9100, openai_api_key="sk-x")}}}
HEAD_04 = {"math_agent": agent(9001)}
HEAD_07 = {
    "head_server": {"host": "127.0.0.1", "port": 11000},
    "math": {"resources_servers": {"math_with_judge": server(9200)}},
    "math_agent": agent(9001, resources="math"),
    "math_agent_environment_server": relay(9301, "math_agent"),
    "tools": {"resources_servers": {"example_single_tool_call": server(9201)}},
    "session_agent": agent(9002, resources="tools"),
    "tools_single_agent_turn": {"environment_servers": {"single_agent_turn_legacy": server(
        9302, resources_server={"type": "resources_servers", "name": "tools"},
        agent_server={"type": "responses_api_agents", "name": "session_agent"})}},
    "shared": {"resources_servers": {"shared": server(9202)}},
    "twin_a": agent(9003, resources="shared"),
    "twin_b": agent(9004, resources="shared"),
    "twin_a_environment_server": relay(9303, "twin_a"),
    "twin_b_environment_server": relay(9304, "twin_b"),
    "twin_b_second_environment_server": relay(9305, "twin_b"),
    "lonely_agent": agent(9005),
}


def routes(document: dict[str, Any], *agents: str, **kwargs: Any) -> dict[str, Route]:
    options: dict[str, Any] = {"agent_name": None, "agent_url": None, "direct": {}, "environment_server": None}
    options.update(kwargs)
    return resolve_routes(agents, head=HeadDocument(document, "http://127.0.0.1:11000"), **options)


@pytest.mark.parametrize("document", [HEAD_04, HEAD_05], ids=["0.4", "0.5"])
def test_older_head_servers_route_to_the_agent_itself(document: dict[str, Any]) -> None:
    assert routes(document, "math_agent") == {"math_agent": Route("http://127.0.0.1:9001")}
    assert Route("http://127.0.0.1:9001").stamps == {}


def test_a_0_7_head_routes_through_the_environment_server_fronting_the_agent() -> None:
    got = routes(HEAD_07, "math_agent", "session_agent")
    assert got["math_agent"] == Route("http://127.0.0.1:9301", "math_agent_environment_server", "legacy_agent")
    assert got["session_agent"].stamps == {"_ng_environment_server": "tools_single_agent_turn",
                                           "_ng_result_type": "single_agent_turn_legacy"}


@pytest.mark.parametrize(("name", "message"), [
    ("lonely_agent", "has no environment server"),
    ("twin_b", "fronted by several environment servers"),
    ("math_agent_environment_server", "is an environment server, not an agent: pass agent_name=math_agent"),
    ("math_agnet", "did you mean 'math_agent'"),
    ("math", "is not an agent"),
])
def test_0_7_routing_errors_say_what_to_pass(name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        routes(HEAD_07, name)


def test_direct_addresses_win_over_the_head_server() -> None:
    got = routes(HEAD_07, "math_agent", "twin_b", direct={"twin_b": "http://10.0.0.9:80/"})
    assert got["twin_b"] == Route("http://10.0.0.9:80")
    got = routes(HEAD_07, "math_agent", agent_url="http://127.0.0.1:7000", agent_name="math_agent")
    assert got["math_agent"] == Route("http://127.0.0.1:7000")


def test_task_source_resolves_to_the_declaring_or_the_unique_agent() -> None:
    head = HeadDocument(HEAD_07, "http://h")
    assert head.resolve_task_source("math_agent") == "math_agent"
    assert head.resolve_task_source("math") == "math_agent"
    with pytest.raises(ConfigError, match="2 agents use it"):
        head.resolve_task_source("shared")
    with pytest.raises(ConfigError, match="did you mean 'math'"):
        head.resolve_task_source("mathh")


def router(**kwargs: Any) -> RowRouter:
    options: dict[str, Any] = {"agent_map": None, "fan_out": None, "unnamed_agent": None}
    options.update(kwargs)
    return RowRouter(**options)


def test_agent_map_precedence_and_agent_name_override(caplog: pytest.LogCaptureFixture) -> None:
    r = router(agent_map={"a": "mapped_a", "src": "mapped_src", "_default": "fallback"})
    assert r.targets(r.key({"agent_ref": {"name": "a"}, "task_source": "src"}, "x")) == ("mapped_a",)
    assert r.targets(r.key({"task_source": "src"}, "x")) == ("mapped_src",)
    key = r.key({"agent_ref": {"type": "t", "name": "b"}}, "x")
    assert r.targets(key) == ("fallback",) and r.stamp(key) == "fallback" and key.overridden == "b"
    cfg = CollectConfig(agent_name="x", agent_map={"y": "z"})
    assert cfg.agent_map == {"y": "z", "_default": "x"}
    with pytest.raises(ConfigError, match=r"conflicts with agent_map\._default"):
        CollectConfig(agent_name="x", agent_map={"_default": "w"})


def test_fan_out_runs_a_row_once_per_agent_with_consecutive_rollout_indices() -> None:
    r = router(fan_out={"a": ["p", "q"]})
    builder = RequestBuilder(r, lambda agent, basis: {"p": 2, "q": 1}[agent or ""], {})
    row = {"agent_ref": {"name": "a"}, "responses_create_params": {"input": "hi"}}
    assert builder.rollouts(builder.check(row, "x")) == 3
    out = [(i, agent, orjson.loads(body)) for i, agent, _, body, _ in builder.build(row, 7, "x", lambda r: False)]
    assert [(i, a) for i, a, _ in out] == [(0, "p"), (1, "p"), (2, "q")]
    assert [(b["_ng_task_index"], b["_ng_rollout_index"], b["agent_ref"]["name"]) for _, _, b in out] == [
        (7, 0, "p"), (7, 1, "p"), (7, 2, "q")]


def test_num_repeats_map_null_and_missing_entries() -> None:
    assert CollectConfig(num_repeats=None).num_repeats == 1
    cfg = CollectConfig(num_repeats={"a": 3, "_default": 2})
    assert (cfg.repeats_for("a", "src"), cfg.repeats_for("b", "src"), cfg.repeats_for("b", "a")) == (3, 2, 3)
    assert CollectConfig(num_repeats={"src": 4}).repeats_for("b", "src") == 4
    builder = RequestBuilder(router(unnamed_agent="b"), CollectConfig(num_repeats={"a": 3}).repeats_for, {})
    with pytest.raises(ConfigError, match="num_repeats has no entry for 'b'"):
        builder.rollouts(builder.check({}, "x"))
    with pytest.raises(ConfigError, match="num_repeats"):
        CollectConfig(num_repeats={"a": 0})


def test_seed_goes_into_metadata_extra_body_as_nemo_gym_writes_it() -> None:
    builder = RequestBuilder(router(unnamed_agent="a"), lambda *k: 2, {}, add_seed=True)
    row = {"responses_create_params": {"input": "q", "metadata": {"extra_body": '{"top_k": 5}'}}}
    bodies = [orjson.loads(body) for *_, body, _ in builder.build(row, 0, "x", lambda r: False)]
    extra = [b["responses_create_params"]["metadata"]["extra_body"] for b in bodies]
    assert extra == [json.dumps({"top_k": 5, "seed": 0}), json.dumps({"top_k": 5, "seed": 1})]
    assert row["responses_create_params"]["metadata"]["extra_body"] == '{"top_k": 5}'  # no seed leaks across


def test_prompt_config_builds_the_input_and_refuses_rows_that_have_one(tmp_path: Path) -> None:
    (tmp_path / "prompt.yaml").write_text("system: You solve {kind} problems.\nuser: 'Solve: {question}'\n")
    prompt = PromptConfig.load(str(tmp_path / "prompt.yaml"))
    builder = RequestBuilder(router(unnamed_agent="a"), lambda *k: 1, {"temperature": 0.5}, prompt=prompt)
    row = {"question": "1+1", "kind": "math", "responses_create_params": {"max_output_tokens": 9}}
    builder.check(row, "in.jsonl:1")
    (*_, body, _), = builder.build(row, 0, "in.jsonl:1", lambda r: False)
    assert orjson.loads(body)["responses_create_params"] == {
        "max_output_tokens": 9, "temperature": 0.5,
        "input": [{"role": "system", "content": "You solve math problems."},
                  {"role": "user", "content": "Solve: 1+1"}]}
    with pytest.raises(InputError, match=r"in\.jsonl:2: the row has responses_create_params\.input"):
        builder.check({"question": "q", "kind": "k", "responses_create_params": {"input": "x"}}, "in.jsonl:2")
    with pytest.raises(InputError, match=r"in\.jsonl:3: the prompt template needs field 'kind'"):
        builder.check({"question": "q"}, "in.jsonl:3")


def test_overrides_refuse_a_row_whose_responses_create_params_is_not_an_object() -> None:
    builder = RequestBuilder(router(unnamed_agent="a"), lambda *k: 1, {"temperature": 0.5})
    with pytest.raises(InputError, match=r"in\.jsonl:2: responses_create_params is a JSON str, not an object"):
        builder.check({"responses_create_params": "hi"}, "in.jsonl:2")
    builder.check({"q": 1}, "in.jsonl:3")  # none at all: the overrides make it
    RequestBuilder(router(unnamed_agent="a"), lambda *k: 1, {}).check({"responses_create_params": "hi"}, "x")


@pytest.mark.parametrize(
    ("text", "message"),
    [('user: "{0}"\n', "positional field"), ('user: "{}"\n', "positional field"),
     ('system: "{question"\nuser: x\n', "the system template is not a format string"),
     ("[a, b\n", "not valid YAML at line 2"), ("user: 3\n", "needs a `user` template")],
)
def test_a_bad_prompt_template_is_refused_at_load(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "prompt.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        PromptConfig.load(str(tmp_path / "prompt.yaml"))
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(("user", "message"), [("{question.x}", "AttributeError"), ("{question:d}", "ValueError"),
                                               ("{question[0][1]}", "IndexError"), ("{kind}", "needs field 'kind'")])
def test_a_row_the_template_cannot_fill_is_an_input_error_naming_it(user: str, message: str) -> None:
    with pytest.raises(InputError, match=rf"in\.jsonl:4: .*{re.escape(message)}"):
        PromptConfig(user).messages({"question": "q"}, "in.jsonl:4")


def test_every_key_of_nemo_gym_0_7s_collector_is_accepted() -> None:
    keys = ["agent_name=a", "agent_map._default=a", "fan_out.a=[b,c]", "num_repeats.a=2", "num_repeats=null",
            "num_repeats_add_seed=true", "interleave_repeats=false", "prompt_config=p.yaml", "limit=0",
            "head_server.host=127.0.0.1", "head_server.port=11001", "resume_from_cache=true",
            "route_failures_to_sidecar=true", "require_complete=true", "environment_routing_mode=agent",
            "environment_server_name=e", "environment_server_routes.ts=e", "responses_create_params.top_p=1",
            "num_samples_in_parallel=8", *(f"{f}=1" for f in NemoGymOnlyKeys.__dataclass_fields__)]
    normalize_overrides([f"+{k}" for k in keys])
    with pytest.raises(ConfigError, match="did you mean 'num_repeats_add_seed'"):
        normalize_overrides(["+num_repeat_add_seed=true"])


def test_keys_that_cannot_apply_get_one_notice_each() -> None:
    lines = notices(NemoGymOnlyKeys(upload_rollouts=False, observability_enabled=True, dispatch_longest_first=False))
    assert len(lines) == 2 and all("has no effect here" in line for line in lines)


def test_limit_zero_and_head_server_keys() -> None:
    cfg = CollectConfig(limit=0, head_server=HeadServerConfig("10.1.2.3", 11001))
    assert cfg.limit is None and cfg.head_server_url == "http://10.1.2.3:11001"


# End to end against the simulated agent's head document ---------------------------------------------------------

@pytest.mark.parametrize("shape", ["0.7", "0.5"])
async def test_results_are_stamped_with_the_environment_server_on_a_0_7_head(tmp_path: Path, shape: str) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(4, agent_ref={"name": "my_agent"}))
    async with SimAgent(SimAgentConfig(service_time_s=0.0), agent_names=("my_agent",)) as sim:
        sim.head_shape = shape
        result = await collect(config(inp, tmp_path / "out.jsonl", None, agent_name=None, head_server_url=sim.url))
    assert result.exit_code == 0
    stamps = {(r.get("_ng_environment_server"), r.get("_ng_result_type")) for r in read_jsonl(tmp_path / "out.jsonl")}
    assert stamps == ({("my_agent_environment_server", "legacy_agent")} if shape == "0.7" else {(None, None)})


async def test_task_source_rows_and_an_environment_server_given_as_agent(tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    rows = [*make_rows(2, task_source="my_agent_resources"), *make_rows(2, agent_ref={"name": "other"})]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    async with SimAgent(SimAgentConfig(service_time_s=0.0), agent_names=("my_agent", "other")) as sim:
        with caplog.at_level(logging.WARNING):
            result = await collect(config(inp, tmp_path / "out.jsonl", None, agent_name=None,
                                          head_server_url=sim.url))
        assert result.exit_code == 0
        names = [r["agent_ref"]["name"] for r in sorted(read_jsonl(tmp_path / "out.jsonl"),
                                                        key=lambda r: r["_ng_task_index"])]
        assert names == ["my_agent", "my_agent", "other", "other"]
        bodies = sim.stats.bodies_last
        assert bodies[(0, 0)]["agent_ref"] == {"name": "my_agent"} and bodies[(0, 0)]["task_source"]
        with pytest.raises(ConfigError, match="is an environment server, not an agent: pass agent_name=my_agent"):
            await collect(config(inp, tmp_path / "bad.jsonl", None, agent_name="my_agent_environment_server",
                                 head_server_url=sim.url))
        with caplog.at_level(logging.WARNING):
            await collect(config(inp, tmp_path / "all.jsonl", None, agent_name="my_agent", head_server_url=sim.url))
    assert "agent_map overrode agent_ref values already present in the data: [('other', 'my_agent')]" in caplog.text
    assert {r["agent_ref"]["name"] for r in read_jsonl(tmp_path / "all.jsonl")} == {"my_agent"}


async def test_environment_server_name_sends_every_row_to_it(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(3))
    async with SimAgent(SimAgentConfig(service_time_s=0.0), agent_names=("my_agent",)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", None, agent_name=None, head_server_url=sim.url,
                                      environment_server_name="my_agent_environment_server"))
        sent = sim.stats.bodies_last[(0, 0)]
    assert result.exit_code == 0
    assert sent["agent_ref"] == {"name": "my_agent"}
    assert sent["_ng_environment_server"] == "my_agent_environment_server"
    assert {r["_ng_result_type"] for r in read_jsonl(tmp_path / "out.jsonl")} == {"legacy_agent"}


# Task and rollout indices -------------------------------------------------------------------------------------

def shard_pairs(path: Path, start: int, stop: int, repeats: int) -> list[tuple[int, int]]:
    from gym_collect.reader import JsonlRows, RowSelection, iter_requests, scan

    builder = RequestBuilder(router(unnamed_agent="a"), lambda *keys: repeats, {})
    found = scan(JsonlRows(path, RowSelection(start, stop)), builder, "fail")
    rows = JsonlRows(path, RowSelection(start, start + found.num_rows), include_prefix=True)
    return [(r.task_index, r.rollout_index)
            for r in iter_requests(rows, builder, lambda t, r: False, 1, found.indexer)]


POOL = [{"q": "same"}, {"q": "other"}, {"q": "stamped", "_ng_task_index": 1},
        {"q": "far", "_ng_task_index": 10**12}, {"q": "x", "_ng_task_index": 0}]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(POOL), st.builds(lambda i: {"q": i}, st.integers(0, 30))), max_size=40),
       st.integers(1, 3), st.lists(st.integers(0, 40), max_size=4))
def test_any_split_into_shards_gives_the_single_runs_indices(
    tmp_path_factory: pytest.TempPathFactory, rows: list[dict[str, Any]], repeats: int, cuts: list[int]
) -> None:
    path = write_rows(tmp_path_factory.mktemp("rows") / "in.jsonl", rows)
    single = shard_pairs(path, 0, len(rows), repeats)
    assert single == nemo_pairs(path, repeats)
    bounds = sorted({0, len(rows), *(min(c, len(rows)) for c in cuts)})
    sharded = [p for a, b in itertools.pairwise(bounds) for p in shard_pairs(path, a, b, repeats)]
    assert sharded == single
    assert len(set(single)) == len(single)


def test_distinct_lines_are_known_distinct_despite_the_filters_false_positives() -> None:
    # line keys are Python's (per-process seeded) hash: at 12 bits a key, a filter filling up to n keys passes
    # about 0.13% of them as seen, so 30,000 lines give about 40 false positives (none: odds below 1e-17)
    lines = [orjson.dumps({"q": i}) for i in range(30_000)]
    for rows, duplicated in ((lines, set()), ([*lines, lines[17], lines[4000]], {lines[17], lines[4000]})):
        indexer = TaskIndexer(len(rows))
        for raw in rows:
            indexer.observe_line(raw, None)
        assert len(indexer.candidate_lines) > len(duplicated)
        indexer.confirm_lines(rows)
        assert indexer.candidate_lines == {line_key(raw) for raw in duplicated}
        assert indexer.all_distinct == (not duplicated)


def test_shards_of_a_large_file_with_a_few_duplicates_agree_with_nemo_gym(tmp_path: Path) -> None:
    rows = [{"q": i} for i in range(3000)]
    rows[2500] = rows[10]
    rows[2999] = rows[2998]
    path = write_rows(tmp_path / "in.jsonl", rows)
    single = shard_pairs(path, 0, len(rows), 2)
    assert single == nemo_pairs(path, 2)
    assert [p for a, b in ((0, 1000), (1000, 2600), (2600, 3000)) for p in shard_pairs(path, a, b, 2)] == single


async def test_caller_task_indices_and_duplicate_lines_end_to_end_with_resume(tmp_path: Path) -> None:
    rows = [{"q": "a", "_ng_task_index": 40}, {"q": "b", "_ng_task_index": 41}, {"q": "c", "_ng_task_index": 40},
            {"q": "dup"}, {"q": "dup"}, {"q": "solo"}]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    async with SimAgent(SimAgentConfig(service_time_s=0.0)) as sim:
        assert (await collect(config(inp, out, sim.url, num_repeats=2))).exit_code == 0
        got = sorted(pairs(read_jsonl(out)))
        assert got == sorted(nemo_pairs(inp, 2))
        assert got == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (40, 0), (40, 1), (40, 2), (40, 3),
                       (41, 0), (41, 1)]
        kept = read_jsonl(out)[::2]
        out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in kept))
        result = await collect(config(inp, out, sim.url, num_repeats=2, resume=True))
    assert result.exit_code == 0
    assert sorted(pairs(read_jsonl(out))) == got


async def test_materialized_taskset_rows_go_as_episode_requests_to_their_route(tmp_path: Path) -> None:
    from aiohttp import web

    from tests.servers import LoopbackServer

    seen: list[dict[str, Any]] = []
    ports: list[int] = []

    async def head(request: web.Request) -> web.Response:
        env = {"host": "127.0.0.1", "port": ports[0], "entrypoint": "app.py",
               "agent_server": {"type": "responses_api_agents", "name": "episode_agent"}}
        return web.json_response(yaml.safe_dump({"tasks_env": {"environment_servers": {"episode_env": env}}}))

    async def run(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append(body)
        q = body["task"]["task_input"]["q"]
        envelope = {"episode_id": body["episode_id"], "task_id": body["task"]["task_id"]}
        if q == "bad":
            return web.json_response({**body, "task_id": body["task"]["task_id"],
                                      "failure": {"failure_reason": "no answer", "terminal": True, "stage": "verify"}})
        unusable = {"text": {"result": "hello"}, "reserved": {"result": {"reward": 1.0, "_ng_task_index": 99}},
                    "opaque": {"failure": "oops"}}  # 0.7 stops the run on these; here they are failed rollouts
        if q in unusable:
            return web.json_response({**envelope, **unusable[q]})
        return web.json_response({**envelope, "result": {"reward": 1.0, "answer": q}})

    questions = ["a", "b", "bad", "text", "reserved", "opaque"]
    rows = [{"task_id": {"taskset": "ts", "task_id": f"t{i}"}, "task_input": {"q": q}} for i, q in enumerate(questions)]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    with LoopbackServer({"GET /global_config_dict_yaml": head, "POST /run": run}) as server:
        ports.append(int(server.url.rsplit(":", 1)[1]))
        result = await collect(config(inp, tmp_path / "out.jsonl", None, agent_name=None, head_server_url=server.url,
                                      environment_routing_mode="taskset", environment_server_routes={"ts": "tasks_env"},
                                      num_repeats=2))
    assert result.exit_code == 3  # the failures are recorded
    assert sorted((b["episode_id"]["rollout_id"], b["episode_id"]["attempt"]) for b in seen) == sorted(
        (f"{t}-{r}", 0) for t in range(6) for r in range(2))  # each sent once: another attempt would not help
    written = sorted(read_jsonl(tmp_path / "out.jsonl"), key=lambda r: (r["_ng_task_index"], r["_ng_rollout_index"]))
    assert [(r["answer"], r["_ng_task_id"]["task_id"]) for r in written] == [("a", "t0"), ("a", "t0"), ("b", "t1"),
                                                                            ("b", "t1")]
    assert {(r["_ng_environment_server"], r["_ng_result_type"]) for r in written} == {("tasks_env", "episode_env")}
    failures = read_jsonl(tmp_path / "out_failures.jsonl")
    handled = [f for f in failures if f["_ng_failure_class"] == "environment_server_failed"]
    assert len(handled) == 2 and all(f["_ng_failure_terminal"] for f in handled)
    said = {f["_ng_task_index"]: f["_ng_failure_message"] for f in failures if f not in handled}
    assert sorted(said) == [3, 3, 4, 4, 5, 5][::2] and len(failures) == 8
    assert "non-object result" in said[3] and "reserved for rollout collection: ['_ng_task_index']" in said[4]
    # reports and the aggregate entry name the agent the environment server is attributed to, as 0.7 labels it
    entries = orjson.loads((tmp_path / "out_aggregate_metrics.json").read_bytes())
    assert [(e["agent_ref"]["name"], e["_ng_environment_server"]) for e in entries] == [("episode_agent", "tasks_env")]
    assert result.metrics is not None and list(result.metrics["by_agent"]) == ["episode_agent"]
    assert "non-object failure" in said[5]
    with pytest.raises(ConfigError, match="environment_routing_mode=taskset takes only materialized task rows"):
        RequestBuilder(router(taskset_routes={"ts": "e"}, tasksets_only=True), lambda *k: 1, {}).check({"q": 1}, "x")


def test_interleave_repeats_sends_abcabc_with_the_same_indices(tmp_path: Path) -> None:
    from gym_collect.reader import JsonlRows, RowSelection, iter_requests, scan

    path = write_rows(tmp_path / "in.jsonl", [{"q": "a"}, {"q": "b"}, {"q": "a"}])
    builder = RequestBuilder(router(unnamed_agent="x"), lambda *keys: 2, {})
    found = scan(JsonlRows(path, RowSelection()), builder, "fail")
    rows = JsonlRows(path, RowSelection(0, 3), include_prefix=True)
    got = [(r.task_index, r.rollout_index, r.seq)
           for r in iter_requests(rows, builder, lambda t, r: False, 1, found.indexer, interleave=True)]
    assert [(t, r) for t, r, _ in got] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (0, 3)]  # sorted by rollout index
    assert sorted((t, r) for t, r, _ in got) == sorted(nemo_pairs(path, 2))
    assert [seq for *_, seq in got] == list(range(6))


async def test_row_stamps_reach_results_in_order_and_an_unused_num_repeats_entry_is_named(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from aiohttp import web

    from tests.servers import LoopbackServer

    async def answer_without_echo(request: web.Request) -> web.Response:
        return web.json_response({"response": {"output_text": "4"}, "reward": 1.0})

    rows = make_rows(3)
    rows[0].update({"_ng_attempt_index": 2, "_ng_rollout_id": "r-0", "task_source": "math"})
    inp = write_rows(tmp_path / "in.jsonl", rows)
    with LoopbackServer({"POST /run": answer_without_echo}) as server, caplog.at_level(logging.WARNING):
        result = await collect(config(inp, tmp_path / "out.jsonl", server.url, disable_aggregation=True,
                                      num_repeats={"sim_agent": 2, "nosuch": 5}))
    assert result.exit_code == 0
    assert "never appeared in input rows (possible typo?): ['nosuch']" in caplog.text
    stamped = [r for r in read_jsonl(tmp_path / "out.jsonl") if r["_ng_task_index"] == 0]
    assert len(stamped) == 2  # the row's own stamps, in 0.7's order (`rollout_collection.py:2597-2616`)
    assert [list(r)[2:] for r in stamped] == [["_ng_task_index", "_ng_rollout_index", "agent_ref", "task_source",
                                               "_ng_attempt_index", "_ng_rollout_id"]] * 2
    assert stamped[0]["_ng_attempt_index"] == 2
