"""Soak test: many rollouts against a faulty simulated agent; nothing lost, nothing duplicated.

Starts the simulated agent (in a thread of this process, so its counters can be read) with 10% HTTP 500s,
5% 429s with Retry-After, 2% connection resets and 1% hangs, runs the real `collect_rollouts` command in a
subprocess against it, and checks that every (task, rollout) ends exactly once in the output or the failures
file and that the server answered no rollout successfully twice. Prints the figures; exits 1 on a violation.

    python scripts/soak.py                 # 10,000 rollouts (about 100 s on 2 cores: 429 pauses dominate)
    python scripts/soak.py --rows 2000     # quicker
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import orjson

from gym_collect.sim_agent import SimAgentConfig, SimAgentThread


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--parallel", type=int, default=64)
    parser.add_argument("--keep", action="store_true", help="keep the work folder and print its path")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gym_collect_soak_"))
    rows = (orjson.dumps({"responses_create_params": {"input": f"q{i}"}, "expected_answer": str(i)}) for i in
            range(args.rows))
    (work / "in.jsonl").write_bytes(b"\n".join(rows) + b"\n")
    faults = SimAgentConfig(capacity=args.parallel, service_time_s=0.01, service_sigma=0.5, fail_500_rate=0.10,
                            fail_429_rate=0.05, retry_after_s=0.5, reset_rate=0.02, hang_rate=0.01, hang_s=3600,
                            seed=7)
    command = [
        str(Path(sys.executable).parent / "collect_rollouts"), "input_jsonl_fpath=in.jsonl",
        "output_jsonl_fpath=out.jsonl", "agent_name=sim_agent", f"num_samples_in_parallel={args.parallel}",
        "request_timeout_s=2", "max_attempts=8", "backoff_initial_s=0.1", "backoff_max_s=2", "progress=false",
    ]
    started = time.monotonic()
    with SimAgentThread(faults) as sim:
        proc = subprocess.run([*command, f"agent_url={sim.url}"], cwd=work, capture_output=True, text=True)
        wall_s = time.monotonic() - started
        succeeded_by_server = Counter(sim.stats.succeeded)
        statuses = Counter(sim.stats.statuses)
        requests = sim.stats.requests

    output = [orjson.loads(line) for line in (work / "out.jsonl").read_bytes().splitlines()]
    failures_path = work / "out_failures.jsonl"
    failures = [orjson.loads(line) for line in failures_path.read_bytes().splitlines()] if failures_path.exists() \
        else []
    metrics = orjson.loads((work / "out_metrics.json").read_bytes())
    ends = Counter((r["_ng_task_index"], r["_ng_rollout_index"]) for r in output + failures)
    expected = {(t, 0) for t in range(args.rows)}
    missing = expected - set(ends)
    twice = [pair for pair, n in ends.items() if n > 1]
    served_twice = [pair for pair, n in succeeded_by_server.items() if n > 1]

    print(f"rollouts            {args.rows}")
    print(f"written             {len(output)}")
    print(f"failed for good     {len(failures)}")
    print(f"requests sent       {requests} (server statuses: "
          + ", ".join(f"{'reset/dropped' if s == 0 else s}={n}" for s, n in sorted(statuses.items())) + ")")
    print(f"retries             {metrics['retries']}")
    print(f"wall time s         {wall_s:.1f} (collector's own: {metrics['wall_time_s']:.1f})")
    print(f"rollouts/s          {metrics['rollouts_per_s']:.1f}")
    print(f"exit code           {proc.returncode}")
    print(f"missing             {len(missing)}")
    print(f"ended twice         {len(twice)}")
    print(f"served ok twice     {len(served_twice)}")
    ok = not missing and not twice and not served_twice and proc.returncode in (0, 3)
    print("RESULT              " + ("PASS: every rollout ended exactly once" if ok else "FAIL"))
    if not ok:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
    if args.keep:
        print(f"work folder         {work}")
    else:
        shutil.rmtree(work)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
