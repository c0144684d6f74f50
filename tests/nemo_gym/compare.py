"""Compare what NeMo Gym 0.7.0's collector and `collect_rollouts` did on the same input and command line.

Each check returns a list of differences, one readable line each ([] means conforming), so a failing test says what
differs, with field names and example values. Checks:

- `rollouts`: both succeed or both fail; the same (task, rollout) pairs, each once; per pair equal `response`,
  `reward` and every echoed request field (NeMo Gym's result stamps aside: `STAMPS`); the same model calls (multiset
  of `/v1/responses` bodies the stub received: the requests the agents derived from the `/run` bodies).
- `fields`: the same set of keys on every line, stamps included, with equal values.
- `routing`: the same server instances received `POST /run`, as often.
- `materialized_inputs`: `<stem>_materialized_inputs.jsonl` equal line for line (parsed JSON, in file order).
- `aggregate_metrics`: the same server instances received `POST /aggregate_metrics`, and
  `<stem>_aggregate_metrics.json` is equal value for value (`TIMING_KEYS` aside), entries in any order.
- `failures`: `<stem>_failures.jsonl` present on both sides or neither (0.7 leaves an empty one when nothing failed);
  the same failure records per (task, rollout): keys, `_ng_failure_class`, `_ng_failure_terminal`.

Every check also fails when the tool refused the command line (exit 2) that NeMo Gym ran, so no check passes only
because neither side wrote anything.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from tests.nemo_gym.collectors import CollectorRun

# What 0.7.0 stamps on every result (`nemo_gym/rollout_collection.py`, result stamping); compared by `fields`.
STAMPS = frozenset({"_ng_environment_server", "_ng_result_type"})
# Wall-clock figures that may differ between two runs of the same collector.
TIMING_KEYS = frozenset({"perf_summary"})
MAX_EXAMPLES = 3

Pair = tuple[Any, Any]


def _short(value: Any, limit: int = 160) -> str:
    """Compact JSON of `value`, cut at `limit` characters; `<absent>` for a missing field."""
    if value is _ABSENT:
        return "<absent>"
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def pair_of(row: dict[str, Any]) -> Pair:
    """(`_ng_task_index`, `_ng_rollout_index`) of a record (None where missing)."""
    return row.get("_ng_task_index"), row.get("_ng_rollout_index")


def _by_pair(rows: Iterable[dict[str, Any]], label: str, diffs: list[str]) -> dict[Pair, dict[str, Any]]:
    """Index records by pair; a pair seen twice is reported in `diffs`."""
    indexed: dict[Pair, dict[str, Any]] = {}
    for row in rows:
        key = pair_of(row)
        if key in indexed:
            diffs.append(f"{label}: (task, rollout) {key} appears more than once")
        indexed[key] = row
    return indexed


def _pair_sets(nemo: dict[Pair, Any], tool: dict[Pair, Any], what: str) -> list[str]:
    only_nemo, only_tool = sorted(set(nemo) - set(tool), key=str), sorted(set(tool) - set(nemo), key=str)
    diffs = []
    if only_nemo:
        diffs.append(f"{what}: {len(only_nemo)} (task, rollout) only in NeMo Gym's, e.g. {only_nemo[:MAX_EXAMPLES]}")
    if only_tool:
        diffs.append(f"{what}: {len(only_tool)} (task, rollout) only in the tool's, e.g. {only_tool[:MAX_EXAMPLES]}")
    return diffs


def _field_diffs(nemo: dict[Pair, dict[str, Any]], tool: dict[Pair, dict[str, Any]], what: str,
                 include: Callable[[str], bool]) -> list[str]:
    """Per field, how many common pairs differ, with the first example."""
    common = sorted(set(nemo) & set(tool), key=str)
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for key in common:
        a, b = nemo[key], tool[key]
        for name in sorted(set(a) | set(b)):
            if not include(name):
                continue
            va, vb = a.get(name, _ABSENT), b.get(name, _ABSENT)
            if va != vb:
                counts[name] += 1
                examples.setdefault(name, f"{key}: NeMo Gym {_short(va)} vs tool {_short(vb)}")
    return [f"{what}: field {name!r} differs on {n}/{len(common)}, e.g. {examples[name]}"
            for name, n in sorted(counts.items())]


def check_rollouts(nemo: CollectorRun, tool: CollectorRun) -> list[str]:
    """See the module docstring (`rollouts`)."""
    diffs = []
    if (nemo.returncode == 0) != (tool.returncode == 0):
        diffs.append(f"exit: NeMo Gym exited {nemo.returncode}, the tool {tool.returncode}"
                     f" ({(tool.stderr or tool.stdout).strip().splitlines()[-1:] or ''})")
    a = _by_pair(nemo.lines(), "NeMo Gym output", diffs)
    b = _by_pair(tool.lines(), "tool output", diffs)
    diffs += _pair_sets(a, b, "rollouts")
    diffs += _field_diffs(a, b, "rollouts", lambda name: name not in STAMPS)
    calls_a = Counter(json.dumps(body, sort_keys=True) for body in nemo.model_requests)
    calls_b = Counter(json.dumps(body, sort_keys=True) for body in tool.model_requests)
    if calls_a != calls_b:
        missing, extra = calls_a - calls_b, calls_b - calls_a
        diffs.append(f"model calls: {sum(calls_a.values())} from NeMo Gym's run, {sum(calls_b.values())} from the "
                     f"tool's; {sum(missing.values())} only in NeMo Gym's (e.g. {_short(next(iter(missing), ''))}), "
                     f"{sum(extra.values())} only in the tool's (e.g. {_short(next(iter(extra), ''))})")
    return diffs


def check_fields(nemo: CollectorRun, tool: CollectorRun) -> list[str]:
    """See the module docstring (`fields`)."""
    diffs: list[str] = []
    a = _by_pair(nemo.lines(), "NeMo Gym output", diffs)
    b = _by_pair(tool.lines(), "tool output", diffs)
    keys_a = Counter(tuple(sorted(r)) for r in a.values())
    keys_b = Counter(tuple(sorted(r)) for r in b.values())
    if set(keys_a) != set(keys_b):
        only_a = sorted({k for ks in keys_a for k in ks} - {k for ks in keys_b for k in ks})
        only_b = sorted({k for ks in keys_b for k in ks} - {k for ks in keys_a for k in ks})
        diffs.append(f"fields: keys only on NeMo Gym's lines {only_a}, only on the tool's {only_b}")
    diffs += _field_diffs(a, b, "fields", lambda name: name in STAMPS)
    return diffs


def check_routing(nemo: CollectorRun, tool: CollectorRun) -> list[str]:
    """See the module docstring (`routing`)."""
    if nemo.run_counts == tool.run_counts:
        return []
    return [f"routing: POST /run received by {dict(sorted(nemo.run_counts.items()))} under NeMo Gym, "
            f"by {dict(sorted(tool.run_counts.items()))} under the tool"]


def check_materialized_inputs(nemo: CollectorRun, tool: CollectorRun) -> list[str]:
    """See the module docstring (`materialized_inputs`)."""
    suffix = "_materialized_inputs.jsonl"
    if nemo.side_file(suffix).exists() != tool.side_file(suffix).exists():
        return [f"materialized inputs: {suffix} written by NeMo Gym: {nemo.side_file(suffix).exists()}, "
                f"by the tool: {tool.side_file(suffix).exists()}"]
    a, b = nemo.lines(suffix), tool.lines(suffix)
    diffs = []
    if len(a) != len(b):
        diffs.append(f"materialized inputs: {len(a)} lines from NeMo Gym, {len(b)} from the tool")
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            names = sorted(n for n in set(x) | set(y) if x.get(n, _ABSENT) != y.get(n, _ABSENT))
            diffs.append(f"materialized inputs: line {i + 1} differs in {names}, e.g. {names[0]!r}: NeMo Gym "
                         f"{_short(x.get(names[0], _ABSENT))} vs tool {_short(y.get(names[0], _ABSENT))}")
            break
    return diffs


def _without_timing(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _first_difference(a: Any, b: Any, path: str = "") -> str:
    """The JSON path and values of the first difference between `a` and `b` ("" when equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                return f"{path}/{k}: NeMo Gym {_short(a.get(k, _ABSENT))} vs tool {_short(b.get(k, _ABSENT))}"
            found = _first_difference(a[k], b[k], f"{path}/{k}")
            if found:
                return found
        return ""
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path}: {len(a)} entries from NeMo Gym vs {len(b)} from the tool"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = _first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return ""
    return "" if a == b else f"{path or '/'}: NeMo Gym {_short(a)} vs tool {_short(b)}"


def check_aggregate_metrics(nemo: CollectorRun, tool: CollectorRun) -> list[str]:
    """See the module docstring (`aggregate_metrics`)."""
    diffs = []
    if nemo.aggregate_counts != tool.aggregate_counts:
        diffs.append(f"aggregate metrics: POST /aggregate_metrics received by "
                     f"{dict(sorted(nemo.aggregate_counts.items()))} under NeMo Gym, by "
                     f"{dict(sorted(tool.aggregate_counts.items()))} under the tool")
    path_a, path_b = nemo.side_file("_aggregate_metrics.json"), tool.side_file("_aggregate_metrics.json")
    if path_a.exists() != path_b.exists():
        return [*diffs, f"aggregate metrics: _aggregate_metrics.json written by NeMo Gym: {path_a.exists()}, "
                        f"by the tool: {path_b.exists()}"]
    if not path_a.exists():
        return diffs
    a = _in_server_order(_without_timing(json.loads(path_a.read_text())))
    b = _in_server_order(_without_timing(json.loads(path_b.read_text())))
    found = _first_difference(a, b)
    return [*diffs, f"aggregate metrics: {found}"] if found else diffs


def _in_server_order(entries: Any) -> Any:
    """The entries by server and label: 0.7 writes them in the order its requests completed, the tool by server."""
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return entries
    return sorted(entries, key=lambda e: (str(e.get("_ng_environment_server")),
                                          str((e.get("agent_ref") or {}).get("name"))))


def check_failures(nemo: CollectorRun, tool: CollectorRun) -> list[str]:
    """See the module docstring (`failures`)."""
    diffs: list[str] = []
    exists_a, exists_b = nemo.side_file("_failures.jsonl").exists(), tool.side_file("_failures.jsonl").exists()
    if exists_a != exists_b:
        diffs.append(f"failures: _failures.jsonl exists after NeMo Gym's run: {exists_a}, after the tool's: {exists_b}")
    a = _by_pair(nemo.lines("_failures.jsonl"), "NeMo Gym failures", diffs)
    b = _by_pair(tool.lines("_failures.jsonl"), "tool failures", diffs)
    diffs += _pair_sets(a, b, "failures")
    for key in sorted(set(a) & set(b), key=str):
        keys_a, keys_b = set(a[key]), set(b[key])
        if keys_a != keys_b:
            diffs.append(f"failures: {key} keys only in NeMo Gym's record {sorted(keys_a - keys_b)}, "
                         f"only in the tool's {sorted(keys_b - keys_a)}")
        for name in ("_ng_failure_class", "_ng_failure_terminal"):
            if a[key].get(name, _ABSENT) != b[key].get(name, _ABSENT):
                diffs.append(f"failures: {key} {name}: NeMo Gym {_short(a[key].get(name, _ABSENT))} vs tool "
                             f"{_short(b[key].get(name, _ABSENT))}")
    return diffs


def refused(nemo: CollectorRun, tool: CollectorRun) -> list[str]:
    """A difference when the tool rejected (exit 2) a command line NeMo Gym accepted, with the tool's one line."""
    if tool.returncode != 2 or nemo.returncode == 2:
        return []
    last = (tool.stderr or tool.stdout).strip().splitlines()[-1:] or ["(no output)"]
    return [f"refused: the tool exited 2 where NeMo Gym ran: {last[0]}"]


def _guarded(check: Callable[[CollectorRun, CollectorRun], list[str]]) -> Callable[[CollectorRun, CollectorRun],
                                                                                   list[str]]:
    def guarded(nemo: CollectorRun, tool: CollectorRun) -> list[str]:
        return [*refused(nemo, tool), *check(nemo, tool)]

    guarded.__doc__ = check.__doc__
    return guarded


CHECKS: dict[str, Callable[[CollectorRun, CollectorRun], list[str]]] = {
    name: _guarded(check) for name, check in {
        "rollouts": check_rollouts,
        "fields": check_fields,
        "routing": check_routing,
        "materialized_inputs": check_materialized_inputs,
        "aggregate_metrics": check_aggregate_metrics,
        "failures": check_failures,
    }.items()
}
