"""The rows each server's `/aggregate_metrics` is given, built as NeMo Gym 0.7 builds them
(`nemo_gym/rollout_collection.py`):

- every rollout of the output, stripped to its verify-response shape (`_fetch_agent_metrics`, `:3012-3036`);
- with `count_failure_classes_as_zero`: for each (task, rollout) without a rollout, its latest failure record
  when that record's class is listed, as a zero (`_failure_rows_counted_as_zero`, `_counted_failure_row`,
  `:1654-1709`);
- with `count_missing_rollouts_as_zero`: a zero for each materialized (task, rollout) with neither a rollout
  nor a failure record (`_missing_rollout_rows_counted_as_zero`, `:1784-1841`);
- the added rows take their task's dataset fields from its materialized row (`_fill_task_fields`, `:1746-1781`);
- sorted by (task, rollout) (`_rollout_order_key`, `:1712-1714`), then grouped by environment server
  (`_call_aggregate_metrics`, `:2984-3005`; a row's group is decided by `Grouper`).

    outputs, failures, materialized ──read, strip──> ExternalSorter on (task, rollout, source)
        ──one look at each (task, rollout): its rollouts, else its counted failure, else its zero──>
        one spool file per group, in (task, rollout) order

Memory is flat in the number of rollouts: the sorter's buffer (`sort_buffer_bytes` of stripped rows) plus, per
group, the field names its rollouts carry. Rows are stripped as they are read, so a rollout's `response` and
`responses_create_params` never stay in memory.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, TypeVar

import orjson

from gym_collect.external_sort import ExternalSorter
from gym_collect.nemo.routing import AGENT_REF_KEY, ENVIRONMENT_SERVER_KEY
from gym_collect.nemo.rows import RESPONSES_CREATE_PARAMS_KEY, ROLLOUT_INDEX_KEY, TASK_INDEX_KEY
from gym_collect.writer.lines import exact_copy, read_records

log = logging.getLogger(__name__)
T = TypeVar("T")

FAILURE_CLASS_KEY = "_ng_failure_class"
# Heavy fields a verify response is sent without (`rollout_collection.py:3016-3028`).
STRIPPED_KEYS = frozenset({"response", RESPONSES_CREATE_PARAMS_KEY, "ng_agent_observations",
                           "ng_model_call_capture", "ng_trajectory"})
KEPT_RESPONSE_KEYS = ("usage", "incomplete_details")
DEFAULT_SORT_BUFFER_BYTES = 4 << 20
ITEM_OVERHEAD_BYTES = 160  # a sort item's tuple, ints and bytes object, beside its payload
ROLLOUT, FAILURE, MATERIALIZED = 0, 1, 2  # sources, in the order they stand for one (task, rollout)

_Item = tuple[int, int, int, int, bytes]  # task, rollout, source, group number, payload


def verify_response(row: Mapping[str, Any]) -> dict[str, Any]:
    """`row` without `STRIPPED_KEYS`, keeping `response.usage` and `response.incomplete_details` when present
    (`rollout_collection.py:3014-3036`)."""
    entry = {k: v for k, v in row.items() if k not in STRIPPED_KEYS}
    response = row.get("response")
    if isinstance(response, Mapping):
        kept = {k: response[k] for k in KEPT_RESPONSE_KEYS if response.get(k) is not None}
        if kept:
            entry["response"] = kept
    return entry


def counted_failure_row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A failure record as a scored row: no `_ng_failure_*`, `failure_kind` or `failure_reason`,
    `mask_sample: False`, `reward` 0.0 unless it has one (`_counted_failure_row`, `:1696-1709`)."""
    scored = {k: v for k, v in record.items()
              if not k.startswith("_ng_failure_") and k not in ("failure_kind", "failure_reason")}
    scored["mask_sample"] = False
    scored.setdefault("reward", 0.0)
    return scored


@dataclass(frozen=True)
class MetricSources:
    """Where the rows come from: rollout files (a torn last line is skipped), failure records, materialized
    inputs (`<stem>_materialized_inputs.jsonl`). Several of each for the shards of one run."""

    outputs: Sequence[Path]
    failures: Sequence[Path] = ()
    materialized: Sequence[Path] = ()


class Grouper:
    """A row's group, as `_metrics_group` decides it (`rollout_collection.py:1725-1743`): its
    `_ng_environment_server` stamp, else the one group that serves its agent (`agent_groups`, then the stamped
    rows seen so far), else its agent's name, else `default` (rows without `agent_ref` sent to `agent_url`)."""

    def __init__(self, agent_groups: Mapping[str, str], default: str | None) -> None:
        self.agent_groups = dict(agent_groups)
        self.default = default
        self._seen: dict[str, set[str]] = {}

    def __call__(self, row: Mapping[str, Any]) -> str | None:
        stamp = row.get(ENVIRONMENT_SERVER_KEY)
        agent = agent_name(row)
        if isinstance(stamp, str):
            if agent is not None:
                self._seen.setdefault(agent, set()).add(stamp)
            return stamp
        if agent is None:
            return self.default
        if agent in self.agent_groups:
            return self.agent_groups[agent]
        seen = self._seen.get(agent, ())
        return next(iter(seen)) if len(seen) == 1 else agent


def agent_name(row: Mapping[str, Any]) -> str | None:
    """`agent_ref.name` of a row, if it is a string."""
    ref = row.get(AGENT_REF_KEY)
    name = ref.get("name") if isinstance(ref, Mapping) else None
    return name if isinstance(name, str) else None


@dataclass
class GroupRows:
    """One group's rows, spooled to `path` (one compact JSON object a line, in (task, rollout) order).

    `agent`: the first `agent_ref.name` among its rows; `stamped`: whether a row carries the group as its
    `_ng_environment_server`.
    """

    name: str
    path: Path
    count: int = 0
    agent: str | None = None
    stamped: bool = False
    carried: set[str] = field(default_factory=set, repr=False)  # field names its rollouts carry

    def rows(self) -> Iterator[dict[str, Any]]:
        """The rows, parsed, read from the spool file."""
        with self.path.open("rb") as f:
            for line in f:
                yield orjson.loads(line)


class MetricInputs:
    """Builds the rows of every group (module docstring) in spool files under a temporary folder.

    Context manager; leaving it removes the spool files. `build()` reads the sources once (blocking: run it in
    a worker thread) and returns the groups by name; `counted_failures`, `imputed_zeros` and `ungrouped`
    say what it added and left out. Raises `OutputError` for a line that is not a JSON object, `OSError` when
    the temporary folder cannot be written.

    Args:
        sources: the files to read.
        grouper: decides each row's group.
        failure_classes: `count_failure_classes_as_zero`.
        count_missing: `count_missing_rollouts_as_zero`.
        folder: where the temporary folder goes (default: the system's, `TMPDIR`).
        sort_buffer_bytes: the sort's memory bound (stripped rows), beyond which it spills to disk.
    """

    def __init__(self, sources: MetricSources, grouper: Grouper, *, failure_classes: Sequence[str] = (),
                 count_missing: bool = False, folder: Path | None = None,
                 sort_buffer_bytes: int = DEFAULT_SORT_BUFFER_BYTES) -> None:
        self.sources = sources
        self.grouper = grouper
        self.failure_classes = frozenset(failure_classes)
        self.count_missing = count_missing
        self.folder = folder
        self.sort_buffer_bytes = sort_buffer_bytes
        self.counted_failures = self.imputed_zeros = self.ungrouped = 0
        self.spilled_runs = 0
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._folder = Path()
        self._groups: list[GroupRows] = []
        self._numbers: dict[str, int] = {}

    def __enter__(self) -> MetricInputs:
        self._tmp = tempfile.TemporaryDirectory(prefix="gym_collect_aggregate_", dir=self.folder)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def build(self, stop: threading.Event | None = None) -> dict[str, GroupRows]:
        """Read, strip, sort and spool every row; the groups that got at least one row, by name. Raises `Stopped`
        soon after `stop` is set."""
        assert self._tmp is not None, "use MetricInputs as a context manager"
        self._folder = Path(self._tmp.name)
        stop = stop or threading.Event()
        with ExternalSorter[_Item](_pair_source, max_buffer=self.sort_buffer_bytes, size=_item_size,
                                   folder=self._folder) as sorter:
            for path in self.sources.outputs:
                for _, row in watched(read_records(path, skip_torn_tail=True), stop):
                    number = self._group_number(row, carried=True)
                    sorter.add((*_pair(row), ROLLOUT, number, exact_copy(orjson.dumps(verify_response(row)))))
            if self.failure_classes or self.count_missing:
                for path in self.sources.failures:
                    for _, record in watched(read_records(path, skip_torn_tail=True), stop):
                        sorter.add((*_pair(record), FAILURE, self._group_number(record), self._failure(record)))
                for path in self.sources.materialized:
                    if not path.exists():
                        if self.count_missing:
                            log.warning("%s is missing; rollouts owed by it cannot be counted as zeros", path)
                        continue
                    for _, row in watched(read_records(path, skip_torn_tail=True), stop):
                        number = self._group_number(row)
                        sorter.add((*_pair(row), MATERIALIZED, number, self._task_fields(row, number)))
            self._spool(watched(sorter.sorted(), stop))
            self.spilled_runs = sorter.spilled_runs
        return {group.name: group for group in self._groups if group.count}

    def _group_number(self, row: Mapping[str, Any], *, carried: bool = False) -> int:
        """The number of the row's group (-1: none), noting its agent, its stamp and (`carried`, for rollouts)
        its field names."""
        name = self.grouper(row)
        if name is None:
            return -1
        number = self._numbers.get(name)
        if number is None:
            number = self._numbers[name] = len(self._groups)
            self._groups.append(GroupRows(name, self._folder / f"group-{number}.jsonl"))
        group = self._groups[number]
        group.agent = group.agent or agent_name(row)
        group.stamped = group.stamped or row.get(ENVIRONMENT_SERVER_KEY) == name
        if carried:
            group.carried.update(row)
        return number

    def _failure(self, record: Mapping[str, Any]) -> bytes:
        """A listed class: the scored row; otherwise b"" (recorded, so never a missing zero, but not counted)."""
        if record.get(FAILURE_CLASS_KEY) not in self.failure_classes:
            return b""
        return exact_copy(orjson.dumps(verify_response(counted_failure_row(record))))

    def _task_fields(self, row: Mapping[str, Any], number: int) -> bytes:
        """What a materialized row gives an added row: its identity, and the dataset fields the group's
        rollouts carry (`_fill_task_fields`: not `_`-prefixed, not the request or the response)."""
        carried = self._groups[number].carried if number >= 0 else set()
        fill = {k: row[k] for k in carried & row.keys()
                if not k.startswith("_") and k not in (RESPONSES_CREATE_PARAMS_KEY, "response")}
        identity = {TASK_INDEX_KEY: row.get(TASK_INDEX_KEY), ROLLOUT_INDEX_KEY: row.get(ROLLOUT_INDEX_KEY),
                    AGENT_REF_KEY: row.get(AGENT_REF_KEY)}
        if ENVIRONMENT_SERVER_KEY in row:
            identity[ENVIRONMENT_SERVER_KEY] = row[ENVIRONMENT_SERVER_KEY]
        return exact_copy(orjson.dumps({"identity": identity, "fill": fill}))

    def _spool(self, items: Iterator[_Item]) -> None:
        """One look at each (task, rollout), in order: its rollouts, else its latest failure record if counted,
        else a zero for its materialized row (`count_missing`)."""
        files: dict[int, IO[bytes]] = {}

        def emit(number: int, line: bytes) -> None:
            if number < 0:
                self.ungrouped += 1
                return
            f = files.get(number)
            if f is None:
                f = files[number] = self._groups[number].path.open("wb")
            f.write(line + b"\n")
            self._groups[number].count += 1

        def settle(failure: tuple[int, bytes] | None, material: tuple[int, bytes] | None) -> None:
            task_fields = orjson.loads(material[1]) if material is not None else None
            if failure is not None:
                if failure[1]:
                    scored = orjson.loads(failure[1])
                    for k, v in (task_fields["fill"] if task_fields else {}).items():
                        scored.setdefault(k, v)
                    self.counted_failures += 1
                    emit(failure[0], orjson.dumps(scored))
            elif task_fields is not None and self.count_missing and material is not None:
                zero = {**task_fields["identity"], "reward": 0.0}
                for k, v in task_fields["fill"].items():
                    zero.setdefault(k, v)
                self.imputed_zeros += 1
                emit(material[0], orjson.dumps(zero))

        try:
            pair: tuple[int, int] | None = None
            has_rollout = False
            failure: tuple[int, bytes] | None = None
            material: tuple[int, bytes] | None = None
            for task, rollout, source, number, payload in items:
                if (task, rollout) != pair:
                    if pair is not None and not has_rollout:
                        settle(failure, material)
                    pair, has_rollout, failure, material = (task, rollout), False, None, None
                if source == ROLLOUT:
                    has_rollout = True
                    emit(number, payload)
                elif source == FAILURE:
                    failure = (number, payload)  # the latest record stands (`_latest_failure_rows`)
                elif material is None:
                    material = (number, payload)
            if pair is not None and not has_rollout:
                settle(failure, material)
        finally:
            for f in files.values():
                f.close()


class Stopped(Exception):
    """The work was asked to stop (`watched`)."""


def watched(items: Iterable[T], stop: threading.Event, every: int = 1024) -> Iterator[T]:
    """`items`, raising `Stopped` at the first look at `stop` after it is set (one look every `every` items)."""
    for n, item in enumerate(items):
        if n % every == 0 and stop.is_set():
            raise Stopped("stopped")
        yield item


def _index(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0  # 0.7: `or 0`


def _pair(row: Mapping[str, Any]) -> tuple[int, int]:
    return _index(row.get(TASK_INDEX_KEY)), _index(row.get(ROLLOUT_INDEX_KEY))


def _pair_source(item: _Item) -> tuple[int, int, int]:
    return item[0], item[1], item[2]


def _item_size(item: _Item) -> int:
    return len(item[4]) + ITEM_OVERHEAD_BYTES
