"""Failures against a real loopback agent: retries, Retry-After, timeouts, agents down, markers, budgets."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gym_collect.collect import EXIT_FAILURES, EXIT_OK, EXIT_STOPPED, collect
from gym_collect.errors import AgentUnavailableError, InputError, OutputError
from gym_collect.sim_agent import SimAgent, SimAgentConfig
from gym_collect.writer import LineFile
from tests.conftest import config, make_rows, pairs, read_jsonl, write_rows


@pytest.fixture
def inp(tmp_path: Path) -> Path:
    return write_rows(tmp_path / "in.jsonl", make_rows(12))


def failures_of(tmp_path: Path) -> list[dict[str, Any]]:
    return read_jsonl(tmp_path / "out_failures.jsonl")


async def test_transient_failures_retry_with_a_stable_idempotency_key(tmp_path: Path, inp: Path) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0.0, fail_first_k=2)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, max_attempts=3))
    assert result.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(i, 0) for i in range(12)]
    assert all(n == 3 for n in sim.stats.attempts.values())
    assert all(len(keys) == 1 for keys in sim.stats.idempotency_keys.values())
    assert len({k for keys in sim.stats.idempotency_keys.values() for k in keys}) == 12
    assert result.metrics is not None and result.metrics["retries"] == 24


@pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
async def test_retryable_status_is_retried_then_recorded(tmp_path: Path, inp: Path, status: int) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0.0, fail_status=status, retry_after_s=0.0)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, max_attempts=2, limit=2))
    assert result.exit_code == EXIT_FAILURES
    records = failures_of(tmp_path)
    expected_class = "agent_request_failed" if status in (429, 502, 503, 504) else "agent_run_error"
    assert [(r["_ng_failure_http_status"], r["_ng_failure_class"], r["_ng_failure_type"]) for r in records] == [
        (status, expected_class, "ClientResponseError")] * 2
    assert all(r["_ng_failure_response_body"] == f'{{"detail":"scripted status {status}"}}' for r in records)
    assert sum(sim.stats.attempts.values()) == 4


async def test_a_200_answer_that_is_not_a_json_object_is_an_agent_run_error(tmp_path: Path, inp: Path) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0.0, non_json_rate=1.0)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, max_attempts=2, limit=2))
    assert result.exit_code == EXIT_FAILURES
    assert [(r["_ng_failure_http_status"], r["_ng_failure_class"], r["_ng_failure_type"])
            for r in failures_of(tmp_path)] == [(200, "agent_run_error", "JSONDecodeError")] * 2  # as 0.7 classes it
    # the metrics count failures by the class their records hold: what count_failure_classes_as_zero names
    assert result.metrics is not None and result.metrics["failures_by_class"] == {"agent_run_error": 2}


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_non_retryable_status_fails_at_once(tmp_path: Path, inp: Path, status: int) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0.0, fail_status=status)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, max_attempts=5, limit=3))
    assert result.exit_code == EXIT_FAILURES
    records = failures_of(tmp_path)
    assert [(r["_ng_failure_http_status"], r["_ng_failure_class"]) for r in records] == [
        (status, "agent_run_error")] * 3
    assert all("_ng_failure_terminal" not in r for r in records)  # resume may try again, as NeMo Gym would
    assert sum(sim.stats.attempts.values()) == 3
    assert not (tmp_path / "out.jsonl").read_bytes()


@pytest.mark.parametrize("as_date", [False, True])
async def test_retry_after_is_honoured_in_both_forms(tmp_path: Path, inp: Path, as_date: bool) -> None:
    cfg = SimAgentConfig(service_time_s=0.0, fail_status=429, retry_after_s=1.0, retry_after_as_date=as_date)
    async with SimAgent(cfg) as sim:
        started = time.monotonic()
        await collect(config(inp, tmp_path / "out.jsonl", sim.url, max_attempts=2, limit=1))
        elapsed = time.monotonic() - started
    (record,) = failures_of(tmp_path)
    assert sum(sim.stats.attempts.values()) == 2 and record["_ng_failure_http_status"] == 429
    assert elapsed >= 0.5  # Retry-After 1 s (a date is only precise to the second)


async def test_a_429_pauses_new_dispatch_to_that_agent(tmp_path: Path, inp: Path) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0.0, fail_first_k=1)) as sim:
        sim.config.fail_first_k = 0
        sim.config.fail_status = 429
        sim.config.retry_after_s = 0.8
        started = time.monotonic()
        cfg = config(inp, tmp_path / "out.jsonl", sim.url, max_attempts=2, num_samples_in_parallel=1, limit=3)
        await collect(cfg)
        elapsed = time.monotonic() - started
    # one request at a time: each of the 3 rows waits out the pause set by the 429 before it
    assert elapsed >= 3 * 0.8 * 0.9
    assert sum(sim.stats.attempts.values()) == 6


async def test_hung_request_times_out_then_fails(tmp_path: Path, inp: Path) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0.0, hang_rate=1.0, hang_s=3600)) as sim:
        started = time.monotonic()
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, request_timeout_s=0.3, max_attempts=2,
                                      limit=4))
    assert time.monotonic() - started < 10
    assert result.exit_code == EXIT_FAILURES
    assert {(r["_ng_failure_class"], r["_ng_failure_type"], r["_ng_failure_http_status"])
            for r in failures_of(tmp_path)} == {("agent_request_failed", "TimeoutError", None)}


async def test_resets_and_non_json_answers_are_retried(tmp_path: Path, inp: Path) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0.0, reset_rate=0.3, non_json_rate=0.3, seed=5)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, max_attempts=10))
    assert result.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(i, 0) for i in range(12)]
    assert sim.stats.statuses[0] > 0 and result.metrics is not None and result.metrics["retries"] > 0


async def test_agent_down_at_start_is_a_clear_error_within_seconds(tmp_path: Path, inp: Path) -> None:
    async with SimAgent() as sim:
        url = sim.url
        await sim.stop_listening()
        started = time.monotonic()
        with pytest.raises(AgentUnavailableError, match=rf"agent server at {url} is unreachable after 3 attempts"):
            await collect(config(inp, tmp_path / "out.jsonl", url, connect_timeout_s=0.5))
        with pytest.raises(AgentUnavailableError, match=r"head server at .* did not answer"):
            await collect(config(inp, tmp_path / "out.jsonl", None, head_server_url=url))
    assert time.monotonic() - started < 15
    assert not (tmp_path / "out.jsonl").exists()


async def test_agent_down_mid_run_then_up_loses_nothing(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(40))
    async with SimAgent(SimAgentConfig(service_time_s=0.02, fail_first_k=0)) as sim:
        sim.config.fail_status = 503  # "down" for the first wave: retried with backoff
        sim.config.retry_after_s = 0.0
        cfg = config(inp, tmp_path / "out.jsonl", sim.url, max_attempts=30, backoff_initial_s=0.02,
                     backoff_max_s=0.1, num_samples_in_parallel=8)
        import asyncio

        async def recover() -> None:
            await asyncio.sleep(0.3)
            sim.config.fail_status = None

        recovery = asyncio.ensure_future(recover())
        result = await collect(cfg)
        await recovery
    assert result.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(i, 0) for i in range(40)]


async def test_failure_budget_stops_the_run_early(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(200))
    async with SimAgent(SimAgentConfig(service_time_s=0.0, fail_status=400)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, max_failures=5,
                                      num_samples_in_parallel=1))
    assert result.exit_code == EXIT_STOPPED
    assert result.metrics is not None and "failure budget" in result.metrics["stopped"]
    assert len(failures_of(tmp_path)) == 5
    assert sum(sim.stats.attempts.values()) == 5


async def test_failure_rate_budget(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(400))
    async with SimAgent(SimAgentConfig(service_time_s=0.0, fail_status=404)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, max_failure_rate=0.5,
                                      min_rollouts_for_failure_rate=20, num_samples_in_parallel=2))
    assert result.exit_code == EXIT_STOPPED
    assert 20 <= sum(sim.stats.attempts.values()) < 30


@pytest.fixture
async def marker_agent() -> AsyncIterator[str]:
    """An agent that marks task 1 as a NeMo Gym failure, task 2 as not-to-persist, and answers the rest."""

    async def run(request: web.Request) -> web.Response:
        row = orjson.loads(await request.read())
        answer = {**row, "reward": 1.0}
        if row["_ng_task_index"] == 1:
            answer |= {"_ng_failure_class": "sandbox_crash", "_ng_failure_terminal": True}
        elif row["_ng_task_index"] == 2:
            answer |= {"_ng_no_persist": True}
        return web.Response(body=orjson.dumps(answer), content_type="application/json")

    app = web.Application()
    app.router.add_post("/run", run)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def test_nemo_gym_failure_markers_are_honoured(tmp_path: Path, inp: Path, marker_agent: str) -> None:
    result = await collect(config(inp, tmp_path / "out.jsonl", marker_agent, limit=4))
    assert result.exit_code == EXIT_FAILURES
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(0, 0), (3, 0)]
    (failure,) = failures_of(tmp_path)
    assert (failure["_ng_task_index"], failure["_ng_failure_class"], failure["_ng_failure_terminal"]) == (
        1, "sandbox_crash", True)
    assert result.metrics is not None and result.metrics["rollouts"]["not_persisted"] == 1
    # resume redoes the not-persisted rollout (task 2) and leaves the terminal failure alone
    await collect(config(inp, tmp_path / "out.jsonl", marker_agent, limit=4, resume=True))
    assert [r["_ng_task_index"] for r in failures_of(tmp_path)] == [1]


async def test_bad_rows_are_skipped_and_recorded_with_file_and_line(tmp_path: Path, sim: SimAgent) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"q": 0}\nnot json\n\n[1]\n{"q": 3}\n')
    result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, on_bad_row="skip"))
    assert result.exit_code == EXIT_FAILURES
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(0, 0), (3, 0)]
    messages = {r["_ng_task_index"]: r["_ng_failure_message"] for r in failures_of(tmp_path)}
    assert messages[1].startswith(f"{inp}:2: not valid JSON")
    assert messages[2] == f"{inp}:4: not a JSON object (a list)"


async def test_existing_output_is_never_overwritten_silently(tmp_path: Path, inp: Path, sim: SimAgent) -> None:
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"precious": true}\n')
    with pytest.raises(OutputError, match="pass resume=true to finish that run, or overwrite=true"):
        await collect(config(inp, out, sim.url))
    assert out.read_bytes() == b'{"precious": true}\n'
    assert (await collect(config(inp, out, sim.url, overwrite=True))).exit_code == EXIT_OK
    assert len(read_jsonl(out)) == 12


def test_a_full_disk_is_one_clear_error_and_keeps_what_was_written() -> None:
    with LineFile(Path("/dev/full")) as f, pytest.raises(OutputError, match=r"write failed .*intact.*resume=true"):
        f.write(b'{"a": 1}\n')


async def test_unwritable_output_folder_is_one_clear_error(tmp_path: Path, inp: Path, sim: SimAgent) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot"):
        await collect(config(inp, blocker / "sub" / "out.jsonl", sim.url))


DEEP = b'{"a": ' * 300 + b"{}" + b"}" * 300  # JSON nested 300 levels: orjson reads it, and writes at most 255


async def test_an_answer_nested_too_deep_to_write_is_a_failure_and_the_run_goes_on(tmp_path: Path, inp: Path) -> None:
    from tests.servers import LoopbackServer

    async def deep_for_task_1(request: web.Request) -> web.Response:
        row = await request.json()
        body = b'{"reward": 1.0, "trace": ' + DEEP + b"}" if row["_ng_task_index"] == 1 else orjson.dumps(row)
        return web.Response(body=body, content_type="application/json")

    with LoopbackServer({"POST /run": deep_for_task_1}) as server:
        result = await collect(config(inp, tmp_path / "out.jsonl", server.url, limit=3, max_attempts=1))
    assert result.exit_code == EXIT_FAILURES
    assert sorted(r["_ng_task_index"] for r in read_jsonl(tmp_path / "out.jsonl")) == [0, 2]
    [record] = failures_of(tmp_path)
    assert record["_ng_task_index"] == 1 and "nested more than 255 levels" in record["_ng_failure_message"]


async def test_an_input_row_nested_too_deep_to_send_is_one_line_before_any_request(tmp_path: Path) -> None:
    from tests.servers import LoopbackServer, echo_rollout

    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"q": 0}\n{"q": 1, "deep": ' + DEEP + b"}\n")
    with LoopbackServer({"POST /run": echo_rollout}) as server:
        with pytest.raises(InputError, match=r"in\.jsonl:2: the row cannot be written.*255 levels"):
            await collect(config(inp, tmp_path / "out.jsonl", server.url))
        assert server.requests.get("POST /run", 0) == 0
