"""Multi-node runs: 4 concurrent shard processes against one agent, merged with merge_rollouts."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from gym_collect.collect import shard_output_path
from gym_collect.sim_agent import SimAgentConfig, SimAgentThread
from tests.conftest import make_rows, pairs, read_jsonl, write_rows

BIN = Path(sys.executable).parent
NUM_ROWS, REPEATS, SHARDS = 203, 2, 4


def collect_args(url: str, *extra: str) -> list[str]:
    return [str(BIN / "collect_rollouts"), "input_jsonl_fpath=in.jsonl", "agent_name=sim_agent", f"agent_url={url}",
            "progress=false", f"num_repeats={REPEATS}", "num_samples_in_parallel=8", *extra]


@pytest.mark.parametrize("order", ["input", "completion"])
def test_four_concurrent_shards_merge_to_the_single_run(
    tmp_path: Path, clean_env: dict[str, str], order: str
) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(NUM_ROWS))
    with SimAgentThread(SimAgentConfig(capacity=32, service_time_s=0.005, service_sigma=1.0)) as sim:
        procs = [subprocess.Popen(
            collect_args(sim.url, "output_jsonl_fpath=shards/r.jsonl", f"num_shards={SHARDS}", f"shard_id={k}",
                         f"output_order={order}"), cwd=tmp_path, env=clean_env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT) for k in range(SHARDS)]
        single = subprocess.run(collect_args(sim.url, "output_jsonl_fpath=single.jsonl", f"output_order={order}"),
                                cwd=tmp_path, env=clean_env, capture_output=True, timeout=120)
        outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert single.returncode == 0 and all(p.returncode == 0 for p in procs), outputs
    shards = [tmp_path / "shards" / f"r_shard-{k:02d}-of-{SHARDS:02d}.jsonl" for k in range(SHARDS)]
    assert shards == sorted((tmp_path / "shards").glob(f"r_shard-*-of-{SHARDS:02d}.jsonl"))
    merged = tmp_path / "merged.jsonl"
    proc = subprocess.run([str(BIN / "merge_rollouts"), "--output", str(merged), "--input", "in.jsonl",
                           "--num-repeats", str(REPEATS), *map(str, reversed(shards))],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    single_pairs = pairs(read_jsonl(tmp_path / "single.jsonl"))
    assert sorted(pairs(read_jsonl(merged))) == sorted(single_pairs)
    assert len(single_pairs) == NUM_ROWS * REPEATS
    metrics = orjson.loads((tmp_path / "merged_metrics.json").read_bytes())
    assert metrics["rollouts"]["succeeded"] == NUM_ROWS * REPEATS
    if order == "input":
        cat = b"".join(p.read_bytes() for p in shards)
        assert cat == merged.read_bytes()
        assert pairs(read_jsonl(merged)) == single_pairs == [(t, r) for t in range(NUM_ROWS) for r in range(REPEATS)]


def test_merge_refuses_a_gap_naming_the_tasks(tmp_path: Path, clean_env: dict[str, str]) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(40))
    with SimAgentThread(SimAgentConfig(service_time_s=0.0)) as sim:
        for start, end in [(0, 10), (25, 40)]:
            subprocess.run(collect_args(sim.url, f"output_jsonl_fpath=s{start}.jsonl", f"start_idx={start}",
                                        f"end_idx={end}"), cwd=tmp_path, env=clean_env, check=True, timeout=60)
    proc = subprocess.run([str(BIN / "merge_rollouts"), "--output", "m.jsonl", "--input", "in.jsonl",
                           "--num-repeats", str(REPEATS), "s0.jsonl", "s25.jsonl"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "input rows 10-24 are in no shard (between s0.jsonl and s25.jsonl)" in proc.stderr
    assert not (tmp_path / "m.jsonl").exists()


def three_shards_and_a_single_run(tmp_path: Path, env: dict[str, str], *extra: str) -> list[Path]:
    """`in.jsonl` collected as 3 shards (`shards/r_shard-*-of-03.jsonl`, returned) and as one run
    (`single.jsonl`), with `extra` arguments, against a simulated agent."""
    with SimAgentThread(SimAgentConfig(service_time_s=0.0)) as sim:
        for k in range(3):
            subprocess.run(collect_args(sim.url, "output_jsonl_fpath=shards/r.jsonl", "num_shards=3", f"shard_id={k}",
                                        *extra), cwd=tmp_path, env=env, check=True, timeout=60, capture_output=True)
        subprocess.run(collect_args(sim.url, "output_jsonl_fpath=single.jsonl", *extra), cwd=tmp_path, env=env,
                       check=True, timeout=60, capture_output=True)
    return sorted((tmp_path / "shards").glob("r_shard-*-of-03.jsonl"))


def test_shards_with_a_limit_split_the_first_rows_and_merge_to_the_single_run(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    write_rows(tmp_path / "in.jsonl", make_rows(70))
    shards = three_shards_and_a_single_run(tmp_path, clean_env, "limit=40")
    assert [len({t for t, _ in pairs(read_jsonl(p))}) for p in shards] == [13, 13, 14]
    proc = subprocess.run([str(BIN / "merge_rollouts"), "--output", "merged.jsonl", *map(str, shards)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert sorted(pairs(read_jsonl(tmp_path / "merged.jsonl"))) == sorted(pairs(read_jsonl(tmp_path / "single.jsonl")))
    without_last = subprocess.run([str(BIN / "merge_rollouts"), "--output", "m.jsonl", *map(str, shards[:2])],
                                  cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert without_last.returncode == 2 and "input rows 26-39 are in no shard" in without_last.stderr


def nemo_indexed_rows(n: int) -> list[dict[str, object]]:
    """`n` rows where NeMo Gym's task indices are not row indices: every 5th line repeats an earlier one
    byte for byte (one task index, more rollouts), and rows 40-49 carry their own `_ng_task_index`."""
    rows: list[dict[str, object]] = []
    for i, base in enumerate(make_rows(n)):
        rows.append(rows[i // 3] if i % 5 == 4 else {**base, "_ng_task_index": 900 + i} if 40 <= i < 50 else base)
    return rows


def test_shards_of_duplicate_lines_and_caller_indices_merge_to_the_single_run(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    write_rows(tmp_path / "in.jsonl", nemo_indexed_rows(70))
    shards = three_shards_and_a_single_run(tmp_path, clean_env)
    single = Counter(pairs(read_jsonl(tmp_path / "single.jsonl")))
    assert len(shards) == 3 and max(single.values()) == 1
    assert max(r for _, r in single) >= REPEATS and max(t for t, _ in single) >= 900  # not a rectangle
    proc = subprocess.run([str(BIN / "merge_rollouts"), "--output", "merged.jsonl", "--input", "in.jsonl",
                           *map(str, shards)], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Counter(pairs(read_jsonl(tmp_path / "merged.jsonl"))) == single
    assert f"{len(single)} (task, rollout) pairs" in proc.stdout

    without_middle = subprocess.run([str(BIN / "merge_rollouts"), "--output", "m2.jsonl", str(shards[0]),
                                     str(shards[2])], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert without_middle.returncode == 2
    assert f"input rows 23-45 are in no shard (between {shards[0]} and {shards[2]})" in without_middle.stderr
    without_last = subprocess.run([str(BIN / "merge_rollouts"), "--output", "m3.jsonl", "--input", "in.jsonl",
                                   str(shards[0]), str(shards[1])], cwd=tmp_path, capture_output=True, text=True,
                                  timeout=60)
    assert without_last.returncode == 2 and f"input rows 46-69 are in no shard (after {shards[1]})" in \
        without_last.stderr
    assert not (tmp_path / "m2.jsonl").exists() and not (tmp_path / "m3.jsonl").exists()
    # shards made with num_shards know they hold every row together: the first or last missing shows without --input
    for kept, named in (([1, 2], f"input rows 0-22 are in no shard (before {shards[1]})"),
                        ([0, 1], f"input rows 46-69 are in no shard (after {shards[1]})")):
        proc = subprocess.run([str(BIN / "merge_rollouts"), "--output", "m4.jsonl", *(str(shards[k]) for k in kept)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and named in proc.stderr, proc.stderr
    assert not (tmp_path / "m4.jsonl").exists()


def test_shard_names_sort_in_order() -> None:
    names = [shard_output_path(Path("r.jsonl"), 128, k).name for k in range(128)]
    assert names == sorted(names) and names[3] == "r_shard-003-of-128.jsonl"
