"""The command from a built wheel: Hydra finds its config without the source tree."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import EXAMPLE_INPUT, REPO, read_jsonl


def test_built_wheel_runs_the_main_job(tmp_path: Path, clean_env: dict[str, str]) -> None:
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("gym_collect-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**clean_env, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import gym_collect; print(gym_collect.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site))
    proc = subprocess.run([sys.executable, "-m", "gym_collect", f"input_jsonl_fpath={EXAMPLE_INPUT}",
                           "output_jsonl_fpath=out.jsonl", "agent_name=sim_agent", "sim.enabled=true",
                           "sim.service_time_s=0.001"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert len(read_jsonl(tmp_path / "out.jsonl")) == len(read_jsonl(EXAMPLE_INPUT))
