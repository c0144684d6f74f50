"""The real NeMo Gym 0.7.0 server stack on 127.0.0.1, started with `gym env start` and stopped on every path.

What it takes to run here (Python 3.11, no uv, no Ray; see `README.md` beside this file):
- one prebuilt venv for every server: `+skip_venv_if_present=true +uv_venv_dir=DIR` makes NeMo Gym look for
  `DIR/<server type>/<server dir>/.venv` (`nemo_gym/cli/setup_command.py`, `get_venv_path`), each a symlink here;
- the no-Ray shim (`shim/sitecustomize.py`) on `PYTHONPATH`, switched on by an environment variable;
- `PYTHONUNBUFFERED` unset and `+uvicorn_logging_show_200_ok=true`, so every server's log
  (`+nemo_gym_log_dir`, one file per server instance) holds one whole access line per request: that is how the
  suite tells which server received each `POST /run` and `POST /aggregate_metrics`;
- the model server (`openai_model`) pointed at the stub through `env.yaml` in the stack's working directory.

Lifetime: `supervisor.py` owns the process group, stops it when asked, when the test process dies (its stdin pipe
closes) or after `max_lifetime_s`. Readiness is `GET /readyz` on the head server (503 until every server is up).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml

HERE = Path(__file__).resolve().parent
SUPERVISOR = HERE / "supervisor.py"
SHIM_DIR = HERE / "shim"
NO_RAY_ENV = "GYM_COLLECT_CONFORMANCE_NO_RAY"
SERVER_TYPES = ("resources_servers", "responses_api_agents", "responses_api_models", "environment_servers")
# Config files inside the NeMo Gym wheel (paths relative to its site-packages).
DEFAULT_CONFIGS: tuple[str, ...] = (
    "resources_servers/example_single_tool_call/configs/example_single_tool_call.yaml",
    "resources_servers/example_single_tool_call/configs/example_single_tool_call_single_agent_turn.yaml",
    "resources_servers/example_multi_turn_gymnasium/configs/example_multi_turn_gymnasium.yaml",
    "responses_api_models/openai_model/configs/openai_model.yaml",
)
# Head server ports are drawn above NeMo Gym's server range and below Linux's ephemeral range. The servers' range is
# NeMo Gym's default (10001-20000) minus the ports around 11000, NeMo Gym's default head port, which other tests and
# people's own stacks on the same machine use.
HEAD_PORT_RANGE = (21000, 29999)
SERVER_PORT_RANGE = (12001, 20000)
# Requests whose receivers the suite records, by name: what the access log line holds.
TRACKED_REQUESTS = {"run": '"POST /run HTTP/1.1"', "aggregate_metrics": '"POST /aggregate_metrics HTTP/1.1"'}


class StackError(RuntimeError):
    """The stack did not come up; the message points at its log."""


@dataclass(frozen=True)
class Server:
    """One server instance of the running stack, from the head server's document."""

    name: str  # top-level instance name, e.g. "example_single_tool_call_environment_server"
    type: str  # one of SERVER_TYPES
    impl: str  # implementation directory, e.g. "legacy_agent"
    host: str
    port: int

    @property
    def url(self) -> str:
        """`http://host:port`."""
        return f"http://{self.host}:{self.port}"


def site_packages(venv: Path) -> Path:
    """The NeMo Gym venv's site-packages (where the wheel puts `nemo_gym/` and the servers)."""
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def server_dirs(root: Path, config_paths: tuple[str, ...]) -> set[tuple[str, str]]:
    """(server type, implementation dir) of every server the config files (and their `config_paths`) declare."""
    found: set[tuple[str, str]] = set()
    pending, seen = list(config_paths), set()
    while pending:
        rel = pending.pop()
        if rel in seen:
            continue
        seen.add(rel)
        doc = yaml.safe_load((root / rel).read_text()) or {}
        pending.extend(doc.get("config_paths") or [])
        for block in doc.values():
            if isinstance(block, dict):
                for server_type, impls in block.items():
                    if server_type in SERVER_TYPES and isinstance(impls, dict):
                        found.update((server_type, impl) for impl in impls)
    return found


def free_head_port() -> int:
    """A port in `HEAD_PORT_RANGE` that 127.0.0.1 can bind right now (random, so parallel runs rarely meet)."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(*HEAD_PORT_RANGE)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise StackError(f"no free port in {HEAD_PORT_RANGE}")


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    """(status, body) of a GET; connection errors raise `OSError`."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class NemoGymStack:
    """`with NemoGymStack(venv, workdir, model_base_url) as stack:` the real NeMo Gym servers, ready.

    `workdir` receives `env.yaml`, the venv symlinks, `stack.log` (everything `gym env start` prints) and `logs/`
    (one log per server instance). `servers` maps instance name to `Server`; `head_url` is the head server.

    Raises:
        StackError: the stack exited or was not ready within `ready_timeout_s` (the last log lines are included).
    """

    def __init__(self, venv: Path, workdir: Path, model_base_url: str, configs: tuple[str, ...] = DEFAULT_CONFIGS,
                 max_lifetime_s: float = 3600.0, ready_timeout_s: float = 300.0) -> None:
        self.venv = venv
        self.workdir = workdir
        self.model_base_url = model_base_url
        self.configs = configs
        self.max_lifetime_s = max_lifetime_s
        self.ready_timeout_s = ready_timeout_s
        self.head_port = 0
        self.servers: dict[str, Server] = {}
        self.startup_s = 0.0
        self._supervisor: subprocess.Popen[bytes] | None = None
        self._log_offsets: dict[str, int] = {}
        self._marker = 0

    @property
    def head_url(self) -> str:
        """`http://127.0.0.1:PORT` of the head server."""
        return f"http://127.0.0.1:{self.head_port}"

    @property
    def log(self) -> Path:
        """Everything `gym env start` and its servers print."""
        return self.workdir / "stack.log"

    @property
    def log_dir(self) -> Path:
        """One `<instance>.log` per server instance (`+nemo_gym_log_dir`)."""
        return self.workdir / "logs"

    def environment(self) -> dict[str, str]:
        """The stack's environment: the no-Ray shim on, unbuffered output off, the NeMo venv first on PATH."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONUNBUFFERED", "PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("PYTEST_")}
        env[NO_RAY_ENV] = "1"
        env["PYTHONPATH"] = str(SHIM_DIR)
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        env["VIRTUAL_ENV"] = str(self.venv)
        return env

    def _prepare(self) -> Path:
        """Write `env.yaml` and the per-server venv symlinks; return the `uv_venv_dir`."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(exist_ok=True)
        (self.workdir / "env.yaml").write_text(yaml.safe_dump({
            "policy_base_url": self.model_base_url, "policy_api_key": "dummy", "policy_model_name": "stub"}))
        venvs = self.workdir / "venvs"
        for server_type, impl in sorted(server_dirs(site_packages(self.venv), self.configs)):
            link = venvs / server_type / impl / ".venv"
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                link.symlink_to(self.venv, target_is_directory=True)
        return venvs

    def command(self, venvs: Path) -> list[str]:
        """The `gym env start` command line."""
        return [str(self.venv / "bin" / "gym"), "env", "start", f"+config_paths=[{','.join(self.configs)}]",
                "+head_server.host=127.0.0.1", f"+head_server.port={self.head_port}", "+default_host=127.0.0.1",
                "+skip_venv_if_present=true", f"+uv_venv_dir={venvs}", "+uvicorn_logging_show_200_ok=true",
                f"+nemo_gym_log_dir={self.log_dir}", f"+port_range_low={SERVER_PORT_RANGE[0]}",
                f"+port_range_high={SERVER_PORT_RANGE[1]}"]

    def _tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> None:
        """Start the stack and wait until `/readyz` answers 200; see the class docstring for errors."""
        started = time.monotonic()
        venvs = self._prepare()
        self.head_port = free_head_port()
        self._supervisor = subprocess.Popen(
            [sys.executable, str(SUPERVISOR), "--max-lifetime-s", str(self.max_lifetime_s), "--grace-s", "20",
             "--log", str(self.log), "--cwd", str(self.workdir), "--", *self.command(venvs)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=self.environment())
        assert self._supervisor.stdout is not None
        self._supervisor.stdout.readline()  # the command's pid: the supervisor has started it
        deadline = started + self.ready_timeout_s
        while True:
            if self._supervisor.poll() is not None:
                raise StackError(f"gym env start exited early; {self.log}:\n{self._tail()}")
            try:
                status, _ = http_get(f"{self.head_url}/readyz", timeout_s=2.0)
            except OSError:
                status = 0
            if status == 200:
                break
            if time.monotonic() > deadline:
                raise StackError(f"not ready within {self.ready_timeout_s} s; {self.log}:\n{self._tail()}")
            time.sleep(0.5)  # bounded readiness poll of an external process
        self.servers = self._load_servers()
        self.startup_s = time.monotonic() - started
        self._log_offsets = {name: self._server_log(name).stat().st_size if self._server_log(name).exists() else 0
                             for name in self.servers}

    def head_document(self) -> dict[str, Any]:
        """The head server's `GET /global_config_dict_yaml`, decoded (a JSON string holding YAML). Holds secrets in
        real deployments: keep it in memory only."""
        status, body = http_get(f"{self.head_url}/global_config_dict_yaml")
        if status != 200:
            raise StackError(f"head server answered {status} to /global_config_dict_yaml")
        loaded = yaml.safe_load(json.loads(body))
        assert isinstance(loaded, dict)
        return loaded

    def _load_servers(self) -> dict[str, Server]:
        servers = {}
        for name, block in self.head_document().items():
            if not isinstance(block, dict) or len(block) != 1:
                continue
            server_type, impls = next(iter(block.items()))
            if server_type not in SERVER_TYPES or not isinstance(impls, dict) or len(impls) != 1:
                continue
            impl, cfg = next(iter(impls.items()))
            if isinstance(cfg, dict) and cfg.get("port"):
                servers[name] = Server(name, server_type, impl, str(cfg["host"]), int(cfg["port"]))
        return servers

    def _server_log(self, name: str) -> Path:
        return self.log_dir / f"{name.replace('/', '_')}.log"

    def take_request_counts(self, timeout_s: float = 30.0) -> dict[str, Counter[str]]:
        """Per `TRACKED_REQUESTS` name, how many of those requests each server instance received since the last call
        (instances with none omitted). The model server is not tracked.

        Access lines can trail the responses they log, so each server first gets a marker request, and the lines are
        read up to that marker: every request answered before this call is counted, none twice.
        """
        self._marker += 1
        marker = f"/conformance-marker-{self._marker}"
        tracked = [s for s in self.servers.values() if s.type != "responses_api_models"]
        for server in tracked:
            http_get(f"{server.url}{marker}")  # 404, logged like any request
        counts: dict[str, Counter[str]] = {name: Counter() for name in TRACKED_REQUESTS}
        deadline = time.monotonic() + timeout_s
        for server in tracked:
            path = self._server_log(server.name)
            start = self._log_offsets.get(server.name, 0)
            while True:
                data = path.read_bytes()[start:] if path.exists() else b""
                end = data.find(f"GET {marker} ".encode())
                if end >= 0:
                    break
                if time.monotonic() > deadline:
                    raise StackError(f"marker {marker} never reached {path}")
                time.sleep(0.05)  # the server's log is written by another process
            line_end = data.find(b"\n", end)
            consumed = data[: line_end + 1 if line_end >= 0 else len(data)]
            self._log_offsets[server.name] = start + len(consumed)
            text = consumed.decode(errors="replace")
            for name, line in TRACKED_REQUESTS.items():
                if text.count(line):
                    counts[name][server.name] = text.count(line)
        return counts

    def stop(self) -> None:
        """Ask the supervisor to stop the stack and wait for it (it SIGKILLs the group after its grace period)."""
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is None:
            return
        stdin: IO[bytes] | None = supervisor.stdin
        if stdin is not None:
            try:
                stdin.write(b"stop\n")
                stdin.close()
            except BrokenPipeError:
                pass
        try:
            supervisor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            supervisor.kill()
            supervisor.wait()
        if supervisor.stdout is not None:
            supervisor.stdout.close()

    def __enter__(self) -> NemoGymStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
