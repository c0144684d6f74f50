"""Helpers of `scripts/bench.py`: the simulated agent in its own process, child processes measured with
`os.wait4` and psutil, input files, the collector's and the baseline's command lines, machine facts.

Measuring a child: CPU seconds (user + system) and peak RSS (`ru_maxrss`, the kernel's high-water mark,
same as `VmHWM`) come from `os.wait4` on the child itself, so they cover its whole life and nothing else
(the simulated agent is a separate process). While it runs, the child is sampled every `POLL_S` with
psutil (RSS, CPU) together with the size of its output file, which gives the steady-state CPU per rollout
(start-up and shutdown excluded) and the time to its first output byte.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import os
import platform
import select
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson
import psutil

REPO = Path(__file__).resolve().parents[1]
REAL_ROWS = Path(os.environ.get(
    "BENCH_REAL_ROWS", REPO / "tests" / "data" / "nemo_gym_datasets" / "ns_tools__compmath_test.jsonl"))
FALLBACK_ROWS = REPO / "data" / "example.jsonl"

POLL_S = 0.02
MB = 1024 * 1024
SIM_START_TIMEOUT_S = 30.0


def real_rows_source() -> Path:
    """The real NeMo Gym rows replicated by `write_real_rows`: `REAL_ROWS`, else the repo's example rows."""
    return REAL_ROWS if REAL_ROWS.exists() else FALLBACK_ROWS


@dataclass
class Sample:
    """One poll of a running child: seconds since spawn, CPU seconds so far, RSS and output bytes."""

    t_s: float
    cpu_s: float
    rss_bytes: int
    output_bytes: int


@dataclass
class ChildRun:
    """How a child process ran: exit code, wall time, CPU, peak RSS, and the samples taken while it ran."""

    exit_code: int
    wall_s: float
    user_s: float
    system_s: float
    peak_rss_bytes: int
    spawned_at: float  # time.time() just before the spawn
    samples: list[Sample] = field(default_factory=list)
    log: str = ""

    @property
    def cpu_s(self) -> float:
        """User + system CPU seconds of the child over its whole life."""
        return self.user_s + self.system_s

    @property
    def peak_rss_mb(self) -> float:
        """Peak resident set size in MiB (kernel high-water mark)."""
        return self.peak_rss_bytes / MB

    @property
    def polled_peak_rss_mb(self) -> float:
        """The largest RSS seen by polling, in MiB (a lower bound of `peak_rss_mb`)."""
        return max((s.rss_bytes for s in self.samples), default=0) / MB

    def first_output_s(self) -> float | None:
        """Seconds from spawn to the first sample that saw output bytes (None if none did)."""
        return next((s.t_s for s in self.samples if s.output_bytes > 0), None)

    def steady_cpu_per_row_s(self, rows: int) -> float | None:
        """CPU seconds per row between the first and the last sample that saw output growing, rows
        estimated from output bytes (rows of equal size); None when too few samples saw output."""
        final = max((s.output_bytes for s in self.samples), default=0)
        growing = [s for s in self.samples if s.output_bytes > 0]
        if final == 0 or len(growing) < 3:
            return None
        first = growing[0]
        last = next(s for s in growing if s.output_bytes == final)
        done = rows * (last.output_bytes - first.output_bytes) / final
        return (last.cpu_s - first.cpu_s) / done if done > 0 else None


def run_child(
    cmd: Sequence[str], *, cwd: Path, log_path: Path, watch: Path | None = None, timeout_s: float = 1800.0,
    env: dict[str, str] | None = None,
) -> ChildRun:
    """Run `cmd` to completion, stdout and stderr to `log_path`, sampling it every `POLL_S`.

    `watch`: a file whose size is sampled (the child's output). Raises `TimeoutError` (after killing the
    child) when it runs longer than `timeout_s`.
    """
    samples: list[Sample] = []
    with log_path.open("wb") as log:
        spawned_at = time.time()
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        ps = psutil.Process(proc.pid)
        try:
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                with contextlib.suppress(psutil.Error):
                    cpu = ps.cpu_times()
                    samples.append(Sample(time.monotonic() - start, cpu.user + cpu.system, ps.memory_info().rss,
                                          _size(watch)))
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError(f"{cmd[:3]} ran longer than {timeout_s:.0f} s; see {log_path}")
                time.sleep(POLL_S)
        except BaseException:
            proc.kill()
            os.wait4(proc.pid, 0)
            proc.returncode = -9
            raise
    wall_s = time.monotonic() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ChildRun(
        exit_code=proc.returncode, wall_s=wall_s, user_s=usage.ru_utime, system_s=usage.ru_stime,
        peak_rss_bytes=usage.ru_maxrss * 1024, spawned_at=spawned_at, samples=samples,
        log=log_path.read_text(errors="replace"),
    )


def _size(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class SimServer:
    """`python -m gym_collect.sim_agent --port 0 ...` in its own process; `url` once entered.

    `flags` are the sim's options without dashes (`capacity=64`, `service_time_s=0.1`; booleans as
    `--x`/`--no-x`, None as `none`); `agent_names` are the agents its head document names. Raises
    `RuntimeError` when it does not print its listening line within `SIM_START_TIMEOUT_S`.
    """

    def __init__(self, log_path: Path, agent_names: Sequence[str] = (), **flags: Any) -> None:
        self.cmd = [sys.executable, "-m", "gym_collect.sim_agent", "--port", "0"]
        for name in agent_names:
            self.cmd += ["--agent-name", name]
        for name, value in flags.items():
            flag = name.replace("_", "-")
            if isinstance(value, bool):
                self.cmd.append(f"--{flag}" if value else f"--no-{flag}")
            else:
                self.cmd += ["--" + flag, "none" if value is None else str(value)]
        self.log_path = log_path
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> SimServer:
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=log, cwd=REPO)
        assert self._proc.stdout is not None
        deadline = time.monotonic() + SIM_START_TIMEOUT_S
        line = b""
        while b"listening on " not in line:
            ready, _, _ = select.select([self._proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = self._proc.stdout.readline() if ready else b""
            if not ready or (not line and self._proc.poll() is not None):
                self.__exit__(None, None, None)
                raise RuntimeError(f"sim agent did not start: {' '.join(self.cmd)}; see {self.log_path}")
        self.url = line.decode().split("listening on ", 1)[1].strip()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._proc is None:
            return
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
        self._proc = None


def write_real_rows(path: Path, n: int) -> Path:
    """`n` rows of NeMo Gym's `ns_tools__compmath_test.jsonl` (256 real rows, replicated in order; another
    file with `BENCH_REAL_ROWS=PATH`; `data/example.jsonl` when neither exists)."""
    lines = [line for line in real_rows_source().read_bytes().splitlines() if line.strip()]
    with path.open("wb") as f:
        for line in itertools.islice(itertools.cycle(lines), n):
            f.write(line + b"\n")
    return path


def write_small_rows(path: Path, n: int, repeat_every: int | None = None) -> Path:
    """`n` small synthetic NeMo Gym-shaped rows (~150 bytes: agent_ref, one user message, expected_answer).

    With `repeat_every=k`, every k-th line is a byte-identical copy of an earlier one (line i repeats line
    i // 2): NeMo Gym gives such lines one task index and consecutive rollout indices."""
    def content(i: int) -> int:
        return i // 2 if repeat_every and i % repeat_every == repeat_every - 1 else i

    with path.open("wb") as f:
        for chunk_start in range(0, n, 10_000):
            f.write(b"".join(
                orjson.dumps({
                    "agent_ref": {"name": "sim_agent"},
                    "responses_create_params": {"input": [{"role": "user", "content": f"What is {j} + {j}?"}]},
                    "expected_answer": str(2 * j),
                }) + b"\n"
                for j in map(content, range(chunk_start, min(n, chunk_start + 10_000)))
            ))
    return path


def collector_cmd(input_path: Path, output_path: Path, url: str, parallelism: int, **extra: Any) -> list[str]:
    """`python -m gym_collect KEY=VALUE ...` as a user runs it (asyncio's default loop), progress off,
    Hydra's run dir beside the output. Every row's agent goes to `url`; `extra` are further overrides."""
    overrides = {
        "input_jsonl_fpath": input_path, "output_jsonl_fpath": output_path, "agent_url": url,
        "num_samples_in_parallel": parallelism, "progress": "false", "overwrite": "true",
        "hydra.run.dir": output_path.with_suffix(".hydra"), **extra,
    }
    return [sys.executable, "-m", "gym_collect", *(f"{key}={value}" for key, value in overrides.items())]


def baseline_cmd(input_path: Path, output_path: Path, url: str, parallelism: int) -> list[str]:
    """`python scripts/baseline_collector.py ...` (asyncio's default loop, as the collector)."""
    script = Path(__file__).resolve().parent / "baseline_collector.py"
    return [sys.executable, str(script), "--input", str(input_path), "--output", str(output_path), "--url", url,
            "--parallelism", str(parallelism)]


def read_metrics(output_path: Path) -> dict[str, Any]:
    """The collector's `<stem>_metrics.json` beside `output_path`."""
    metrics: dict[str, Any] = orjson.loads(output_path.with_name(output_path.stem + "_metrics.json").read_bytes())
    return metrics


def count_lines(path: Path) -> int:
    """Number of lines in a file, read in 1 MiB chunks."""
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(MB), b""))


def uvloop_available() -> bool:
    """True when uvloop can be imported by this interpreter (the simulated agent then runs on it; the
    collector and the baseline always run on asyncio's default loop)."""
    return importlib.util.find_spec("uvloop") is not None


def machine() -> dict[str, Any]:
    """CPU model, core count, memory, Python and library versions, uvloop availability."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for name in ("aiohttp", "orjson", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            versions[name] = version(name)
    return {
        "cpu_model": model, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(), "platform": platform.platform(), "uvloop": uvloop_available(),
        "load_average_1m": round(os.getloadavg()[0], 2), "real_rows": str(real_rows_source()),
        "versions": versions,
    }
