"""merge_rollouts on real temp files: order, gaps, overlaps, failures, metrics, the console command."""

from __future__ import annotations

import logging
import math
import random
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gym_collect.errors import ConfigError, OutputError
from gym_collect.merge import MergeAggregation, MergeMismatch, main, merge_metrics, merge_rollouts, without_side_files
from gym_collect.metrics import RunMetrics
from gym_collect.shards import MergeRefused, check_shards
from gym_collect.stats import LatencyHistogram
from gym_collect.writer import OutputPaths

Pair = tuple[int, int]


def row(task: int, rollout: int, **extra: Any) -> dict[str, Any]:
    return {"_ng_task_index": task, "_ng_rollout_index": rollout, "agent_ref": {"name": "agent"},
            "reward": (task + rollout) % 2 * 1.0, **extra}


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return path


def shard(path: Path, pairs: Iterable[Pair], failed: Iterable[Pair] = ()) -> Path:
    write_jsonl(path, (row(t, r) for t, r in pairs))
    failed = list(failed)
    if failed:
        records = ({"_ng_task_index": t, "_ng_rollout_index": r, "error_class": "HTTP500"} for t, r in failed)
        write_jsonl(path.with_name(path.stem + "_failures.jsonl"), records)
    return path


def pairs(tasks: Iterable[int], repeats: int = 2) -> list[Pair]:
    return [(t, r) for t in tasks for r in range(repeats)]


def ids(path: Path) -> list[Pair]:
    lines = path.read_bytes().splitlines()
    return [(d["_ng_task_index"], d["_ng_rollout_index"]) for d in map(orjson.loads, lines)]


@pytest.fixture
def three(tmp_path: Path) -> list[Path]:
    """Shards over tasks 0-299 x 2, rows shuffled within each, named out of task order."""
    rng = random.Random(0)
    out = []
    for name, tasks in (("b", range(100, 200)), ("c", range(200, 300)), ("a", range(0, 100))):
        p = pairs(tasks)
        rng.shuffle(p)
        out.append(shard(tmp_path / f"shard_{name}.jsonl", p))
    return out


def test_good_shards_merge_in_task_order(three: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "merged" / "all.jsonl"
    check = merge_rollouts(three, out, num_repeats=2, expected_tasks=range(300))
    assert check.ok and check.succeeded == 600 and check.failed == 0
    got = ids(out)
    assert Counter(got) == Counter(pairs(range(300)))
    by_shard = [ids(p) for p in sorted(three)]  # shard_a, shard_b, shard_c: verbatim, in task order
    assert got == by_shard[0] + by_shard[1] + by_shard[2]
    assert [s.path.name for s in check.shards] == ["shard_a.jsonl", "shard_b.jsonl", "shard_c.jsonl"]
    assert not (tmp_path / "merged" / "all_failures.jsonl").exists()
    metrics = orjson.loads((tmp_path / "merged" / "all_metrics.json").read_bytes())
    assert metrics["metrics_missing"] == [str(p) for p in sorted(three)]  # no shard wrote metrics here
    assert sorted(p.name for p in (tmp_path / "merged").iterdir()) == [
        "all.jsonl", "all_aggregate_metrics.json", "all_metrics.json"]


def test_inferred_range_and_blank_lines(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(5, 10), 1))
    with a.open("ab") as f:
        f.write(b"\n  \n" + orjson.dumps(row(10, 0)))  # blank lines skipped, last line without newline
    out = tmp_path / "m.jsonl"
    check = merge_rollouts([a], out)
    assert check.expected_tasks == range(5, 11)
    assert ids(out) == pairs(range(5, 11), 1) and out.read_bytes().endswith(b"\n")


def refused(paths: list[Path], out: Path, **kw: Any) -> str:
    with pytest.raises(MergeRefused) as info:
        merge_rollouts(paths, out, **kw)
    assert not out.exists()
    assert not any(p.name.endswith(".tmp") for p in out.parent.iterdir())
    return str(info.value)


def test_gap_is_refused_naming_the_range_and_neighbours(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(0, 120)))
    b = shard(tmp_path / "b.jsonl", pairs(range(140, 400)))
    c = shard(tmp_path / "c.jsonl", [p for p in pairs(range(400, 500)) if p != (450, 1)])
    msg = refused([a, b, c], tmp_path / "m.jsonl", num_repeats=2)
    assert f"missing tasks 120-139 (all 2 rollouts) between {a} (tasks 0-119) and {b} (tasks 140-399)" in msg
    assert f"missing task 450 (rollout 1) inside {c}" in msg
    msg = refused([a, b, c], tmp_path / "m.jsonl", num_repeats=2, expected_tasks=range(520))
    assert "missing tasks 500-519 (all 2 rollouts) after the last shard" in msg


def test_overlap_is_refused_naming_tasks_and_both_shards(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(0, 110)))
    b = shard(tmp_path / "b.jsonl", pairs(range(100, 200)))
    msg = refused([a, b], tmp_path / "m.jsonl", num_repeats=2)
    assert f"duplicated tasks 100-109 (all 2 rollouts) in both {a} and {b}" in msg
    check = check_shards([a, b], None, 2)
    assert check.duplicated == ((a, b, ((100, 109),), (0, 1)),)


def test_repeat_inside_one_shard_is_refused(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", [*pairs(range(10), 1), (3, 0)])
    assert f"duplicated task 3 twice in {a}" in refused([a], tmp_path / "m.jsonl")


def test_failures_count_as_accounted_and_are_concatenated(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", [p for p in pairs(range(0, 50)) if p not in {(7, 1), (8, 0)}],
              failed=[(7, 1), (8, 0)])
    b = shard(tmp_path / "b.jsonl", [p for p in pairs(range(50, 100)) if p != (60, 0)], failed=[(60, 0)])
    out = tmp_path / "m.jsonl"
    check = merge_rollouts([b, a], out, num_repeats=2)
    assert (check.succeeded, check.failed) == (197, 3)
    assert "197 succeeded, 3 failed" in check.describe()
    assert ids(tmp_path / "m_failures.jsonl") == [(7, 1), (8, 0), (60, 0)]
    msg = refused([a, b], tmp_path / "n.jsonl", num_repeats=2, strict=True)
    assert "--strict: 3 failed rollouts at tasks 7-8, 60" in msg and "a_failures.jsonl" in msg


def test_superseded_and_repeated_failures_are_dropped(tmp_path: Path) -> None:
    # (5, 0) failed, then succeeded on resume; (6, 0) failed twice (two runs): one record each survives.
    a = shard(tmp_path / "a.jsonl", pairs(range(10), 1)[:6] + pairs(range(7, 10), 1),
              failed=[(5, 0), (6, 0), (6, 0)])
    out = tmp_path / "m.jsonl"
    check = merge_rollouts([a], out)
    assert (check.succeeded, check.failed, check.shards[0].dropped_failure_rows) == (9, 1, 2)
    assert ids(tmp_path / "m_failures.jsonl") == [(6, 0)]
    assert "2 superseded or repeated failure records dropped" in check.describe()


def test_failure_in_another_shard_is_an_overlap(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(10), 1))
    b = shard(tmp_path / "b.jsonl", pairs(range(10, 20), 1), failed=[(4, 0)])
    msg = refused([a, b], tmp_path / "m.jsonl")
    assert f"duplicated task 4 in both {a} and {tmp_path / 'b_failures.jsonl'}" in msg


def test_stale_failures_file_is_removed(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(10), 1))
    write_jsonl(tmp_path / "m_failures.jsonl", [row(1, 0)])
    merge_rollouts([a], tmp_path / "m.jsonl")
    assert not (tmp_path / "m_failures.jsonl").exists()


def test_expected_range_from_input_and_start_idx(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"q": 1}\n\n{"q": 2}\n{"q": 3}\n')  # 3 rows
    a = shard(tmp_path / "a.jsonl", pairs(range(10, 14), 1))
    out = str(tmp_path / "m.jsonl")
    assert main(["--output", out, str(a), "--input", str(prompts), "--start-idx", "10"]) == 2
    msg = refused([a], tmp_path / "m.jsonl", expected_tasks=range(10, 13))
    assert f"{a}: task 13 outside the expected tasks 10-12" in msg
    assert main(["--output", out, str(a), "--num-tasks", "4", "--start-idx", "10"]) == 0


def test_rollout_index_beyond_num_repeats(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(4), 3))
    msg = refused([a], tmp_path / "m.jsonl", num_repeats=2)
    assert f"{a}: rollout index >= --num-repeats 2 at tasks 0-3" in msg


def test_malformed_lines_name_file_and_line(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(4), 1))
    with a.open("ab") as f:
        f.write(b'[1, 2]\n{"_ng_task_index": 4}\n{"_ng_task_index": 4, "_ng_rollout')
    msg = refused([a], tmp_path / "m.jsonl")
    assert f"{a}:5: not a JSON object but list (and 2 more bad lines in this file)" in msg


def test_missing_shard_file_and_bad_arguments(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(4), 1))
    ghost = tmp_path / "ghost.jsonl"
    msg = refused([a, ghost], tmp_path / "m.jsonl", expected_tasks=range(8))
    assert f"{ghost}: shard file not found" in msg
    with pytest.raises(ConfigError):
        check_shards([a, tmp_path / "." / "a.jsonl"], None, 1)
    with pytest.raises(OutputError):
        merge_rollouts([a], a)
    with pytest.raises(OutputError):
        merge_rollouts([a], tmp_path / "a_failures.jsonl")


def test_huge_expected_range_is_reported_quickly(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(4), 1))
    msg = refused([a], tmp_path / "m.jsonl", expected_tasks=range(100_000_000))
    assert "missing tasks 4-99999999 after the last shard" in msg


def run_metrics(rewards: list[float], latencies: list[float], wall_s: float,
                failures: list[str]) -> dict[str, Any]:
    """A metrics document as the collector writes it, through JSON."""
    now = [0.0]
    m = RunMetrics(expected=len(rewards) + len(failures), clock=lambda: now[0])
    for i, (reward, latency) in enumerate(zip(rewards, latencies, strict=True)):
        m.add_success("agent", latency, row(i, 0, reward=reward, tokens=i))
    for error_class in failures:
        m.add_failure("agent", error_class)
    m.attempts, m.retries = len(rewards) + 2 * len(failures), len(failures)
    now[0] = wall_s
    return orjson.loads(orjson.dumps(m.snapshot()))  # type: ignore[no-any-return]


def test_metrics_merge_counts_and_means_exactly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(1)
    specs = [([1.0, 0.0, 1.0, 1.0], 4.0, ["HTTP500"]), ([0.0, 0.0, 0.5, 1.0], 9.5, []),
             ([1.0] * 4 + [0.0] * 4, 6.0, ["HTTP500", "AgentTimeout"])]
    shards, latencies, first = [], [], 0
    for i, (rewards, wall, failures) in enumerate(specs):
        lat = [rng.uniform(0.01, 30.0) for _ in rewards]
        latencies += lat
        n = len(rewards)
        p = shard(tmp_path / f"s{i}.jsonl", [(first + t, 0) for t in range(n)],
                  failed=[(first + n + k, 0) for k in range(len(failures))])
        first += n + len(failures)
        (tmp_path / f"s{i}_metrics.json").write_bytes(orjson.dumps(run_metrics(rewards, lat, wall, failures)))
        shards.append(p)
    shards.append(shard(tmp_path / "s3.jsonl", [(first, 0)]))  # no metrics file
    with caplog.at_level(logging.WARNING, logger="gym_collect.merge"):
        merge_rollouts(shards, tmp_path / "m.jsonl", expected_tasks=range(first + 1))
    assert "s3_metrics.json: no metrics file" in caplog.text
    m = orjson.loads((tmp_path / "m_metrics.json").read_bytes())
    assert m["schema"] == "gym_collect.metrics/1"
    assert m["rollouts"] == {"expected": 19, "succeeded": 16, "failed": 3, "skipped_resume": 0,
                             "not_persisted": 0, "interrupted": 0, "masked": 0}
    assert (m["attempts"], m["retries"]) == (22, 3)
    assert m["by_agent"] == {"agent": {"succeeded": 16, "failed": 3}}
    assert m["failures_by_class"] == {"HTTP500": 2, "AgentTimeout": 1}
    assert m["wall_time_s"] == 9.5 and m["rollouts_per_s"] == 16 / 9.5
    rewards = [r for rs, _, _ in specs for r in rs]
    assert m["fields"]["agent"]["reward"]["mean"] == sum(rewards) / 16  # dyadic: exact
    assert math.isclose(m["fields"]["agent"]["reward"]["std"], statistics.stdev(rewards), rel_tol=1e-12)
    assert m["fields"]["agent"]["tokens"]["count"] == 16
    whole = LatencyHistogram()
    for x in latencies:
        whole.record(x)
    assert {k: v for k, v in m["latency_s"].items() if k != "mean"} == {
        k: v for k, v in whole.summary().items() if k != "mean"}
    assert math.isclose(m["latency_s"]["mean"], whole.summary()["mean"], rel_tol=1e-12)
    assert m["shards"] == [str(p) for p in shards] and m["metrics_missing"] == [str(shards[3])]


def test_merge_metrics_function_rejects_malformed() -> None:
    good = run_metrics([1.0], [0.5], 1.0, [])
    assert merge_metrics([good, good])["rollouts"]["succeeded"] == 2  # type: ignore[index]
    assert merge_metrics([])["rollouts_per_s"] == 0.0
    coarser = {**good["latency_histogram"], "relative_error": 0.02}
    for bad in ({**good, "schema": "other/1"}, {**good, "attempts": -1},
                {**good, "rollouts": {"succeeded": 1}}, {**good, "latency_histogram": coarser}):
        with pytest.raises(ValueError, match="shard metrics #1"):
            merge_metrics([good, bad])


def test_console_command(three: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "gym_collect.merge", "--output", str(out), "--num-repeats", "2"]
    ok = subprocess.run([*cmd, *map(str, three)], capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    assert "600 succeeded, 0 failed" in ok.stdout and len(ids(out)) == 600
    out.unlink()
    gap = subprocess.run([*cmd, str(three[1]), str(three[2])], capture_output=True, text=True, check=False)
    assert gap.returncode == 2
    assert (f"missing tasks 100-199 (all 2 rollouts) between {three[2]} (tasks 0-99) and {three[1]} "
            "(tasks 200-299)") in gap.stderr
    assert not out.exists()


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 40), st.integers(1, 3), st.integers(1, 4), st.randoms(use_true_random=False), st.data())
def test_any_partition_merges_and_any_loss_is_named(num_tasks: int, repeats: int, num_shards: int,
                                                     rng: random.Random, data: st.DataObject) -> None:
    everything = pairs(range(num_tasks), repeats)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        owner = [rng.randrange(num_shards) for _ in everything]
        failed = {p for p in everything if rng.random() < 0.1}
        paths = []
        for k in range(num_shards):
            mine = [p for p, o in zip(everything, owner, strict=True) if o == k]
            rng.shuffle(mine)
            paths.append(shard(folder / f"s{k}.jsonl", [p for p in mine if p not in failed],
                               failed=[p for p in mine if p in failed]))
        expected = range(num_tasks)
        check = merge_rollouts(paths, folder / "m.jsonl", expected_tasks=expected, num_repeats=repeats)
        assert (check.succeeded, check.failed) == (len(everything) - len(failed), len(failed))
        merged = ids(folder / "m.jsonl") + (ids(folder / "m_failures.jsonl") if failed else [])
        assert sorted(merged) == everything
        lost = data.draw(st.sampled_from(everything))
        k = owner[everything.index(lost)]
        name = paths[k].name if lost not in failed else f"s{k}_failures.jsonl"
        src = folder / name
        src.write_bytes(b"".join(line + b"\n" for line in src.read_bytes().splitlines()
                                 if orjson.loads(line)["_ng_task_index"] != lost[0]
                                 or orjson.loads(line)["_ng_rollout_index"] != lost[1]))
        with pytest.raises(MergeRefused, match=rf"missing task[s]? ({lost[0]}\b|\d+-)"):
            merge_rollouts(paths, folder / "n.jsonl", expected_tasks=expected, num_repeats=repeats)


def manifest(shard_path: Path, start: int, stop: int, **changes: Any) -> Path:
    """Write the run manifest collect_rollouts leaves beside a shard (schema gym_collect.run/1)."""
    definition: dict[str, Any] = {"input": {"size": 1234, "fingerprint": "ab12"}, "start_idx": start,
                                  "stop_idx": stop, "num_repeats": 2, "responses_create_params": {},
                                  "agent_name": "agent", **changes}
    doc = {"schema": "gym_collect.run/1", "input_path": "/data/in.jsonl", "definition": definition}
    return write_jsonl(shard_path.with_name(shard_path.stem + "_run.json"), [doc])


def test_manifests_give_repeats_and_tasks(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(0, 5), 2))
    b = shard(tmp_path / "b.jsonl", pairs(range(5, 10), 2))
    manifest(a, 0, 5)
    manifest(b, 5, 10)
    assert main(["-o", str(tmp_path / "m.jsonl"), str(b), str(a)]) == 0
    assert sorted(ids(tmp_path / "m.jsonl")) == pairs(range(10), 2)
    manifest(b, 5, 12)  # the manifest says shard b selected tasks 5-11: 10 and 11 are missing
    with pytest.raises(MergeRefused, match="missing tasks 10-11"):
        merge_rollouts([a, b], tmp_path / "n.jsonl")


@pytest.mark.parametrize(("change", "named"), [
    ({"input": {"size": 99, "fingerprint": "ff00"}}, "input differs"),
    ({"num_repeats": 4}, "num_repeats differs"),
    ({"responses_create_params": {"temperature": 0.9}}, "responses_create_params differs"),
    ({"agent_name": "other"}, "agent_name differs"),
    ({"agents": {"x": "y"}}, "agents differs"),
])
def test_shards_of_different_runs_are_refused_naming_them(
    tmp_path: Path, change: dict[str, Any], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(0, 5), 2))
    b = shard(tmp_path / "b.jsonl", pairs(range(5, 10), 2))
    manifest(a, 0, 5)
    manifest(b, 5, 10, **change)
    assert main(["--output", str(tmp_path / "m.jsonl"), str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert named in err and str(a) in err and str(b) in err
    value = orjson.dumps(next(iter(change.values())), option=orjson.OPT_SORT_KEYS).decode()
    assert value in err
    assert not (tmp_path / "m.jsonl").exists()


def test_a_shard_without_manifest_among_others_is_refused(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(0, 5), 2))
    b = shard(tmp_path / "b.jsonl", pairs(range(5, 10), 2))
    manifest(a, 0, 5)
    with pytest.raises(MergeMismatch, match=f"{b} has no run manifest"):
        merge_rollouts([a, b], tmp_path / "m.jsonl")
    assert merge_rollouts([a, b], tmp_path / "m.jsonl", num_repeats=2, use_manifests=False).ok


def test_explicit_repeats_contradicting_the_manifests_are_refused(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(0, 5), 2))
    manifest(a, 0, 5)
    assert main(["-o", str(tmp_path / "m.jsonl"), "--num-repeats", "3", str(a)]) == 2


# The union's aggregate metrics ------------------------------------------------------------------------------

AGG_ANSWER = {"agent_metrics": {"pass@2": 0.75}, "key_metrics": {"pass@2": 0.75}, "group_level_metrics": [],
              "repeat_level_metrics": []}


def env_shard(path: Path, pairs_: Iterable[Pair], failed: Iterable[Pair] = (), materialized: Iterable[Pair] = ()
              ) -> Path:
    """A shard of a 0.7-routed run: rows stamped with their environment server, 0.7 failure records and
    materialized inputs beside them."""
    stamps = {"_ng_environment_server": "math_env", "response": {"output": ["..."], "usage": {"total_tokens": 3}}}
    write_jsonl(path, (row(t, r, **stamps) for t, r in pairs_))
    paths_ = OutputPaths(path)
    write_jsonl(paths_.failures, ({"_ng_failure_class": "agent_run_error", "_ng_failure_http_status": 500,
                                   "_ng_task_index": t, "_ng_rollout_index": r, "agent_ref": {"name": "agent"},
                                   "_ng_environment_server": "math_env"} for t, r in failed))
    write_jsonl(paths_.materialized_inputs, ({"q": t, "agent_ref": {"name": "agent"}, "_ng_task_index": t,
                                              "_ng_rollout_index": r} for t, r in materialized))
    return path


class AggregateServer:
    """A loopback head server whose document names one environment server, `math_env`, at its own address,
    which answers `POST /aggregate_metrics` with `AGG_ANSWER` and keeps what it received."""

    def __init__(self) -> None:
        from aiohttp import web

        from tests.servers import LoopbackServer

        self.received: list[list[dict[str, Any]]] = []

        async def head(request: web.Request) -> web.Response:
            port = int(self.server.url.rsplit(":", 1)[1])
            doc = {"math_env": {"environment_servers": {"legacy_agent": {
                       "host": "127.0.0.1", "port": port, "agent_server": {"type": "responses_api_agents",
                                                                           "name": "agent"}}}},
                   "agent": {"responses_api_agents": {"simple_agent": {"host": "127.0.0.1", "port": port}}}}
            return web.json_response(yaml.safe_dump(doc))

        async def metrics(request: web.Request) -> web.Response:
            self.received.append((await request.json())["verify_responses"])
            return web.json_response(AGG_ANSWER)

        self.server = LoopbackServer({"GET /global_config_dict_yaml": head, "POST /aggregate_metrics": metrics})

    def __enter__(self) -> AggregateServer:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)


def test_the_union_goes_to_each_groups_server_named_by_the_head_server(tmp_path: Path) -> None:
    a = env_shard(tmp_path / "a.jsonl", pairs(range(0, 3))[::-1])
    b = env_shard(tmp_path / "b.jsonl", pairs(range(3, 5)))
    out = tmp_path / "m.jsonl"
    with AggregateServer() as server:
        merge_rollouts([b, a], out, num_repeats=2, aggregation=MergeAggregation(head_server_url=server.server.url))
    (rows,) = server.received  # one request, with the rows of both shards, in (task, rollout) order
    assert [(r["_ng_task_index"], r["_ng_rollout_index"]) for r in rows] == pairs(range(5))
    assert all(r["response"] == {"usage": {"total_tokens": 3}} for r in rows)
    assert orjson.loads(OutputPaths(out).aggregate_metrics.read_bytes()) == [
        {"agent_ref": {"name": "agent"}, "_ng_environment_server": "math_env", **AGG_ANSWER}]


def test_the_union_is_aggregated_locally_without_a_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    a = shard(tmp_path / "a.jsonl", pairs(range(0, 10)))
    b = shard(tmp_path / "b.jsonl", pairs(range(10, 15)))
    merge_rollouts([a, b], tmp_path / "m.jsonl", num_repeats=2)
    (entry,) = orjson.loads((tmp_path / "m_aggregate_metrics.json").read_bytes())
    assert entry["agent_ref"] == {"name": "agent"} and entry["_ng_environment_server"] is None
    assert entry["key_metrics"]["mean/reward"] == statistics.mean(row(t, r)["reward"] for t, r in pairs(range(15)))
    assert set(entry) >= {"agent_metrics", "group_level_metrics", "repeat_level_metrics"}
    assert sum("computed locally" in r.getMessage() for r in caplog.records) == 1


def test_cli_counts_failures_and_missing_rollouts_over_all_shards(tmp_path: Path) -> None:
    # Task 5 was materialized by shard b but is in no file: with the option it counts as a zero.
    a = env_shard(tmp_path / "a.jsonl", [p for p in pairs(range(3)) if p != (1, 1)], failed=[(1, 1)],
                  materialized=pairs(range(3)))
    b = env_shard(tmp_path / "b.jsonl", pairs(range(3, 5)), materialized=pairs(range(3, 6)))
    out = tmp_path / "m.jsonl"
    with AggregateServer() as server:
        code = main([str(a), str(b), "-o", str(out), "--num-repeats", "2", "--agent-url", server.server.url,
                     "--count-failure-classes-as-zero", "agent_run_error", "--count-missing-rollouts-as-zero"])
    assert code == 0
    (rows,) = server.received
    assert [(r["_ng_task_index"], r["_ng_rollout_index"], r["reward"]) for r in rows] == [
        (t, r, 0.0 if (t, r) in {(1, 1), (5, 0), (5, 1)} else row(t, r)["reward"]) for t, r in pairs(range(6))]
    assert {k: v for k, v in rows[3].items() if k != "reward"} == {
        "_ng_task_index": 1, "_ng_rollout_index": 1, "agent_ref": {"name": "agent"},
        "_ng_environment_server": "math_env", "mask_sample": False}
    assert ids(OutputPaths(out).materialized_inputs) == pairs(range(6))  # the shards' files, concatenated
    (entry,) = orjson.loads(OutputPaths(out).aggregate_metrics.read_bytes())
    assert entry["_ng_environment_server"] == "math_env" and entry["key_metrics"] == AGG_ANSWER["key_metrics"]


def test_no_aggregation_writes_none_and_removes_a_stale_file(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(4)))
    out = tmp_path / "m.jsonl"
    for stale in (OutputPaths(out).aggregate_metrics, OutputPaths(out).materialized_inputs):
        stale.write_text("[]")
    assert main([str(a), "-o", str(out), "--num-repeats", "2", "--no-aggregation"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m")) == ["m.jsonl", "m_metrics.json"]


def test_aggregation_options_are_checked(tmp_path: Path) -> None:
    a = shard(tmp_path / "a.jsonl", pairs(range(4)))
    for bad in (["--agent-url", "localhost:1"], ["--aggregate-timeout-s", "-1"],
                ["--agent-url", "http://h:1", "--no-aggregation"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(a), "-o", str(tmp_path / "m.jsonl"), *bad])
        assert exit_info.value.code == 2


def test_an_unreachable_head_server_leaves_every_group_to_the_local_default(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tests.servers import LoopbackServer

    with LoopbackServer({}) as gone:
        url = gone.url  # nothing listens there once the block ends
    a = shard(tmp_path / "a.jsonl", pairs(range(4)))
    merge_rollouts([a], tmp_path / "m.jsonl", num_repeats=2,
                   aggregation=MergeAggregation(head_server_url=url, connect_timeout_s=0.2))
    (entry,) = orjson.loads((tmp_path / "m_aggregate_metrics.json").read_bytes())
    assert entry["key_metrics"]["mean/reward"] == 0.5
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "head server" in
                  r.getMessage()]
    assert url in warning and "aggregated locally" in warning


def listed_shard(path: Path, rows: tuple[int, int], listed: Iterable[Pair], written: Iterable[Pair],
                 failed: Iterable[Pair] = ()) -> Path:
    """A shard as collect_rollouts leaves it: rows, failures, its manifest (row range `rows`) and its
    materialized inputs listing `listed` (the pairs its selection expects)."""
    shard(path, written, failed)
    manifest(path, *rows, num_repeats={"_default": 1, "agent": 3})
    write_jsonl(OutputPaths(path).materialized_inputs, (row(t, r) for t, r in listed))
    return path


# NeMo Gym's indices that are no rectangle: task 7 is a repeated line (6 rollouts), task 900 a caller's own
LISTED_A = [*pairs([0, 1], 3), *pairs([7], 6)]
LISTED_B = [*pairs([2, 3], 3), *pairs([900], 1)]


def test_materialized_inputs_give_the_expected_pairs(tmp_path: Path) -> None:
    a = listed_shard(tmp_path / "a.jsonl", (0, 4), LISTED_A, LISTED_A[::-1])
    b = listed_shard(tmp_path / "b.jsonl", (4, 9), LISTED_B, LISTED_B[1:], failed=LISTED_B[:1])
    out = tmp_path / "m.jsonl"
    check = merge_rollouts([b, a], out, aggregation=None)
    assert check.expected_pairs == len(LISTED_A) + len(LISTED_B) and (check.succeeded, check.failed) == (18, 1)
    assert Counter(ids(out)) == Counter(LISTED_A + LISTED_B[1:])
    assert ids(OutputPaths(out).failures) == LISTED_B[:1]
    assert Counter(ids(OutputPaths(out).materialized_inputs)) == Counter(LISTED_A + LISTED_B)
    assert "19 (task, rollout) pairs of tasks 0-900 listed by their materialized inputs" in check.describe()
    with pytest.raises(MergeRefused, match=r"--strict: 1 failed rollouts at task 2"):
        merge_rollouts([a, b], tmp_path / "strict.jsonl", strict=True, aggregation=None)


@pytest.mark.parametrize(("written_a", "listed_b", "rows_b", "expected"), [
    ([p for p in LISTED_A if p != (7, 5)], LISTED_B, (4, 9), "missing task 7 (rollout 5) inside"),
    ([*LISTED_A, (7, 6)], LISTED_B, (4, 9), "a.jsonl: task 7 hold rollouts that no shard's materialized inputs list"),
    ([*LISTED_A, (5, 0)], LISTED_B, (4, 9), "a.jsonl: task 5 hold rollouts that no shard's materialized inputs"),
    (LISTED_A, [*LISTED_B, (1, 2)], (4, 9), "b_materialized_inputs.jsonl: lists task 1 (rollout 2) that an earlier "
                                            "shard's materialized inputs list too: the shards' selections overlap"),
    (LISTED_A, LISTED_B, (6, 9), "input rows 4-5 are in no shard (between"),
])
def test_materialized_inputs_refuse_what_they_do_not_list(
        tmp_path: Path, written_a: list[Pair], listed_b: list[Pair], rows_b: tuple[int, int], expected: str) -> None:
    a = listed_shard(tmp_path / "a.jsonl", (0, 4), LISTED_A, written_a)
    b = listed_shard(tmp_path / "b.jsonl", rows_b, listed_b, LISTED_B)
    assert expected in refused([a, b], tmp_path / "m.jsonl", aggregation=None)


def test_the_input_bounds_the_rows_the_shards_must_cover(tmp_path: Path) -> None:
    a = listed_shard(tmp_path / "a.jsonl", (2, 4), LISTED_A, LISTED_A)
    b = listed_shard(tmp_path / "b.jsonl", (4, 9), LISTED_B, LISTED_B)
    msg = refused([a, b], tmp_path / "m.jsonl", expected_tasks=range(12), aggregation=None)
    assert f"input rows 0-1 are in no shard (before {a})" in msg
    assert f"input rows 9-11 are in no shard (after {b})" in msg
    assert merge_rollouts([a, b], tmp_path / "m.jsonl", expected_tasks=range(2, 9), aggregation=None).ok


def test_a_shard_without_materialized_inputs_falls_back_to_the_rectangle(tmp_path: Path) -> None:
    a = listed_shard(tmp_path / "a.jsonl", (0, 2), pairs(range(2), 2), pairs(range(2), 2))
    b = shard(tmp_path / "b.jsonl", pairs(range(2, 4), 2))
    manifest(a, 0, 2)
    manifest(b, 2, 4)
    check = merge_rollouts([a, b], tmp_path / "m.jsonl", aggregation=None)
    assert check.expected_pairs is None and check.expected_tasks == range(4) and check.succeeded == 8


def test_a_missing_shard_file_with_materialized_inputs_left_is_named(tmp_path: Path) -> None:
    a = listed_shard(tmp_path / "a.jsonl", (0, 4), LISTED_A, LISTED_A)
    b = listed_shard(tmp_path / "b.jsonl", (4, 9), LISTED_B, LISTED_B)
    b.unlink()  # its manifest and materialized inputs stay
    assert f"{b}: shard file not found" in refused([a, b], tmp_path / "m.jsonl", aggregation=None)


def test_a_broad_glob_leaves_out_the_side_files_of_the_shards_it_names(tmp_path: Path) -> None:
    names = ["r_shard-00-of-02.jsonl", "r_shard-00-of-02_failures.jsonl", "r_shard-00-of-02_materialized_inputs.jsonl",
             "r_shard-01-of-02.jsonl", "other_failures.jsonl"]
    kept = without_side_files([tmp_path / name for name in names])
    # a side file whose shard is not given stays: the merge then says what is wrong with it
    assert [p.name for p in kept] == ["r_shard-00-of-02.jsonl", "r_shard-01-of-02.jsonl", "other_failures.jsonl"]


# What -o may replace ---------------------------------------------------------------------------------------

def test_an_existing_output_is_replaced_only_when_it_is_an_earlier_merge_or_with_overwrite(
        three: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "all.jsonl"
    assert merge_rollouts(three, out, num_repeats=2).ok
    assert merge_rollouts(three, out, num_repeats=2).ok  # an earlier merge of shards: merged again
    run = write_jsonl(tmp_path / "run.jsonl", [row(0, 0)])
    write_jsonl(tmp_path / "run_run.json", [{"schema": "gym_collect.run/1"}])  # a collect_rollouts run's
    other = write_jsonl(tmp_path / "other.jsonl", [{"q": 1}])
    for target, held in ((run, "a collect_rollouts run's rollouts"), (other, "rows that no earlier merge wrote")):
        before = target.read_bytes()
        assert main(["-o", str(target), *map(str, three), "--no-aggregation", "--num-repeats", "2"]) == 2
        assert target.read_bytes() == before
        with pytest.raises(OutputError, match=f"holds {held}.*--overwrite"):
            merge_rollouts(three, target, num_repeats=2)
        assert main(["-o", str(target), *map(str, three), "--no-aggregation", "--num-repeats", "2", "--overwrite"]) == 0
        assert Counter(ids(target)) == Counter(pairs(range(300)))


def test_the_shards_input_and_a_link_to_a_shard_are_never_an_output(three: list[Path], tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "prompts.jsonl", [{"q": i} for i in range(300)])
    for n, shard_path in enumerate(sorted(three)):
        manifest(shard_path, 100 * n, 100 * (n + 1), input={"size": 1, "fingerprint": "ab"})
        doc = orjson.loads(shard_path.with_name(shard_path.stem + "_run.json").read_bytes())
        write_jsonl(shard_path.with_name(shard_path.stem + "_run.json"), [{**doc, "input_path": str(source)}])
    link = tmp_path / "link.jsonl"
    link.symlink_to(three[0].name)
    lock = OutputPaths(three[0]).lock
    lock.touch()
    for target in (source, link, lock):
        before = (source.read_bytes(), three[0].read_bytes())
        with pytest.raises(OutputError, match="would overwrite an input file"):
            merge_rollouts(three, target, overwrite=True)
        assert (source.read_bytes(), three[0].read_bytes()) == before


def test_a_run_writing_the_output_refuses_the_merge(three: list[Path], tmp_path: Path) -> None:
    from gym_collect.writer import OutputLock

    out = tmp_path / "live.jsonl"
    write_jsonl(out, [row(0, 0)])
    with OutputLock(OutputPaths(out).lock, out), pytest.raises(OutputError, match="being written by another run"):
        merge_rollouts(three, out, overwrite=True)
    assert ids(out) == [(0, 0)]


@pytest.mark.parametrize(("argv", "said"), [
    ([], "the following arguments are required"),
    (["-o", "m.jsonl", "a.jsonl", "--num-repeats", "0"], "--num-repeats must be >= 1"),
])
def test_a_usage_error_is_one_line(argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    err = capsys.readouterr().err
    assert caught.value.code == 2 and err.count("\n") == 1
    assert err.startswith("merge_rollouts: error: ") and said in err and "(see merge_rollouts --help)" in err
