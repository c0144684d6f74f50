"""tune_parallelism: the stopping rule as a table, and a real sweep against a GPU-like simulated backend."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from gym_collect.config import SimSettings, TuneConfig
from gym_collect.sim_agent import SimAgentConfig, SimAgentThread
from gym_collect.tune import Step, choose_knee, next_level, sweep
from tests.conftest import config, make_rows, read_jsonl, write_rows


def steps(*rates: float, errors: float = 0.0) -> list[Step]:
    return [Step(8 * 2**i, 200, r, 0.1, 0.2, errors if i == len(rates) - 1 else 0.0, "") for i, r in enumerate(rates)]


def test_stopping_rule_and_knee() -> None:
    assert next_level(steps(10, 19), 0.1, 0.0) is None
    assert "gained only +5.0%" in (next_level(steps(10, 20, 21), 0.1, 0.0) or "")
    assert "dropped" in (next_level(steps(10, 20, 15), 0.1, 0.0) or "")
    assert "errors appeared at 16" in (next_level(steps(10, 20, errors=0.2), 0.1, 0.0) or "")
    assert choose_knee(steps(10, 20, 21), 0.1, 0.0) == 16
    assert choose_knee(steps(10, 20, 40, 39), 0.1, 0.0) == 32
    assert choose_knee(steps(10, 30, errors=0.5), 0.1, 0.0) == 8


async def test_sweep_finds_the_knee_of_a_gpu_like_backend(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", make_rows(3000))
    sim = SimSettings(enabled=True, mode="gpu", capacity=32, service_time_s=0.05, service_sigma=0.0)
    # steps of about a second each (640 rows at capacity 32 x 20/s): short steps end in a partial wave whose
    # share, and the machine's noise, can pass for a gain past the capacity
    cfg = config(inp, tmp_path / "out.jsonl", None, sim=sim, tune=TuneConfig(start=16, rows_per_step=640))
    report = await sweep(cfg)
    assert 16 <= report.knee <= 64
    assert report.recommended == round(0.8 * report.knee)
    written = sorted(r["_ng_task_index"] for s in report.steps for r in read_jsonl(Path(s.output)))
    assert written == list(range(report.next_start_idx))  # every row the sweep used was collected once


def test_console_script_prints_table_and_writes_report(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(1500))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tune_parallelism"), "+input_jsonl_fpath=in.jsonl",
         "+output_jsonl_fpath=out.jsonl", "+agent_name=sim_agent", "sim.enabled=true", "sim.mode=gpu",
         "sim.capacity=16", "sim.service_time_s=0.03", "sim.service_sigma=0", "tune.start=4", "tune.rows_per_step=100"],
        cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "<- knee" in proc.stdout and "num_samples_in_parallel=" in proc.stdout
    report = orjson.loads((tmp_path / "out_tune.json").read_bytes())
    assert report["recommended"] == round(0.8 * report["knee"])
    assert (tmp_path / "out_tune.csv").read_text().startswith("parallelism,")
    assert (tmp_path / "out_tune.png").stat().st_size > 1000


def test_an_input_that_runs_out_ends_the_sweep_with_the_steps_it_has(tmp_path: Path,
                                                                       clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(60))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tune_parallelism"), "+input_jsonl_fpath=in.jsonl",
         "+output_jsonl_fpath=out.jsonl", "+agent_name=sim_agent", "sim.enabled=true", "sim.service_time_s=0.01",
         "tune.start=4", "tune.rows_per_step=60", "tune.validate_rows=20"],
        cwd=tmp_path, env=clean_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "Stopped: the input ran out of rows" in proc.stdout and "Validation" not in proc.stdout
    assert "Next: nothing is left: the sweep collected every row up to 60" in proc.stdout
    assert orjson.loads((tmp_path / "out_tune.json").read_bytes())["next_start_idx"] == 60


def test_the_next_command_runs_as_printed_in_a_shell(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(300))
    with SimAgentThread(SimAgentConfig(service_time_s=0.001)) as sim:
        env = {**clean_env, "OCTOK": "from-the-environment"}
        proc = subprocess.run(
            [str(Path(sys.executable).parent / "tune_parallelism"), "+input_jsonl_fpath=in.jsonl",
             "+output_jsonl_fpath=out.jsonl", "+agent_name=sim_agent", f"agent_url={sim.url}",
             "+headers.X-Oc=${oc.env:OCTOK}", "tune.start=4", "tune.max_level=8", "tune.rows_per_step=40",
             "disable_aggregation=true"],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr + proc.stdout
        next_line = next(line for line in proc.stdout.splitlines() if line.startswith("Next: "))
        command = next_line.removeprefix("Next: ").replace("=out.jsonl", "=rest.jsonl")
        rest = subprocess.run(["bash", "-c", f"PATH={Path(sys.executable).parent}:$PATH {command} progress=false"],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert rest.returncode == 0, rest.stderr + rest.stdout
    start = orjson.loads((tmp_path / "out_tune.json").read_bytes())["next_start_idx"]
    assert sorted(r["_ng_task_index"] for r in read_jsonl(tmp_path / "rest.jsonl")) == list(range(start, 300))
