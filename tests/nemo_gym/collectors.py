"""Run NeMo Gym 0.7.0's `ng_collect_rollouts` and this repository's `collect_rollouts` the same way, side by side.

Both get the same `+key=value` arguments on the same input file, one after the other against the same stack: in
separate directories (`<case>/nemo/`, `<case>/tool/`) side by side, or in one directory for resume across the tools.
Both find the head server the NeMo Gym way, from an `env.yaml` in the working directory, so the command lines are
identical. Around each run the harness records which server instances received `POST /run`
and `POST /aggregate_metrics`
(`NemoGymStack.take_request_counts`) and the bodies the stub model received.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from tests.nemo_gym.stack import NemoGymStack
from tests.nemo_gym.stub_model import StubModel

TOOL_BIN = Path(sys.executable).parent  # the tool's venv: pytest runs from it
OUTPUT_NAME = "rollouts.jsonl"
COLLECT_TIMEOUT_S = 300.0


@dataclass
class CollectorRun:
    """What one collector did: exit status, output directory, `/run` receivers and model calls."""

    name: str  # "nemo" or "tool"
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    output: Path  # the output_jsonl_fpath
    elapsed_s: float
    run_counts: Counter[str] = field(default_factory=Counter)  # server instance -> POST /run received
    aggregate_counts: Counter[str] = field(default_factory=Counter)  # server instance -> POST /aggregate_metrics
    model_requests: list[dict[str, Any]] = field(default_factory=list)

    def side_file(self, suffix: str) -> Path:
        """`<stem><suffix>` beside the output, e.g. `side_file("_failures.jsonl")`."""
        return self.output.with_name(self.output.stem + suffix)

    def lines(self, suffix: str = "") -> list[dict[str, Any]]:
        """The JSON lines of the output (or of a side file); [] when it does not exist."""
        path = self.side_file(suffix) if suffix else self.output
        if not path.exists():
            return []
        return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]

    def describe(self) -> str:
        """Exit status and the last lines of stderr, for assertion messages."""
        tail = "\n".join((self.stderr or self.stdout).splitlines()[-15:])
        return f"{self.name} exited {self.returncode} in {self.elapsed_s:.1f} s:\n{tail}"


def _environment() -> dict[str, str]:
    """The test process's environment minus what changes Python's, Hydra's or pytest's behaviour in a child."""
    drop = ("PYTHONPATH", "PYTHONUNBUFFERED", "VIRTUAL_ENV")
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("PYTEST_", "HYDRA_"))}


def _run(name: str, argv: list[str], cwd: Path, output: Path, stack: NemoGymStack, stub: StubModel,
         env: dict[str, str]) -> CollectorRun:
    stack.take_request_counts()  # start from a clean slate
    stub.take_requests()
    started = time.monotonic()
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=COLLECT_TIMEOUT_S,
                          check=False)
    elapsed = time.monotonic() - started
    counts = stack.take_request_counts()
    return CollectorRun(name, argv, proc.returncode, proc.stdout, proc.stderr, output, elapsed, counts["run"],
                        counts["aggregate_metrics"], stub.take_requests())


def run_nemo(stack: NemoGymStack, stub: StubModel, cwd: Path, args: list[str],
             extra_env: dict[str, str] | None = None) -> CollectorRun:
    """`ng_collect_rollouts ARGS +output_jsonl_fpath=<cwd>/rollouts.jsonl` in `cwd` (created, with an `env.yaml`)."""
    _pin_head_server(cwd, stack)
    output = cwd / OUTPUT_NAME
    argv = [str(stack.venv / "bin" / "ng_collect_rollouts"), *args, f"+output_jsonl_fpath={output}"]
    return _run("nemo", argv, cwd, output, stack, stub, {**_environment(), **(extra_env or {})})


def run_tool(stack: NemoGymStack, stub: StubModel, cwd: Path, args: list[str],
             extra_env: dict[str, str] | None = None) -> CollectorRun:
    """`collect_rollouts ARGS +output_jsonl_fpath=<cwd>/rollouts.jsonl` in `cwd` (created, with an `env.yaml`)."""
    _pin_head_server(cwd, stack)
    output = cwd / OUTPUT_NAME
    argv = [str(TOOL_BIN / "collect_rollouts"), *args, f"+output_jsonl_fpath={output}"]
    return _run("tool", argv, cwd, output, stack, stub, {**_environment(), **(extra_env or {})})


def _pin_head_server(cwd: Path, stack: NemoGymStack) -> None:
    """Create `cwd` with an `env.yaml` naming the stack's head server, as NeMo Gym users pin it."""
    cwd.mkdir(parents=True, exist_ok=True)
    (cwd / "env.yaml").write_text(yaml.safe_dump({"head_server": {"host": "127.0.0.1", "port": stack.head_port}}))


def run_merge(stack: NemoGymStack, stub: StubModel, cwd: Path, shards: list[Path]) -> CollectorRun:
    """`merge_rollouts SHARDS -o <cwd>/rollouts.jsonl --head-server-url URL` in `cwd` (created): the merged output
    as a run of its own (its `/aggregate_metrics` requests counted; `/run` requests and model calls are the
    shards' runs', added by the caller)."""
    cwd.mkdir(parents=True, exist_ok=True)
    output = cwd / OUTPUT_NAME
    argv = [str(TOOL_BIN / "merge_rollouts"), *map(str, shards), "-o", str(output), "--head-server-url",
            stack.head_url]
    return _run("tool", argv, cwd, output, stack, stub, _environment())
