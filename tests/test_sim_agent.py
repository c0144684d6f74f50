"""The simulated agent server: pure units for its fault and capacity helpers, then a real loopback server."""

import asyncio
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from gym_collect.sim_agent import SIM_HEAD_SECRET, SimAgent, SimAgentConfig, SimAgentThread, main, sim_reward
from gym_collect.sim_faults import Fault, FifoSlots, SharedProcessor, draw_fault, retry_after_value

# First row of NeMo Gym's example_multi_turn_gymnasium rollouts_materialized_inputs.jsonl (as posted to /run).
ROW: dict[str, Any] = {
    "responses_create_params": {"input": [{"role": "user", "content": "What is the capital of France?"}]},
    "follow_ups": ["What is the approximate population of that city?", "Name one famous landmark there."],
    "expected_answer": "Eiffel",
    "agent_ref": {"type": "responses_api_agents", "name": "example_multi_turn_gymnasium_agent"},
    "_ng_task_index": 0,
    "_ng_rollout_index": 0,
}


def row(task: int, rollout: int = 0, **extra: Any) -> dict[str, Any]:
    return {**ROW, "_ng_task_index": task, "_ng_rollout_index": rollout, **extra}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        yield s


async def post(session: aiohttp.ClientSession, sim: SimAgent, body: dict[str, Any], **kw: Any) -> Any:
    async with session.post(sim.url + "/run", json=body, **kw) as resp:
        return resp.status, resp.headers.copy(), await resp.read()


# --- pure units -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("u", "expected"),
    [(0.0, Fault.RESET), (0.09, Fault.RESET), (0.1, Fault.HANG), (0.25, Fault.ERROR_500),
     (0.35, Fault.RATE_LIMIT_429), (0.45, Fault.NON_JSON), (0.5, None), (0.99, None)],
)  # fmt: skip
def test_draw_fault_bands(u: float, expected: Fault | None) -> None:
    rates = {f: 0.1 for f in Fault}
    assert draw_fault(u, rates) is expected


def test_draw_fault_no_rates() -> None:
    assert draw_fault(0.0, {f: 0.0 for f in Fault}) is None


def test_retry_after_value() -> None:
    assert retry_after_value(0.5, as_date=False) == "0.5"
    assert retry_after_value(2.0, as_date=False) == "2"
    assert retry_after_value(1.2, as_date=True, now=0.0) == "Thu, 01 Jan 1970 00:00:02 GMT"


async def test_fifo_slots_order_and_cancellation() -> None:
    slots = FifoSlots(lambda: 1)
    await slots.acquire()
    order: list[int] = []

    async def waiter(n: int) -> None:
        await slots.acquire()
        order.append(n)

    tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    tasks[0].cancel()
    slots.release()
    await asyncio.sleep(0)
    assert order == [1] and slots.busy == 1 and not slots.try_acquire()
    slots.release()
    await asyncio.gather(*tasks[1:])
    assert order == [1, 2] and slots.busy == 1


async def test_shared_processor_shares_and_survives_cancellation() -> None:
    loop = asyncio.get_running_loop()
    processor = SharedProcessor(lambda: 1)
    start = loop.time()
    jobs = [asyncio.create_task(processor.serve(0.1)) for _ in range(3)]
    await asyncio.sleep(0.05)  # three jobs at rate 1/3: each has ~0.017 s of work done
    jobs[0].cancel()
    await asyncio.gather(*jobs[1:])
    elapsed = loop.time() - start  # 0.05 s at 1/3 speed, then 2 x (0.1 - 0.017) s at 1/2 speed: ~0.22 s
    assert 0.18 < elapsed < 0.5 and processor.in_service == 0


def test_shared_processor_degrades_past_capacity() -> None:
    plain, degrading = SharedProcessor(lambda: 4), SharedProcessor(lambda: 4, lambda: 0.5)
    assert plain.work_rate(2) == degrading.work_rate(4) == 1.0
    assert plain.work_rate(8) == 0.5  # the backend still delivers 4 s of work per second
    assert 8 * degrading.work_rate(8) == pytest.approx(4 / 1.5)  # past capacity it delivers less


async def test_long_rollouts_are_task_determined_with_matching_usage(session: aiohttp.ClientSession) -> None:
    cfg = SimAgentConfig(service_time_s=0.002, task_sigma=1.0, usage_tokens_per_s=100_000.0, seed=3)
    async with SimAgent(cfg) as sim:
        tokens: dict[int, set[int]] = {}
        for task in range(6):
            for rollout in range(2):
                status, _, body = await post(session, sim, row(task, rollout))
                assert status == 200
                tokens.setdefault(task, set()).add(orjson.loads(body)["response"]["usage"]["output_tokens"])
    assert all(len(seen) == 1 for seen in tokens.values())  # the task decides the length
    assert len({next(iter(seen)) for seen in tokens.values()}) == 6  # and tasks differ (heavy-tailed)


def test_reward_is_deterministic_and_about_70_percent() -> None:
    rewards = [sim_reward(t, r) for t in range(500) for r in range(4)]
    assert set(rewards) == {0.0, 1.0}
    assert 0.6 < sum(rewards) / len(rewards) < 0.8
    assert rewards == [sim_reward(t, r) for t in range(500) for r in range(4)]


@pytest.mark.parametrize(
    "bad",
    [{"capacity": 0}, {"mode": "fifo"}, {"fail_500_rate": 0.6, "reset_rate": 0.6}, {"hang_rate": -0.1},
     {"service_time_s": -1.0}, {"fail_status": 1000}, {"degrade": -1.0}, {"task_sigma": -0.5}],
)  # fmt: skip
def test_config_rejects_bad_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        SimAgentConfig(**bad)


def test_cli_rejects_bad_values() -> None:
    with pytest.raises(SystemExit):
        main(["--mode", "fifo"])
    with pytest.raises(SystemExit):
        main(["--fail-500-rate", "2"])


# --- real loopback server ---------------------------------------------------------------------------------


async def test_answer_shape_and_reward(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0)) as sim:
        for task in range(20):
            status, headers, body = await post(session, sim, row(task))
            assert status == 200 and headers["Content-Type"] == "application/json"
            answer = orjson.loads(body)
            assert {k: answer[k] for k in ROW} == row(task)  # the row echoed
            response = answer["response"]
            assert re.fullmatch(r"resp_[0-9a-f]{32}", response["id"])
            assert isinstance(response["created_at"], float)
            assert (response["model"], response["object"], response["status"]) == (
                "sim-model", "response", "completed")  # fmt: skip
            [message] = response["output"]
            assert message["type"] == "message" and message["role"] == "assistant"
            assert message["status"] == "completed"
            [part] = message["content"]
            assert part["type"] == "output_text" and part["annotations"] == []
            usage = response["usage"]
            assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
            assert answer["reward"] == sim_reward(task, 0)
            assert ("Eiffel" in part["text"]) == (answer["reward"] == 1.0)

        no_expected = {k: v for k, v in row(3, 1).items() if k != "expected_answer"}
        status, _, body = await post(session, sim, no_expected)
        assert orjson.loads(body)["reward"] == sim_reward(3, 1)
        first = orjson.loads((await post(session, sim, row(3)))[2])
        again = orjson.loads((await post(session, sim, row(3)))[2])
        assert first["response"]["usage"] == again["response"]["usage"]
        assert first["response"]["id"] != again["response"]["id"]


async def test_padding_and_bad_body(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0, response_pad_bytes=1500)) as sim:
        _, _, body = await post(session, sim, row(1))
        assert len(orjson.loads(body)["sim_padding"]) == 1500
        async with session.post(sim.url + "/run", data=b"[1, 2]") as resp:
            assert resp.status == 400
        async with session.post(sim.url + "/run", data=b"{not json") as resp:
            assert resp.status == 400
        assert sim.stats.statuses == {200: 1, 400: 2}


async def test_queue_mode_serves_capacity_at_a_time(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(capacity=2, service_time_s=0.2)) as sim:
        start = time.monotonic()

        async def timed(task: int) -> float:
            status, _, _ = await post(session, sim, row(task))
            assert status == 200
            return time.monotonic() - start

        done = sorted(await asyncio.gather(*(timed(t) for t in range(4))))
        assert done[0] > 0.15 and done[1] < done[2] - 0.1  # two waves of two
        assert 0.35 < done[3] < 2.0
        assert sim.stats.max_in_flight == 4 and sim.stats.in_flight == 0


async def test_gpu_mode_stretches_service_past_capacity(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(capacity=2, service_time_s=0.2, mode="gpu")) as sim:
        start = time.monotonic()

        async def timed(task: int) -> float:
            status, _, _ = await post(session, sim, row(task))
            assert status == 200
            return time.monotonic() - start

        done = sorted(await asyncio.gather(*(timed(t) for t in range(4))))
        assert done[0] > 0.35 and done[3] < 2.0  # four share two slots: each takes ~2 service times
        assert done[3] - done[0] < 0.15  # and they finish together
        solo = time.monotonic()
        await timed(9)
        assert time.monotonic() - solo < 0.35  # alone again: one service time


async def test_rate_limited_mode_and_capacity_halving(session: aiohttp.ClientSession) -> None:
    config = SimAgentConfig(capacity=4, capacity_halve_at_s=0.0, service_time_s=0.2, mode="rate_limited",
                            rate_limit_retry_after_s=3.0)  # fmt: skip
    async with SimAgent(config) as sim:
        answers = await asyncio.gather(*(post(session, sim, row(t)) for t in range(4)))
        statuses = sorted(status for status, _, _ in answers)
        assert statuses == [200, 200, 429, 429]
        assert {h["Retry-After"] for s, h, _ in answers if s == 429} == {"3"}
        async with session.get(sim.url + "/stats") as resp:  # the counters, for a client in another process
            stats = await resp.json()
        assert (stats["requests"], stats["statuses"]) == (4, {"200": 2, "429": 2})


async def test_fault_500_and_429(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0, fail_500_rate=1.0)) as sim:
        assert (await post(session, sim, row(1)))[0] == 500
        sim.config = SimAgentConfig(service_time_s=0, fail_429_rate=1.0, retry_after_s=0.5)
        status, headers, _ = await post(session, sim, row(1))
        assert (status, headers["Retry-After"]) == (429, "0.5")
        sim.config.retry_after_as_date = True
        sim.config.retry_after_s = 30
        status, headers, _ = await post(session, sim, row(1))
        wait_s = parsedate_to_datetime(headers["Retry-After"]).timestamp() - time.time()
        assert status == 429 and 25 < wait_s < 35
        assert sim.stats.statuses == {500: 1, 429: 2}
        assert sim.stats.succeeded == {}


async def test_faults_are_deterministic_per_row_and_attempt(session: aiohttp.ClientSession) -> None:
    config = SimAgentConfig(service_time_s=0, fail_500_rate=0.5, seed=7)
    failing = []
    for order in (range(40), reversed(range(40))):
        async with SimAgent(config) as sim:
            statuses = {t: (await post(session, sim, row(t)))[0] for t in order}
            failing.append({t for t, s in statuses.items() if s == 500})
    assert failing[0] == failing[1] and 5 < len(failing[0]) < 35


async def test_reset_raises_connection_error(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0, reset_rate=1.0)) as sim:
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(session, sim, row(1))
        assert sim.stats.statuses == {0: 1} and sim.stats.succeeded == {}


async def test_non_json_answer(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0, non_json_rate=1.0)) as sim:
        status, _, body = await post(session, sim, row(1))
        assert status == 200
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(body)
        assert sim.stats.statuses == {200: 1} and sim.stats.succeeded == {}


async def test_hang_delays_the_answer(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0, hang_rate=1.0, hang_s=0.3)) as sim:
        start = time.monotonic()
        assert (await post(session, sim, row(1)))[0] == 200
        assert time.monotonic() - start >= 0.25
        with pytest.raises(asyncio.TimeoutError):
            await post(session, sim, row(2), timeout=aiohttp.ClientTimeout(total=0.05))


async def test_fail_first_k_then_success(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0, fail_first_k=2)) as sim:
        statuses = [(await post(session, sim, row(5, 1)))[0] for _ in range(3)]
        assert statuses == [500, 500, 200]
        assert sim.stats.attempts[(5, 1)] == 3 and sim.stats.succeeded[(5, 1)] == 1


async def test_fail_status_changes_at_run_time(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0, fail_status=404)) as sim:
        assert (await post(session, sim, row(1)))[0] == 404
        sim.config.fail_status = 503
        status, headers, _ = await post(session, sim, row(1))
        assert status == 503 and headers["Retry-After"] == "0.5"
        sim.config.fail_status = None
        assert (await post(session, sim, row(1)))[0] == 200


async def test_stats_record_headers_and_bodies(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0)) as sim:
        headers = {"Authorization": "Bearer abc", "Idempotency-Key": "k-1"}
        await post(session, sim, row(2, 3, extra_field=1), headers=headers)
        await post(session, sim, row(2, 3, extra_field=2), headers={**headers, "Idempotency-Key": "k-2"})
        await post(session, sim, {"no": "indices"})
        stats = sim.stats
        assert stats.requests == 3 and stats.authorization_values == {"Bearer abc"}
        assert stats.idempotency_keys == {(2, 3): {"k-1", "k-2"}}
        assert stats.bodies_last[(2, 3)]["extra_field"] == 2 and (-1, -1) in stats.bodies_last
        assert {"authorization", "idempotency-key"} <= stats.headers_seen
        stats.reset()
        assert stats.requests == 0 and stats.succeeded == {} and stats.bodies_last == {}


async def test_stop_and_start_listening(session: aiohttp.ClientSession) -> None:
    async with SimAgent(SimAgentConfig(service_time_s=0)) as sim:
        port = sim.port
        assert (await post(session, sim, row(1)))[0] == 200
        await sim.stop_listening()
        with pytest.raises(aiohttp.ClientConnectionError):  # the pooled connection is gone too
            await post(session, sim, row(1))
        with pytest.raises(aiohttp.ClientConnectionError):
            await post(session, sim, row(1))
        await sim.start_listening()
        assert sim.port == port
        assert (await post(session, sim, row(1)))[0] == 200


async def test_head_server_document_and_health(session: aiohttp.ClientSession) -> None:
    async with SimAgent(agent_names=("agent_a", "agent_b")) as sim:
        async with session.get(sim.url + "/global_config_dict_yaml") as resp:
            assert resp.status == 200
            text = await resp.json()
        assert isinstance(text, str)
        doc = yaml.safe_load(text)
        for name in ("agent_a", "agent_b"):
            server = doc[name]["responses_api_agents"]["simple_agent"]
            assert (server["host"], server["port"]) == ("127.0.0.1", sim.port)
        model = doc["policy_model"]["responses_api_models"]["openai_model"]
        assert model["openai_api_key"] == SIM_HEAD_SECRET
        async with session.get(sim.url + "/health") as resp:
            assert (resp.status, await resp.text()) == (200, "ok")
    async with SimAgent(head_server=False) as sim, session.get(sim.url + "/global_config_dict_yaml") as resp:
        assert resp.status == 404


def test_thread_from_sync_code() -> None:
    def post_sync(url: str) -> int:
        request = urllib.request.Request(url + "/run", data=orjson.dumps(row(4)), method="POST")
        with urllib.request.urlopen(request, timeout=5) as resp:
            status: int = resp.status
            return status

    with SimAgentThread(SimAgentConfig(service_time_s=0.01), port=0) as sim:
        assert sim.url == f"http://127.0.0.1:{sim.port}"
        assert post_sync(sim.url) == 200
        sim.config.fail_status = 400
        with pytest.raises(urllib.error.HTTPError):
            post_sync(sim.url)
        sim.stop_listening()
        with pytest.raises(urllib.error.URLError):
            post_sync(sim.url)
        sim.start_listening()
        sim.config.fail_status = None
        assert post_sync(sim.url) == 200
        assert sim.stats.statuses == {200: 2, 400: 1}


def test_thread_reports_startup_errors() -> None:
    with SimAgentThread(port=0) as first, pytest.raises(OSError), SimAgentThread(port=first.port):
        pass


def test_cli_prints_listening_line() -> None:
    flags = (
        "--port 0 --capacity 4 --service-time-s 0 --mode gpu --agent-name a --agent-name b --fail-status NONE"
    )
    cmd = [sys.executable, "-m", "gym_collect.sim_agent", *flags.split()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.fullmatch(r"sim_agent listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        with urllib.request.urlopen(match[1] + "/global_config_dict_yaml", timeout=5) as resp:
            doc = yaml.safe_load(orjson.loads(resp.read()))
        assert doc["b"]["responses_api_agents"]["simple_agent"]["port"] == int(match[2])
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
