"""`<stem>_materialized_inputs.jsonl`: every `/run` body in (task, rollout) order, written before dispatch, and
how resume uses it (against a recording agent on 127.0.0.1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from gym_collect.collect import EXIT_OK, collect
from gym_collect.errors import ConfigError
from tests.conftest import config, make_rows, pairs, read_jsonl, write_rows
from tests.servers import LoopbackServer


class RecordingAgent:
    """Echoes each body with a reward; `bodies` holds what it received. With `materialized` set, the bytes of
    that file as the first request found it are kept in `materialized_seen`."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.materialized_seen: bytes | None = None
        self.materialized: Path | None = None

    async def run(self, request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        if self.materialized is not None and self.materialized_seen is None:
            self.materialized_seen = self.materialized.read_bytes()
        self.bodies.append(body)
        return web.json_response({**body, "reward": 0.5})


@pytest.fixture
def agent() -> RecordingAgent:
    return RecordingAgent()


@pytest.fixture
def server(agent: RecordingAgent) -> Any:
    with LoopbackServer({"POST /run": agent.run}) as running:
        yield running


def materialized(out: Path) -> list[dict[str, Any]]:
    return read_jsonl(out.with_name(out.stem + "_materialized_inputs.jsonl"))


@pytest.mark.parametrize("interleave", [False, True])
async def test_every_body_is_written_in_order_before_the_first_request(tmp_path: Path, agent: RecordingAgent,
                                                                       server: LoopbackServer,
                                                                       interleave: bool) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(3)), tmp_path / "out.jsonl"
    agent.materialized = tmp_path / "out_materialized_inputs.jsonl"
    result = await collect(config(inp, out, server.url, num_repeats=2, num_repeats_add_seed=True,
                                  interleave_repeats=interleave, responses_create_params={"temperature": 0.3}))
    assert result.exit_code == EXIT_OK
    lines = materialized(out)
    order = [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)] if interleave else [
        (t, r) for t in range(3) for r in range(2)]
    assert pairs(lines) == order
    # the whole file was there, whole lines, when the first request arrived
    assert agent.materialized_seen is not None and read_jsonl(agent.materialized) == lines
    assert agent.materialized_seen.count(b"\n") == 6 and agent.materialized_seen.endswith(b"\n")
    # each line is exactly the body that was sent for its pair
    sent = {(b["_ng_task_index"], b["_ng_rollout_index"]): b for b in agent.bodies}
    assert all(sent[(r["_ng_task_index"], r["_ng_rollout_index"])] == r for r in lines)
    assert all(r["responses_create_params"]["temperature"] == 0.3 and r["agent_ref"] == {"name": "sim_agent"}
               for r in lines)


async def test_bad_rows_and_a_dry_run_add_nothing(tmp_path: Path, server: LoopbackServer) -> None:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_bytes(b'{"q": 0}\nnot json\n{"q": 2}\n')
    await collect(config(inp, out, server.url, on_bad_row="skip", dry_run=True))
    assert not (tmp_path / "out_materialized_inputs.jsonl").exists()
    await collect(config(inp, out, server.url, on_bad_row="skip"))
    assert pairs(materialized(out)) == [(0, 0), (2, 0)]


def contents(folder: Path) -> dict[str, bytes]:
    """Every file in `folder`, by name."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


async def test_resume_keeps_the_file_and_an_output_without_a_manifest_is_checked_against_it(
        tmp_path: Path, agent: RecordingAgent, server: LoopbackServer) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(4)), tmp_path / "out.jsonl"
    await collect(config(inp, out, server.url, limit=4))
    side = tmp_path / "out_materialized_inputs.jsonl"
    before = side.read_bytes()
    # as NeMo Gym leaves an output: no manifest, two rollouts lost
    (tmp_path / "out_run.json").unlink()
    kept = out.read_bytes().splitlines(keepends=True)[:2]
    out.write_bytes(b"".join(kept) + b'{"_ng_task_index": 2, "_ng_rol')  # and a line a crash cut short
    assert (tmp_path / "out_aggregate_metrics.json").exists()
    files = contents(tmp_path)
    # other settings are refused, and change nothing: no manifest of the refused settings, no repair, no removal
    for changed in ({"responses_create_params": {"temperature": 0.5}}, {"num_repeats": 2},
                    {"interleave_repeats": True, "num_repeats": 2}):
        with pytest.raises(ConfigError, match=r"resume refused: .*materialized_inputs\.jsonl"):
            await collect(config(inp, out, server.url, limit=4, resume=True, **changed))
        assert contents(tmp_path) == files
    assert (await collect(config(inp, out, server.url, limit=4, resume=True))).exit_code == EXIT_OK
    assert side.read_bytes() == before and sorted(pairs(read_jsonl(out))) == [(t, 0) for t in range(4)]
    assert len(agent.bodies) == 6


@pytest.mark.parametrize("change", ["edit", "truncate", "extend"])
async def test_resume_refuses_materialized_inputs_of_another_run(tmp_path: Path, server: LoopbackServer,
                                                                  change: str) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(4)), tmp_path / "out.jsonl"
    await collect(config(inp, out, server.url))
    (tmp_path / "out_run.json").unlink()
    side = tmp_path / "out_materialized_inputs.jsonl"
    lines = side.read_bytes().splitlines(keepends=True)
    if change == "edit":
        lines[2] = lines[2].replace(b'"expected_answer"', b'"answer"')
    elif change == "truncate":
        lines = lines[:3]
    else:
        lines.append(lines[0])
    side.write_bytes(b"".join(lines))
    with pytest.raises(ConfigError, match=r"resume refused: .*materialized_inputs\.jsonl"):
        await collect(config(inp, out, server.url, resume=True))


async def test_a_fresh_run_replaces_files_left_by_an_earlier_one(tmp_path: Path, server: LoopbackServer) -> None:
    inp, out = write_rows(tmp_path / "in.jsonl", make_rows(2)), tmp_path / "out.jsonl"
    for name in ("out_materialized_inputs.jsonl", "out_aggregate_metrics.json"):
        (tmp_path / name).write_bytes(b'{"stale": true}\n')
    await collect(config(inp, out, server.url))
    assert pairs(materialized(out)) == [(0, 0), (1, 0)]
    assert not (tmp_path / "out_aggregate_metrics.json").exists() or b"stale" not in (
        tmp_path / "out_aggregate_metrics.json").read_bytes()
