"""`collect_rollouts` against NeMo Gym 0.7.0's `ng_collect_rollouts`, on the real NeMo Gym servers (issues 8 and 9).

Each case runs both collectors once, with the same `+key=value` command line on the same input (see
`collectors.py`), and every check of `compare.py` is its own test: `test_case[<case>-<check>]`. A check the tool
does not pass yet is marked `xfail(strict=True)` with what differs, so it turns into a failure (XPASS) the day the
collector work lands and the mark must go. Resume across the tools has its own tests below.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.nemo_gym.collectors import CollectorRun, run_merge, run_nemo, run_tool
from tests.nemo_gym.compare import (
    CHECKS,
    check_aggregate_metrics,
    check_failures,
    check_materialized_inputs,
    check_rollouts,
    check_routing,
)
from tests.nemo_gym.conftest import report
from tests.nemo_gym.stack import NemoGymStack
from tests.nemo_gym.stub_model import FAIL_MARKER, StubModel

# The first case also waits for the NeMo Gym venv (minutes on a cold package cache) and the stack.
pytestmark = [pytest.mark.nemo_gym, pytest.mark.timeout(1800)]

DATA = Path(__file__).resolve().parent / "data"
SIMPLE_AGENT = "example_single_tool_call_simple_agent"  # simple_agent behind a legacy_agent relay
SESSION_AGENT = "example_single_tool_call_session_agent"  # simple_agent behind single_agent_turn_legacy
SINGLE_AGENT_TURN = "example_single_tool_call_single_agent_turn"
GYMNASIUM_AGENT = "example_multi_turn_gymnasium_agent"  # gymnasium_agent behind a legacy_agent relay


def load(name: str) -> list[dict[str, Any]]:
    """The bundled NeMo Gym example rows (`data/<name>.jsonl`)."""
    return [orjson.loads(line) for line in (DATA / f"{name}.jsonl").read_bytes().splitlines() if line.strip()]


def agent_ref(name: str) -> dict[str, str]:
    """A row's `agent_ref` naming agent `name`."""
    return {"type": "responses_api_agents", "name": name}


def weather(agent: str | None = None) -> list[dict[str, Any]]:
    """The 5 example_single_tool_call rows, with `agent_ref` set to `agent` when given."""
    return [{**row, "agent_ref": agent_ref(agent)} if agent else row for row in load("example_single_tool_call")]


def failing(row: dict[str, Any]) -> dict[str, Any]:
    """`row` with its user message marked so the stub model answers 400 (the rollout fails)."""
    rcp = dict(row["responses_create_params"])
    rcp["input"] = [{**item, "content": f"{item['content']} {FAIL_MARKER}"} if item.get("role") == "user" else item
                    for item in rcp["input"]]
    return {**row, "responses_create_params": rcp}


def gymnasium() -> list[dict[str, Any]]:
    """The 5 example_multi_turn_gymnasium rows (each with its own `agent_ref`)."""
    return load("example_multi_turn_gymnasium")


def lines(rows: list[dict[str, Any]]) -> bytes:
    """Rows as JSONL (compact, one line each)."""
    return b"".join(orjson.dumps(row) + b"\n" for row in rows)


def caller_indices_and_duplicates() -> bytes:
    """Rows stamped 40, 41, 40 by the caller, then one line twice byte for byte, then one more."""
    rows = weather()
    stamped = [{**rows[0], "_ng_task_index": 40}, {**rows[1], "_ng_task_index": 41}, {**rows[2], "_ng_task_index": 40}]
    return lines(stamped) + lines([rows[3]]) * 2 + lines([rows[4]])


def task_source_rows() -> bytes:
    """Rows as 0.7's `gym dataset collate` writes them: no `agent_ref`, a `task_source` naming the declaring
    instance: an agent (resolved to itself) or a resources server (resolved to its unique agent)."""
    mixed = []
    for w, g in zip(weather(), gymnasium(), strict=True):
        g = {k: v for k, v in g.items() if k != "agent_ref"}
        mixed += [{**w, "task_source": SIMPLE_AGENT}, {**g, "task_source": "example_multi_turn_gymnasium"}]
    return lines(mixed)


def mixed_rows() -> bytes:
    """Weather rows (the simple agent) and gymnasium rows (their own agent), alternating."""
    return lines([r for pair in zip(weather(SIMPLE_AGENT), gymnasium(), strict=True) for r in pair])


def prompt_rows() -> bytes:
    """Gymnasium rows with the question in a field and no `responses_create_params.input` (for `prompt_config`)."""
    rows = []
    for row in gymnasium():
        rcp = {k: v for k, v in row["responses_create_params"].items() if k != "input"}
        rows.append({**row, "question": row["responses_create_params"]["input"][0]["content"],
                     "responses_create_params": rcp})
    return lines(rows)


def hydra_dict(items: str) -> str:
    """The Hydra dict literal `{items}`, its braces doubled for the `str.format` that fills in a case's arguments."""
    return "{{" + items + "}}"


PROMPT_YAML = "system: Answer in one short sentence.\nuser: 'Question: {question}'\n"


@dataclass(frozen=True)
class Case:
    """One side-by-side run: input, shared arguments, and what the checks expect today."""

    name: str
    build: Callable[[], bytes]  # the input file's bytes
    args: tuple[str, ...]  # shared +key=value arguments; "{prompt}" and "{head_port}" are filled in
    xfail: dict[str, str] = field(default_factory=dict)  # check -> what differs today
    skip: dict[str, str] = field(default_factory=dict)  # check -> why it does not apply


# What still differs, by check: both follow from this tool's documented default (record a failed rollout and go on;
# exit 3 while one is missing). See README.md for the observed 0.7 shapes.
AGGREGATED_AFTER_FAILURE = ("the tool goes on after the failed rollout and aggregates the 5 it wrote; 0.7 ends the run "
                            "at the failure, before aggregating")
HANDLED_FAILURE_EXIT = ("exit 3 where 0.7 exits 0: the environment server answers a handled failure, which 0.7 "
                        "records and counts as done; this tool's default (no route_failures_to_sidecar, no "
                        "require_complete) exits 3 while a selected rollout is missing")


def weather_failing() -> bytes:
    """The 5 weather rows, then a copy of the first marked to fail: 6 rows, (5, 0) fails."""
    return lines([*weather(), failing(weather()[0])])


CASES: tuple[Case, ...] = (
    Case("plain_agent", lambda: lines(weather()), (f"+agent_name={SIMPLE_AGENT}",)),
    Case("num_repeats", lambda: lines(gymnasium()), ("+num_repeats=3",)),
    Case("limit", lambda: lines(gymnasium()), ("+limit=2", "+num_repeats=2")),
    Case("mixed_dataset", mixed_rows, ("+num_repeats=2",)),
    Case("single_agent_turn", lambda: lines(weather()), (f"+agent_name={SESSION_AGENT}",)),
    Case("agent_name_overrides_rows", lambda: lines(weather(SESSION_AGENT)), (f"+agent_name={SIMPLE_AGENT}",)),
    Case("task_source_rows", task_source_rows, ()),
    Case("environment_server_name", lambda: lines(weather(SESSION_AGENT)),
         ("+environment_routing_mode=legacy", f"+environment_server_name={SINGLE_AGENT_TURN}")),
    Case("failing_environment", weather_failing, (f"+agent_name={SIMPLE_AGENT}", "+num_samples_in_parallel=1"),
         {"aggregate_metrics": AGGREGATED_AFTER_FAILURE},
         skip={"failures": "0.7's default ends the run at the first failed /run and records nothing; the tool's "
                           "documented default records the failure and goes on"}),
    Case("failing_single_agent_turn", weather_failing, (f"+agent_name={SESSION_AGENT}", "+num_samples_in_parallel=1"),
         {"rollouts": HANDLED_FAILURE_EXIT}),
    Case("route_failures_to_sidecar_true", weather_failing,
         (f"+agent_name={SIMPLE_AGENT}", "+route_failures_to_sidecar=true")),
    Case("route_failures_to_sidecar_false", weather_failing,
         (f"+agent_name={SIMPLE_AGENT}", "+route_failures_to_sidecar=false", "+num_samples_in_parallel=1")),
    Case("caller_indices_and_duplicates", caller_indices_and_duplicates,
         (f"+agent_name={SIMPLE_AGENT}", "+num_repeats=2")),
    Case("crlf_lines_and_duplicates", lambda: caller_indices_and_duplicates().replace(b"\n", b"\r\n"),
         (f"+agent_name={SIMPLE_AGENT}",)),
    Case("num_repeats_add_seed", lambda: lines(weather()),
         (f"+agent_name={SIMPLE_AGENT}", "+num_repeats=2", "+num_repeats_add_seed=true")),
    Case("prompt_config", prompt_rows, ("+prompt_config={prompt}",)),
    Case("limit_zero", lambda: lines(gymnasium()), ("+limit=0",)),
    Case("head_server_port_key", lambda: lines(gymnasium()), ("+head_server.port={head_port}",)),
    Case("disable_aggregation", lambda: lines(gymnasium()), ("+disable_aggregation=true",)),
    Case("count_failure_classes_as_zero", weather_failing,
         (f"+agent_name={SIMPLE_AGENT}", "+route_failures_to_sidecar=true",
          "+count_failure_classes_as_zero=[agent_run_error]")),
    Case("count_missing_rollouts_as_zero", weather_failing,
         (f"+agent_name={SIMPLE_AGENT}", "+route_failures_to_sidecar=true", "+count_missing_rollouts_as_zero=true")),
    Case("num_repeats_map", mixed_rows, ("+num_repeats=" + hydra_dict(f"{SIMPLE_AGENT}:3,_default:2"),)),
    Case("num_repeats_null", lambda: lines(gymnasium()), ("+num_repeats=null",)),
    Case("agent_map", lambda: lines(weather(SESSION_AGENT)),
         ("+agent_map=" + hydra_dict(f"{SESSION_AGENT}:{SIMPLE_AGENT}"),)),
    Case("fan_out", lambda: lines(weather(SIMPLE_AGENT)),
         ("+fan_out=" + hydra_dict(f"{SIMPLE_AGENT}:[{SIMPLE_AGENT},{SESSION_AGENT}]"),)),
    Case("interleave_repeats", mixed_rows, ("+num_repeats=2", "+interleave_repeats=true")),
    Case("responses_create_params", lambda: lines(weather()),
         (f"+agent_name={SIMPLE_AGENT}", "+responses_create_params.temperature=0.25",
          "+responses_create_params.max_output_tokens=64")),
)


def _params() -> list[Any]:
    params = []
    for case in CASES:
        for check in CHECKS:
            marks = [pytest.mark.xfail(strict=True, reason=case.xfail[check])] if check in case.xfail else []
            params.append(pytest.param(case, check, id=f"{case.name}-{check}", marks=marks))
    return params


@pytest.fixture(scope="package")
def runs() -> dict[str, tuple[CollectorRun, CollectorRun]]:
    """Both collectors' runs per case, made once by the first check of the case that needs them."""
    return {}


def run_case(case: Case, stack: NemoGymStack, stub: StubModel, base: Path) -> tuple[CollectorRun, CollectorRun]:
    """Write the case's input (and prompt file), then run NeMo Gym's collector and the tool on it."""
    case_dir = base / case.name
    case_dir.mkdir(parents=True, exist_ok=True)
    source = case_dir / "input.jsonl"
    source.write_bytes(case.build())
    prompt = case_dir / "prompt.yaml"
    prompt.write_text(PROMPT_YAML)
    args = [f"+input_jsonl_fpath={source}",
            *(a.format(prompt=prompt, head_port=stack.head_port) for a in case.args)]
    return run_nemo(stack, stub, case_dir / "nemo", args), run_tool(stack, stub, case_dir / "tool", args)


@pytest.mark.parametrize(("case", "check"), _params())
def test_case(case: Case, check: str, stack: NemoGymStack, stub: StubModel,
              runs: dict[str, tuple[CollectorRun, CollectorRun]], tmp_path_factory: pytest.TempPathFactory) -> None:
    if check in case.skip:
        pytest.skip(case.skip[check])
    if case.name not in runs:
        runs[case.name] = run_case(case, stack, stub, tmp_path_factory.mktemp("conformance"))
    nemo, tool = runs[case.name]
    assert nemo.returncode == 0 or case.name.startswith(("failing", "route_failures_to_sidecar_false")), \
        nemo.describe()
    diffs = CHECKS[check](nemo, tool)
    report({"case": case.name, "check": check, "diffs": diffs, "nemo_s": round(nemo.elapsed_s, 2),
            "tool_s": round(tool.elapsed_s, 2), "nemo_exit": nemo.returncode, "tool_exit": tool.returncode,
            "nemo_runs": nemo.run_counts, "tool_runs": tool.run_counts, "nemo_aggregates": nemo.aggregate_counts,
            "tool_aggregates": tool.aggregate_counts})
    assert diffs == [], "\n".join([*diffs, tool.describe()])


# Resume across the tools. The first run leaves one rollout failed (the stub rejects the marked row, and
# route_failures_to_sidecar keeps NeMo Gym going), the stub then heals, and the second run resumes in the same
# directory. The reference is NeMo Gym resuming its own output; the tool's first run gets its default failure
# handling (record and go on), so that the interoperation itself is what these tests observe.
RESUME_FIRST = (f"+agent_name={SIMPLE_AGENT}", "+num_samples_in_parallel=1")
RESUME_SECOND = (f"+agent_name={SIMPLE_AGENT}", "+num_samples_in_parallel=1", "+resume_from_cache=true")


def _resume(first: Callable[..., CollectorRun], second: Callable[..., CollectorRun], first_extra: tuple[str, ...],
            stack: NemoGymStack, stub: StubModel, workdir: Path, source: Path) -> CollectorRun:
    args = [f"+input_jsonl_fpath={source}"]
    stub.fail_marked = True
    try:
        first(stack, stub, workdir, [*args, *RESUME_FIRST, *first_extra])
    finally:
        stub.fail_marked = False
    try:
        return second(stack, stub, workdir, [*args, *RESUME_SECOND])
    finally:
        stub.fail_marked = True


@pytest.fixture(scope="package")
def nemo_resumed(stack: NemoGymStack, stub: StubModel, tmp_path_factory: pytest.TempPathFactory) -> CollectorRun:
    """NeMo Gym resuming NeMo Gym: the reference for both directions."""
    base = tmp_path_factory.mktemp("resume_reference")
    source = base / "input.jsonl"
    source.write_bytes(weather_failing())
    return _resume(run_nemo, run_nemo, ("+route_failures_to_sidecar=true",), stack, stub, base / "run", source)


RESUME_XFAIL: dict[str, str] = {}


@pytest.mark.parametrize("direction", [
    pytest.param(d, marks=[pytest.mark.xfail(strict=True, reason=RESUME_XFAIL[d])] if d in RESUME_XFAIL else [])
    for d in ("tool_resumes_nemo", "nemo_resumes_tool")])
def test_resume_across_tools(direction: str, stack: NemoGymStack, stub: StubModel, nemo_resumed: CollectorRun,
                             tmp_path_factory: pytest.TempPathFactory) -> None:
    base = tmp_path_factory.mktemp(direction)
    source = base / "input.jsonl"
    source.write_bytes(weather_failing())
    started = time.monotonic()
    if direction == "tool_resumes_nemo":
        final = _resume(run_nemo, run_tool, ("+route_failures_to_sidecar=true",), stack, stub, base / "run", source)
    else:
        final = _resume(run_tool, run_nemo, (), stack, stub, base / "run", source)
    diffs = [*check_rollouts(nemo_resumed, final), *check_failures(nemo_resumed, final),
             *check_materialized_inputs(nemo_resumed, final), *check_aggregate_metrics(nemo_resumed, final)]
    report({"case": f"resume_{direction}", "check": "resume", "diffs": diffs,
            "elapsed_s": round(time.monotonic() - started, 2), "final_exit": final.returncode})
    assert diffs == [], "\n".join([*diffs, final.describe()])


def test_shards_merged_equal_nemo_gyms_single_run(stack: NemoGymStack, stub: StubModel,
                                                  runs: dict[str, tuple[CollectorRun, CollectorRun]],
                                                  tmp_path_factory: pytest.TempPathFactory) -> None:
    """The caller-indices-and-duplicates input split into two shards by the tool, merged by `merge_rollouts`
    (aggregated by the environment servers through the head server), against NeMo Gym's single run."""
    case = next(c for c in CASES if c.name == "caller_indices_and_duplicates")
    if case.name not in runs:
        runs[case.name] = run_case(case, stack, stub, tmp_path_factory.mktemp("conformance"))
    nemo, _ = runs[case.name]
    base = tmp_path_factory.mktemp("shards")
    source = base / "input.jsonl"
    source.write_bytes(case.build())
    shard_runs = [run_tool(stack, stub, base / "shards", [f"+input_jsonl_fpath={source}", *case.args,
                                                          "+num_shards=2", f"+shard_id={k}"]) for k in range(2)]
    assert all(r.returncode == 0 for r in shard_runs), [r.describe() for r in shard_runs]
    merged = run_merge(stack, stub, base / "merged", sorted((base / "shards").glob("rollouts_shard-*-of-02.jsonl")))
    assert merged.returncode == 0, merged.describe()
    for shard in shard_runs:
        merged.run_counts.update(shard.run_counts)
        merged.model_requests.extend(shard.model_requests)
    diffs = [*check_rollouts(nemo, merged), *check_routing(nemo, merged), *check_aggregate_metrics(nemo, merged)]
    a = sorted(orjson.dumps(line, option=orjson.OPT_SORT_KEYS) for line in nemo.lines("_materialized_inputs.jsonl"))
    b = sorted(orjson.dumps(line, option=orjson.OPT_SORT_KEYS) for line in merged.lines("_materialized_inputs.jsonl"))
    if a != b:
        diffs.append(f"materialized inputs: {len(a)} lines from NeMo Gym, {len(b)} merged from the shards, "
                     "not the same set")
    report({"case": "shards_merged", "check": "merge", "diffs": diffs})
    assert diffs == [], "\n".join([*diffs, merged.describe()])
