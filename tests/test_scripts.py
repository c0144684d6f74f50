"""The scripts run end to end (benchmarks in quick mode, the soak on fewer rows); none asserts on speed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from tests.conftest import REPO

FIGURES = ("capacity ratio", "overhead ratio", "memory ratio", "start-up", "order cost")


def test_bench_quick_prints_all_five_figures(tmp_path: Path, clean_env: dict[str, str]) -> None:
    report = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench.py"), "--quick", "--json", str(report)],
        cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    table = proc.stdout.split("gym_collect benchmark", 1)[1]
    for figure in FIGURES:
        assert figure in table, f"{figure!r} missing from:\n{table}"
    keys = {f["key"] for f in orjson.loads(report.read_bytes())["figures"]}
    assert {"capacity_64", "capacity_256", "overhead", "memory", "startup", "order"} <= keys


def test_soak_ends_every_rollout_exactly_once(tmp_path: Path, clean_env: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--rows", "600"], cwd=tmp_path,
                          env=clean_env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "PASS: every rollout ended exactly once" in proc.stdout
    assert "missing             0" in proc.stdout and "ended twice         0" in proc.stdout


def test_bench_auto_quick_prints_its_figures(tmp_path: Path, clean_env: dict[str, str]) -> None:
    report = tmp_path / "auto.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_auto.py"), "--quick", "--scenario",
                           "rate_limited", "--json", str(report)], cwd=tmp_path, env=clean_env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    first, second = (f["figure"] for f in orjson.loads(report.read_bytes()))
    assert first.startswith("3 rate_limited: auto / best fixed") and second.startswith("3 rate_limited: requests")
    assert "3 rate_limited: requests answered 429" in proc.stdout
