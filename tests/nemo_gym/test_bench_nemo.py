"""`scripts/bench_nemo.py` runs end to end against NeMo Gym 0.7.0's collector (a few hundred rows; no figure is
asserted, only that both collectors wrote every rollout and the ratios were printed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.nemo_gym, pytest.mark.timeout(900)]


def test_bench_nemo_prints_both_ratios(nemo_venv: Path, tmp_path: Path, clean_env: dict[str, str]) -> None:
    report = tmp_path / "bench_nemo.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_nemo.py"), "--rows", "300", "--json",
                           str(report), "--workdir", str(tmp_path / "runs")], cwd=tmp_path,
                          env={**clean_env, "NEMO_GYM_VENV": str(nemo_venv)}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 throughput, collect_rollouts / ng_collect_rollouts" in proc.stdout
    assert "2 memory, peak RSS collect_rollouts / ng_collect_rollouts" in proc.stdout
    figures = orjson.loads(report.read_bytes())
    assert figures["rows"] == 300 and figures["throughput_ratio_whole"] > 0 and figures["memory_ratio"] > 0
