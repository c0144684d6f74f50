"""Data safety under hostile conditions, against real loopback servers, real files and the real command:
the input is never touched, one run owns an output, the exit code tells the truth, secrets go nowhere,
HTTP and the operating system are handled, and every user error is one line."""

from __future__ import annotations

import asyncio
import base64
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from aiohttp import web

from gym_collect.collect import EXIT_ERROR, EXIT_FAILURES, EXIT_OK, collect
from gym_collect.errors import ConfigError, InputError, OutputError
from gym_collect.shutdown import EXIT_INTERRUPTED
from gym_collect.sim_agent import SimAgent, SimAgentConfig, SimAgentThread
from tests.conftest import config, make_rows, pairs, read_jsonl, write_rows
from tests.servers import LoopbackServer, echo_rollout

COLLECT = str(Path(sys.executable).parent / "collect_rollouts")
SIDE_SUFFIXES = ["", "_failures.jsonl", "_materialized_inputs.jsonl", "_aggregate_metrics.json", "_metrics.json",
                 "_run.json", "_status.json", "_run.lock"]
WAIT_S = 30.0


def cli(cwd: Path, env: dict[str, str], *args: str, timeout: float = 120, **popen: Any) -> tuple[int, str]:
    """Run `collect_rollouts` in `cwd`; (exit code, stdout and stderr together)."""
    proc = subprocess.run([COLLECT, "progress=false", *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=timeout, check=False, **popen)
    return proc.returncode, proc.stdout.decode()


def one_error_line(output: str) -> str:
    """The output must be one error line (what, where, what to do) and no traceback; returns it."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if "ERROR" in line or "error:" in line]
    assert len(errors) == 1, output
    return errors[0]


def files_with_content(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


class Gate:
    """Holds `/run` requests until released; `arrived` is set by the first one."""

    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.release = threading.Event()

    async def run(self, request: web.Request) -> web.StreamResponse:
        self.arrived.set()
        await asyncio.get_running_loop().run_in_executor(None, self.release.wait, WAIT_S)
        return await echo_rollout(request)


# The input is never touched --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["fresh", "resume", "overwrite"])
@pytest.mark.parametrize("suffix", SIDE_SUFFIXES)
async def test_the_input_is_never_a_file_the_run_writes(tmp_path: Path, sim: SimAgent, mode: str,
                                                        suffix: str) -> None:
    out = tmp_path / "x.jsonl"
    inp = write_rows(out.with_name(out.stem + suffix) if suffix else out, make_rows(5))
    before = inp.read_bytes()
    flags = {} if mode == "fresh" else {mode: True}
    with pytest.raises(ConfigError, match="the input would be overwritten"):
        await collect(config(inp, out, sim.url, **flags))
    assert inp.read_bytes() == before
    assert files_under(tmp_path) == [inp.name]


@pytest.mark.parametrize("link", ["symlink", "hardlink", "dotted path"])
async def test_the_input_reached_through_another_path_is_refused_too(tmp_path: Path, sim: SimAgent,
                                                                     link: str) -> None:
    (tmp_path / "data").mkdir()
    inp = write_rows(tmp_path / "data" / "in.jsonl", make_rows(5))
    before = inp.read_bytes()
    out = tmp_path / "out.jsonl"
    if link == "symlink":
        out.symlink_to(inp)
    elif link == "hardlink":
        os.link(inp, out)
    else:
        out = tmp_path / "data" / ".." / "data" / "in.jsonl"
    with pytest.raises(ConfigError, match="the input would be overwritten"):
        await collect(config(inp, out, sim.url, overwrite=True))
    assert inp.read_bytes() == before


@pytest.mark.parametrize("suffix", ["_failures.jsonl", "_materialized_inputs.jsonl", "_run.lock"])
async def test_an_output_that_is_another_runs_side_file_is_refused(tmp_path: Path, sim: SimAgent,
                                                                     suffix: str) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(3))
    assert (await collect(config(inp, tmp_path / "out.jsonl", sim.url))).exit_code == EXIT_OK
    side = tmp_path / f"out{suffix}"
    side.touch()
    before = files_with_content(tmp_path)
    for mode in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ConfigError, match=r"is a side file of the run that writes .*out\.jsonl"):
            await collect(config(inp, side, sim.url, **mode))
    assert files_with_content(tmp_path) == before


# One run owns an output ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("second", ["fresh", "resume=true", "overwrite=true", "a link to it, resume=true",
                                    "a hard link to it, resume=true"])
def test_a_second_run_on_a_live_output_is_refused_and_nothing_is_duplicated(
    tmp_path: Path, clean_env: dict[str, str], second: str
) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(30))
    (tmp_path / "alias.jsonl").symlink_to("out.jsonl")
    gate = Gate()
    with LoopbackServer({"POST /run": gate.run}) as server:
        args = ["input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl", f"agent_url={server.url}",
                "num_samples_in_parallel=4"]
        first = subprocess.Popen([COLLECT, "progress=false", *args], cwd=tmp_path, env=clean_env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        alias = "hard.jsonl" if "hard" in second else "alias.jsonl"
        second_args = [*args[:1], f"output_jsonl_fpath={alias}", *args[2:], "resume=true"] if "link" in second \
            else [*args, *([] if second == "fresh" else [second])]
        try:
            assert gate.arrived.wait(WAIT_S)
            os.link(tmp_path / "out.jsonl", tmp_path / "hard.jsonl")  # the output exists once requests go out
            code, output = cli(tmp_path, clean_env, *second_args)
        finally:
            gate.release.set()
            first_output, _ = first.communicate(timeout=WAIT_S)
    line = one_error_line(output)
    assert code == EXIT_ERROR
    assert "being written by another run" in line
    assert f"pid {first.pid}" in line or "hard link" in line  # a hard link's holder is known only to the kernel
    assert first.returncode == EXIT_OK, first_output.decode()
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(t, 0) for t in range(30)]
    assert not (tmp_path / "out_run.lock").exists()


def test_a_killed_runs_lock_is_released_by_the_kernel(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(20))
    gate = Gate()
    with LoopbackServer({"POST /run": gate.run}) as server:
        args = ["input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl", f"agent_url={server.url}"]
        first = subprocess.Popen([COLLECT, "progress=false", *args], cwd=tmp_path, env=clean_env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert gate.arrived.wait(WAIT_S)
        first.kill()
        first.wait(WAIT_S)
        assert (tmp_path / "out_run.lock").exists()  # left behind, but no longer held
        gate.release.set()
        code, output = cli(tmp_path, clean_env, *args, "resume=true")
    assert code == EXIT_OK, output
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(t, 0) for t in range(20)]


# The exit code tells the truth ---------------------------------------------------------------------------------

async def test_answers_that_are_never_persisted_do_not_count_as_done(tmp_path: Path) -> None:
    async def no_persist(request: web.Request) -> web.Response:
        return web.json_response({"_ng_no_persist": True})

    inp = write_rows(tmp_path / "in.jsonl", make_rows(6))
    with LoopbackServer({"POST /run": no_persist}) as server:
        result = await collect(config(inp, tmp_path / "out.jsonl", server.url))
    assert result.exit_code == EXIT_FAILURES
    assert result.metrics is not None and result.metrics["rollouts"]["missing"] == 6
    assert read_jsonl(tmp_path / "out.jsonl") == []


@pytest.mark.parametrize("change", ["truncate", "append", "edit"])
async def test_an_input_changed_during_the_run_is_reported(tmp_path: Path, change: str) -> None:
    rows = make_rows(5000)
    inp = write_rows(tmp_path / "in.jsonl", rows)
    original = inp.read_bytes()
    changed = threading.Event()

    async def change_input_then_answer(request: web.Request) -> web.Response:
        if not changed.is_set():
            changed.set()
            if change == "truncate":
                inp.write_bytes(original[: len(original) // 4])
            elif change == "append":
                with inp.open("ab") as f:
                    f.write(b"".join(orjson.dumps(r) + b"\n" for r in make_rows(200)))
            else:  # in place: the same size, and the modification time put back
                info = inp.stat()
                inp.write_bytes(original.replace(b"What is 3", b"What is 9"))
                os.utime(inp, ns=(info.st_atime_ns, info.st_mtime_ns))
        return await echo_rollout(request)

    with LoopbackServer({"POST /run": change_input_then_answer}) as server:
        result = await collect(config(inp, tmp_path / "out.jsonl", server.url, num_samples_in_parallel=8))
    assert result.exit_code == EXIT_ERROR
    assert result.metrics is not None and result.metrics["input_changed"]
    written = read_jsonl(tmp_path / "out.jsonl")
    assert len(pairs(written)) == len(set(pairs(written))) and all(t < 5000 for t, _ in pairs(written))
    # every rollout is of its row as the check pass saw it; rows read after the change are not sent
    assert all(r["responses_create_params"] == rows[r["_ng_task_index"]]["responses_create_params"] for r in written)
    assert len(written) < 5000 and read_jsonl(tmp_path / "out_failures.jsonl") == []


async def test_resume_refuses_an_input_edited_anywhere(tmp_path: Path, sim: SimAgent) -> None:
    rows = [{**row, "pad": "x" * 100} for row in make_rows(30_000)]  # about 4 MB
    inp = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    assert (await collect(config(inp, out, sim.url, end_idx=4))).exit_code == EXIT_OK
    data = bytearray(inp.read_bytes())
    middle = len(data) // 2 + data[len(data) // 2:].index(b"x")
    data[middle:middle + 1] = b"y"
    inp.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"resume refused.*input"):
        await collect(config(inp, out, sim.url, end_idx=4, resume=True))


# Secrets go nowhere ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["header", "url"])
def test_secrets_echoed_in_error_bodies_reach_no_file_and_no_output(tmp_path: Path, clean_env: dict[str, str],
                                                                    where: str) -> None:
    async def echo_headers_in_500(request: web.Request) -> web.Response:
        echoed = {"authorization": request.headers.get("Authorization"), "headers": dict(request.headers)}
        return web.json_response(echoed, status=500)

    write_rows(tmp_path / "in.jsonl", make_rows(3))
    secret = "tok-4f9c2a77e1d0b8" if where == "header" else "pw-93be01c4"
    with LoopbackServer({"POST /run": echo_headers_in_500}) as server:
        if where == "header":
            credentials = [f"agent_url={server.url}", f"headers.Authorization=Bearer {secret}"]
        else:
            credentials = [f"agent_url={server.url.replace('http://', f'http://agent:{secret}@')}"]
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                           *credentials, "max_attempts=2", "backoff_initial_s=0.01", "backoff_max_s=0.01")
    assert code == EXIT_FAILURES, output
    failures = read_jsonl(tmp_path / "out_failures.jsonl")
    assert len(failures) == 3 and all("<redacted>" in f["_ng_failure_response_body"] for f in failures)
    assert secret not in output
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("answer", ["failure", "rollout"])
def test_secrets_an_agent_echoes_into_its_answer_reach_no_file(tmp_path: Path, clean_env: dict[str, str],
                                                               answer: str) -> None:
    async def echo_headers(request: web.Request) -> web.Response:
        row = await request.json()
        echoed = f"upstream saw {dict(request.headers)}"
        if answer == "failure":
            return web.json_response({"_ng_failure_class": "agent_run_error", "_ng_failure_message": echoed})
        return web.json_response({**row, "response": {"output_text": echoed}, "reward": 1.0})

    write_rows(tmp_path / "in.jsonl", make_rows(3))
    secret, password = "tok-4f9c2a77e1d0b8", "pw-93be01c4"
    with LoopbackServer({"POST /run": echo_headers}) as server:
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                           f"agent_url={server.url.replace('http://', f'http://agent:{password}@')}",
                           f"+headers.X-Api-Key=Token {secret}")
    assert code == (EXIT_FAILURES if answer == "failure" else EXIT_OK), output
    lines = read_jsonl(tmp_path / ("out_failures.jsonl" if answer == "failure" else "out.jsonl"))
    assert len(lines) == 3 and all("<redacted>" in str(line) for line in lines)
    basic = base64.b64encode(f"agent:{password}".encode()).decode()
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert not [s for s in (secret, password, basic) if s.encode() in path.read_bytes()], path


# HTTP and the operating system -------------------------------------------------------------------------------

@pytest.mark.parametrize("status", [301, 302, 303])
async def test_a_redirect_never_turns_post_into_a_saved_get(tmp_path: Path, status: int) -> None:
    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=status, headers={"Location": "/elsewhere"})

    inp = write_rows(tmp_path / "in.jsonl", make_rows(2))
    routes = {"POST /run": moved, "GET /elsewhere": echo_rollout, "POST /elsewhere": echo_rollout}
    with LoopbackServer(routes) as server:
        result = await collect(config(inp, tmp_path / "out.jsonl", server.url))
    assert result.exit_code == EXIT_FAILURES
    assert read_jsonl(tmp_path / "out.jsonl") == []
    failures = read_jsonl(tmp_path / "out_failures.jsonl")
    assert {f["_ng_failure_http_status"] for f in failures} == {status}
    assert all("/elsewhere" in f["_ng_failure_message"] for f in failures) and server.requests["POST /run"] == 2
    assert server.requests.get("GET /elsewhere", 0) == server.requests.get("POST /elsewhere", 0) == 0


async def test_a_307_or_308_to_the_same_server_reposts_the_same_body(tmp_path: Path) -> None:
    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=307 if request.path == "/run" else 308, headers={"Location": "/final"})

    inp = write_rows(tmp_path / "in.jsonl", make_rows(3))
    with LoopbackServer({"POST /run": moved, "POST /hop": moved, "POST /final": echo_rollout}) as server:
        result = await collect(config(inp, tmp_path / "out.jsonl", server.url))
    assert result.exit_code == EXIT_OK
    written = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(pairs(written)) == [(0, 0), (1, 0), (2, 0)]
    assert all(r["responses_create_params"]["input"][0]["content"].startswith("What is") for r in written)


def test_unset_parallelism_stays_within_a_low_open_file_limit(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(3000))

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    with SimAgentThread(SimAgentConfig(capacity=4096, service_time_s=0.2, service_sigma=0.1)) as sim:
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                           f"agent_url={sim.url}", preexec_fn=low_limit)
        peak = sim.stats.max_in_flight
    assert code == EXIT_OK, output
    assert "Open-file limit 1024" in output
    assert 500 < peak < 1024
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(t, 0) for t in range(3000)]


async def test_waiting_for_a_pooled_connection_is_not_counted_as_a_timeout(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(60))
    async with SimAgent(SimAgentConfig(capacity=100, service_time_s=0.3, service_sigma=0.0)) as sim:
        result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, num_samples_in_parallel=100,
                                      global_aiohttp_connector_limit=10, request_timeout_s=1.0))
    assert result.exit_code == EXIT_OK
    assert result.metrics is not None and result.metrics["attempts"] == 60 and result.metrics["retries"] == 0
    assert sim.stats.max_in_flight == 10


# Signals in every phase ----------------------------------------------------------------------------------------

def test_a_signal_an_import_turns_into_another_error_still_ends_with_one_line_and_130(
        tmp_path: Path, clean_env: dict[str, str]) -> None:
    # OmegaConf, interrupted while Hydra registers its configs, raises an AttributeError of its own
    (tmp_path / "importing_command.py").write_text(
        "import os, signal\ntry:\n    os.kill(os.getpid(), signal.SIGINT)\nexcept KeyboardInterrupt:\n"
        "    raise AttributeError(\"'NoneType' object has no attribute '_invalidate_flags_cache'\")\n")
    run = "import sys; from gym_collect.entry import _run; sys.exit(_run('cmd', 'importing_command'))"
    proc = subprocess.run([sys.executable, "-c", run], cwd=tmp_path, env={**clean_env, "PYTHONPATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert proc.stderr.strip() == "cmd: interrupted (SIGINT) before the run started"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_while_the_command_is_still_importing_ends_with_one_line_and_130(
        tmp_path: Path, clean_env: dict[str, str], sig: signal.Signals) -> None:
    # a command module whose import receives the signal, as a Ctrl-C in the first half second does
    (tmp_path / "importing_command.py").write_text(
        f"import os, signal\nos.kill(os.getpid(), signal.{sig.name})\n\ndef main():\n    return 0\n")
    run = "import sys; from gym_collect.entry import _run; sys.exit(_run('cmd', 'importing_command'))"
    proc = subprocess.run(
        [sys.executable, "-c", run],
        cwd=tmp_path, env={**clean_env, "PYTHONPATH": str(tmp_path)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == EXIT_INTERRUPTED
    assert proc.stderr.strip() == f"cmd: interrupted ({sig.name}) before the run started" and not proc.stdout


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_a_signal_during_start_up_ends_with_one_line_and_130(tmp_path: Path, clean_env: dict[str, str],
                                                            sig: signal.Signals) -> None:
    asked = threading.Event()

    async def hang(request: web.Request) -> web.Response:
        asked.set()
        await asyncio.sleep(WAIT_S)
        return web.json_response("{}")

    write_rows(tmp_path / "in.jsonl", make_rows(5))
    with LoopbackServer({"GET /global_config_dict_yaml": hang}) as head:
        proc = subprocess.Popen(
            [COLLECT, "progress=false", "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
             "agent_name=my_agent", f"head_server_url={head.url}", "connect_timeout_s=60"],
            cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert asked.wait(WAIT_S)
        proc.send_signal(sig)
        output = proc.communicate(timeout=WAIT_S)[0].decode()
    assert proc.returncode == EXIT_INTERRUPTED, output
    assert "Traceback" not in output and f"Interrupted by {sig.name} during start-up" in output
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "out_run.lock").exists()


def test_a_signal_while_the_last_rollout_is_in_flight_still_ends_complete(tmp_path: Path,
                                                                           clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(5))
    pid: list[int] = []
    seen = []

    async def signal_on_last(request: web.Request) -> web.Response:
        seen.append(1)
        if len(seen) == 5:
            os.kill(pid[0], signal.SIGTERM)
            await asyncio.sleep(0.2)  # the answer arrives after the signal
        return await echo_rollout(request)

    with LoopbackServer({"POST /run": signal_on_last}) as server:
        proc = subprocess.Popen(
            [COLLECT, "progress=false", "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
             f"agent_url={server.url}", "num_samples_in_parallel=1"],
            cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        pid.append(proc.pid)
        output = proc.communicate(timeout=WAIT_S)[0].decode()
    assert proc.returncode == EXIT_OK, output
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(t, 0) for t in range(5)]
    assert orjson.loads((tmp_path / "out_metrics.json").read_bytes())["rollouts"]["missing"] == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_aggregation_stops_it_and_keeps_the_runs_exit_code(tmp_path: Path, clean_env: dict[str, str],
                                                                          sig: signal.Signals) -> None:
    asked = threading.Event()

    async def never_answers(request: web.Request) -> web.Response:
        await request.read()
        asked.set()
        await asyncio.sleep(WAIT_S)
        return web.json_response({})

    write_rows(tmp_path / "in.jsonl", make_rows(5))
    with LoopbackServer({"POST /run": echo_rollout, "POST /aggregate_metrics": never_answers}) as server:
        proc = subprocess.Popen(
            [COLLECT, "progress=false", "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
             f"agent_url={server.url}", "aggregate_timeout_s=600"],
            cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert asked.wait(WAIT_S)
        proc.send_signal(sig)
        output = proc.communicate(timeout=WAIT_S)[0].decode()  # not the 600 s aggregate_timeout_s
    assert proc.returncode == EXIT_OK, output
    assert "Traceback" not in output and f"{sig.name} during aggregation: stopping it" in output
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(t, 0) for t in range(5)]
    assert orjson.loads((tmp_path / "out_metrics.json").read_bytes())["rollouts"]["missing"] == 0
    assert not (tmp_path / "out_aggregate_metrics.json").exists()
    with LoopbackServer({"POST /run": echo_rollout}) as server:  # no /aggregate_metrics: the local default
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                           f"agent_url={server.url}", "resume=true")
    assert code == EXIT_OK and server.requests.get("POST /run") is None, output
    assert orjson.loads((tmp_path / "out_aggregate_metrics.json").read_bytes())[0]["agent_metrics"]["mean/reward"]


# Expected comforts -----------------------------------------------------------------------------------------------

def test_dry_run_sends_nothing_and_writes_nothing(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", [*make_rows(4, agent_ref={"name": "sim_agent"}),
                                       *make_rows(2, agent_ref={"name": "other"})])
    with SimAgentThread(agent_names=("sim_agent", "other")) as sim:
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=o/out.jsonl",
                           f"head_server_url={sim.url}", "num_repeats=3", "dry_run=true")
        requests = sim.stats.requests
    assert code == EXIT_OK, output
    assert requests == 0
    assert files_under(tmp_path) == ["in.jsonl"]
    assert "rows [0, 6) of 6: 18 rollouts" in output
    assert "agent other: 6 rollouts" in output and "agent sim_agent: 12 rollouts" in output


def test_dry_run_tells_what_resume_would_skip(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(10))
    with SimAgentThread() as sim:
        args = ["input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl", f"agent_url={sim.url}"]
        assert cli(tmp_path, clean_env, *args, "end_idx=10")[0] == EXIT_OK
        before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
        code, output = cli(tmp_path, clean_env, *args, "end_idx=10", "resume=true", "dry_run=true")
        refusals = [cli(tmp_path, clean_env, *args, "end_idx=10", *extra, "dry_run=true")
                    for extra in (["resume=true", "num_repeats=2"], [], ["agent_url=http://127.0.0.1:9"])]
    assert code == EXIT_OK, output
    assert "Resume: 10 rollouts already written would be skipped, 0 that failed before would not be retried, " \
           "0 would be collected" in output
    # what the real run would refuse, the dry run says, with the exit code the real run would have
    assert [c for c, _ in refusals] == [EXIT_ERROR] * 3
    assert "Resume would be refused: resume refused: this run's definition differs" in refusals[0][1]
    assert "exists and is not empty: the run would be refused" in refusals[1][1]
    assert "(NOT reachable)" in refusals[2][1] and "The run would not start (exit code 2)" in refusals[2][1]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("dry_run", [["dry_run=true"], ["dry_run=on", "hydra/launcher=submitit_local"]])
def test_a_multirun_dry_run_merges_nothing_submits_nothing_and_writes_nothing(
        tmp_path: Path, clean_env: dict[str, str], dry_run: list[str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(6))
    with SimAgentThread() as sim:
        proc = subprocess.run([COLLECT, "-m", "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=o/r.jsonl",
                               f"agent_url={sim.url}", *dry_run, "num_shards=2", "shard_id=range(2)"],
                              cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120)
    code, output = proc.returncode, proc.stdout + proc.stderr
    assert code == EXIT_OK, output
    assert "Sweep ended with exit code 0" in output and "merged" not in output.lower()
    assert output.count("Dry run: nothing is sent and nothing is written.") == 2  # each job's plan, here
    assert files_under(tmp_path) == ["in.jsonl"]


async def test_agent_url_alone_sends_every_row_there(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(4))
    with LoopbackServer({"POST /run": echo_rollout}) as server:
        cfg = config(inp, tmp_path / "out.jsonl", server.url, agent_name=None)
        result = await collect(cfg)
    assert result.exit_code == EXIT_OK
    written = read_jsonl(tmp_path / "out.jsonl")
    assert sorted(pairs(written)) == [(t, 0) for t in range(4)]
    assert all("agent_ref" not in r for r in written)  # the tool invents no agent name


def test_side_files_have_the_outputs_mode(tmp_path: Path, clean_env: dict[str, str]) -> None:
    async def fail_first(request: web.Request) -> web.Response:
        body = await request.json()
        if body["_ng_task_index"] == 0:
            return web.json_response({"error": "bad row"}, status=400)
        return await echo_rollout(request)

    write_rows(tmp_path / "in.jsonl", make_rows(3))
    with LoopbackServer({"POST /run": fail_first}) as server:
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                           f"agent_url={server.url}")
    assert code == EXIT_FAILURES, output
    modes = {name: (tmp_path / name).stat().st_mode & 0o777
             for name in ("out.jsonl", "out_failures.jsonl", "out_metrics.json", "out_run.json", "out_status.json")}
    assert set(modes.values()) == {0o644}, modes


# Every user error is one line ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "expected"), [
    (["agent_url=localhost:8000"], "agent_url='localhost:8000' is not a server address"),
    (["agent_url=http://127.0.0.1:abc"], "not a server address"),
    (["agent_url=http://127.0.0.1:99999"], "not a server address"),
    (["output_jsonl_fpath=outdir"], "is a directory"),
    (["start_idx=50"], "has 5 rows, none in the selection"),
    (["input_jsonl_fpath=empty.jsonl"], "has no rows"),
    (["input_jsonl_fpath=missing.jsonl"], "input file not found"),
])
def test_user_errors_are_one_line(tmp_path: Path, clean_env: dict[str, str], args: list[str],
                                  expected: str) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(5))
    (tmp_path / "empty.jsonl").write_bytes(b"\n\n")
    (tmp_path / "outdir").mkdir()
    code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                       "agent_url=http://127.0.0.1:9", *args)
    assert code == EXIT_ERROR
    assert expected in one_error_line(output)


@pytest.mark.parametrize("entry", [{"host": "127.0.0.1", "port": "abc"}, {"host": "127.0.0.1"}, {"port": 8000}])
def test_a_head_server_entry_without_a_usable_address_is_one_line(tmp_path: Path, clean_env: dict[str, str],
                                                                  entry: dict[str, Any]) -> None:
    document = {"my_agent": {"responses_api_agents": {"simple_agent": entry}}}

    async def head(request: web.Request) -> web.Response:
        return web.json_response(yaml.safe_dump(document))

    write_rows(tmp_path / "in.jsonl", make_rows(2))
    with LoopbackServer({"GET /global_config_dict_yaml": head}) as server:
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                           "agent_name=my_agent", f"head_server_url={server.url}")
    assert code == EXIT_ERROR
    assert "gives 'my_agent' no usable address" in one_error_line(output)


def test_a_head_server_that_never_answers_fails_within_the_connect_timeout(tmp_path: Path,
                                                                            clean_env: dict[str, str]) -> None:
    async def hang(request: web.Request) -> web.Response:
        await asyncio.sleep(WAIT_S)
        return web.json_response("{}")

    write_rows(tmp_path / "in.jsonl", make_rows(2))
    with LoopbackServer({"GET /global_config_dict_yaml": hang}) as server:
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                           "agent_name=my_agent", f"head_server_url={server.url}", "connect_timeout_s=1")
    assert code == EXIT_ERROR
    assert "did not answer within 1 s" in one_error_line(output)


@pytest.mark.parametrize("answer", ["404", "500", "html"])
def test_a_server_that_is_not_a_head_server_is_named_at_once(tmp_path: Path, clean_env: dict[str, str],
                                                            answer: str) -> None:
    async def wrong(request: web.Request) -> web.Response:
        if answer == "html":
            return web.Response(text="<html>a dashboard</html>", content_type="text/html")
        return web.Response(status=int(answer), text="no")

    write_rows(tmp_path / "in.jsonl", make_rows(2))
    with LoopbackServer({"GET /global_config_dict_yaml": wrong}) as server:
        code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                           "agent_name=my_agent", f"head_server_url={server.url}", "connect_timeout_s=30")
        asked = server.requests["GET /global_config_dict_yaml"]
    assert code == EXIT_ERROR and asked == 1  # asked once: it answered, so waiting would not help
    line = one_error_line(output)
    assert f"{server.url} is not a NeMo Gym head server" in line and "head_server_url=URL" in line


@pytest.mark.parametrize("source", ["fifo", "/dev/stdin"])
def test_an_input_that_is_not_a_regular_file_is_refused_at_start(tmp_path: Path, clean_env: dict[str, str],
                                                                 source: str) -> None:
    if source == "fifo":
        os.mkfifo(tmp_path / "in.jsonl")
        path = "in.jsonl"
    else:
        path = source
    code, output = cli(tmp_path, clean_env, f"input_jsonl_fpath={path}", "output_jsonl_fpath=out.jsonl",
                       "agent_url=http://127.0.0.1:9", stdin=subprocess.PIPE if source != "fifo" else None,
                       timeout=30)
    assert code == EXIT_ERROR
    assert "is not a regular file" in one_error_line(output)


@pytest.mark.parametrize("special", ["output_fifo", "output_link_to_device", "side_file_fifo", "side_file_dir"])
def test_an_output_path_that_is_not_a_file_is_refused_and_left_as_it_is(tmp_path: Path, clean_env: dict[str, str],
                                                                       special: str) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(2))
    target = tmp_path / ("out.jsonl" if special.startswith("output") else "out_failures.jsonl")
    if special.endswith("fifo"):
        os.mkfifo(target)
    elif special.endswith("dir"):
        target.mkdir()
    else:
        target.symlink_to("/dev/null")  # a regression would unlink the link, never the device
    kind = target.stat().st_mode
    code, output = cli(tmp_path, clean_env, "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
                       "agent_url=http://127.0.0.1:9", timeout=30)
    assert code == EXIT_ERROR
    assert "which a run would remove or replace" in one_error_line(output)
    assert target.stat().st_mode == kind and target.is_symlink() == special.endswith("device")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "outputs") == sorted(["in.jsonl", target.name])


async def test_merge_refuses_an_output_that_is_not_a_file(tmp_path: Path, sim: SimAgent) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(2))
    assert (await collect(config(inp, tmp_path / "shard.jsonl", sim.url))).exit_code == EXIT_OK
    os.mkfifo(tmp_path / "merged.jsonl")
    proc = await asyncio.to_thread(
        subprocess.run, [str(Path(sys.executable).parent / "merge_rollouts"), "-o", "merged.jsonl", "shard.jsonl",
                         "--no-aggregation"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "merged.jsonl is a pipe" in proc.stderr
    assert (tmp_path / "merged.jsonl").is_fifo()


async def test_an_output_of_the_same_stem_keeps_its_side_files(tmp_path: Path, sim: SimAgent) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(3))
    first, second = tmp_path / "x" / "rollouts", tmp_path / "x" / "rollouts.json"
    assert (await collect(config(inp, first, sim.url))).exit_code == EXIT_OK
    before = {p.name: p.read_bytes() for p in first.parent.iterdir() if p.name != "rollouts_status.json"}
    with pytest.raises(OutputError, match=r"side files \(rollouts_\*\) belong to .*x/rollouts, an output of the same"):
        await collect(config(inp, second, sim.url))
    after = {p.name: p.read_bytes() for p in first.parent.iterdir() if p.name != "rollouts_status.json"}
    assert after == before and not second.exists()
    first.unlink()  # its owner gone, the side files are stale: the other output may take them
    assert (await collect(config(inp, second, sim.url))).exit_code == EXIT_OK


async def test_resume_over_a_line_whose_agent_ref_is_null(tmp_path: Path, sim: SimAgent) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(3))
    out = tmp_path / "out.jsonl"
    assert (await collect(config(inp, out, sim.url))).exit_code == EXIT_OK
    lines = read_jsonl(out)
    lines[0]["agent_ref"] = None
    out.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in lines[:2]))
    result = await collect(config(inp, out, sim.url, resume=True))
    assert result.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(out))) == [(0, 0), (1, 0), (2, 0)]


async def test_an_empty_shard_is_not_an_error(tmp_path: Path, sim: SimAgent) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(2))
    result = await collect(config(inp, tmp_path / "out.jsonl", sim.url, num_shards=4, shard_id=0))
    assert result.exit_code == EXIT_OK
    with pytest.raises(InputError, match="none in the selection"):
        await collect(config(inp, tmp_path / "b.jsonl", sim.url, start_idx=2))
    with pytest.raises(InputError, match="none in the selection"):  # a refused run leaves no empty folders
        await collect(config(inp, tmp_path / "new" / "sub" / "c.jsonl", sim.url, start_idx=2))
    assert not (tmp_path / "new").exists()


async def test_a_status_file_that_cannot_be_written_is_a_warning_not_the_end_of_the_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(20))
    status = tmp_path / "out_status.json"

    async def block_the_status_file_then_answer(request: web.Request) -> web.Response:
        if not status.is_dir():
            status.unlink(missing_ok=True)
            status.mkdir()  # a directory where the status file goes: every later write fails
        return await echo_rollout(request)

    with LoopbackServer({"POST /run": block_the_status_file_then_answer}) as server:
        result = await collect(config(inp, tmp_path / "out.jsonl", server.url, status_every_s=0.01))
    assert result.exit_code == EXIT_OK
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == [(t, 0) for t in range(20)]
    warnings = [r for r in caplog.records if "out_status.json" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"


def test_one_ctrl_c_stops_a_whole_sweep_not_just_its_running_job(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(30))
    gate = Gate()
    with LoopbackServer({"POST /run": gate.run}) as server:
        proc = subprocess.Popen(
            [COLLECT, "-m", "progress=false", "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl",
             f"agent_url={server.url}", "num_shards=3", "shard_id=range(3)", "num_samples_in_parallel=2"],
            cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert gate.arrived.wait(WAIT_S)
            proc.send_signal(signal.SIGINT)
        finally:
            gate.release.set()
            output, _ = proc.communicate(timeout=WAIT_S)
        asked = server.requests["POST /run"]
    text = output.decode()
    assert proc.returncode == EXIT_INTERRUPTED, text
    assert text.count("Not started: SIGINT interrupted an earlier job of this sweep") == 2, text
    assert asked <= 10  # the first shard's rows only: the other two never started
    assert not (tmp_path / "out_shard-1-of-3.jsonl").exists() and not (tmp_path / "out_shard-2-of-3.jsonl").exists()
