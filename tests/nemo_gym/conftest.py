"""Fixtures of the conformance suite: the NeMo Gym venv, the stub model and the real NeMo Gym stack, one per run.

The stack is shared by every case of this package and stopped when the package's tests are done (or, whatever
happens to this process, by its supervisor). `GYM_COLLECT_CONFORMANCE_REPORT=PATH` appends one JSON line per check
to PATH (case, check, differences, durations): the raw material of the conformance table.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.nemo_gym.stack import NemoGymStack
from tests.nemo_gym.stub_model import StubModel
from tests.nemo_gym.venv import VenvError, ensure_venv

REPORT_ENV = "GYM_COLLECT_CONFORMANCE_REPORT"


@pytest.fixture(scope="package")
def nemo_venv() -> Path:
    """The NeMo Gym 0.7.0 venv, created on first use (about 3 minutes), reused afterwards."""
    try:
        return ensure_venv()
    except VenvError as exc:
        raise VenvError(f"{exc} (without the package index, leave this suite out: pytest -m 'not nemo_gym')") from exc


@pytest.fixture(scope="package")
def stub() -> Iterator[StubModel]:
    """The deterministic stub model on 127.0.0.1."""
    with StubModel() as model:
        yield model


@pytest.fixture(scope="package")
def stack(nemo_venv: Path, stub: StubModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NemoGymStack]:
    """The real NeMo Gym 0.7.0 servers (head, 3 environment servers, 3 agents, 2 resources servers, the model
    server), ready; stopped after the last case of this package."""
    with NemoGymStack(nemo_venv, tmp_path_factory.mktemp("nemo_gym_stack"), stub.base_url) as running:
        yield running


def report(record: dict[str, Any]) -> None:
    """Append `record` to the conformance report when `GYM_COLLECT_CONFORMANCE_REPORT` names a file."""
    path = os.environ.get(REPORT_ENV)
    if path:
        with Path(path).open("a") as out:
            out.write(json.dumps(record, sort_keys=True, default=str) + "\n")
