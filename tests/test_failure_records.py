"""Failure records in NeMo Gym 0.7's shape, attempts across resumes, and what `route_failures_to_sidecar` and
`require_complete` do to a run (against a scripted agent on 127.0.0.1)."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gym_collect.collect import EXIT_FAILURES, EXIT_OK, EXIT_STOPPED, collect
from gym_collect.nemo.failures import PriorAttempts, is_terminal, max_rollout_attempts
from tests.conftest import config, make_rows, pairs, read_jsonl, write_rows
from tests.servers import LoopbackServer

# What a NeMo Gym agent answers when the model server behind it rejected the request (an HTTP 400 wrapped
# twice by `nemo_gym/server_utils.py`'s exception middleware).
WRAPPED_400 = ('"Hit an exception in simple_agent calling an inner server: Hit an exception in openai_model calling '
               'an inner server: b\'{\\"error\\":{\\"message\\":\\"bad input\\",\\"type\\":\\"invalid_request_error\\",'
               '\\"param\\":\\"input\\",\\"code\\":null}}\'"')


class ScriptedAgent:
    """`POST /run` answers: `failures[task]` = (status, body) for a failing task, else the row echoed with a
    reward; `handled[task]` = a 200 answer carrying `_ng_failure_*` fields. Keeps every body it received."""

    def __init__(self) -> None:
        self.failures: dict[int, tuple[int, str]] = {}
        self.handled: dict[int, dict[str, Any]] = {}
        self.bodies: list[dict[str, Any]] = []

    async def run(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        self.bodies.append(body)
        task = body["_ng_task_index"]
        if task in self.failures:
            status, text = self.failures[task]
            return web.Response(status=status, text=text, content_type="application/json")
        if task in self.handled:
            return web.json_response(self.handled[task])
        return web.json_response({**body, "reward": 1.0, "response": {"usage": {"output_tokens": 3}}})

    def attempts(self) -> Counter[tuple[int, int]]:
        """POSTs received per (task, rollout)."""
        return Counter((b["_ng_task_index"], b["_ng_rollout_index"]) for b in self.bodies)


@pytest.fixture
def agent() -> ScriptedAgent:
    return ScriptedAgent()


@pytest.fixture
def server(agent: ScriptedAgent) -> Any:
    with LoopbackServer({"POST /run": agent.run}) as running:
        yield running


def failures(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out.with_name(out.stem + "_failures.jsonl"))


async def test_a_collector_side_failure_is_recorded_as_nemo_gym_0_7_records_it(tmp_path: Path, agent: ScriptedAgent,
                                                                              server: LoopbackServer) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(3)), tmp_path / "out.jsonl"
    agent.failures = {1: (500, '"boom"'), 2: (503, "x" * 5000)}
    result = await collect(config(inp, out, server.url, max_attempts=2))
    assert result.exit_code == EXIT_FAILURES
    by_task = {r["_ng_task_index"]: r for r in failures(out)}
    assert set(by_task[1]) == {"_ng_failure_class", "_ng_failure_type", "_ng_failure_message",
                               "_ng_failure_http_status", "_ng_failure_response_body", "_ng_task_index",
                               "_ng_rollout_index", "agent_ref"}
    assert (by_task[1]["_ng_failure_class"], by_task[1]["_ng_failure_type"], by_task[1]["_ng_failure_http_status"],
            by_task[1]["_ng_failure_response_body"]) == ("agent_run_error", "ClientResponseError", 500, '"boom"')
    assert by_task[1]["_ng_failure_message"] == f"500, message='Internal Server Error', url='{server.url}/run'"
    # a gateway status says the rollout may not have run; the body is cut at 2,000 characters
    assert by_task[2]["_ng_failure_class"] == "agent_request_failed"
    assert by_task[2]["_ng_failure_response_body"] == "x" * 2000 + "…"
    assert "reward" not in by_task[1] and "_ng_failure_terminal" not in by_task[1]
    assert pairs(read_jsonl(out)) == [(0, 0)]


async def test_a_failure_the_agent_reports_is_its_answer_stamped_at_top_level(tmp_path: Path, agent: ScriptedAgent,
                                                                             server: LoopbackServer) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(2)), tmp_path / "out.jsonl"
    agent.handled = {0: {"_ng_failure_class": "environment_server_failed", "_ng_failure_terminal": False,
                         "_ng_failure_message": "episode broke", "_ng_failure_stage": "agent", "extra": [1, 2]}}
    await collect(config(inp, out, server.url))
    (record,) = failures(out)
    assert record == {"_ng_failure_class": "environment_server_failed", "_ng_failure_terminal": False,
                      "_ng_failure_message": "episode broke", "_ng_failure_stage": "agent", "extra": [1, 2],
                      "_ng_task_index": 0, "_ng_rollout_index": 0, "agent_ref": {"name": "sim_agent"}}
    assert agent.attempts()[(0, 0)] == 1  # an answer is not retried within the run


@pytest.mark.parametrize(("status", "body", "posts"), [
    (500, WRAPPED_400, 1),  # a model's 400 wrapped in the agent's 500 cannot heal
    (500, '{"object":"error","message":"too long","type":"BadRequestError","param":null,"code":400}', 1),
    (500, '"Hit an exception in simple_agent calling an inner server: upstream reset"', 3),
    (503, WRAPPED_400, 3),  # a gateway status is retried whatever its body says
])
async def test_a_500_that_wraps_a_client_error_is_not_retried(tmp_path: Path, agent: ScriptedAgent,
                                                              server: LoopbackServer, status: int, body: str,
                                                              posts: int) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(1)), tmp_path / "out.jsonl"
    agent.failures = {0: (status, body)}
    await collect(config(inp, out, server.url, max_attempts=3))
    assert agent.attempts()[(0, 0)] == posts
    assert failures(out)[0]["_ng_failure_http_status"] == status


async def test_resume_counts_attempts_across_runs_and_keeps_the_history(tmp_path: Path, agent: ScriptedAgent,
                                                                        server: LoopbackServer,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEMO_GYM_MAX_ROLLOUT_ATTEMPTS", "2")
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(3)), tmp_path / "out.jsonl"
    agent.failures = {1: (500, '"down"'), 2: (500, '"down"')}
    assert (await collect(config(inp, out, server.url, max_attempts=1))).exit_code == EXIT_FAILURES
    agent.failures = {2: (500, '"still down"')}
    second = await collect(config(inp, out, server.url, max_attempts=1, resume=True))
    assert second.exit_code == EXIT_FAILURES
    retried = [b for b in agent.bodies[3:]]
    assert sorted((b["_ng_task_index"], b.get("_ng_attempt_index")) for b in retried) == [(1, 1), (2, 1)]
    done = {r["_ng_task_index"]: r for r in read_jsonl(out)}
    assert set(done) == {0, 1} and done[1]["_ng_attempt_index"] == 1 and "_ng_attempt_index" not in done[0]
    assert [(r["_ng_task_index"], r.get("_ng_attempt_index")) for r in failures(out)] == [(1, None), (2, None), (2, 1)]
    # task 2 has had NEMO_GYM_MAX_ROLLOUT_ATTEMPTS=2 attempts: a third resume sends nothing
    agent.failures = {}
    before = len(agent.bodies)
    third = await collect(config(inp, out, server.url, max_attempts=1, resume=True))
    assert len(agent.bodies) == before and third.exit_code == EXIT_FAILURES
    assert len(failures(out)) == 3


@pytest.mark.parametrize("keep", [True, False])
async def test_terminal_failures_are_not_retried_unless_asked(tmp_path: Path, agent: ScriptedAgent,
                                                              server: LoopbackServer, keep: bool,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(2)), tmp_path / "out.jsonl"
    agent.handled = {1: {"_ng_failure_class": "sandbox_crash", "_ng_failure_terminal": True}}
    await collect(config(inp, out, server.url))
    agent.handled = {}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gym_collect"):
        result = await collect(config(inp, out, server.url, resume=True, keep_permanent_failures=keep))
    assert agent.attempts()[(1, 0)] == (1 if keep else 2)
    assert result.exit_code == (EXIT_FAILURES if keep else EXIT_OK)
    said = "\n".join(record.getMessage() for record in caplog.records)
    if keep:  # the last line says why resume leaves it and what would retry it, never "rerun with resume=true"
        assert "Collecting 0 rollouts (2 rows, 1 already done, 1 not retried)" in said
        assert "they failed in earlier runs for good" in said and "keep_permanent_failures=false" in said
        assert "rerun with resume=true" not in said


async def test_route_failures_to_sidecar_false_stops_at_the_first_failure_without_a_record(
        tmp_path: Path, agent: ScriptedAgent, server: LoopbackServer) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(6)), tmp_path / "out.jsonl"
    agent.failures = {2: (500, '"down"')}
    result = await collect(config(inp, out, server.url, route_failures_to_sidecar=False, num_samples_in_parallel=1,
                                  max_attempts=1))
    assert result.exit_code == EXIT_STOPPED
    assert pairs(read_jsonl(out)) == [(0, 0), (1, 0)] and failures(out) == []
    agent.failures = {}
    assert (await collect(config(inp, out, server.url, resume=True))).exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(out))) == [(t, 0) for t in range(6)]


@pytest.mark.parametrize(("flags", "code"), [
    ({}, EXIT_FAILURES),  # this tool's default: a missing rollout is a non-zero exit
    ({"route_failures_to_sidecar": True}, EXIT_OK),  # NeMo Gym: a recorded failure counts as done
    ({"route_failures_to_sidecar": True, "require_complete": True}, EXIT_FAILURES),
    ({"require_complete": False}, EXIT_OK),
])
async def test_exit_code_follows_route_failures_to_sidecar_and_require_complete(
        tmp_path: Path, agent: ScriptedAgent, server: LoopbackServer, flags: dict[str, bool], code: int) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(3)), tmp_path / "out.jsonl"
    agent.failures = {1: (500, '"down"')}
    result = await collect(config(inp, out, server.url, max_attempts=1, **flags))
    assert result.exit_code == code
    assert len(failures(out)) == 1 and len(read_jsonl(out)) == 2


async def test_nothing_written_is_never_a_success(tmp_path: Path, agent: ScriptedAgent,
                                                  server: LoopbackServer) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(2)), tmp_path / "out.jsonl"
    agent.failures = {0: (500, '"down"'), 1: (500, '"down"')}
    result = await collect(config(inp, out, server.url, max_attempts=1, route_failures_to_sidecar=True))
    assert result.exit_code == EXIT_FAILURES


async def test_a_run_without_failures_leaves_an_empty_failures_file(tmp_path: Path, agent: ScriptedAgent,
                                                                    server: LoopbackServer) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(2)), tmp_path / "out.jsonl"
    assert (await collect(config(inp, out, server.url))).exit_code == EXIT_OK
    assert (tmp_path / "out_failures.jsonl").read_bytes() == b""


def test_prior_attempts_gate_terminal_and_exhausted_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = PriorAttempts(3)
    for _ in range(2):
        attempts.add((0, 0), {"_ng_failure_class": "agent_run_error"})
    attempts.add((1, 0), {"_ng_failure_class": "x", "_ng_failure_terminal": True})
    assert (attempts.attempt_index(0, 0), attempts.gated(0, 0), attempts.gated(1, 0)) == (2, False, True)
    attempts.add((0, 0), {})
    assert attempts.gated(0, 0) and attempts.attempt_index(5, 5) == 0
    assert is_terminal({"_ng_failure_class": "timeout_exceeded", "_ng_failure_terminal": True})
    assert not is_terminal({"_ng_failure_class": "timeout_exceeded", "_ng_failure_terminal": True},
                           retry_terminal_timeouts=True)
    assert is_terminal({"_ng_failure_class": "skipped"}, retry_terminal_timeouts=True)
    assert is_terminal({"error_class": "HTTP400", "permanent": True})  # records of earlier releases
    for raw, expected in (("", 3), ("5", 5), ("0", 3), ("many", 3)):
        monkeypatch.setenv("NEMO_GYM_MAX_ROLLOUT_ATTEMPTS", raw)
        assert max_rollout_attempts() == expected
