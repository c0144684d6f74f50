"""Dispatch without head-of-line blocking: the per-backend backlog and its spill file as pure objects, the same
objects in simulated time, then the collector against real servers on 127.0.0.1, one of them held."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections import Counter, deque
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.collect import EXIT_OK, EXIT_STOPPED, collect
from gym_collect.concurrency.backlog import Backlog
from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.concurrency.sim import SimBackend, simulate
from gym_collect.concurrency.spill import SpillQueue
from gym_collect.config import CollectConfig
from gym_collect.errors import OutputError
from gym_collect.runner import DISPATCH_GC_THRESHOLD, dispatch_gc
from gym_collect.sim_agent import SimAgent, SimAgentConfig
from tests.conftest import config, make_rows, pairs, read_jsonl, write_rows
from tests.servers import LoopbackServer, echo_rollout

# ------------------------------------------------------------------------------------------ pure objects


def test_spill_queue_is_fifo_and_frees_its_file(tmp_path: Path) -> None:
    spill = SpillQueue[tuple[int, bytes]](tmp_path)
    for i in range(5):
        spill.put((i, b"x" * i))
    assert list(tmp_path.iterdir()) == []  # no name left behind, even before close
    assert spill.take(2) == [(0, b""), (1, b"x")]
    spill.put((5, b"y"))
    assert spill.take(10) == [(2, b"xx"), (3, b"xxx"), (4, b"xxxx"), (5, b"y")]
    assert spill.size == 0 and spill.bytes_on_disk == 0  # truncated once empty
    spill.put((6, b""))
    spill.close()
    assert spill.size == 0 and spill.take(1) == []


def test_a_spill_that_cannot_be_written_names_the_folder(tmp_path: Path) -> None:
    spill = SpillQueue[int](tmp_path / "missing")
    with pytest.raises(OutputError, match="missing: cannot queue requests"):
        spill.put(1)


def test_a_backend_at_its_limit_does_not_hold_back_another() -> None:
    limits = InFlightLimits({"a": "a", "b": "b"}, {"a": 1, "b": 2}, shared=None)
    with Backlog[str](limits, per_backend=10) as rows:
        for seq, backend in enumerate("aaab"):
            rows.add(seq, backend, f"{backend}{seq}")
        started = []
        while (pick := rows.next_startable()) is not None:
            limits.take(pick[1])
            started.append(rows.pop(pick[1]))
        assert started == ["a0", "b3"]
        limits.release("a")
        assert rows.next_startable() == (1, "a")


def test_rows_are_read_for_a_backend_with_room_nothing_queued_and_rows_left() -> None:
    limits = InFlightLimits({"a": "a", "b": "b"}, {"a": 1, "b": 1}, shared=None)
    rows = Backlog[str](limits, per_backend=2, remaining={"a": 5, "b": 1})
    assert rows.wants_more()  # nothing queued
    rows.add(0, "a", "a0")
    assert rows.wants_more()  # b has room and nothing queued
    for seq in range(1, 4):
        rows.add(seq, "a", f"a{seq}")
    assert rows.in_memory == 2 and rows.spilled == 2  # past a's share of memory: on disk
    rows.add(4, "b", "b4")
    assert not rows.wants_more()  # each backend has something to start
    limits.take("b")
    assert rows.pop("b") == "b4"
    limits.release("b")
    assert not rows.wants_more()  # b has room but its one row is read
    assert [rows.pop("a") for _ in range(4)] == ["a0", "a1", "a2", "a3"]  # in order, back from disk
    rows.close()


def test_ordered_output_reads_no_further_than_the_window() -> None:
    limits = InFlightLimits({"a": "a", "b": "b"}, {"a": 1, "b": 8}, shared=None)
    with Backlog[int](limits, per_backend=4, max_span=6) as rows:
        for seq in range(6):
            assert rows.wants_more()
            rows.add(seq, "a", seq)  # a is full from the first; b waits for rows
        assert not rows.wants_more()  # seq 6 would be 6 past the lowest queued (0)
        limits.take("a")
        rows.pop("a")
        assert rows.wants_more()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), min_size=1, max_size=400),
       st.integers(1, 8))
def test_backlog_memory_is_bounded_and_every_item_comes_out_once_in_order(
        steps: list[tuple[str, bool]], per_backend: int) -> None:
    limits = InFlightLimits({k: k for k in "abc"}, {"a": 1, "b": 3, "c": None}, shared=None)
    out: dict[str, list[int]] = {k: [] for k in "abc"}
    in_flight: deque[str] = deque()
    with Backlog[int](limits, per_backend) as rows:
        for seq, (backend, finish_one) in enumerate(steps):
            rows.add(seq, backend, seq)
            assert all(rows.in_memory_of(b) <= per_backend for b in "abc")
            if finish_one and in_flight:
                limits.release(in_flight.popleft())
            while (pick := rows.next_startable()) is not None:
                limits.take(pick[1])
                in_flight.append(pick[1])
                out[pick[1]].append(rows.pop(pick[1]))
        while in_flight:
            limits.release(in_flight.popleft())
            while (pick := rows.next_startable()) is not None:
                limits.take(pick[1])
                in_flight.append(pick[1])
                out[pick[1]].append(rows.pop(pick[1]))
        assert rows.size == 0 and rows.peak_in_memory <= 3 * per_backend
    for backend, seqs in out.items():
        assert seqs == [seq for seq, (b, _) in enumerate(steps) if b == backend]


# ------------------------------------------------------------------------------------ simulated time


def test_rows_interleaved_one_to_one_let_the_big_backend_run_at_its_capacity() -> None:
    backends = {"small": SimBackend(16, 0.1, 0.2, model="shared", seed=1),
                "big": SimBackend(128, 0.1, 0.2, model="shared", seed=2)}

    def run(levels: dict[str, int | None], shared: int | None) -> tuple[float, int]:
        limits = InFlightLimits({k: k for k in backends}, levels, shared)
        result = simulate(backends, limits, 30.0, pattern=["small", "big"], read_ahead_per_backend=64)
        return result.throughput_per_s(5.0, 30.0), result.peak_backlog

    pair, peak = run({"small": 16, "big": 128}, None)
    shared, _ = run({"small": None, "big": None}, 32)
    assert pair >= 3.0 * shared  # (16 + 128) / (2 * 16) = 4.5 in theory; head-of-line blocking gives 1
    assert peak <= 2 * 64  # what waits past a backend's share of memory is on disk


# ------------------------------------------------------------------------------------- the real thing


def _two_backend_rows(path: Path, n: int) -> Path:
    """`n` rows a backend, alternating small, big."""
    return write_rows(path, ({"responses_create_params": {"input": f"q{i}"},
                              "agent_ref": {"name": ("small", "big")[i % 2]}} for i in range(2 * n)))


def _config(inp: Path, out: Path, urls: dict[str, str], **overrides: Any) -> CollectConfig:
    return CollectConfig(input_jsonl_fpath=str(inp), output_jsonl_fpath=str(out), agents=urls, progress=False,
                         **overrides)


async def test_a_held_backend_does_not_hold_back_the_others_rows(tmp_path: Path) -> None:
    n = 1100  # rows a backend: more than the 1,024 one shared read-ahead held, and than a backend's memory
    inp = _two_backend_rows(tmp_path / "in.jsonl", n)
    release, big_done = threading.Event(), threading.Event()
    answered: Counter[str] = Counter()

    async def held(request: web.Request) -> web.StreamResponse:
        await asyncio.to_thread(release.wait)  # the test releases it; at most the small limit of threads
        answered["small"] += 1
        return await echo_rollout(request)

    async def free(request: web.Request) -> web.StreamResponse:
        response = await echo_rollout(request)
        answered["big"] += 1
        if answered["big"] == n:
            big_done.set()
        return response

    with LoopbackServer({"POST /run": held}) as small, LoopbackServer({"POST /run": free}) as big:
        cfg = _config(inp, tmp_path / "out.jsonl", {"small": small.url, "big": big.url},
                      num_samples_in_parallel={"small": 2, "big": 16})
        run = asyncio.create_task(collect(cfg))
        try:
            big_finished = await asyncio.to_thread(big_done.wait, 60.0)
            big_answered, small_answered = answered["big"], answered["small"]
            small_seen = small.requests.get("POST /run", 0)
        finally:
            release.set()
            result = await run
    assert big_finished, f"only {big_answered} of the big backend's {n} rows ran while the small one was held"
    assert small_seen == 2 and small_answered == 0
    assert result.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(t, 0) for t in range(2 * n)]


async def test_output_in_input_order_with_rows_spilled(tmp_path: Path) -> None:
    n = 700
    inp = _two_backend_rows(tmp_path / "in.jsonl", n)
    small_cfg = SimAgentConfig(capacity=2, service_time_s=0.002, seed=1)
    big_cfg = SimAgentConfig(capacity=64, service_time_s=0.0, seed=2)
    async with SimAgent(small_cfg, agent_names=["small"]) as small, SimAgent(big_cfg, agent_names=["big"]) as big:
        cfg = _config(inp, tmp_path / "out.jsonl", {"small": small.url, "big": big.url}, output_order="input",
                      num_samples_in_parallel={"small": 2, "big": 16})
        result = await collect(cfg)
    assert result.exit_code == EXIT_OK
    assert pairs(read_jsonl(tmp_path / "out.jsonl")) == [(t, 0) for t in range(2 * n)]


async def test_rows_read_ahead_do_not_start_after_the_dispatch_budget(tmp_path: Path) -> None:
    n, service_s, budget_s = 100, 0.02, 0.2
    inp = _two_backend_rows(tmp_path / "in.jsonl", n)
    out = tmp_path / "out.jsonl"
    small_cfg = SimAgentConfig(capacity=8, service_time_s=service_s, seed=1)
    big_cfg = SimAgentConfig(capacity=64, service_time_s=0.0, seed=2)
    async with SimAgent(small_cfg, agent_names=["small"]) as small, SimAgent(big_cfg, agent_names=["big"]) as big:
        urls = {"small": small.url, "big": big.url}
        first = await collect(_config(inp, out, urls, num_samples_in_parallel={"small": 1, "big": 16},
                                      dispatch_budget_s=budget_s, drain_margin_s=0.0))
        small_done = sum(r["agent_ref"]["name"] == "small" for r in read_jsonl(out))
        second = await collect(_config(inp, out, urls, num_samples_in_parallel={"small": 8, "big": 16}, resume=True))
    assert first.exit_code == EXIT_STOPPED
    # One at a time for `service_s` each: what the budget allows, not the hundreds read ahead past the big rows.
    assert small_done <= budget_s / service_s + 2
    assert second.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(out))) == [(t, 0) for t in range(2 * n)]


async def test_dispatch_runs_with_the_start_up_heap_frozen_and_restores_the_collector(tmp_path: Path) -> None:
    """The garbage collector's settings while `/run` requests are answered, and after the run."""
    seen: list[tuple[int, int]] = []

    async def record(request: web.Request) -> web.Response:
        seen.append((gc.get_threshold()[0], gc.get_freeze_count()))  # the server shares the collector's process
        return await echo_rollout(request)

    before = (gc.get_threshold(), gc.get_freeze_count())
    write_rows(tmp_path / "in.jsonl", make_rows(20))
    with LoopbackServer({"POST /run": record}) as server:
        result = await collect(config(tmp_path / "in.jsonl", tmp_path / "out.jsonl", server.url))
    assert result.exit_code == EXIT_OK and len(seen) == 20
    assert all(threshold == DISPATCH_GC_THRESHOLD and frozen > 0 for threshold, frozen in seen)
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_dispatch_gc_restores_the_collector_when_dispatch_fails() -> None:
    before = (gc.get_threshold(), gc.get_freeze_count())
    with pytest.raises(OutputError), dispatch_gc():
        assert gc.get_threshold()[0] == DISPATCH_GC_THRESHOLD
        raise OutputError("disk full")
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
