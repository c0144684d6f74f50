"""`collect_rollouts` side by side with NeMo Gym 0.7.0's own `ng_collect_rollouts`, printing ratios measured in one
run (issue: NeMo Gym 0.7 drop-in, the files NeMo Gym users rely on).

Both collectors get the same rows (real NeMo Gym rows, replicated), the same `num_samples_in_parallel` and the same
stand-in server: the simulated agent in its own process (a fresh one per run, same settings), which serves the head
server's document (0.7 shape: the agent behind an environment server), `POST /run` and `POST /aggregate_metrics`.
Both find the head server through an `env.yaml` in their working directory, and both
write their materialized inputs and aggregate metrics. Figures:

  1. throughput: rollouts/s of `collect_rollouts` / of `ng_collect_rollouts`, each counted over the whole process
     (spawn to exit: what a user waits for; NeMo Gym's imports and set-up included) and over the steady part (from
     the first output line to the last, sampled every 50 ms). Target >= 3.
  2. memory: peak RSS (kernel high-water mark) of `collect_rollouts` / of `ng_collect_rollouts`. Target <= 0.15.

NeMo Gym's venv is the conformance suite's (`tests/nemo_gym/venv.py`: `.nemo-gym-venv/`, built on first use from the
pinned lock file, about 3 minutes; `NEMO_GYM_VENV=DIR` moves it).

    python scripts/bench_nemo.py [--rows 20000] [--parallelism 64] [--service-time-s 0.01] [--json PATH]

Exit code 0 when both runs completed and wrote every rollout (PASS or MISS alike), 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import orjson
import yaml
from _benchlib import ChildRun, SimServer, count_lines, machine, run_child, write_real_rows

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.nemo_gym.venv import ensure_venv  # noqa: E402

AGENT = "sim_agent"
TIMEOUT_S = 3600.0


def steady_rate(run: ChildRun, rows: int) -> float | None:
    """Rollouts/s between the first sample that saw output and the first that saw all of it (rows of equal size)."""
    growing = [s for s in run.samples if s.output_bytes > 0]
    if len(growing) < 3:
        return None
    final = growing[-1].output_bytes
    last = next(s for s in growing if s.output_bytes == final)
    span = last.t_s - growing[0].t_s
    done = rows * (final - growing[0].output_bytes) / final
    return done / span if span > 0 else None


def run_nemo(venv: Path, workdir: Path, rows_path: Path, head_port: int, parallelism: int) -> tuple[ChildRun, Path]:
    """`ng_collect_rollouts` in `workdir/nemo` (an `env.yaml` there names the head server)."""
    cwd = workdir / "nemo"
    cwd.mkdir()
    (cwd / "env.yaml").write_text(yaml.safe_dump({"head_server": {"host": "127.0.0.1", "port": head_port}}))
    output = cwd / "rollouts.jsonl"
    cmd = [str(venv / "bin" / "ng_collect_rollouts"), f"+agent_name={AGENT}", f"+input_jsonl_fpath={rows_path}",
           f"+output_jsonl_fpath={output}", f"+num_samples_in_parallel={parallelism}"]
    return run_child(cmd, cwd=cwd, log_path=workdir / "nemo.log", watch=output, timeout_s=TIMEOUT_S), output


def run_tool(workdir: Path, rows_path: Path, head_port: int, parallelism: int) -> tuple[ChildRun, Path]:
    """`collect_rollouts` in `workdir/tool` (an `env.yaml` there names the head server, as for NeMo Gym), the same
    arguments plus `progress=false` and a `hydra.run.dir`."""
    cwd = workdir / "tool"
    cwd.mkdir()
    (cwd / "env.yaml").write_text(yaml.safe_dump({"head_server": {"host": "127.0.0.1", "port": head_port}}))
    output = cwd / "rollouts.jsonl"
    cmd = [str(Path(sys.executable).parent / "collect_rollouts"), f"+agent_name={AGENT}",
           f"+input_jsonl_fpath={rows_path}", f"+output_jsonl_fpath={output}",
           f"+num_samples_in_parallel={parallelism}", "progress=false", f"hydra.run.dir={cwd / '.hydra'}"]
    return run_child(cmd, cwd=cwd, log_path=workdir / "tool.log", watch=output, timeout_s=TIMEOUT_S), output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--parallelism", type=int, default=64)
    parser.add_argument("--service-time-s", type=float, default=0.01)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep the runs' files here (default: a temporary folder)")
    args = parser.parse_args(argv)

    venv = ensure_venv()
    with tempfile.TemporaryDirectory(prefix="bench_nemo_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        rows_path = write_real_rows(workdir / "rows.jsonl", args.rows)
        sim_flags: dict[str, Any] = {"capacity": args.parallelism, "service_time_s": args.service_time_s}
        runs: dict[str, tuple[ChildRun, Path]] = {}
        for name in ("nemo", "tool"):
            with SimServer(workdir / f"sim_{name}.log", **sim_flags) as sim:
                port = int(sim.url.rsplit(":", 1)[1])
                runs[name] = (run_nemo(venv, workdir, rows_path, port, args.parallelism) if name == "nemo"
                              else run_tool(workdir, rows_path, port, args.parallelism))
        ok = True
        for name, (run, output) in runs.items():
            written = count_lines(output) if output.exists() else 0
            materialized = output.with_name(output.stem + "_materialized_inputs.jsonl")
            aggregate = output.with_name(output.stem + "_aggregate_metrics.json")
            if run.exit_code != 0 or written != args.rows or not materialized.exists() or not aggregate.exists():
                ok = False
                print(f"{name}: exit {run.exit_code}, {written} of {args.rows} rollouts, materialized inputs "
                      f"{materialized.exists()}, aggregate metrics {aggregate.exists()}; see "
                      f"{workdir / (name + '.log')}:\n{run.log[-2000:]}")
        if not ok:
            return 1
        nemo, _ = runs["nemo"]
        tool, _ = runs["tool"]
        whole = (args.rows / tool.wall_s) / (args.rows / nemo.wall_s)
        steady_tool, steady_nemo = steady_rate(tool, args.rows), steady_rate(nemo, args.rows)
        steady = steady_tool / steady_nemo if steady_tool and steady_nemo else None
        memory = tool.peak_rss_mb / nemo.peak_rss_mb
        figures = {
            "rows": args.rows, "parallelism": args.parallelism, "service_time_s": args.service_time_s,
            "tool_wall_s": tool.wall_s, "nemo_wall_s": nemo.wall_s, "tool_cpu_s": tool.cpu_s, "nemo_cpu_s": nemo.cpu_s,
            "throughput_ratio_whole": whole, "throughput_ratio_steady": steady,
            "tool_steady_per_s": steady_tool, "nemo_steady_per_s": steady_nemo,
            "tool_peak_rss_mb": tool.peak_rss_mb, "nemo_peak_rss_mb": nemo.peak_rss_mb, "memory_ratio": memory,
            "machine": machine(),
        }
        print(f"{args.rows} rows, num_samples_in_parallel={args.parallelism}, simulated agent {args.parallelism} "
              f"slots @ {args.service_time_s * 1000:.0f} ms; materialized inputs and aggregation on, both")
        print(f"1 throughput, collect_rollouts / ng_collect_rollouts, whole process: {whole:.2f} "
              f"({args.rows / tool.wall_s:.0f} vs {args.rows / nemo.wall_s:.0f} rollouts/s; "
              f"{tool.wall_s:.1f} vs {nemo.wall_s:.1f} s)  target >= 3  {'PASS' if whole >= 3 else 'MISS'}")
        if steady is not None and steady_tool and steady_nemo:
            print(f"  steady part (first to last output line): {steady:.2f} ({steady_tool:.0f} vs {steady_nemo:.0f} "
                  "rollouts/s)")
        print(f"  CPU seconds: {tool.cpu_s:.1f} vs {nemo.cpu_s:.1f}")
        print(f"2 memory, peak RSS collect_rollouts / ng_collect_rollouts: {memory:.3f} ({tool.peak_rss_mb:.1f} vs "
              f"{nemo.peak_rss_mb:.1f} MiB)  target <= 0.15  {'PASS' if memory <= 0.15 else 'MISS'}")
        if args.json:
            args.json.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
