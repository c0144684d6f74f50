"""Shared fixtures: real input files, a real simulated agent on 127.0.0.1, typed configs."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gym_collect.config import CollectConfig
from gym_collect.sim_agent import SimAgent, SimAgentConfig

REPO = Path(__file__).resolve().parents[1]
NEMO_GYM_DATA = REPO / "tests" / "data"  # copies of NeMo Gym files, with their SOURCE.md
EXAMPLE_INPUT = REPO / "data" / "example.jsonl"


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    """Write rows as JSONL and return the path."""
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def make_rows(n: int, **extra: Any) -> list[dict[str, Any]]:
    """`n` NeMo Gym-shaped rows with a question and an expected answer."""
    return [
        {"responses_create_params": {"input": [{"role": "user", "content": f"What is {i} + {i}?"}]},
         "expected_answer": str(2 * i), **extra}
        for i in range(n)
    ]


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSONL file, parsed (fails on a torn or invalid line)."""
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def nemo_pairs(path: Path, repeats: int = 1) -> list[tuple[int, int]]:
    """The (task, rollout) pairs NeMo Gym 0.7 assigns to a whole file, in order: a reference implementation of
    `nemo_gym/rollout_collection.py:2155-2192` (a row's own `_ng_task_index` kept, identical lines share a
    task index, rollout indices count per task)."""
    line_tasks: dict[bytes, int] = {}
    rollouts: dict[int, int] = {}
    out = []
    for raw in path.read_bytes().splitlines(keepends=True):
        if not raw.strip():
            continue
        own = orjson.loads(raw).get("_ng_task_index")
        task = own if isinstance(own, int) else line_tasks.setdefault(raw.rstrip(b"\r\n"), len(line_tasks))
        for _ in range(repeats):
            out.append((task, rollouts.get(task, 0)))
            rollouts[task] = rollouts.get(task, 0) + 1
    return out


def pairs(rows: Iterable[dict[str, Any]]) -> list[tuple[int, int]]:
    """(task, rollout) of each record, in file order."""
    return [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows]


def config(input_path: Path, output_path: Path, agent_url: str | None, **overrides: Any) -> CollectConfig:
    """A typed config for one run against `agent_url`, progress off, fast retries."""
    settings: dict[str, Any] = {
        "input_jsonl_fpath": str(input_path),
        "output_jsonl_fpath": str(output_path),
        "agent_name": "sim_agent",
        "agent_url": agent_url,
        "progress": False,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "connect_timeout_s": 2.0,
        **overrides,
    }
    return CollectConfig(**settings)


@pytest.fixture
async def sim() -> AsyncIterator[SimAgent]:
    """A simulated agent on 127.0.0.1 with capacity 8 and 20 ms service time."""
    async with SimAgent(SimAgentConfig(capacity=8, service_time_s=0.02, seed=1)) as agent:
        yield agent


@pytest.fixture
def rows_file(tmp_path: Path) -> Path:
    """A 40-row input file."""
    return write_rows(tmp_path / "prompts.jsonl", make_rows(40))


@pytest.fixture
def clean_env() -> dict[str, str]:
    """The environment for subprocesses, without variables that change Hydra's or Python's behaviour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HYDRA_", "PYTEST_", "NEMO_GYM_"))}
    env["PYTHONUNBUFFERED"] = "1"
    return env
