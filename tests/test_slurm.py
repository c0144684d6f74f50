"""Slurm, with stand-ins for sbatch/srun/sacct on PATH (tests/fake_slurm): the array script Hydra's submitit
launcher generates from the `slurm` preset, and scripts/slurm_submit.sh's array plus dependent merge job."""

from __future__ import annotations

import fcntl
import json
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gym_collect.sim_agent import SimAgentConfig, SimAgentThread
from tests.conftest import REPO, make_rows, pairs, read_jsonl, write_rows
from tests.test_launchers import (
    ALL_PAIRS,
    COLLECT,
    REPEATS,
    ROWS,
    SHARDS,
    HoldingAgent,
    closed_port,
    fake_slurm_env,
)

SUBMIT = REPO / "scripts" / "slurm_submit.sh"


def wait_for_job(state: Path, job_id: str) -> dict[str, object]:
    """Block until the fake job's runner ends (it holds job_ID.lock while it runs); its final state."""
    with (state / f"job_{job_id}.lock").open() as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
    return json.loads((state / f"job_{job_id}.json").read_text())  # type: ignore[no-any-return]


def test_slurm_preset_generates_an_array_job_and_merges(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(ROWS))
    state = tmp_path / "slurm_state"
    with SimAgentThread(SimAgentConfig(service_time_s=0.002)) as sim:
        proc = subprocess.run(
            [COLLECT, "--config-dir", str(REPO / "configs"), "--config-name", "slurm", "-m", f"num_shards={SHARDS}",
             f"shard_id=range({SHARDS})", "input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out/r.jsonl",
             "agent_name=sim_agent", f"agent_url={sim.url}", f"num_repeats={REPEATS}",
             "hydra.launcher.partition=cpu", "hydra.launcher.timeout_min=30"],
            cwd=tmp_path, env=fake_slurm_env(clean_env, state), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(pairs(read_jsonl(tmp_path / "out" / "r.jsonl"))) == ALL_PAIRS
    (script,) = (tmp_path / "multirun").rglob("*_submission.sh")
    text = script.read_text()
    print(text)
    for line in ("#SBATCH --array=0-3%4", "#SBATCH --job-name=collect_rollouts", "#SBATCH --partition=cpu",
                 "#SBATCH --time=30", "#SBATCH --signal=USR2@120", "#SBATCH --cpus-per-task=2", "srun --unbuffered"):
        assert line in text, line
    (submission,) = [json.loads(line) for line in (state / "submissions.log").read_text().splitlines()]
    assert submission["options"]["array"] == "0-3%4"


@dataclass
class Submitted:
    """What `scripts/slurm_submit.sh` submitted to the fake Slurm, and how its two jobs ended."""

    array: dict[str, Any]
    merge: dict[str, Any]
    array_tasks: set[str]
    merge_tasks: set[str]


def submit_and_wait(tmp_path: Path, clean_env: dict[str, str], *overrides: str) -> Submitted:
    """Run `slurm_submit.sh SHARDS out/r.jsonl input_jsonl_fpath=in.jsonl OVERRIDES` in `tmp_path` under the fake
    Slurm and wait for both of its jobs to end."""
    state = tmp_path / "slurm_state"
    proc = subprocess.run(["bash", str(SUBMIT), str(SHARDS), "out/r.jsonl", "input_jsonl_fpath=in.jsonl", *overrides],
                          cwd=tmp_path, env=fake_slurm_env(clean_env, state), capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    array, merge = (json.loads(line) for line in (state / "submissions.log").read_text().splitlines())
    array_state, merge_state = wait_for_job(state, array["job_id"]), wait_for_job(state, merge["job_id"])
    return Submitted(array, merge, set(array_state["tasks"].values()),  # type: ignore[union-attr]
                     set(merge_state["tasks"].values()))  # type: ignore[union-attr]


def test_submit_script_runs_the_array_then_the_dependent_merge(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(ROWS))
    with SimAgentThread(SimAgentConfig(service_time_s=0.002)) as sim:
        jobs = submit_and_wait(tmp_path, clean_env, "agent_name=sim_agent", f"agent_url={sim.url}",
                               f"num_repeats={REPEATS}")
    assert jobs.merge["options"]["dependency"] == f"afterany:{jobs.array['job_id']}"
    assert jobs.merge_tasks == {"COMPLETED"}
    assert sorted(pairs(read_jsonl(tmp_path / "out" / "r.jsonl"))) == ALL_PAIRS
    assert (tmp_path / "out" / "r_metrics.json").exists()


def test_shards_with_failures_recorded_are_merged(tmp_path: Path, clean_env: dict[str, str]) -> None:
    rows = [dict(r, agent_ref={"name": "bad" if i % 5 == 0 else "sim_agent"}) for i, r in enumerate(make_rows(ROWS))]
    write_rows(tmp_path / "in.jsonl", rows)
    with SimAgentThread(SimAgentConfig(service_time_s=0.002)) as sim, \
            SimAgentThread(SimAgentConfig(service_time_s=0.002, fail_status=400)) as bad:
        jobs = submit_and_wait(tmp_path, clean_env, f"agents.sim_agent={sim.url}", f"agents.bad={bad.url}",
                               "max_attempts=1")
    assert jobs.array_tasks == {"FAILED"}  # exit 3: some rollouts failed for good, and are recorded
    assert jobs.merge_tasks == {"COMPLETED"}
    assert len(read_jsonl(tmp_path / "out" / "r.jsonl")) == ROWS * 4 // 5
    assert len(read_jsonl(tmp_path / "out" / "r_failures.jsonl")) == ROWS // 5


def test_a_stopped_array_task_leaves_the_merge_refused_and_nothing_written(tmp_path: Path,
                                                                           clean_env: dict[str, str]) -> None:
    per_shard = ROWS // SHARDS
    rows = [dict(r, agent_ref={"name": "dead" if i // per_shard == 1 else "sim_agent"})
            for i, r in enumerate(make_rows(ROWS))]
    write_rows(tmp_path / "in.jsonl", rows)
    with SimAgentThread(SimAgentConfig(service_time_s=0.002)) as sim:
        jobs = submit_and_wait(tmp_path, clean_env, f"agents.sim_agent={sim.url}",
                               f"agents.dead=http://127.0.0.1:{closed_port()}", "connect_timeout_s=2")
    assert jobs.merge_tasks == {"FAILED"}
    assert not (tmp_path / "out" / "r.jsonl").exists()
    state = tmp_path / "slurm_state"
    log = (state / f"slurm-{jobs.array['job_id']}_1.out").read_text()
    assert "unreachable" in log and "Traceback" not in log
    merged = (state / f"slurm-{jobs.merge['job_id']}.out").read_text()
    assert "refused" in merged and "input rows 10-19 are in no shard" in merged, merged


SUBMITIT_LIKE_JOB = """
import signal, sys
from pathlib import Path
marker = Path(sys.argv[1])
def requeue(signum, frame):  # what submitit's USR2 handler does: scontrol requeue, then exit
    marker.write_text("requeued")
    sys.exit(-1)
signal.signal(signal.SIGUSR2, requeue)
sys.argv = ["collect_rollouts", *sys.argv[2:]]
from gym_collect.cli import main
main()
"""


def test_time_limit_signal_drains_then_requeues_and_the_requeued_job_resumes(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(ROWS))
    marker = tmp_path / "requeued"
    args = ["input_jsonl_fpath=in.jsonl", "output_jsonl_fpath=out.jsonl", "agent_name=sim_agent",
            f"num_repeats={REPEATS}", "num_samples_in_parallel=2", "progress=false", "resume=true",
            "shutdown_grace_s=0.2"]
    env = {**clean_env, "SUBMITIT_EXECUTOR": "slurm"}
    with HoldingAgent(hold={25}) as agent:
        job = subprocess.Popen([sys.executable, "-c", SUBMITIT_LIKE_JOB, str(marker), *args, f"agent_url={agent.url}"],
                               cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        assert agent.held.wait(60), "the job never reached task 25"
        job.send_signal(signal.SIGUSR2)
        out, _ = job.communicate(timeout=60)
        assert job.returncode == 255, out  # submitit's sys.exit(-1) after requeueing
        assert marker.read_text() == "requeued"
        assert "stopping cleanly, then requeueing" in out and "Traceback" not in out
        metrics = orjson.loads((tmp_path / "out_metrics.json").read_bytes())  # written: a clean stop
        assert metrics["rollouts"]["succeeded"] == len(read_jsonl(tmp_path / "out.jsonl")) < ROWS * REPEATS
        agent.hold.clear()
        requeued = subprocess.run([COLLECT, *args, f"agent_url={agent.url}"], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=120)
    assert requeued.returncode == 0, requeued.stdout + requeued.stderr
    assert sorted(pairs(read_jsonl(tmp_path / "out.jsonl"))) == ALL_PAIRS
