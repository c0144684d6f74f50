"""NeMo Gym 0.7's aggregate metrics after a run (`_call_aggregate_metrics`, `nemo_gym/rollout_collection.py:2957-3099`).

    output, failures, materialized ──MetricInputs──> rows per group (stripped, (task, rollout) order)
        ──one streamed POST {server}/aggregate_metrics per group, concurrently──> AggregateMetrics
        (no endpoint, an error, a timeout, a bad answer: NeMo Gym's default aggregation, computed locally)
        ──> <stem>_aggregate_metrics.json, one entry per group, written atomically

A group is an environment server (what results carry as `_ng_environment_server`), or an agent where no
environment server fronts it (older head servers, `agent_url`, `agents.NAME=URL`). Aggregation never changes
a run's exit code: every problem is one log line.
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import threading
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import IO, Any, TypeVar

import aiohttp
import ijson
import orjson

from gym_collect.errors import ConfigError
from gym_collect.nemo.default_metrics import default_aggregate_metrics
from gym_collect.nemo.head import AGENT_TYPE, ENVIRONMENT_TYPE, HeadDocument
from gym_collect.nemo.metric_inputs import (
    DEFAULT_SORT_BUFFER_BYTES,
    Grouper,
    GroupRows,
    MetricInputs,
    MetricSources,
    watched,
)
from gym_collect.nemo.routing import AGENT_REF_KEY, ENVIRONMENT_SERVER_KEY, Route
from gym_collect.redact import display_url
from gym_collect.spooled import StreamedList
from gym_collect.writer import OutputPaths, replace_atomic

log = logging.getLogger(__name__)
T = TypeVar("T")

ENDPOINT = "/aggregate_metrics"
BODY_CHUNK_BYTES = 1 << 18  # rows read from the spool file per chunk of the streamed request body
MAX_SHOWN_BODY = 200  # characters of an error answer quoted in the warning
NO_ENDPOINT_STATUSES = (404, 405)
ANSWER_CHUNK_BYTES = 1 << 16  # of a server's answer, copied to its temporary file
NOT_JSON = "not JSON"
_OPENING = frozenset({"start_map", "start_array"})
_CLOSING = frozenset({"end_map", "end_array"})
PER_TASK_FIELDS = ("group_level_metrics", "repeat_level_metrics")  # in the file only: they grow with the run
# `AggregateMetrics` (`nemo_gym/config_types.py:933-966`): every field has a default.
METRIC_FIELDS: tuple[tuple[str, type], ...] = (("agent_metrics", dict), ("key_metrics", dict),
                                               ("group_level_metrics", list), ("repeat_level_metrics", list))
LOCAL_NOTE = ("NeMo Gym's default aggregation computed locally (a server's own metrics, such as pass@k, are "
              "missing)")


@dataclass(frozen=True)
class AggregationTarget:
    """Where one group's rows go: `POST {url}/aggregate_metrics`.

    `url`: the environment server's base URL, or the agent's where no environment server fronts it. `agent`:
    the agent the group is labelled by (None: the first agent among its rows). `is_environment_server`: the
    group is an environment server (its name goes into the entry's `_ng_environment_server`); None: it is when
    its rows carry it as their `_ng_environment_server`.
    """

    url: str
    agent: str | None = None
    is_environment_server: bool | None = True


def targets_from_routes(routes: Mapping[str, Route]) -> dict[str, AggregationTarget]:
    """The targets of a run's routes (routing key -> `Route`): one per environment server, labelled by the first
    agent behind it (`Route.label`), and one per agent reached directly."""
    targets: dict[str, AggregationTarget] = {}
    for agent, route in routes.items():
        name = route.label(agent)
        if route.environment_server is not None:
            targets.setdefault(route.environment_server, AggregationTarget(route.url, name))
        else:
            targets.setdefault(agent, AggregationTarget(route.url, name, is_environment_server=False))
    return targets


def targets_from_head(head: HeadDocument) -> dict[str, AggregationTarget]:
    """A target for every environment server and agent of a head server's document that has a usable address;
    environment servers are labelled by the agent they are attributed to (`HeadDocument.attributed_agent`)."""
    targets: dict[str, AggregationTarget] = {}
    for server_type in (ENVIRONMENT_TYPE, AGENT_TYPE):
        for instance in head.of_type(server_type):
            try:
                url = head.address(instance.name)
            except ConfigError:
                continue  # a group served by it is computed locally, with a warning naming it
            if server_type == ENVIRONMENT_TYPE:
                targets[instance.name] = AggregationTarget(url, head.attributed_agent(instance.name))
            else:
                targets.setdefault(instance.name, AggregationTarget(url, instance.name, is_environment_server=False))
    return targets


def label_runs(agent_by_group: Mapping[str, str | None]) -> dict[str, str]:
    """Each group's label: its agent's name when that agent labels no other group, else the group's own name;
    a label that would still repeat falls back to the group's name too. Independent of the mapping's order,
    every label unique (`label_runs`, `nemo_gym/global_config.py:298-320`)."""
    groups_by_agent: dict[str, set[str]] = defaultdict(set)
    for group, agent in agent_by_group.items():
        if agent is not None:
            groups_by_agent[agent].add(group)
    labels = {group: agent if agent is not None and len(groups_by_agent[agent]) == 1 else group
              for group, agent in agent_by_group.items()}
    while True:
        counts = Counter(labels.values())
        clashing = [group for group, label in labels.items() if counts[label] > 1 and label != group]
        if not clashing:
            return labels
        for group in clashing:
            labels[group] = group


async def aggregate_run(session: aiohttp.ClientSession, paths: OutputPaths, targets: Mapping[str, AggregationTarget],
                        *, count_failure_classes_as_zero: Sequence[str], count_missing_rollouts_as_zero: bool,
                        timeout_s: float | None, redact: Callable[[str], str] = lambda s: s,
                        sort_buffer_bytes: int = DEFAULT_SORT_BUFFER_BYTES) -> list[dict[str, Any]] | None:
    """Aggregate a run's rollouts per group and write `paths.aggregate_metrics`; the entries written without
    their per-task lists (`PER_TASK_FIELDS`, in the file only), or None when nothing was written (no rollouts,
    or an error, logged as one line).

    Rows: `paths.output`, plus `paths.failures` and `paths.materialized_inputs` as the counting options ask
    (`gym_collect.nemo.metric_inputs`). `targets`: group name -> `AggregationTarget`; a row's group is its
    `_ng_environment_server` stamp, else the group of its `agent_ref.name`, else the only target when there is
    one (rows sent to `agent_url` without `agent_ref`). Each group's request runs under `timeout_s` (None: no
    limit). Messages pass through `redact` (secrets in URLs or echoed in error answers). Memory: see
    `aggregate_files`. Raises nothing but `asyncio.CancelledError`.
    """
    by_agent: dict[str, list[str]] = defaultdict(list)
    for group, target in targets.items():
        if target.agent is not None:
            by_agent[target.agent].append(group)
    grouper = Grouper({agent: groups[0] for agent, groups in by_agent.items() if len(groups) == 1},
                      default=next(iter(targets)) if len(targets) == 1 else None)
    sources = MetricSources((paths.output,), (paths.failures,), (paths.materialized_inputs,))
    return await aggregate_files(session, sources, paths.aggregate_metrics, targets.get, grouper=grouper,
                                 count_failure_classes_as_zero=count_failure_classes_as_zero,
                                 count_missing_rollouts_as_zero=count_missing_rollouts_as_zero,
                                 timeout_s=timeout_s, redact=redact, sort_buffer_bytes=sort_buffer_bytes)


async def aggregate_files(session: aiohttp.ClientSession | None, sources: MetricSources, destination: Path,
                          resolve: Callable[[str], AggregationTarget | None], *, grouper: Grouper,
                          count_failure_classes_as_zero: Sequence[str] = (),
                          count_missing_rollouts_as_zero: bool = False, timeout_s: float | None = None,
                          redact: Callable[[str], str] = lambda s: s,
                          sort_buffer_bytes: int = DEFAULT_SORT_BUFFER_BYTES) -> list[dict[str, Any]] | None:
    """Aggregate the rows of `sources` per group and write `destination` (see `aggregate_run`).

    `resolve(group)` gives a group's server, None for none; with `session` None no request is sent and every
    entry is computed locally (one note). File shape (0.7, `rollout_collection.py:3049-3060, 3096-3097`): an
    indented JSON list of `{"agent_ref": {"name": label}, "_ng_environment_server": group, "agent_metrics",
    "key_metrics", "group_level_metrics", "repeat_level_metrics", "perf_summary"?}`, labels by `label_runs`.
    A group that is an agent, not an environment server, has `"_ng_environment_server": null` (0.5 wrote no
    such key; 0.7 has no such groups). Entries are sorted by group name (0.7 writes them in completion order,
    which varies from run to run).

    Memory: the sort buffer (`sort_buffer_bytes` of stripped rows; more spills to sorted runs in `TMPDIR`),
    plus a `BODY_CHUNK_BYTES` chunk per request in flight; a server's answer goes to a temporary file and its
    per-task lists are copied from there into the file item by item (ijson), so neither the rows nor the
    answer is ever whole in memory. A local aggregation holds what `default_aggregate_metrics` holds (its
    per-task groups among them).
    """
    try:
        return await _aggregate(session, sources, destination, resolve, grouper, count_failure_classes_as_zero,
                                count_missing_rollouts_as_zero, timeout_s, redact, sort_buffer_bytes)
    except Exception as exc:  # aggregation never changes how a run ends: one line, no traceback
        log.error("Aggregate metrics not written to %s: %s", destination, _one_line(redact(str(exc))))
        return None


async def _aggregate(session: aiohttp.ClientSession | None, sources: MetricSources, destination: Path,
                     resolve: Callable[[str], AggregationTarget | None], grouper: Grouper,
                     failure_classes: Sequence[str], count_missing: bool, timeout_s: float | None,
                     redact: Callable[[str], str], sort_buffer_bytes: int) -> list[dict[str, Any]] | None:
    log.info("Computing aggregate metrics")
    stop = threading.Event()
    with MetricInputs(sources, grouper, failure_classes=failure_classes, count_missing=count_missing,
                      sort_buffer_bytes=sort_buffer_bytes) as inputs:
        groups = await _in_worker(partial(inputs.build, stop), stop)
        if failure_classes:
            log.info("Counting %d failure row(s) as scored zeros: %s", inputs.counted_failures, list(failure_classes))
        if count_missing:
            log.info("Counting %d materialized rollout(s) with no row as scored zeros", inputs.imputed_zeros)
        if inputs.ungrouped:
            log.warning("%d row(s) name no agent or environment server: left out of the aggregate metrics",
                        inputs.ungrouped)
        if not groups:
            log.info("No rollouts to aggregate: %s not written", destination)
            return None
        targets = {name: resolve(name) for name in groups}
        labels = label_runs({name: (t.agent if t is not None and t.agent else groups[name].agent)
                             for name, t in targets.items()})
        if session is None:
            log.info("No server to ask: %s holds %s", destination.name, LOCAL_NOTE)
        async with asyncio.TaskGroup() as tasks:
            running = [tasks.create_task(_group_entry(session, groups[name], targets[name], labels[name],
                                                      timeout_s, redact, stop))
                       for name in sorted(groups)]
    entries = [entry for task in running if (entry := task.result()) is not None]
    try:
        if not entries:
            return None
        await _in_worker(partial(replace_atomic, destination, _file_chunks(entries)), stop)
    finally:
        for entry in entries:
            for value in entry.values():
                if isinstance(value, StreamedList):
                    value.close()
    for entry in entries:
        log.info("Key metrics for %s: %s", entry[AGENT_REF_KEY]["name"], orjson.dumps(entry["key_metrics"]).decode())
    log.info("Wrote %s (%d group(s))", destination, len(entries))
    return [{key: value for key, value in entry.items() if key not in PER_TASK_FIELDS} for entry in entries]


class _Spooled(StreamedList):
    """A list field of a server's answer left in the answer's temporary file: its items are read back one by
    one (ijson) when the file is written, so an answer with a group per task never sits in memory whole."""

    def __init__(self, spool: IO[bytes], key: str) -> None:
        self.spool, self.key = spool, key

    def __iter__(self) -> Iterator[Any]:
        self.spool.seek(0)
        return iter(ijson.items(self.spool, f"{self.key}.item", use_float=True))

    def close(self) -> None:
        self.spool.close()


def _file_chunks(entries: list[dict[str, Any]]) -> Iterator[bytes]:
    """The entries as `orjson.dumps(entries, option=OPT_INDENT_2)` writes them, byte for byte, with `_Spooled`
    lists streamed item by item."""
    yield b"[\n"
    for n, entry in enumerate(entries):
        yield b"  {\n"
        for m, (key, value) in enumerate(entry.items()):
            yield b"    " + orjson.dumps(key) + b": "
            if isinstance(value, StreamedList):
                empty = True
                for item in value:
                    yield (b"[\n" if empty else b",\n") + b"      " + _indented(item, 3)
                    empty = False
                yield b"[]" if empty else b"\n    ]"
            else:
                yield _indented(value, 2)
            yield b",\n" if m + 1 < len(entry) else b"\n"
        yield b"  },\n" if n + 1 < len(entries) else b"  }\n"
    yield b"]"


def _indented(value: Any, level: int) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_INDENT_2).replace(b"\n", b"\n" + b"  " * level)


async def _in_worker(work: Callable[[], T], stop: threading.Event) -> T:
    """`work()` in a worker thread. Cancelled (a signal stops the aggregation), it sets `stop`, which the long
    work watches (`watched`), and waits for the thread to end before the cancellation goes on: no worker is
    left writing into the temporary folder its caller then removes."""
    future = asyncio.ensure_future(asyncio.to_thread(work))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: a worker stopped half-way is no error to report
        raise


class _Unanswered(Exception):
    """The server gave no usable `AggregateMetrics`; the message says what happened."""


async def _group_entry(session: aiohttp.ClientSession | None, group: GroupRows, target: AggregationTarget | None,
                       label: str, timeout_s: float | None, redact: Callable[[str], str],
                       stop: threading.Event) -> dict[str, Any] | None:
    """The group's entry: the server's answer, else the local default (after one warning); None when even that
    fails (one error line)."""
    known = target.is_environment_server if target is not None else None
    environment_server = group.name if (group.stamped if known is None else known) else None
    if session is not None:
        if target is None:
            log.warning("No server is known for %s: its entry is %s", group.name, LOCAL_NOTE)
        else:
            shown = display_url(target.url)
            try:
                return _entry(label, environment_server, await _ask(session, target.url, group, timeout_s, redact))
            except _Unanswered as exc:
                log.warning("%s", redact(f"{shown}: POST {ENDPOINT} {exc}; the entry of {label} is {LOCAL_NOTE}"))
    try:
        document = await _in_worker(partial(default_aggregate_metrics, watched(group.rows(), stop),
                                            spool_groups=True), stop)
        if (problem := _shape_problem(document)) is not None:
            raise ValueError(problem)
    except Exception as exc:  # a bad row must not cost the other groups their entries
        log.error("%s: no aggregate metrics: the default aggregation failed (%s)", label,
                  _one_line(redact(f"{type(exc).__name__}: {exc}")))
        return None
    return _entry(label, environment_server, document)


async def _ask(session: aiohttp.ClientSession, url: str, group: GroupRows, timeout_s: float | None,
               redact: Callable[[str], str]) -> dict[str, Any]:
    """`POST {url}/aggregate_metrics` with the group's rows, streamed; the answer, spooled to a temporary file
    (its small fields parsed, its lists `_Spooled`). Raises `_Unanswered`, whose message quotes what the server
    said, redacted before it is cut short (so no part of a secret shows)."""
    spool = tempfile.TemporaryFile()  # noqa: SIM115 (closed on error here, else once the file is written)
    try:
        try:
            async with asyncio.timeout(timeout_s):
                async with session.post(url.rstrip("/") + ENDPOINT, data=_body(group.path), allow_redirects=False,
                                        headers={"Content-Type": "application/json"}) as response:
                    status = response.status
                    async for chunk in response.content.iter_chunked(ANSWER_CHUNK_BYTES):
                        spool.write(chunk)
        except TimeoutError:
            raise _Unanswered(f"had no answer within aggregate_timeout_s={timeout_s:g} s") from None
        except Exception as exc:  # aiohttp.ClientError, and whatever else the request raises: the local default
            raise _Unanswered(f"failed ({type(exc).__name__}: {_one_line(redact(str(exc)))})") from None
        if status in NO_ENDPOINT_STATUSES:
            raise _Unanswered(f"is not served (HTTP {status}: no such endpoint)")
        if status != 200:
            raise _Unanswered(f"answered HTTP {status}: {_shown(_head(spool), redact)}")
        answer = await asyncio.to_thread(_read_answer, spool)
        if answer == NOT_JSON:
            raise _Unanswered(f"answered something that is not JSON: {_shown(_head(spool), redact)}")
        if isinstance(answer, str):
            raise _Unanswered(f"answered JSON that is not NeMo Gym's AggregateMetrics ({answer})")
    except BaseException:
        spool.close()
        raise
    if not any(isinstance(value, _Spooled) for value in answer.values()):
        spool.close()
    return answer


def _head(spool: IO[bytes]) -> bytes:
    spool.seek(0)
    return spool.read(4 * MAX_SHOWN_BODY)


def _read_answer(spool: IO[bytes]) -> dict[str, Any] | str:
    """The spooled answer as an `AggregateMetrics` (`nemo_gym/config_types.py:933-966`), or what keeps it from
    being one (`NOT_JSON`, or a description).

    One streaming pass (ijson's basic events, no prefixes built), whatever the answer's size: the small fields
    are built as it goes; a list field with items stays in the spool (`_Spooled`, read back item by item when
    the file is written), an empty or absent one is `[]`. Other fields are skipped.
    """
    kinds = {**dict(METRIC_FIELDS), "perf_summary": dict}
    document: dict[str, Any] = {}
    spool.seek(0)
    try:
        events = ijson.basic_parse(spool, use_float=True)
        first = next(events, None)
        if first is None:
            return NOT_JSON
        if first[0] != "start_map":
            return f"a JSON {first[0].removeprefix('start_')}, not an object"
        key = ""
        depth = 1  # of the containers open; 1: the answer's own object
        field: str | None = None  # the field whose value is open, when it is a metric field
        builder: ijson.ObjectBuilder | None = None
        items = 0
        for event, value in events:
            if depth == 1:
                if event == "map_key":
                    key = value
                    continue
                if event == "end_map":
                    depth = 0
                    continue
                kind = kinds.get(key)  # a field's value starts
                if kind is None or (key == "perf_summary" and event == "null"):
                    depth += event in _OPENING  # skipped
                    continue
                if event != ("start_array" if kind is list else "start_map"):
                    return f"{key} is not a JSON {'array' if kind is list else 'object'}"
                field, depth, items = key, 2, 0
                if kind is dict:
                    builder = ijson.ObjectBuilder()
                    builder.event(event, value)
                continue
            if builder is not None:
                builder.event(event, value)
            elif field is not None and depth == 2 and event != "end_array":
                if event != "start_map":
                    return f"{field} holds something that is not an object"
                items += 1
            if event in _OPENING:
                depth += 1
            elif event in _CLOSING:
                depth -= 1
                if depth == 1 and field is not None:
                    document[field] = builder.value if builder is not None else (
                        _Spooled(spool, field) if items else [])
                    field, builder = None, None
    except ijson.JSONError:
        return NOT_JSON
    for key, kind in METRIC_FIELDS:
        document.setdefault(key, kind())
    return document


async def _body(path: Path) -> AsyncIterator[bytes]:
    """`{"verify_responses": [...]}` piece by piece from the spool file (one JSON object a line): sent with
    chunked transfer encoding, so no request body is ever whole in memory."""
    yield b'{"verify_responses":['
    f = await asyncio.to_thread(path.open, "rb")
    try:
        separator = b""
        while lines := await asyncio.to_thread(f.readlines, BODY_CHUNK_BYTES):
            yield separator + b",".join(line.rstrip(b"\n") for line in lines)
            separator = b","
    finally:
        f.close()
    yield b"]}"


def _shape_problem(document: Any) -> str | None:
    """What keeps `document` from being an `AggregateMetrics` (`nemo_gym/config_types.py:933-966`), or None."""
    if not isinstance(document, dict):
        return f"a JSON {type(document).__name__}, not an object"
    for key, kind in METRIC_FIELDS:
        value = document.get(key, kind())
        if not isinstance(value, StreamedList | kind):
            return f"{key} is not a JSON {'object' if kind is dict else 'array'}"
        if isinstance(value, list) and not all(isinstance(item, dict) for item in value):
            return f"{key} holds something that is not an object"
    if not isinstance(document.get("perf_summary"), dict | None):
        return "perf_summary is not an object"
    return None


def _entry(label: str, environment_server: str | None, document: Mapping[str, Any]) -> dict[str, Any]:
    entry: dict[str, Any] = {AGENT_REF_KEY: {"name": label}, ENVIRONMENT_SERVER_KEY: environment_server}
    for key, kind in METRIC_FIELDS:
        entry[key] = document.get(key, kind())
    if document.get("perf_summary") is not None:
        entry["perf_summary"] = document["perf_summary"]
    return entry


def _shown(payload: bytes, redact: Callable[[str], str]) -> str:
    return _one_line(redact(payload.decode("utf-8", "replace"))) or "(empty)"


def _one_line(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= MAX_SHOWN_BODY else text[:MAX_SHOWN_BODY] + "..."
