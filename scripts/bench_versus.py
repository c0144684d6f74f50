"""CPU per rollout of this tree's `collect_rollouts` against an earlier revision's, measured in one run.

Both collectors run the same job side by side, interleaved pair by pair so that drifting load hits both alike:
`--rows` small synthetic rows, `num_samples_in_parallel=64`, against one simulated agent in its own process
(64 slots, 0 ms, ~1.6 KB answers). The earlier revision is checked out into a temporary git worktree and
installed into a venv of its own (pip, from the package index or `PIP_FIND_LINKS`). Figures, medians of
`--repeats` pairs:

  1. whole process: CPU seconds (user + system, `os.wait4`) per rollout, this tree / the revision's, of the
     median runs and of the fastest runs (load from elsewhere only adds CPU time). This tree runs with
     `disable_aggregation=true`, the revision's job (an earlier revision may not aggregate);
  2. dispatch: the seconds the run itself reports for its rollouts ("in X s"), this tree / the revision's;
  3. with aggregation on (this tree's default): the CPU it adds per rollout, from a third run per pair.

    python scripts/bench_versus.py --rev fb87a90 [--rows 20000] [--repeats 5] [--json PATH]

Exit code 0 when every run wrote every rollout, 1 otherwise.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson
from _benchlib import ChildRun, SimServer, collector_cmd, count_lines, machine, run_child, write_small_rows

REPO = Path(__file__).resolve().parent.parent
PARALLELISM = 64
ANSWER_PAD_BYTES = 700
DISPATCH_LINE = re.compile(r"in ([0-9.]+) s, [0-9.]+ rollouts/s")


def install_revision(rev: str, folder: Path) -> Path:
    """Check `rev` out into `folder/tree` and install it into `folder/venv`; its Python."""
    tree, venv = folder / "tree", folder / "venv"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "--force", str(tree), rev], check=True,
                   capture_output=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "-e", str(tree)], check=True)
    return python


def one_run(python: Path, work: Path, name: str, rows_path: Path, url: str, rows: int,
            **extra: str) -> tuple[ChildRun, float]:
    """One collection; (the child's measurements, the dispatch seconds it reports)."""
    output = work / f"{name}.jsonl"
    cmd = [str(python), *collector_cmd(rows_path, output, url, PARALLELISM, **extra)[1:]]
    run = run_child(cmd, cwd=work, log_path=work / f"{name}.log", watch=output)
    written = count_lines(output) if output.exists() else 0
    if run.exit_code != 0 or written != rows:
        raise RuntimeError(f"{name}: exit {run.exit_code}, {written} of {rows} rollouts; see {work / name}.log")
    found = DISPATCH_LINE.search(run.log)
    if found is None:
        raise RuntimeError(f"{name}: no 'in X s' line in its log")
    return run, float(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rev", required=True, help="the earlier revision (a commit, tag or branch)")
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_versus_") as tmp:
        folder = Path(tmp)
        try:
            try:
                earlier = install_revision(args.rev, folder)
            except subprocess.CalledProcessError as exc:
                print(f"cannot install revision {args.rev} ({' '.join(map(str, exc.cmd[:4]))} ... exited "
                      f"{exc.returncode}): check the revision and that pip can reach the package index",
                      file=sys.stderr)
                return 1
            work = folder / "work"
            work.mkdir()
            rows_path = write_small_rows(work / "rows.jsonl", args.rows)
            ours: list[tuple[ChildRun, float]] = []
            theirs: list[tuple[ChildRun, float]] = []
            aggregating: list[ChildRun] = []
            # the aggregating runs get a server of their own: a 20,000-rollout /aggregate_metrics body grows the
            # server's heap, which would slow the pairs that follow
            with SimServer(work / "sim.log", capacity=PARALLELISM, service_time_s=0, service_sigma=0,
                           response_pad_bytes=ANSWER_PAD_BYTES) as sim, \
                    SimServer(work / "sim_aggregating.log", capacity=PARALLELISM, service_time_s=0, service_sigma=0,
                              response_pad_bytes=ANSWER_PAD_BYTES) as aggregating_sim:
                for rep in range(args.repeats):
                    theirs.append(one_run(earlier, work, f"earlier{rep}", rows_path, sim.url, args.rows))
                    ours.append(one_run(Path(sys.executable), work, f"ours{rep}", rows_path, sim.url, args.rows,
                                        disable_aggregation="true"))
                    aggregating.append(one_run(Path(sys.executable), work, f"aggregating{rep}", rows_path,
                                               aggregating_sim.url, args.rows)[0])
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(folder / "tree")],
                           capture_output=True)
    per_rollout = {name: statistics.median(run.cpu_s for run, _ in runs) / args.rows * 1e6
                   for name, runs in (("ours", ours), ("earlier", theirs))}
    # load from elsewhere only ever adds CPU time, so the fastest run of each is the least disturbed one
    # (as `timeit` advises: https://docs.python.org/3/library/timeit.html#timeit.Timer.repeat)
    fastest = {name: min(run.cpu_s for run, _ in runs) / args.rows * 1e6
               for name, runs in (("ours", ours), ("earlier", theirs))}
    dispatch = {name: statistics.median(s for _, s in runs) for name, runs in (("ours", ours), ("earlier", theirs))}
    aggregation_us = statistics.median(run.cpu_s for run in aggregating) / args.rows * 1e6 - per_rollout["ours"]
    figures = {
        "rev": args.rev, "rows": args.rows, "repeats": args.repeats, "cpu_us_per_rollout": per_rollout,
        "cpu_ratio": per_rollout["ours"] / per_rollout["earlier"], "fastest_cpu_us_per_rollout": fastest,
        "fastest_cpu_ratio": fastest["ours"] / fastest["earlier"], "dispatch_s": dispatch,
        "dispatch_ratio": dispatch["ours"] / dispatch["earlier"], "aggregation_us_per_rollout": aggregation_us,
        "samples_cpu_s": {"ours": [r.cpu_s for r, _ in ours], "earlier": [r.cpu_s for r, _ in theirs]},
        "machine": machine(),
    }
    print(f"{args.rows} small rows, num_samples_in_parallel={PARALLELISM}, simulated agent at 0 ms; medians of "
          f"{args.repeats} interleaved pairs; this tree with disable_aggregation=true")
    print(f"1 CPU per rollout, this tree / {args.rev}: {figures['cpu_ratio']:.3f} ({per_rollout['ours']:.0f} vs "
          f"{per_rollout['earlier']:.0f} us)")
    print(f"  fastest runs: {figures['fastest_cpu_ratio']:.3f} ({fastest['ours']:.0f} vs {fastest['earlier']:.0f} us)")
    print(f"2 dispatch seconds, this tree / {args.rev}: {figures['dispatch_ratio']:.3f} ({dispatch['ours']:.2f} vs "
          f"{dispatch['earlier']:.2f} s)")
    print(f"3 aggregation (on by default) adds {aggregation_us:.0f} us of CPU per rollout")
    if args.json:
        args.json.write_bytes(orjson.dumps(figures, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
