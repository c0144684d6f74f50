"""NeMo Gym 0.7.0's default `/aggregate_metrics`, computed here when an environment server cannot answer.

The collector POSTs the verify responses of a run to each environment server's `/aggregate_metrics`; a server
without custom metric hooks answers with `compute_aggregate_metrics` (`nemo_gym/reward_profile.py:1111-1236`),
which runs `RewardProfiler` over pandas DataFrames. `default_aggregate_metrics` gives the same JSON document,
value for value, from one pass over the responses with the standard library only:

    verify responses ──> per task (consecutive)      ──> group_level_metrics
      (mask_sample:        per rollout index, field  ──> repeat_level_metrics ──> *_across_repeats/mean/*
       coverage only)      per field (all rows)      ──> agent_metrics, key_metrics (mean/*, coverage/*)
      ng_perf            ──────────────────────────────> perf_summary

Every rule that is NeMo Gym's, not arithmetic, is here with its source line; the arithmetic (fsum means,
ddof=1 deviations, linear quantiles, Student's t) is `gym_collect.sample_stats`.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping
from functools import cache
from typing import Any

from gym_collect.nemo.perf_summary import PerfSummary
from gym_collect.nemo.rows import ROLLOUT_INDEX_KEY, TASK_INDEX_KEY
from gym_collect.sample_stats import mean, median, quantile, sample_std, t_quantile
from gym_collect.spooled import SpooledList

__all__ = ["default_aggregate_metrics", "verify_response"]

Number = int | float

MASK_SAMPLE_KEY = "mask_sample"
# Fields the collector drops before POSTing (rollout_collection.py:3017-3027); `response` is cut to these.
_STRIPPED_KEYS = frozenset({"response", "responses_create_params", "ng_agent_observations",
                            "ng_model_call_capture", "ng_trajectory"})
_RESPONSE_KEPT = ("usage", "incomplete_details")
# pandas keeps a column int64 only while every value fits; beyond, it is uint64 or object, so float here
_INT64 = range(-(2**63), 2**63)
# metrics_config.py:69-94: a `mean/<field>` per repeat is summarized across repeats unless its name ends so
_NOT_ACROSS_REPEATS_SUFFIXES = (
    "/max", "/min", "/median", "/p5", "/p25", "/p75", "/p95", "/ci_low_95", "/ci_high_95", "/ci_lower",
    "/ci_upper", "_ci_lower", "_ci_upper", "_ci95_lower", "_ci95_upper", "/_ng_attempt_index",
    "/std_dev_across_runs", "/std_err_across_runs", "/avg_sample_std_dev",
)
# compute_aggregate_metrics runs every response under one synthetic agent (reward_profile.py:1150-1157)
_AGENT = "agent"


def verify_response(rollout: Mapping[str, Any]) -> dict[str, Any]:
    """One rollout record as NeMo Gym's collector sends it to `/aggregate_metrics`
    (`rollout_collection.py:3013-3036`): without `responses_create_params`, `ng_agent_observations`,
    `ng_model_call_capture` and `ng_trajectory`, and `response` cut to its `usage` and `incomplete_details`
    (absent when neither is set)."""
    entry = {k: v for k, v in rollout.items() if k not in _STRIPPED_KEYS}
    response = rollout.get("response") or {}
    kept = {k: response[k] for k in _RESPONSE_KEPT if isinstance(response, Mapping) and response.get(k) is not None}
    if kept:
        entry["response"] = kept
    return entry


def default_aggregate_metrics(verify_responses: Iterable[Mapping[str, Any]], *,
                              spool_groups: bool = False) -> dict[str, Any]:
    """NeMo Gym's `AggregateMetrics` for `verify_responses`, as the server's JSON answer holds it.

    Returns `{"group_level_metrics": [...], "agent_metrics": {...}, "key_metrics": {...}, "perf_summary": dict or
    None, "repeat_level_metrics": [...]}`: JSON-safe, equal to what `compute_aggregate_metrics` without custom
    hooks returns after FastAPI's serialization (floats to ~1e-15 relative: sums here are exact-rounded, pandas'
    are pairwise; ints where pandas keeps int64 columns).

    Input: verify responses (`verify_response(rollout)` of each rollout), grouped by `_ng_task_index`, as the
    collector's order (sorted by task, then rollout index) has them; order within a task does not matter, and
    tasks may come in any order (the output is sorted as NeMo Gym sorts it). A missing index counts as 0.
    Rows with a truthy `mask_sample` leave every quality statistic and appear only as `coverage/*` counts.

    Memory: the output (one `rollout_infos` entry per scored rollout), one task's rows at a time, and each numeric
    field's values as 8-byte doubles in an `array('d')` per (rollout index, field), which the per-repeat and the
    run-wide medians and quantiles need (at the end, one field's values at a time as a sorted list); `ng_perf`
    values, when rollouts carry them, in lists.

    With `spool_groups`, `group_level_metrics` is a `SpooledList` (one entry per task, kept in a temporary file,
    the caller closes it) and the tasks must come in increasing order, as the collector sorts them: memory then
    holds no per-task state at all beyond the current task.

    Raises:
        ValueError: a task's rows are not consecutive (with `spool_groups`: tasks not in increasing order);
            two scored rows share (task, rollout index), or a scored
            and a masked one do (NeMo Gym's server answers 500 there); a `response` or its `usage` is not an
            object.
    """
    acc = _Aggregate(spool_groups)
    for vr in verify_responses:
        acc.add(vr)
    return acc.result()


class _Field:
    """One numeric field over every scored row: how many rows have it, extremes, and whether it stays int64."""

    __slots__ = ("count", "is_int", "max", "min")

    def __init__(self, x: Number) -> None:
        self.count, self.min, self.max = 0, x, x
        self.is_int = True

    def add(self, x: Number) -> None:
        self.count += 1
        self.is_int = self.is_int and isinstance(x, int) and x in _INT64
        self.min, self.max = min(self.min, x), max(self.max, x)


class _Task:
    """The rows of one task seen so far: rollout keys, numeric fields of the scored ones, their rollout_infos."""

    __slots__ = ("index", "infos", "masked", "rows", "scored")

    def __init__(self, index: Any) -> None:
        self.index = index
        self.rows: list[dict[str, Number]] = []
        self.infos: list[dict[str, Any]] = []
        self.scored: set[Any] = set()
        self.masked: set[Any] = set()


class _Repeat:
    """The scored rows of one rollout index: how many, and each numeric field's values."""

    __slots__ = ("rows", "values")

    def __init__(self) -> None:
        self.rows = 0
        self.values: dict[str, array[float]] = {}


class _Aggregate:
    """`compute_aggregate_metrics`, fed one verify response at a time."""

    def __init__(self, spool_groups: bool = False) -> None:
        self.spool_groups = spool_groups
        self.responses = self.masked = self.tasks_total = self.tasks_measured = 0
        self.rollout_indices: set[Any] = set()
        self.seen_tasks: set[Any] = set()
        self.task: _Task | None = None
        self.groups: list[dict[str, Any]] | SpooledList = SpooledList() if spool_groups else []
        self.fields: dict[str, _Field] = {}
        self.repeats: dict[Any, _Repeat] = {}
        self.perf = PerfSummary()

    def add(self, vr: Mapping[str, Any]) -> None:
        task_index, rollout_index = vr.get(TASK_INDEX_KEY, 0), vr.get(ROLLOUT_INDEX_KEY, 0)
        if self.task is None or task_index != self.task.index:
            previous = self.task.index if self.task is not None else None
            self._close_task()
            if self.spool_groups:  # increasing order: no set of every task seen
                if previous is not None and not previous < task_index:
                    raise ValueError(f"verify responses of task {task_index!r} come after task {previous!r}; sort "
                                     f"them by ({TASK_INDEX_KEY}, {ROLLOUT_INDEX_KEY})")
            elif task_index in self.seen_tasks:
                raise ValueError(f"verify responses of task {task_index!r} are not consecutive; sort them by "
                                 f"({TASK_INDEX_KEY}, {ROLLOUT_INDEX_KEY})")
            else:
                self.seen_tasks.add(task_index)
            self.task = _Task(task_index)
        task = self.task
        self.responses += 1
        self.rollout_indices.add(rollout_index)
        self.perf.add(vr)
        # reward_profile.py:842-849, 856-891: masked rows are counted, never measured
        if vr.get(MASK_SAMPLE_KEY):
            self.masked += 1
            task.masked.add(rollout_index)
            return
        if rollout_index in task.scored:
            raise ValueError(f"duplicate verify response for ({TASK_INDEX_KEY}, {ROLLOUT_INDEX_KEY}) = "
                             f"({task_index!r}, {rollout_index!r})")
        task.scored.add(rollout_index)
        measured = {k: v for k, v in vr.items() if k != MASK_SAMPLE_KEY}
        usage = _mapping(_mapping(measured.get("response"), "response").get("usage"), "response.usage")
        task.infos.append(_rollout_info(measured, usage, task_index, rollout_index))
        numeric = _numeric_fields({**measured, **usage})
        task.rows.append(numeric)
        repeat = self.repeats.get(rollout_index)
        if repeat is None:
            repeat = self.repeats[rollout_index] = _Repeat()
        repeat.rows += 1
        for name, x in numeric.items():
            field = self.fields.get(name)
            if field is None:
                field = self.fields[name] = _Field(x)
            field.add(x)
            values = repeat.values.get(name)
            if values is None:
                values = repeat.values[name] = array("d")
            values.append(float(x))

    def _close_task(self) -> None:
        task, self.task = self.task, None
        if task is None:
            return
        self.tasks_total += 1
        if task.scored & task.masked:
            raise ValueError(f"task {task.index!r}: rollout indices {sorted(task.scored & task.masked)!r} are both "
                             "masked and scored")
        if not task.rows:
            return  # fully masked: no group (reward_profile.py:880-891)
        self.tasks_measured += 1
        values: dict[str, list[Number]] = {}
        for row in task.rows:
            for name, x in row.items():
                values.setdefault(name, []).append(x)
        n = len(task.rows)
        group = {TASK_INDEX_KEY: task.index}
        for name, xs in values.items():
            group.update(_describe(name, sorted(float(x) for x in xs), min(xs), max(xs), n))
        # reward_profile.py:443-462; expected == present: the rows are synthesized from these very responses
        group.update(sample={"agent_ref": {"name": _AGENT}}, num_rollouts=n, expected_num_rollouts=n,
                     missing_num_rollouts=0, reward_profile_completion_pct=100.0,
                     rollout_infos=sorted(task.infos, key=lambda info: info[ROLLOUT_INDEX_KEY]))
        self.groups.append(group)

    def result(self) -> dict[str, Any]:
        self._close_task()
        scored = self.responses - self.masked
        perf_summary = self.perf.summary()
        # no scored row leaves the groups empty: a spooled one stays the (empty) SpooledList the caller closes
        out: dict[str, Any] = {"group_level_metrics": self.groups if self.spool_groups else [], "agent_metrics": {},
                               "key_metrics": {}, "perf_summary": perf_summary, "repeat_level_metrics": []}
        if not self.responses:
            return out
        coverage = {} if not self.masked else {  # reward_profile.py:928-950
            "coverage/measured_rollouts": scored,
            "coverage/masked_rollouts": self.masked,
            "coverage/measured_tasks": self.tasks_measured,
            "coverage/fully_masked_tasks": self.tasks_total - self.tasks_measured,
        }
        if not scored:  # reward_profile.py:1145-1148
            out.update(agent_metrics=dict(coverage), key_metrics=dict(coverage))
            return out
        agent: dict[str, Any] = {}
        for name, field in self.fields.items():
            xs = sorted(x for repeat in self.repeats.values() for x in repeat.values.get(name, ()))
            agent.update(_describe(name, xs, field.min, field.max, scored))
        # pandas' per-stat Series has one dtype: int64 only if every column is (reward_profile.py:186-213)
        if not all(f.is_int and f.count == scored for f in self.fields.values()):
            _max_min_as_float(agent)
            if isinstance(self.groups, list):
                for group in self.groups:
                    _max_min_as_float(group)
            else:
                self.groups.map = _max_min_as_float  # applied as each spooled group is read back
        repeats = self._repeat_level() if len(self.repeats) > 1 else []
        agent.update(self._across_repeats(repeats))
        agent.update(coverage)
        agent["num_repeats"] = len(self.rollout_indices)  # reward_profile.py:1203, masked rows included
        key_metrics = {k: v for k, v in agent.items() if k.startswith("mean/")}  # reward_profile.py:829-834
        key_metrics.update(coverage)
        if isinstance(self.groups, list):
            self.groups.sort(key=lambda group: group[TASK_INDEX_KEY])
        out.update(group_level_metrics=self.groups, agent_metrics=agent, key_metrics=key_metrics,
                   repeat_level_metrics=repeats)
        return out

    def _repeat_level(self) -> list[dict[str, Any]]:
        """reward_profile.py:242-309, for the one agent, rollout indices in order; rows of a repeat are distinct
        tasks, so its row count is NeMo Gym's `sample_count`."""
        out = []
        for rollout_index in sorted(self.repeats):
            repeat = self.repeats[rollout_index]
            entry: dict[str, Any] = {ROLLOUT_INDEX_KEY: int(rollout_index), "sample_count": repeat.rows,
                                     "missing_count": self.tasks_measured - repeat.rows}
            for name, values in repeat.values.items():
                xs = sorted(values)
                n, m = len(xs), mean(xs)
                std = sample_std(xs, m) if n > 1 else 0.0
                sem = std / n**0.5
                entry.update({f"mean/{name}": m, f"median/{name}": median(xs), f"std/{name}": std,
                              f"sem/{name}": sem, f"min/{name}": xs[0], f"max/{name}": xs[-1],
                              f"p25/{name}": quantile(xs, 0.25), f"p75/{name}": quantile(xs, 0.75)})
                entry.update(_interval("/", name, m, sem, n))
            out.append(entry)
        return out

    def _across_repeats(self, repeats: list[dict[str, Any]]) -> dict[str, float]:
        """reward_profile.py:311-365: each repeat's `mean/<field>` as one observation."""
        out: dict[str, float] = {}
        for name in self.fields:
            key = f"mean/{name}"
            if key.endswith(_NOT_ACROSS_REPEATS_SUFFIXES) or "_across_repeats/" in key:
                continue
            xs = sorted(entry[key] for entry in repeats if key in entry)
            if not xs:
                continue
            n, m = len(xs), mean(xs)
            std = sample_std(xs, m) if n > 1 else 0.0
            se = std / n**0.5
            out.update({f"mean_across_repeats/{key}": m, f"median_across_repeats/{key}": median(xs),
                        f"std_across_repeats/{key}": std, f"min_across_repeats/{key}": xs[0],
                        f"max_across_repeats/{key}": xs[-1], f"se_across_repeats/{key}": se})
            out.update(_interval("_across_repeats/", key, m, se, n))
        return out


def _max_min_as_float(metrics: dict[str, Any]) -> dict[str, Any]:
    for key in metrics:
        if key.startswith(("max/", "min/")):
            metrics[key] = float(metrics[key])
    return metrics


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    """`value or {}`, which NeMo Gym then calls `.get` or `.items` on."""
    if not value:
        return {}
    if not isinstance(value, Mapping):
        raise ValueError(f"verify response: {what} must be an object, got {type(value).__name__}")
    return value


def _numeric_fields(record: Mapping[str, Any]) -> dict[str, Number]:
    """The DataFrame columns of one result (reward_profile.py:408-422): numbers and booleans (as 0/1) under
    keys not starting with `_`, `response.usage` merged over the top level; NaN is pandas' missing value."""
    out: dict[str, Number] = {}
    for k, v in record.items():
        if k.startswith("_"):
            continue
        if isinstance(v, bool):
            out[k] = int(v)
        elif isinstance(v, int | float) and v == v:
            out[k] = v
    return out


def _rollout_info(result: Mapping[str, Any], usage: Mapping[str, Any], task_index: Any,
                  rollout_index: Any) -> dict[str, Any]:
    """reward_profile.py:150-176: `reward` as it is, then numeric usage, then numeric top-level fields (these
    win over usage here, unlike in the statistics)."""
    info: dict[str, Any] = {"rollout_id": f"{task_index}:{rollout_index}", TASK_INDEX_KEY: task_index,
                            ROLLOUT_INDEX_KEY: rollout_index}
    if "reward" in result:
        info["reward"] = result["reward"]
    tops = {k: v for k, v in result.items() if not k.startswith("_") and k not in ("reward", "response")}
    for source in (usage, tops):
        for k, v in source.items():
            if isinstance(v, bool):
                info[k] = int(v)
            elif isinstance(v, int | float):
                info[k] = v
    return info


def _describe(name: str, ordered: list[float], lo: Number, hi: Number, rows: int) -> dict[str, Any]:
    """`describe_dataframe` for one column (reward_profile.py:186-224): NaN results are dropped, and a
    deviation over one value is 0.0 only when the whole group is that one row (pandas gives NaN, which NeMo Gym
    fills with 0 only when every column's deviation is NaN and the column has no gap)."""
    if not ordered:
        return {}
    m = mean(ordered)
    out: dict[str, Any] = {f"mean/{name}": m, f"max/{name}": hi, f"min/{name}": lo,
                           f"median/{name}": median(ordered)}
    if len(ordered) > 1:
        out[f"std/{name}"] = sample_std(ordered, m)
    elif rows == 1:
        out[f"std/{name}"] = 0.0
    return out


@cache
def _t975(df: int) -> float:
    return t_quantile(0.975, df)


def _interval(marker: str, name: str, m: float, scale: float, n: int) -> dict[str, float]:
    """`_confidence_interval` (reward_profile.py:226-240): the 95% t-interval `scipy.stats.t.interval(0.95,
    n - 1, m, scale)` as `ci_low_95<marker><name>` and `ci_high_95<marker><name>`; none for n <= 1, a point
    for scale 0."""
    if n <= 1:
        return {}
    half = 0.0 if scale == 0 else _t975(n - 1) * scale
    return {f"ci_low_95{marker}{name}": m - half, f"ci_high_95{marker}{name}": m + half}
