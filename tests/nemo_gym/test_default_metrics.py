"""`default_aggregate_metrics` against NeMo Gym 0.7.0's `compute_aggregate_metrics`, run in NeMo Gym's venv.

Every input is generated here (seeded), sent through NeMo Gym's function behind FastAPI (`aggregate_reference.py`,
one subprocess for all of them), and the two JSON documents must be equal: same keys, same list order, same JSON
types (an int is not a float), floats within 1e-9 relative (1e-12 absolute, for values that are ~0 and differ only
by the order of a sum). The t quantiles and linear quantiles underneath are checked against scipy and pandas too.
"""

from __future__ import annotations

import math
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from gym_collect.nemo.default_metrics import default_aggregate_metrics, verify_response
from gym_collect.sample_stats import quantile, t_quantile

pytestmark = [pytest.mark.nemo_gym, pytest.mark.timeout(1800)]

REFERENCE = Path(__file__).resolve().parent / "aggregate_reference.py"
Rows = list[dict[str, Any]]


def row(task: int, rollout: int, **fields: Any) -> dict[str, Any]:
    return {"_ng_task_index": task, "_ng_rollout_index": rollout, "agent_ref": {"name": "a"}, **fields}


def usage(rng: random.Random) -> dict[str, Any]:
    i, o = rng.randint(1, 4000), rng.randint(1, 900)
    return {"usage": {"input_tokens": i, "output_tokens": o, "total_tokens": i + o,
                      "input_tokens_details": {"cached_tokens": rng.randint(0, i)},
                      "output_tokens_details": {"reasoning_tokens": rng.randint(0, o)}},
            "incomplete_details": None if rng.random() < 0.7 else {"reason": "max_output_tokens"}}


def grid(tasks: int, repeats: int, make: Callable[[random.Random, int, int], dict[str, Any]], seed: int) -> Rows:
    rng = random.Random(seed)
    return [row(t, r, **make(rng, t, r)) for t in range(tasks) for r in range(repeats)]


def one_repeat() -> Rows:
    return grid(6, 1, lambda rng, t, r: {"reward": rng.random(), "turns": rng.randint(1, 9)}, 1)


def several_repeats() -> Rows:
    return grid(5, 4, lambda rng, t, r: {"reward": float(rng.random() < 0.6), "score": rng.gauss(0.3, 2.0),
                                         "response": usage(rng)}, 2)


def uneven() -> Rows:
    rng = random.Random(3)
    keep = [(0, 0), (0, 2), (1, 1), (2, 0), (2, 1), (2, 2), (2, 3), (3, 3), (4, 0), (4, 1)]
    rows = []
    for t, r in keep:
        fields: dict[str, Any] = {"reward": rng.random()}
        if (t, r) in {(0, 0), (0, 2), (2, 0), (4, 1)}:  # task 2: one value among four rows, so no deviation
            fields["judge_score"] = rng.randint(0, 10)
        if t != 2:
            fields["only_some_tasks"] = rng.uniform(-5, 5)
        rows.append(row(t, r, **fields))
    return rows


def booleans() -> Rows:
    return grid(4, 3, lambda rng, t, r: {"reward": rng.randint(0, 1), "solved": rng.random() < 0.5,
                                         "timed_out": False, "steps": rng.randint(1, 30)}, 4)


def usage_tokens() -> Rows:
    rows = grid(3, 2, lambda rng, t, r: {"reward": rng.random(), "response": usage(rng)}, 5)
    rows[0]["total_tokens"] = 7  # a top-level field that `response.usage` shadows in the statistics
    rows[1]["response"] = {"incomplete_details": {"reason": "content_filter"}}  # no usage on this one
    rows[2]["response"] = {"usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7, "cached": True}}
    return rows


def mask_some() -> Rows:
    rows = grid(4, 3, lambda rng, t, r: {"reward": rng.random(), "tokens": rng.randint(5, 50)}, 6)
    for i, flag in [(0, True), (3, 1), (4, "yes"), (5, True), (1, False), (2, 0), (6, None)]:
        rows[i]["mask_sample"] = flag
    for r in rows:
        if r["_ng_task_index"] == 1:
            r["mask_sample"] = True  # a fully masked task
    return rows


def mask_all() -> Rows:
    return [{**r, "mask_sample": True} for r in grid(3, 2, lambda rng, t, r: {"reward": rng.random()}, 7)]


def mask_one_repeat_left() -> Rows:
    rows = grid(3, 2, lambda rng, t, r: {"reward": rng.random()}, 8)
    return [{**r, "mask_sample": r["_ng_rollout_index"] == 1} for r in rows]


def single_rollout() -> Rows:
    return [row(0, 0, reward=0.25, tokens=12, ok=True, response=usage(random.Random(9)))]


def non_numeric() -> Rows:
    rows = grid(3, 2, lambda rng, t, r: {
        "reward": rng.random(), "answer": f"x{r}", "tags": ["a", t], "info": {"depth": t, "ratio": 0.5},
        "nothing": None, "_private": 3, "trace": {"calls": [{"n": 1}]}}, 10)
    rows[1]["reward"] = None
    rows[2]["reward"] = "invalid"
    del rows[3]["reward"]
    return rows


def negative_and_ints() -> Rows:
    return grid(4, 2, lambda rng, t, r: {"reward": rng.randint(-3, 3), "delta": rng.randint(-10**12, 10**12),
                                         "mixed": rng.choice([1, 2.5, -3, 0.0])}, 11)


def all_int() -> Rows:
    return grid(3, 3, lambda rng, t, r: {"reward": rng.randint(0, 1), "turns": rng.randint(1, 5),
                                         "done": rng.random() < 0.5}, 12)


def ints_with_gaps() -> Rows:
    rows = all_int()
    del rows[4]["turns"]  # one gap makes the column, and so every max/min, float
    return rows


def one_rollout_task() -> Rows:
    rows = grid(4, 3, lambda rng, t, r: {"reward": rng.random(), "n": rng.randint(0, 9)}, 13)
    return [r for r in rows if r["_ng_task_index"] != 2 or r["_ng_rollout_index"] == 1]


def no_numeric_fields() -> Rows:
    return grid(2, 2, lambda rng, t, r: {"reward": "n/a", "answer": str(rng.random())}, 14)


def excluded_suffixes() -> Rows:
    return grid(3, 3, lambda rng, t, r: {"reward": rng.random(), "latency/p95": rng.random(),
                                         "acc_ci_lower": rng.random(), "x/max": rng.random()}, 15)


def perf() -> Rows:
    def make(rng: random.Random, t: int, r: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"reward": rng.random()}
        if rng.random() < 0.8:
            fields["ng_perf"] = {"prompt_tokens": rng.randint(10, 99), "completion_tokens": rng.randint(1, 50),
                                 "num_turns": rng.randint(0, 4), "total_latency_ms": rng.uniform(5, 900),
                                 "token_observability_coverage": rng.choice([0, 0.5, 1.0])}
            if rng.random() < 0.5:
                fields["ng_perf"]["reasoning_tokens"] = rng.randint(0, 9)
        return fields
    return grid(4, 3, make, 16)


def shuffled() -> Rows:
    rows = several_repeats()
    rng = random.Random(17)
    tasks = sorted({r["_ng_task_index"] for r in rows}, reverse=True)
    out = []
    for t in tasks:
        group = [r for r in rows if r["_ng_task_index"] == t]
        rng.shuffle(group)
        out.extend(group)
    return out


def missing_indices() -> Rows:
    return [{"reward": 0.5, "steps": 3}, {"_ng_task_index": 2, "reward": 1.0}]


def large() -> Rows:
    rng = random.Random(18)
    rows = []
    for t in range(40):
        for r in range(8):
            if rng.random() < 0.1:
                continue
            fields: dict[str, Any] = {"reward": rng.choice([0.0, 1.0, rng.random()]),
                                      "response": usage(rng), "mask_sample": rng.random() < 0.05}
            for name in ("a", "b", "c"):
                if rng.random() < 0.8:
                    fields[name] = rng.choice([rng.randint(-50, 50), rng.gauss(0, 100), rng.random() < 0.5])
            rows.append(row(t, r, **fields))
    return rows


def rollouts_as_collected() -> Rows:
    """Whole rollout records, through `verify_response` as the collector strips them."""
    rng = random.Random(19)
    return [verify_response({
        **row(t, r, reward=rng.random()), "responses_create_params": {"input": "hi"}, "ng_trajectory": [1],
        "ng_agent_observations": [], "ng_model_call_capture": {"calls": []},
        "response": {"id": "r", "output": [{"type": "message"}], **usage(rng)}})
        for t in range(3) for r in range(2)]


CASES: dict[str, Callable[[], Rows]] = {f.__name__: f for f in (
    one_repeat, several_repeats, uneven, booleans, usage_tokens, mask_some, mask_all, mask_one_repeat_left,
    single_rollout, non_numeric, negative_and_ints, all_int, ints_with_gaps, one_rollout_task, no_numeric_fields,
    excluded_suffixes, perf, shuffled, missing_indices, large, rollouts_as_collected, lambda: [])}
CASES["empty"] = CASES.pop("<lambda>")
ERROR_CASES: dict[str, Rows] = {
    "duplicate": [row(0, 0, reward=1.0), row(0, 0, reward=0.0)],
    "masked_and_scored": [row(0, 0, reward=1.0), row(0, 0, reward=0.0, mask_sample=True)],
}
T_PPF = [[p, df] for p in (0.975, 0.025, 0.9, 0.99999) for df in (*range(1, 60), 75, 100, 250, 999, 1000, 1001,
                                                                    4096, 10**5, 10**6, 10**7, 0.5, 2.5)]
QUANTILE_INPUTS = [[[float(x) for x in random.Random(n).sample(range(-1000, 1000), n)], q]
                   for n in (1, 2, 3, 4, 7, 10, 101) for q in (0.25, 0.5, 0.75, 0.9, 0.99)]


@pytest.fixture(scope="module")
def nemo(nemo_venv: Path) -> dict[str, Any]:
    """NeMo Gym's answers for every case, t quantile and linear quantile above (one subprocess)."""
    request = {"cases": {name: make() for name, make in CASES.items()} | ERROR_CASES, "t_ppf": T_PPF,
               "quantiles": QUANTILE_INPUTS}
    proc = subprocess.run([str(nemo_venv / "bin" / "python"), str(REFERENCE)], input=orjson.dumps(request),
                          capture_output=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    answer: dict[str, Any] = orjson.loads(proc.stdout)
    return answer


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Where two parsed JSON values differ; floats within 1e-9 relative or 1e-12 absolute, NaN equal to NaN."""
    if isinstance(theirs, dict) and isinstance(ours, dict):
        out = [f"{path}/{k}: only in NeMo Gym's ({theirs[k]!r})" for k in theirs.keys() - ours.keys()]
        out += [f"{path}/{k}: only in ours ({ours[k]!r})" for k in ours.keys() - theirs.keys()]
        for k in theirs.keys() & ours.keys():
            out += differences(ours[k], theirs[k], f"{path}/{k}")
        return out
    if isinstance(theirs, list) and isinstance(ours, list):
        if len(ours) != len(theirs):
            return [f"{path}: {len(ours)} items, NeMo Gym's {len(theirs)}"]
        return [d for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for d in differences(a, b, f"{path}[{i}]")]
    if type(ours) is not type(theirs):
        return [f"{path}: {ours!r} ({type(ours).__name__}), NeMo Gym's {theirs!r} ({type(theirs).__name__})"]
    if isinstance(theirs, float):
        if (math.isnan(ours) and math.isnan(theirs)) or math.isclose(ours, theirs, rel_tol=1e-9, abs_tol=1e-12):
            return []
        return [f"{path}: {ours!r}, NeMo Gym's {theirs!r}"]
    return [] if ours == theirs else [f"{path}: {ours!r}, NeMo Gym's {theirs!r}"]


@pytest.mark.parametrize("case", list(CASES))
def test_equals_nemo_gym(case: str, nemo: dict[str, Any]) -> None:
    theirs = nemo["cases"][case]
    assert theirs["status"] == 200, theirs["body"]
    ours = orjson.loads(orjson.dumps(default_aggregate_metrics(iter(CASES[case]()))))
    diffs = differences(ours, theirs["body"])
    assert not diffs, "\n".join(diffs[:40])


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_rejects_what_nemo_gym_rejects(case: str, nemo: dict[str, Any]) -> None:
    assert nemo["cases"][case]["status"] == 500
    with pytest.raises(ValueError):
        default_aggregate_metrics(ERROR_CASES[case])


def test_cases_exercise_what_they_claim(nemo: dict[str, Any]) -> None:
    """The generated cases reach the branches they are named after, on NeMo Gym's side."""
    body = {name: answer["body"] for name, answer in nemo["cases"].items() if answer["status"] == 200}
    assert body["empty"]["perf_summary"] is None and body["empty"]["agent_metrics"] == {}
    assert body["several_repeats"]["repeat_level_metrics"] and "ci_low_95_across_repeats/mean/reward" in \
        body["several_repeats"]["agent_metrics"]
    assert body["one_repeat"]["repeat_level_metrics"] == []
    assert "mean/input_tokens" in body["usage_tokens"]["agent_metrics"]
    assert body["mask_some"]["agent_metrics"]["coverage/fully_masked_tasks"] == 1
    assert body["mask_all"]["group_level_metrics"] == [] and "num_repeats" not in body["mask_all"]["agent_metrics"]
    assert type(body["all_int"]["agent_metrics"]["max/reward"]) is int
    assert type(body["ints_with_gaps"]["agent_metrics"]["max/reward"]) is float
    assert type(body["booleans"]["agent_metrics"]["max/solved"]) is int
    assert type(body["one_repeat"]["agent_metrics"]["max/turns"]) is float
    assert body["perf"]["perf_summary"]["overall_observability_coverage"] < 1
    task_2 = body["uneven"]["group_level_metrics"][2]
    assert "mean/judge_score" in task_2 and "std/judge_score" not in task_2 and "std/reward" in task_2


def test_t_quantile_equals_scipy(nemo: dict[str, Any]) -> None:
    for (p, df), want in zip(T_PPF, nemo["t_ppf"], strict=True):
        assert math.isclose(t_quantile(p, df), want, rel_tol=1e-13), (p, df)


def test_linear_quantile_equals_pandas(nemo: dict[str, Any]) -> None:
    for (xs, q), want in zip(QUANTILE_INPUTS, nemo["quantiles"], strict=True):
        assert quantile(sorted(xs), q) == want, (len(xs), q)
