"""Shard sweeps under Hydra's launchers, run as a user would: the real console script, agents on 127.0.0.1.

`collect_rollouts -m hydra/launcher=L num_shards=4 'shard_id=range(4)' ...` must end with one merged output
holding every (task, rollout) exactly once, exit with the highest job exit code, merge nothing when a shard
failed, keep secrets out of every file and console line, and finish after a shard was killed and the sweep
rerun. The Ray launcher's tests are marked `ray` (pytest -m ray, with the `ray` extra installed).
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest
from aiohttp import web

from gym_collect.sim_agent import SimAgentConfig, SimAgentThread
from tests.conftest import REPO, make_rows, pairs, read_jsonl, write_rows

COLLECT = str(Path(sys.executable).parent / "collect_rollouts")
ROWS, REPEATS, SHARDS = 40, 2, 4
ALL_PAIRS = sorted((t, r) for t in range(ROWS) for r in range(REPEATS))
HEADER_SECRET = "tok en-7f3a9c=/+,x"  # a space, a comma and '=': Hydra escapes such values in its files
URL_USER, URL_PASSWORD = "collector", "pw-51d0e8b2"
RAY_ARGS = ("hydra/launcher=ray", "+hydra.launcher.ray.init.include_dashboard=false",
            "+hydra.launcher.ray.init._node_ip_address=127.0.0.1", "+hydra.launcher.ray.init.num_cpus=2",
            "+hydra.launcher.ray.remote.max_retries=0")
FAKE_SLURM = REPO / "tests" / "fake_slurm"  # sbatch, srun, sacct, ... that run jobs on this machine
LAUNCHERS = {
    "basic": (),
    "slurm": ("hydra/launcher=submitit_slurm", "hydra.launcher.partition=cpu", "hydra.launcher.timeout_min=10"),
    "submitit_local": ("hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5"),
    "joblib": ("hydra/launcher=joblib", "hydra.launcher.n_jobs=2"),
    "ray": RAY_ARGS,
}
FAST = [pytest.param(name) for name in ("basic", "submitit_local", "joblib", "slurm")]
ALL = [*FAST, pytest.param("ray", marks=pytest.mark.ray)]


def fake_slurm_env(env: dict[str, str], state: Path) -> dict[str, str]:
    """`env` with the fake Slurm commands first on PATH, keeping their state in `state`."""
    return {**env, "PATH": f"{FAKE_SLURM}{os.pathsep}{env['PATH']}", "FAKE_SLURM_STATE": str(state)}


def sweep(cwd: Path, env: dict[str, str], launcher: str, *args: str,
          timeout_s: float = 240) -> subprocess.CompletedProcess[str]:
    """Run one shard sweep of `in.jsonl` into `out/r.jsonl` and return the finished process (under
    `slurm`, through the fake Slurm commands)."""
    if launcher == "slurm":
        env = fake_slurm_env(env, cwd / "slurm_state")
    cmd = [COLLECT, "-m", *LAUNCHERS[launcher], f"num_shards={SHARDS}", f"shard_id=range({SHARDS})",
           "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out/r.jsonl", f"num_repeats={REPEATS}",
           "progress=false", "connect_timeout_s=2", "backoff_initial_s=0.01", "backoff_max_s=0.05", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout_s)


def shard_files(cwd: Path) -> list[Path]:
    return [cwd / "out" / f"r_shard-{k:02d}-of-{SHARDS:02d}.jsonl" for k in range(SHARDS)]


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def everything_written(root: Path, *streams: str) -> str:
    """Every file under `root` (pickles included, decoded leniently) and the given console output."""
    files = (p.read_bytes().decode("utf-8", errors="replace") for p in root.rglob("*") if p.is_file())
    return "".join([*streams, *files])


@pytest.mark.parametrize("launcher", ALL)
def test_shard_sweep_merges_every_rollout_once_and_keeps_secrets_out(
    tmp_path: Path, clean_env: dict[str, str], launcher: str
) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(ROWS))
    with SimAgentThread(SimAgentConfig(capacity=16, service_time_s=0.002)) as sim:
        url = sim.url.replace("http://", f"http://{URL_USER}:{URL_PASSWORD}@")
        started = time.monotonic()
        proc = sweep(tmp_path, clean_env, launcher, "agent_name=sim_agent", f"agent_url={url}",
                     f"headers.X-Api-Key='{HEADER_SECRET}'", "num_samples_in_parallel=4")
        wall_s = time.monotonic() - started
        served = sum(sim.stats.succeeded.values())
        auth = set(sim.stats.authorization_values)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    merged = read_jsonl(tmp_path / "out" / "r.jsonl")
    assert sorted(pairs(merged)) == ALL_PAIRS
    assert served == len(ALL_PAIRS)
    metrics = orjson.loads((tmp_path / "out" / "r_metrics.json").read_bytes())
    assert metrics["rollouts"]["succeeded"] == len(ALL_PAIRS) and len(metrics["shards"]) == SHARDS
    # the jobs resolved both secrets from the environment they inherited ...
    assert auth == {"Basic " + base64.b64encode(f"{URL_USER}:{URL_PASSWORD}".encode()).decode()}
    # ... and neither is in any file of the run folder or any console line, in any escaped form
    seen = everything_written(tmp_path, proc.stdout, proc.stderr)
    for secret in (HEADER_SECRET, "tok en-7f3a9c", "7f3a9c", URL_PASSWORD):
        assert secret not in seen, f"{secret!r} leaked"
    assert (tmp_path / "multirun").is_dir() and list((tmp_path / "multirun").rglob("overrides.yaml"))
    print(f"{launcher}: {SHARDS} shards, {len(ALL_PAIRS)} rollouts, sweep wall time {wall_s:.1f} s")


@pytest.mark.parametrize("launcher", ALL)
def test_unreachable_agent_of_one_shard_exits_2_and_merges_nothing(
    tmp_path: Path, clean_env: dict[str, str], launcher: str
) -> None:
    per_shard = ROWS // SHARDS
    rows = [dict(r, agent_ref={"name": "dead" if i // per_shard == 2 else "sim_agent"})
            for i, r in enumerate(make_rows(ROWS))]
    write_rows(tmp_path / "in.jsonl", rows)
    with SimAgentThread(SimAgentConfig(service_time_s=0.001)) as sim:
        proc = sweep(tmp_path, clean_env, launcher, f"agents.sim_agent={sim.url}",
                     f"agents.dead=http://127.0.0.1:{closed_port()}")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert not (tmp_path / "out" / "r.jsonl").exists()
    assert "Nothing merged" in out and "shards 2 (exit 2) of 4 did not finish" in out
    assert "'shard_id=2' resume=true" in out
    assert "Traceback" not in out
    for k in (0, 1, 3):  # the other shards finished: a rerun only checks them
        assert len(read_jsonl(shard_files(tmp_path)[k])) == per_shard * REPEATS


class HoldingAgent:
    """An agent server on 127.0.0.1 in a thread: `POST /run` answers the row with a reward, except for tasks
    in `hold`, whose requests wait until the client goes away. `held` is set when the first one arrives;
    `held_ports` are the client ports of those requests."""

    def __init__(self, hold: set[int]) -> None:
        self.hold = hold
        self.held = threading.Event()
        self.held_ports: list[int] = []
        self.answered: dict[tuple[int, int], int] = {}
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self.url = ""
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    async def _run(self, request: web.Request) -> web.Response:
        row: dict[str, Any] = await request.json()
        key = (row["_ng_task_index"], row["_ng_rollout_index"])
        if key[0] in self.hold:
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.held_ports.append(int(peer[1]) if peer else -1)
            self.held.set()
            assert self._stop is not None
            await self._stop.wait()
        self.answered[key] = self.answered.get(key, 0) + 1
        return web.json_response({**row, "reward": 1.0})

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        app.router.add_post("/run", self._run)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> HoldingAgent:
        self._thread.start()
        assert self._ready.wait(10), "agent did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def process_with_client_port(root: psutil.Process, port: int) -> psutil.Process:
    """The process under `root` that owns the TCP connection whose local port is `port`."""
    for proc in root.children(recursive=True):
        try:
            if any(c.laddr and c.laddr.port == port for c in proc.net_connections(kind="tcp")):
                return proc
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no process under {root.pid} has a connection from port {port}")


@pytest.mark.parametrize(("signum", "sweep_code", "shard_says"), [
    (signal.SIGKILL, 1, "1 (no exit code)"),  # the job dies: submitit reports it lost, the sweep exits 1
    (signal.SIGTERM, 130, "1 (exit 130)"),  # the job stops cleanly: its own code, exactly
])
def test_killed_shard_then_rerun_merges_every_rollout_once(
    tmp_path: Path, clean_env: dict[str, str], signum: int, sweep_code: int, shard_says: str
) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(ROWS))
    cmd = [COLLECT, "-m", *LAUNCHERS["submitit_local"], f"num_shards={SHARDS}", f"shard_id=range({SHARDS})",
           "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out/r.jsonl", f"num_repeats={REPEATS}",
           "progress=false", "agent_name=sim_agent", "num_samples_in_parallel=2", "resume=true",
           "shutdown_grace_s=0.2"]
    with HoldingAgent(hold={15}) as agent:  # task 15 is in shard 1 (rows 10-19)
        first = subprocess.Popen([*cmd, f"agent_url={agent.url}"], cwd=tmp_path, env=clean_env, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            assert agent.held.wait(120), "shard 1 never reached task 15"
            victim = process_with_client_port(psutil.Process(first.pid), agent.held_ports[0])
            leftovers = [p for p in psutil.Process(first.pid).children(recursive=True) if p.pid != victim.pid]
            victim.send_signal(signum)
            out, _ = first.communicate(timeout=120)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
        psutil.wait_procs(leftovers, timeout=120)  # jobs the aborted sweep left running end on their own
        assert first.returncode == sweep_code, out
        assert not (tmp_path / "out" / "r.jsonl").exists()
        assert "Nothing merged" in out and f"shards {shard_says} of 4" in out and "resume=true" in out
        assert "Traceback" not in out
        partial = read_jsonl(shard_files(tmp_path)[1])
        assert 0 < len(partial) < (ROWS // SHARDS) * REPEATS  # killed mid-run
        agent.hold.clear()
        second = subprocess.run([*cmd, f"agent_url={agent.url}"], cwd=tmp_path, env=clean_env, text=True,
                                capture_output=True, timeout=240)
    assert second.returncode == 0, second.stdout + second.stderr
    merged = pairs(read_jsonl(tmp_path / "out" / "r.jsonl"))
    assert sorted(merged) == ALL_PAIRS  # every (task, rollout) exactly once
    assert "Merged 4 shards" in second.stdout + second.stderr


def test_job_exit_code_is_the_highest_of_the_sweep(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """Exit 3 (some rollouts failed) from one job and 0 from the other: the sweep exits 3, exactly, and a
    shard set whose shards all finished is merged with its failures."""
    write_rows(tmp_path / "in.jsonl", make_rows(ROWS))
    with SimAgentThread(SimAgentConfig(service_time_s=0.001, fail_status=None)) as good, \
            SimAgentThread(SimAgentConfig(service_time_s=0.001, fail_status=400)) as bad:
        proc = subprocess.run(
            [COLLECT, "-m", *LAUNCHERS["submitit_local"], "input_jsonl_fpath=in.jsonl", "agent_name=sim_agent",
             f"agent_url={good.url},{bad.url}", "output_jsonl_fpath=out/${hydra:job.num}.jsonl", "progress=false",
             "max_attempts=1"],
            cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert len(read_jsonl(tmp_path / "out" / "0.jsonl")) == ROWS
    assert "Sweep ended with exit code 3" in proc.stdout + proc.stderr


@pytest.fixture
def hydra_cli(tmp_path: Path, clean_env: dict[str, str]) -> Iterator[Any]:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([COLLECT, *args], cwd=tmp_path, env=clean_env, capture_output=True, text=True,
                              timeout=120)
    yield run


def test_launcher_and_logging_groups_and_hydra_flags_pass(hydra_cli: Any) -> None:
    proc = hydra_cli("hydra/launcher=submitit_local", "hydra/job_logging=disabled", "--cfg", "hydra")
    assert proc.returncode == 0, proc.stderr
    assert "LocalLauncher" in proc.stdout and "name: collect_rollouts" in proc.stdout
    info = hydra_cli("--info", "plugins")
    assert info.returncode == 0 and "submitit" in info.stdout.lower(), info.stderr
    completion = hydra_cli("-sc", "install=bash")
    assert completion.returncode == 0 and "complete" in completion.stdout, completion.stderr
    typo = hydra_cli("hydra/lancher=submitit_local")
    assert typo.returncode == 2 and "did you mean 'hydra/launcher'" in typo.stderr


def test_cfg_output_holds_no_secret(hydra_cli: Any) -> None:
    for flags in (("--cfg", "job"), ("--cfg", "all", "--resolve")):
        proc = hydra_cli(*flags, f'headers.Authorization="Bearer {HEADER_SECRET}"',
                         f"agent_url=http://{URL_USER}:{URL_PASSWORD}@127.0.0.1:9")
        assert proc.returncode == 0, proc.stderr
        assert "headers" in proc.stdout
        for secret in ("7f3a9c", URL_PASSWORD):
            assert secret not in proc.stdout + proc.stderr, (flags, proc.stdout)


@pytest.mark.parametrize(("name", "launcher"), [
    ("slurm", "SlurmLauncher"),
    pytest.param("ray_local", "RayLauncher", marks=pytest.mark.ray),
    pytest.param("ray_cluster", "RayLauncher", marks=pytest.mark.ray)])
def test_presets_compose(hydra_cli: Any, name: str, launcher: str) -> None:
    proc = hydra_cli("--config-dir", str(REPO / "configs"), "--config-name", name, "--cfg", "all")
    assert proc.returncode == 0, proc.stderr
    assert launcher in proc.stdout and "resume: true" in proc.stdout


def test_tune_parallelism_job_name(tmp_path: Path, clean_env: dict[str, str]) -> None:
    proc = subprocess.run([str(Path(COLLECT).with_name("tune_parallelism")), "--cfg", "hydra"], cwd=tmp_path,
                          env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "name: tune_parallelism" in proc.stdout, proc.stderr

