"""NeMo Gym's aggregate metrics after a run, against real loopback servers and real files: what each server
receives, the file written, the local default when a server cannot answer, the counting options."""

from __future__ import annotations

import asyncio
import logging
import random
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.nemo import aggregation
from gym_collect.nemo.aggregation import AggregationTarget, aggregate_run, label_runs, targets_from_routes
from gym_collect.nemo.metric_inputs import Grouper, MetricInputs, MetricSources
from gym_collect.nemo.routing import UNNAMED_AGENT, Route
from gym_collect.redact import Redactor, url_secrets
from gym_collect.spooled import StreamedList
from gym_collect.writer import OutputPaths
from tests.servers import LoopbackServer

HEAVY = ("responses_create_params", "ng_agent_observations", "ng_model_call_capture", "ng_trajectory")
ANSWER = {"agent_metrics": {"mean/reward": 0.5, "pass@2": 1.0}, "key_metrics": {"pass@2": 1.0},
          "group_level_metrics": [{"_ng_task_index": 0}], "repeat_level_metrics": []}
PERF = {"ng_perf/mean/latency_s": 1.5}


def rollout(task: int, rollout_index: int, env: str | None = "math_env", agent: str = "math_agent",
            reward: float = 1.0, **extra: Any) -> dict[str, Any]:
    """A 0.7 result line: heavy request/response fields, stamps, a reward."""
    row: dict[str, Any] = {
        "responses_create_params": {"input": [{"role": "user", "content": "x" * 50}]},
        "response": {"output": [{"type": "message", "content": "y" * 50}], "usage": {"output_tokens": 7},
                     "incomplete_details": {"reason": "max_output_tokens"}},
        "ng_trajectory": [1, 2], "ng_agent_observations": ["o"], "ng_model_call_capture": {"calls": 1},
        "reward": reward, "subset": f"s{task % 2}", "agent_ref": {"name": agent},
        "_ng_task_index": task, "_ng_rollout_index": rollout_index, **extra,
    }
    if env is not None:
        row["_ng_environment_server"] = env
        row["_ng_result_type"] = "legacy_agent"
    return row


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def stripped(row: dict[str, Any]) -> dict[str, Any]:
    """What 0.7 sends of a result (`rollout_collection.py:3014-3036`), written out by hand."""
    out = {k: v for k, v in row.items() if k not in (*HEAVY, "response")}
    out["response"] = {"usage": row["response"]["usage"], "incomplete_details": row["response"]["incomplete_details"]}
    return out


class MetricsServer:
    """`POST {prefix}/aggregate_metrics` on one loopback server for several prefixes (one per group), each
    recording the body and headers it received and answering `ANSWER` (plus `PERF` for `with_perf`)."""

    def __init__(self, prefixes: Iterable[str], with_perf: Iterable[str] = ()) -> None:
        self.bodies: dict[str, list[dict[str, Any]]] = {}
        self.headers: dict[str, dict[str, str]] = {}
        self.perf = set(with_perf)
        self.arrived = {p: asyncio.Event() for p in prefixes}
        self.server = LoopbackServer({f"POST {p}/aggregate_metrics": self._handler(p) for p in self.arrived})

    def _handler(self, prefix: str) -> Any:
        async def handle(request: web.Request) -> web.Response:
            self.headers[prefix] = dict(request.headers)
            self.bodies[prefix] = (await request.json())["verify_responses"]
            self.arrived[prefix].set()
            # Every group's request is in flight before any is answered: they run concurrently.
            async with asyncio.timeout(10):
                await asyncio.gather(*(event.wait() for event in self.arrived.values()))
            return web.json_response({**ANSWER, **({"perf_summary": PERF} if prefix in self.perf else {})})
        return handle

    def __enter__(self) -> MetricsServer:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    def url(self, prefix: str) -> str:
        return self.server.url + prefix



def headline(entry: dict[str, Any]) -> dict[str, Any]:
    """What `aggregate_run` returns of an entry: all but its per-task lists."""
    return {k: v for k, v in entry.items() if k not in ("group_level_metrics", "repeat_level_metrics")}

async def aggregate(paths: OutputPaths, targets: dict[str, AggregationTarget], *, failure_classes: Iterable[str] = (),
                    count_missing: bool = False, timeout_s: float | None = 10.0, headers: dict[str, str] | None = None,
                    redact: Any = None, **kwargs: Any) -> list[dict[str, Any]] | None:
    async with aiohttp.ClientSession(headers=headers) as session:
        return await aggregate_run(session, paths, targets, count_failure_classes_as_zero=list(failure_classes),
                                   count_missing_rollouts_as_zero=count_missing, timeout_s=timeout_s,
                                   redact=redact or (lambda s: s), **kwargs)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def test_each_server_gets_its_groups_rows_stripped_sorted_and_streamed(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    math = [rollout(t, r, reward=float(r)) for t in range(3) for r in range(2)]
    code = [rollout(t, r, env="code_env", agent="code_agent") for t in range(3, 5) for r in range(2)]
    completion_order = math + code
    random.Random(3).shuffle(completion_order)
    paths = OutputPaths(write_jsonl(tmp_path / "out.jsonl", completion_order))
    caplog.set_level(logging.INFO)
    with MetricsServer(["/math", "/code"], with_perf=["/code"]) as server:
        entries = await aggregate(paths, {"math_env": AggregationTarget(server.url("/math"), "math_agent"),
                                          "code_env": AggregationTarget(server.url("/code"), "code_agent")})
    assert server.bodies == {"/math": [stripped(r) for r in math], "/code": [stripped(r) for r in code]}
    for headers in server.headers.values():
        assert headers.get("Transfer-Encoding") == "chunked" and "Content-Length" not in headers
        assert headers["Content-Type"] == "application/json"
    written = orjson.loads(paths.aggregate_metrics.read_bytes())
    assert entries == [headline(entry) for entry in written]
    assert written == [
        {"agent_ref": {"name": "code_agent"}, "_ng_environment_server": "code_env", **ANSWER, "perf_summary": PERF},
        {"agent_ref": {"name": "math_agent"}, "_ng_environment_server": "math_env", **ANSWER},
    ]
    assert paths.aggregate_metrics.read_bytes() == orjson.dumps(written, option=orjson.OPT_INDENT_2)
    assert 'Key metrics for math_agent: {"pass@2":1.0}' in caplog.text
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("answer", ["404", "500", "hang", "not json", "bad shape", "refused"])
async def test_a_server_that_cannot_answer_gets_the_local_default_and_one_warning(
        answer: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [rollout(t, 0, reward=float(t % 2)) for t in range(4)]
    paths = OutputPaths(write_jsonl(tmp_path / "out.jsonl", rows))

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        if answer == "500":
            return web.Response(status=500, text="Internal Server Error\ntraceback: boom")
        if answer == "not json":
            return web.Response(text="<html>proxy</html>")
        if answer == "bad shape":
            return web.json_response({"agent_metrics": [1, 2]})
        await asyncio.Future()  # "hang": never answers
        raise AssertionError

    routes = {} if answer in ("404", "refused") else {"POST /aggregate_metrics": handle}
    with LoopbackServer(routes) as server:
        url = server.url
        if answer != "refused":
            entries = await aggregate(paths, {"math_env": AggregationTarget(url, "math_agent")}, timeout_s=0.5)
    if answer == "refused":  # the server is gone: nothing listens on its port now
        entries = await aggregate(paths, {"math_env": AggregationTarget(url, "math_agent")}, timeout_s=5.0)
    assert entries is not None and entries[0]["key_metrics"]["mean/reward"] == 0.5  # the default, computed here
    assert entries[0]["agent_ref"] == {"name": "math_agent"} and entries[0]["_ng_environment_server"] == "math_env"
    assert set(entries[0]) == {"agent_ref", "_ng_environment_server", "agent_metrics", "key_metrics"}
    assert set(orjson.loads(paths.aggregate_metrics.read_bytes())[0]) == {
        "agent_ref", "_ng_environment_server", "agent_metrics", "key_metrics", "group_level_metrics",
        "repeat_level_metrics"}
    assert [headline(e) for e in orjson.loads(paths.aggregate_metrics.read_bytes())] == entries
    (warning,) = warnings_of(caplog)
    assert url in warning and "computed locally" in warning and "\n" not in warning
    expected = {"404": "HTTP 404", "500": "HTTP 500: Internal Server Error traceback: boom", "hang": "0.5 s",
                "not json": "not JSON: <html>proxy</html>", "bad shape": "agent_metrics is not a JSON object",
                "refused": "ClientConnectorError"}[answer]
    assert expected in warning


async def test_secrets_in_headers_and_urls_never_reach_the_log(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    paths = OutputPaths(write_jsonl(tmp_path / "out.jsonl", [rollout(0, 0)]))
    token = "key sk-verysecret-0123456789"

    async def echo_headers(request: web.Request) -> web.Response:
        sent = [request.headers.get(name) for name in ("Authorization", "X-Api-Key")]
        return web.Response(status=502, text=f"bad gateway; you sent {sent}")

    with LoopbackServer({"POST /aggregate_metrics": echo_headers}) as server:
        url = server.url.replace("http://", "http://user:pw-hidden-42@")
        redact = Redactor([token, *url_secrets([url])])
        entries = await aggregate(paths, {"math_env": AggregationTarget(url, "math_agent")},
                                  headers={"X-Api-Key": token}, redact=redact)
    assert entries is not None
    (warning,) = warnings_of(caplog)
    assert "HTTP 502" in warning and warning.count("<redacted>") == 2
    for secret in ("sk-verysecret-0123456789", "pw-hidden-42", "dXNlcjpwdy1oaWRkZW4tNDI="):
        assert secret not in caplog.text


async def test_counted_failures_and_missing_rollouts_join_as_0_7_builds_them(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    paths = OutputPaths(out)
    write_jsonl(out, [rollout(1, 0), rollout(0, 1), rollout(2, 1)])
    base = {"agent_ref": {"name": "math_agent"}, "_ng_environment_server": "math_env",
            "_ng_result_type": "legacy_agent"}
    failure = {"_ng_failure_class": "agent_run_error", "_ng_failure_type": "ClientResponseError",
               "_ng_failure_message": "500, message='Internal Server Error'", "_ng_failure_http_status": 500,
               "_ng_failure_response_body": "boom", **base}
    write_jsonl(paths.failures, [
        {**failure, "_ng_task_index": 0, "_ng_rollout_index": 0},  # counted, filled from its materialized row
        {**failure, "_ng_task_index": 1, "_ng_rollout_index": 1, "_ng_failure_class": "agent_request_failed"},
        {**failure, "_ng_task_index": 1, "_ng_rollout_index": 1},  # the latest record stands: counted
        {**failure, "_ng_task_index": 2, "_ng_rollout_index": 0},
        {**failure, "_ng_task_index": 2, "_ng_rollout_index": 0, "_ng_failure_class": "environment_server_failed",
         "_ng_failure_terminal": False, "_ng_failure_stage": "agent", "reward": 0.25},  # not listed: not counted
        {**failure, "_ng_task_index": 2, "_ng_rollout_index": 1},  # the rollout landed: not counted
    ])
    write_jsonl(paths.materialized_inputs, [
        {"responses_create_params": {"input": "q"}, "subset": f"s{t % 2}", "unscored": "x",
         "agent_ref": {"name": "math_agent"}, "_ng_task_index": t, "_ng_rollout_index": r}
        for t in range(4) for r in range(2)])
    with MetricsServer(["/m"]) as server:
        await aggregate(paths, {"math_env": AggregationTarget(server.url("/m"), "math_agent")},
                        failure_classes=["agent_run_error"], count_missing=True)
    counted = {"agent_ref": {"name": "math_agent"}, "_ng_environment_server": "math_env",
               "_ng_result_type": "legacy_agent", "mask_sample": False, "reward": 0.0}

    def zero(task: int, rollout_index: int) -> dict[str, Any]:
        return {"_ng_task_index": task, "_ng_rollout_index": rollout_index, "agent_ref": {"name": "math_agent"},
                "reward": 0.0, "subset": f"s{task % 2}"}

    assert server.bodies["/m"] == [
        {**counted, "_ng_task_index": 0, "_ng_rollout_index": 0, "subset": "s0"},
        stripped(rollout(0, 1)), stripped(rollout(1, 0)),
        {**counted, "_ng_task_index": 1, "_ng_rollout_index": 1, "subset": "s1"},
        stripped(rollout(2, 1)), zero(3, 0), zero(3, 1),
    ]


async def test_without_counting_options_only_rollouts_are_sent(tmp_path: Path) -> None:
    paths = OutputPaths(write_jsonl(tmp_path / "out.jsonl", [rollout(1, 0)]))
    write_jsonl(paths.failures, [{"_ng_failure_class": "agent_run_error", "_ng_task_index": 0, "_ng_rollout_index": 0,
                                  "agent_ref": {"name": "math_agent"}, "_ng_environment_server": "math_env"}])
    write_jsonl(paths.materialized_inputs, [{"agent_ref": {"name": "math_agent"}, "_ng_task_index": t,
                                             "_ng_rollout_index": 0} for t in range(3)])
    with MetricsServer(["/m"]) as server:
        await aggregate(paths, {"math_env": AggregationTarget(server.url("/m"), "math_agent")})
    assert server.bodies["/m"] == [stripped(rollout(1, 0))]


async def test_a_large_unsorted_output_spills_and_still_arrives_sorted(tmp_path: Path) -> None:
    rows = [rollout(t, r, reward=float((t + r) % 3)) for t in range(60) for r in range(3)]
    shuffled = rows[:]
    random.Random(7).shuffle(shuffled)
    out = write_jsonl(tmp_path / "out.jsonl", shuffled)
    with out.open("ab") as f:
        f.write(orjson.dumps(rollout(99, 0))[:40])  # a torn last line, as a crash leaves it
    paths = OutputPaths(out)
    with MetricsServer(["/m"]) as server:
        await aggregate(paths, {"math_env": AggregationTarget(server.url("/m"), "math_agent")},
                        sort_buffer_bytes=4096)
    assert server.bodies["/m"] == [stripped(r) for r in rows]
    with MetricInputs(MetricSources([out]), Grouper({}, None), sort_buffer_bytes=4096) as inputs:
        groups = inputs.build()
        assert inputs.spilled_runs > 5
        assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in groups["math_env"].rows()] == [
            (t, r) for t in range(60) for r in range(3)]


async def test_agent_only_groups_and_rows_without_agent_ref(tmp_path: Path) -> None:
    rows = [rollout(t, 0, env=None, agent="a1") for t in range(2)]
    rows.append({k: v for k, v in rollout(2, 0, env=None).items() if k != "agent_ref"})
    paths = OutputPaths(write_jsonl(tmp_path / "out.jsonl", rows))
    with MetricsServer(["/x"]) as server:
        entries = await aggregate(paths, {"a1": AggregationTarget(server.url("/x"), "a1", is_environment_server=False)})
    assert [r["_ng_task_index"] for r in server.bodies["/x"]] == [0, 1, 2]  # the only target takes the unnamed row
    assert orjson.loads(paths.aggregate_metrics.read_bytes()) == [
        {"agent_ref": {"name": "a1"}, "_ng_environment_server": None, **ANSWER}]
    assert entries == [headline({"agent_ref": {"name": "a1"}, "_ng_environment_server": None, **ANSWER})]


async def test_no_rollouts_no_request_no_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    paths = OutputPaths(write_jsonl(tmp_path / "out.jsonl", []))
    with MetricsServer(["/m"]) as server:
        assert await aggregate(paths, {"math_env": AggregationTarget(server.url("/m"))}) is None
    assert server.server.requests == {} and not paths.aggregate_metrics.exists()
    assert "No rollouts to aggregate" in caplog.text


async def test_an_unwritable_file_is_one_error_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    paths = OutputPaths(write_jsonl(tmp_path / "out.jsonl", [rollout(0, 0)]))
    paths.aggregate_metrics.mkdir()  # a folder where the file should go
    with MetricsServer(["/m"]) as server:
        assert await aggregate(paths, {"math_env": AggregationTarget(server.url("/m"), "math_agent")}) is None
    (error,) = warnings_of(caplog)
    assert str(paths.aggregate_metrics) in error and "Traceback" not in caplog.text


def test_labels_follow_0_7_label_runs() -> None:
    assert label_runs({"env_a": "agent_a", "env_b": "agent_b"}) == {"env_a": "agent_a", "env_b": "agent_b"}
    # One agent behind two servers: each is labelled by its own name.
    assert label_runs({"env_a": "agent", "env_b": "agent"}) == {"env_a": "env_a", "env_b": "env_b"}
    # A server named like another group's agent: the clash falls back to the group names.
    assert label_runs({"x": "y", "y": None}) == {"x": "x", "y": "y"}


def test_targets_from_routes() -> None:
    routes = {"math_agent": Route("http://e:1", "math_env", "legacy_agent"),
              "other_agent": Route("http://e:1", "math_env", "legacy_agent"),
              "old_agent": Route("http://a:2"), UNNAMED_AGENT: Route("http://u:3")}
    assert targets_from_routes(routes) == {
        "math_env": AggregationTarget("http://e:1", "math_agent"),
        "old_agent": AggregationTarget("http://a:2", "old_agent", is_environment_server=False),
        UNNAMED_AGENT: AggregationTarget("http://u:3", None, is_environment_server=False)}


@pytest.mark.parametrize("disable", [False, True])
async def test_a_run_aggregates_its_rollouts_unless_disabled(disable: bool, tmp_path: Path) -> None:
    from gym_collect.collect import collect
    from tests.conftest import config, make_rows, write_rows
    from tests.servers import echo_rollout

    received: list[list[dict[str, Any]]] = []

    async def metrics(request: web.Request) -> web.Response:
        received.append((await request.json())["verify_responses"])
        return web.json_response(ANSWER)

    inp = write_rows(tmp_path / "in.jsonl", make_rows(3))
    out = tmp_path / "out.jsonl"
    with LoopbackServer({"POST /run": echo_rollout, "POST /aggregate_metrics": metrics}) as server:
        result = await collect(config(inp, out, server.url, num_repeats=2, disable_aggregation=disable))
    assert result.exit_code == 0
    if disable:
        assert received == [] and not OutputPaths(out).aggregate_metrics.exists()
        return
    (rows,) = received
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == [(t, r) for t in range(3) for r in (0, 1)]
    assert all("responses_create_params" not in r and "response" not in r for r in rows)
    assert orjson.loads(OutputPaths(out).aggregate_metrics.read_bytes()) == [
        {"agent_ref": {"name": "sim_agent"}, "_ng_environment_server": None, **ANSWER}]


def test_aggregate_timeout_must_be_positive_or_null(tmp_path: Path) -> None:
    from gym_collect.config import CollectConfig
    from gym_collect.errors import ConfigError

    assert CollectConfig(aggregate_timeout_s=None).aggregate_timeout_s is None
    with pytest.raises(ConfigError, match="aggregate_timeout_s"):
        CollectConfig(aggregate_timeout_s=0)


async def test_a_run_stopped_by_its_failure_budget_is_not_aggregated(tmp_path: Path) -> None:
    from gym_collect.collect import collect
    from tests.conftest import config, make_rows, write_rows

    async def failing(request: web.Request) -> web.Response:
        body = await request.json()
        if body["_ng_task_index"] == 0:  # one rollout in the output: there would be something to aggregate
            return web.json_response({**body, "reward": 1.0})
        return web.Response(status=400, text="bad request")

    async def metrics(request: web.Request) -> web.Response:
        return web.json_response(ANSWER)

    inp = write_rows(tmp_path / "in.jsonl", make_rows(3))
    out = tmp_path / "out.jsonl"
    with LoopbackServer({"POST /run": failing, "POST /aggregate_metrics": metrics}) as server:
        result = await collect(config(inp, out, server.url, max_failures=1, num_samples_in_parallel=1))
        assert result.exit_code == 4 and result.metrics is not None
        assert result.metrics["rollouts"]["in_output"] == 1
        assert "POST /aggregate_metrics" not in server.requests
    assert not OutputPaths(out).aggregate_metrics.exists()


def test_the_runs_clock_stops_before_aggregation() -> None:
    from gym_collect.metrics import RunMetrics

    now = [100.0]
    metrics = RunMetrics(4, clock=lambda: now[0])
    metrics.note_request()
    now[0] = 102.0
    metrics.stop_clock()
    now[0] = 160.0  # a minute of aggregation
    snapshot = metrics.snapshot()
    assert (snapshot["wall_time_s"], snapshot["active_s"]) == (2.0, 2.0)


# A server's answer is streamed: spooled to a temporary file, checked in one pass, its lists copied item by item.

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False,
                                                                                                allow_infinity=False)
                           | st.text(max_size=5), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)


@given(st.lists(st.fixed_dictionaries({
    "agent_metrics": st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=3),
    "key_metrics": st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=2),
    "group_level_metrics": st.lists(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=3), max_size=4),
    "repeat_level_metrics": st.lists(st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=2), max_size=2),
}), min_size=1, max_size=3))
@settings(max_examples=60, deadline=None)
def test_the_streamed_file_is_byte_for_byte_what_0_7_writes(answers: list[dict[str, Any]]) -> None:
    entries = []
    for n, answer in enumerate(answers):
        spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed below)
        spool.write(orjson.dumps(answer))
        document = aggregation._read_answer(spool)
        assert isinstance(document, dict)
        entries.append(aggregation._entry(f"agent{n}", f"env{n}", document))
    expected = [aggregation._entry(f"agent{n}", f"env{n}", answer) for n, answer in enumerate(answers)]
    try:
        assert b"".join(aggregation._file_chunks(entries)) == orjson.dumps(expected, option=orjson.OPT_INDENT_2)
    finally:
        for entry in entries:
            for value in entry.values():
                if isinstance(value, StreamedList):
                    value.close()


@pytest.mark.parametrize(("answer", "problem"), [
    (b"", "not JSON"), (b"[1]", "a JSON array, not an object"), (b'{"key_metrics": 3}', "key_metrics is not"),
    (b'{"group_level_metrics": [{"a": 1}, 2]}', "group_level_metrics holds something that is not an object"),
    (b'{"perf_summary": []}', "perf_summary is not a JSON object"),
    (b'{"repeat_level_metrics": {}}', "repeat_level_metrics is not a JSON array"),
    (b'{"group_level_metrics": [[1]]}', "group_level_metrics holds something that is not an object"),
    (b'{"agent_metrics": {}} trailing', "not JSON"), (b'{"agent_metrics": {"a": ', "not JSON"),
    (b'{"agent_metrics": {}, "perf_summary": null, "group_level_metrics": [{"x": [1, {"y": 2}]}]}', None),
])
def test_a_spooled_answer_is_checked_in_one_streaming_pass(answer: bytes, problem: str | None) -> None:
    with tempfile.TemporaryFile() as spool:
        spool.write(answer)
        found = aggregation._read_answer(spool)
        if problem is None:
            assert isinstance(found, dict)
            assert [dict(item) for item in found["group_level_metrics"]] == orjson.loads(answer)["group_level_metrics"]
            assert (found["agent_metrics"], found["repeat_level_metrics"]) == ({}, [])
        else:
            assert isinstance(found, str) and found.startswith(problem)


async def test_a_stopped_aggregation_waits_for_its_worker_before_its_files_go(tmp_path: Path) -> None:
    import itertools
    import threading

    from gym_collect.nemo.metric_inputs import Stopped, watched

    started, ended, stop = threading.Event(), threading.Event(), threading.Event()
    written = tmp_path / "spool.jsonl"  # stands for the spool files in the folder the caller then removes

    def work() -> None:
        started.set()
        try:
            with written.open("ab") as f:
                for n in watched(itertools.count(), stop, every=1):
                    f.write(b"%d\n" % n)
                    stop.wait(0.001)
        finally:
            ended.set()

    task = asyncio.ensure_future(aggregation._in_worker(work, stop))
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert stop.is_set() and ended.is_set()  # the worker had ended when the cancellation went on
    with pytest.raises(Stopped):
        list(watched(range(3), stop))
