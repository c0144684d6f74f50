"""The ready-made jobs in scripts/: the Kubernetes Indexed Job installs what exists and its command composes."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

from tests.conftest import REPO

COLLECT = str(Path(sys.executable).parent / "collect_rollouts")


def test_k8s_job_installs_a_wheel_built_from_the_repository_and_its_command_composes(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    job = yaml.safe_load((REPO / "scripts" / "k8s_indexed_job.yaml").read_text())
    container = job["spec"]["template"]["spec"]["containers"][0]
    script = container["args"][0]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    wheel = f"/wheels/gym_collect-{version}-py3-none-any.whl"
    assert f"pip install --no-cache-dir {wheel} &&" in script
    assert not re.search(r"pip install (--\S+ )*gym[-_]collect\b", script)  # nothing from the package index
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}
    assert volumes[mounts["/wheels"]]["configMap"]["name"] == "gym-collect-wheel"
    command = shlex.split(script.split("exec ", 1)[1])
    assert command[0] == "collect_rollouts"
    env = {**clean_env, "JOB_COMPLETION_INDEX": "3", "AGENT_TOKEN": "t0ken-xyz"}
    args = [a.replace("${JOB_COMPLETION_INDEX}", "3") for a in command[1:]]
    proc = subprocess.run([COLLECT, *args, "--cfg", "job", "--resolve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "shard_id: 3" in proc.stdout and "num_shards: 8" in proc.stdout
    assert "t0ken-xyz" not in proc.stdout


def test_slurm_array_script_composes(tmp_path: Path, clean_env: dict[str, str]) -> None:
    text = (REPO / "scripts" / "slurm_array.sbatch").read_text()
    command = shlex.split(text.split("exec ", 1)[1].replace("\\\n", " ").replace('"$@"', ""))
    env = {**clean_env, "SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_JOB_ID": "77"}
    args = [a.replace("${SLURM_ARRAY_JOB_ID}", "77").replace("${SLURM_ARRAY_TASK_ID}", "5") for a in command[1:]]
    proc = subprocess.run([COLLECT, *args, "--cfg", "job", "--resolve"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "shard_id: 5" in proc.stdout and "resume: true" in proc.stdout
