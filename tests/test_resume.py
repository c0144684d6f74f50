"""Resume: the manifest check, torn lines, redoing failures, exactly-once after crashes and signals."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.collect import EXIT_INTERRUPTED, EXIT_OK, collect
from gym_collect.errors import ConfigError
from gym_collect.sim_agent import SimAgent, SimAgentConfig, SimAgentThread
from gym_collect.writer import DoneSet
from tests.conftest import config as make_config
from tests.conftest import make_rows, pairs, read_jsonl, write_rows

COLLECT = str(Path(sys.executable).parent / "collect_rollouts")


async def test_resume_refuses_a_changed_definition(tmp_path: Path, sim: SimAgent) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(10))
    await collect(make_config(inp, tmp_path / "out.jsonl", sim.url, limit=5))
    with pytest.raises(ConfigError, match=r"resume refused.*num_repeats: 1 -> 2.*stop_idx: 5 -> 10"):
        await collect(make_config(inp, tmp_path / "out.jsonl", sim.url, num_repeats=2, resume=True))
    write_rows(inp, make_rows(11))
    with pytest.raises(ConfigError, match=r"resume refused.*input: "):
        await collect(make_config(inp, tmp_path / "out.jsonl", sim.url, limit=5, resume=True))


async def test_resume_repairs_a_torn_line_and_fills_the_gaps(tmp_path: Path, sim: SimAgent) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(10))
    out = tmp_path / "out.jsonl"
    await collect(make_config(inp, out, sim.url, num_repeats=2))
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:7]) + lines[7][:25])  # a crash mid-write
    sim.stats.reset()
    result = await collect(make_config(inp, out, sim.url, num_repeats=2, resume=True))
    assert result.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(out))) == [(t, r) for t in range(10) for r in range(2)]
    assert sum(sim.stats.attempts.values()) == 13
    assert result.metrics is not None and result.metrics["rollouts"]["skipped_resume"] == 7
    assert result.metrics["fields"]["sim_agent"]["reward"]["count"] == 20


async def test_resume_redoes_failures_and_keeps_idempotency_keys(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(6))
    out = tmp_path / "out.jsonl"
    async with SimAgent(SimAgentConfig(service_time_s=0.0, fail_status=503, retry_after_s=0.0)) as sim:
        first = await collect(make_config(inp, out, sim.url, max_attempts=1))
        assert len(read_jsonl(tmp_path / "out_failures.jsonl")) == 6
        keys = {k: set(v) for k, v in sim.stats.idempotency_keys.items()}
        sim.config.fail_status = None
        second = await collect(make_config(inp, out, sim.url, max_attempts=1, resume=True))
    assert (first.exit_code, second.exit_code) == (3, EXIT_OK)
    assert sorted(pairs(read_jsonl(out))) == [(t, 0) for t in range(6)]
    # the failures file is history (NeMo Gym counts attempts from it); each retry says it is the second attempt
    assert len(read_jsonl(tmp_path / "out_failures.jsonl")) == 6
    assert {r["_ng_attempt_index"] for r in read_jsonl(out)} == {1}
    assert {k: set(v) for k, v in sim.stats.idempotency_keys.items()} == keys


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 50), st.integers(1, 4), st.data())
def test_done_set_marks_each_pair_once(num_rows: int, repeats: int, data: st.DataObject) -> None:
    done = DoneSet(100, num_rows, repeats)  # pairs outside the bitmap's range go to the exact overflow set
    marks = data.draw(st.lists(st.tuples(st.integers(95, 160), st.integers(-1, 5))))
    added = [done.add(t, r) for t, r in marks]
    assert sum(added) == len(set(marks)) == done.count
    assert all(done.is_done(t, r) == ((t, r) in set(marks)) for t in range(95, 160) for r in range(-1, 5))


def run_collector(tmp_path: Path, url: str, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    args = [COLLECT, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl", "agent_name=sim_agent",
            f"agent_url={url}", "progress=false", "num_repeats=2", "num_samples_in_parallel=16", *extra]
    return subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_sigkill_at_random_moments_then_resume_gives_each_rollout_once(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(2000))
    rng = random.Random(20261121)
    kills = 0
    with SimAgentThread(SimAgentConfig(capacity=16, service_time_s=0.04, service_sigma=0.5)) as sim:
        for _ in range(22):
            proc = run_collector(tmp_path, sim.url, clean_env, "resume=true")
            time.sleep(rng.uniform(0.3, 1.5))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
            proc.wait(timeout=30)
        final = run_collector(tmp_path, sim.url, clean_env, "resume=true")
        output, _ = final.communicate(timeout=120)
    assert kills >= 20
    assert final.returncode == EXIT_OK, output.decode()
    rollouts = read_jsonl(tmp_path / "out.jsonl")  # raises on any torn or invalid line
    assert sorted(pairs(rollouts)) == [(t, r) for t in range(2000) for r in range(2)]
    assert len(pairs(rollouts)) == len(set(pairs(rollouts)))


def test_sigterm_finishes_in_flight_writes_metrics_and_exits_interrupted(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(300))
    with SimAgentThread(SimAgentConfig(capacity=64, service_time_s=0.4)) as sim:
        proc = run_collector(tmp_path, sim.url, clean_env, "shutdown_grace_s=20")
        out, deadline = tmp_path / "out.jsonl", time.monotonic() + 30
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        served = sum(sim.stats.succeeded.values())
    text = output.decode()
    assert proc.returncode == EXIT_INTERRUPTED, text
    written = read_jsonl(tmp_path / "out.jsonl")
    assert len(written) == served  # every request the server answered was written: in-flight work finished
    assert 0 < len(written) < 600
    metrics = orjson.loads((tmp_path / "out_metrics.json").read_bytes())
    assert metrics["stopped"] == "interrupted by SIGTERM"
    assert metrics["rollouts"]["succeeded"] == len(written)
    assert "Stopping: interrupted by SIGTERM" in text


def test_env_token_never_reaches_files_or_logs(tmp_path: Path, clean_env: dict[str, str]) -> None:
    token = "tok-" + os.urandom(8).hex()
    literal = "lit-" + os.urandom(8).hex()
    write_rows(tmp_path / "in.jsonl", make_rows(20))
    env = {**clean_env, "AGENT_TOKEN": token}
    with SimAgentThread(SimAgentConfig(service_time_s=0.0, fail_first_k=1)) as sim:
        proc = run_collector(tmp_path, sim.url, env, "headers.Authorization=Bearer ${oc.env:AGENT_TOKEN}",
                             f"+headers.X-Api-Key={literal}", "limit=10")
        output, _ = proc.communicate(timeout=60)
        seen = set(sim.stats.authorization_values)
    assert proc.returncode == EXIT_OK, output.decode()
    assert seen == {f"Bearer {token}"}
    everything = output + b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    assert token.encode() not in everything
    assert literal.encode() not in everything
    assert list(tmp_path.glob("outputs/*/*/.hydra/overrides.yaml"))  # Hydra's saved config exists, redacted


def test_a_second_signal_exits_at_once_with_whole_lines(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(300))
    with SimAgentThread(SimAgentConfig(capacity=64, service_time_s=0.2, service_sigma=1.0)) as sim:
        proc = run_collector(tmp_path, sim.url, clean_env, "shutdown_grace_s=600")
        out, deadline = tmp_path / "out.jsonl", time.monotonic() + 30
        while time.monotonic() < deadline and not (out.exists() and out.stat().st_size > 0):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        stopped = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED, output.decode()
    assert time.monotonic() - stopped < 5  # not the 600 s grace
    assert "Second signal (SIGTERM): exiting now" in output.decode()
    read_jsonl(out)  # every line whole


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=200_000).map(lambda b: b.replace(b"\n", b"x")), max_size=4),
       st.binary(max_size=150_000).map(lambda b: b.replace(b"\n", b"y")))
def test_torn_tail_repair_keeps_exactly_the_whole_lines(
    tmp_path_factory: pytest.TempPathFactory, lines: list[bytes], torn: bytes
) -> None:
    from gym_collect.writer.lines import repair_torn_tail as _repair_torn_tail

    path = tmp_path_factory.mktemp("torn") / "out.jsonl"
    whole = b"".join(line + b"\n" for line in lines)
    path.write_bytes(whole + torn)
    _repair_torn_tail(path)
    assert path.read_bytes() == whole
