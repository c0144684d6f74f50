"""merge_rollouts: check that shard outputs cover the input exactly once, then concatenate them.

    shard files ──check_shards──> ShardCheck ──(ok?)──> rows, failures, metrics written to temp files
    (one streaming pass;          (who wrote each            in the output's folder, then os.replace'd
     a slot map of owners)         (task, rollout))          (a second streaming pass, lines copied verbatim)

The check lives in ``gym_collect.shards``; this module reads the shards' run manifests (``<stem>_run.json``,
schema ``gym_collect.run/1``, written by ``collect_rollouts``), merges their ``<stem>_metrics.json`` documents
and writes the merged files. Rows are never held in memory.

Then the union is aggregated (``MergeAggregation``): metrics such as pass@k do not decompose over shards, so
each group's rows from every shard go to its server's ``/aggregate_metrics`` together, or are aggregated
locally with NeMo Gym's default when no server is given or one cannot answer (``gym_collect.nemo.aggregation``;
NeMo Gym 0.7's ``gym eval aggregate``, ``nemo_gym/rollout_collection.py:3690-3760``).

Shards merge only when their run manifests agree (``gym_collect.manifests``); ``num_repeats`` and the
expected tasks come from the manifests unless given.

Errors follow ``gym_collect.errors``: ``MergeRefused`` (an ``InputError``: a gap, an overlap, a malformed
line, a missing shard file, a failure under ``--strict``), ``InputError`` (unreadable input), ``OutputError``
(cannot write, or the output would overwrite an input). In every case nothing is written and ``main``
returns the error's ``exit_code``, 2, as ``collect_rollouts`` does for input and output errors.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import orjson

from gym_collect.client import AgentClient
from gym_collect.config import check_url
from gym_collect.errors import ConfigError, GymCollectError, OutputError
from gym_collect.manifests import MergeMismatch, ShardPlan, plan_from_manifests, read_manifest
from gym_collect.metrics import METRICS_SCHEMA
from gym_collect.nemo.aggregation import AggregationTarget, aggregate_files, targets_from_head
from gym_collect.nemo.head import fetch_head_document
from gym_collect.nemo.metric_inputs import Grouper, MetricSources
from gym_collect.nemo.routing import UNNAMED_AGENT
from gym_collect.reader import count_rows
from gym_collect.redact import url_secrets
from gym_collect.shards import MergeRefused, ShardCheck, check_shards
from gym_collect.stats import LatencyHistogram, NumericFieldStats
from gym_collect.writer import OutputLock, OutputPaths, followed, not_a_file
from gym_collect.writer.paths import SIDE_SUFFIXES

__all__ = ["MergeAggregation", "MergeMismatch", "ShardPlan", "main", "merge_metrics", "merge_rollouts",
           "plan_from_manifests"]

log = logging.getLogger(__name__)

_COUNT_KEYS = ("expected", "succeeded", "failed", "skipped_resume", "not_persisted")


def _count(d: Mapping[str, object], key: str, what: str) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what}: {key!r} must be a non-negative int, got {v!r}")
    return v


def _object(d: Mapping[str, object], key: str, what: str) -> Mapping[str, object]:
    v = d.get(key)
    if not isinstance(v, Mapping):
        raise ValueError(f"{what}: {key!r} must be an object, got {type(v).__name__}")
    return v


@dataclass
class _Metrics:
    """The mergeable part of one ``<stem>_metrics.json`` (schema ``gym_collect.metrics/1``)."""

    rollouts: dict[str, int]
    attempts: int
    retries: int
    wall_time_s: float
    histogram: LatencyHistogram
    fields: NumericFieldStats
    by_agent: dict[str, dict[str, int]]
    failures_by_class: dict[str, int]

    @classmethod
    def empty(cls) -> _Metrics:
        return cls(dict.fromkeys(_COUNT_KEYS, 0), 0, 0, 0.0, LatencyHistogram(), NumericFieldStats(), {}, {})

    @classmethod
    def parse(cls, d: Mapping[str, object]) -> _Metrics:
        """Raises ValueError on a wrong schema, a missing key or a wrong type; unknown keys are ignored."""
        what = "metrics"
        if not isinstance(d, Mapping) or d.get("schema") != METRICS_SCHEMA:
            raise ValueError(f"{what}: not a {METRICS_SCHEMA!r} object")
        rollouts = _object(d, "rollouts", what)
        wall = d.get("wall_time_s")
        if isinstance(wall, bool) or not isinstance(wall, int | float) or not wall >= 0.0:
            raise ValueError(f"{what}: 'wall_time_s' must be a number >= 0, got {wall!r}")
        by_agent: dict[str, dict[str, int]] = {}
        for agent, counts in _object(d, "by_agent", what).items():
            if not isinstance(counts, Mapping):
                raise ValueError(f"{what}: by_agent[{agent!r}] must be an object")
            mine = by_agent[str(agent)] = {"succeeded": 0, "failed": 0}
            mine.update({str(k): _count(counts, k, f"{what} by_agent[{agent!r}]") for k in counts})
        failures = _object(d, "failures_by_class", what)
        return cls(
            rollouts={str(k): _count(rollouts, k, f"{what} rollouts") for k in (*_COUNT_KEYS, *rollouts)},
            attempts=_count(d, "attempts", what),
            retries=_count(d, "retries", what),
            wall_time_s=float(wall),
            histogram=LatencyHistogram.from_dict(_object(d, "latency_histogram", what)),
            fields=NumericFieldStats.from_dict(_object(d, "fields", what)),
            by_agent=by_agent,
            failures_by_class={str(k): _count(failures, k, f"{what} failures_by_class") for k in failures},
        )

    def merge(self, other: _Metrics) -> _Metrics:
        """Sum counts, merge histogram and field stats, max the wall time (shards run concurrently); returns
        self. Raises ValueError, before changing anything, if the histograms' relative errors differ."""
        self.histogram.merge(other.histogram)
        for k, n in other.rollouts.items():
            self.rollouts[k] = self.rollouts.get(k, 0) + n
        self.attempts += other.attempts
        self.retries += other.retries
        self.wall_time_s = max(self.wall_time_s, other.wall_time_s)
        self.fields.merge(other.fields)
        for agent, counts in other.by_agent.items():
            mine = self.by_agent.setdefault(agent, {"succeeded": 0, "failed": 0})
            for k, n in counts.items():
                mine[k] = mine.get(k, 0) + n
        for cls_name, n in other.failures_by_class.items():
            self.failures_by_class[cls_name] = self.failures_by_class.get(cls_name, 0) + n
        return self

    def to_dict(self, shards: Sequence[str], metrics_missing: Sequence[str]) -> dict[str, object]:
        succeeded = self.rollouts["succeeded"]
        return {
            "schema": METRICS_SCHEMA,
            "rollouts": dict(self.rollouts),
            "attempts": self.attempts,
            "retries": self.retries,
            "wall_time_s": self.wall_time_s,
            "rollouts_per_s": succeeded / self.wall_time_s if self.wall_time_s > 0 else 0.0,
            "latency_s": self.histogram.summary(),
            "latency_histogram": self.histogram.to_dict(),
            "fields": self.fields.to_dict(),
            "by_agent": {agent: dict(c) for agent, c in self.by_agent.items()},
            "failures_by_class": dict(self.failures_by_class),
            "shards": list(shards),
            "metrics_missing": list(metrics_missing),
        }


def merge_metrics(dicts: Sequence[Mapping[str, object]], *, shards: Sequence[str] = (),
                  metrics_missing: Sequence[str] = ()) -> dict[str, object]:
    """Merge shard metrics objects (schema ``gym_collect.metrics/1``) into one of the same schema.

    Counts are summed: ``rollouts.{expected,succeeded,failed,skipped_resume,not_persisted}`` (required) and
    any other int under ``rollouts`` (such as ``interrupted``), ``attempts``, ``retries``, ``by_agent``
    (every int counter; ``succeeded``/``failed`` default to 0) and ``failures_by_class``;
    ``fields`` merged exactly (Chan et al. 1979); ``latency_histogram`` merged and ``latency_s`` recomputed
    from it; ``wall_time_s`` is the max over shards, since shards run concurrently (shards run one after
    another would make this an underestimate); ``rollouts_per_s = rollouts.succeeded / wall_time_s``.
    ``shards`` and ``metrics_missing`` (shard files whose metrics were missing or unreadable) are recorded
    as given. Other top-level keys are ignored. Raises ValueError on a malformed object or on histograms
    with different relative errors.
    """
    acc: _Metrics | None = None
    for i, d in enumerate(dicts):
        try:
            parsed = _Metrics.parse(d)
            acc = parsed if acc is None else acc.merge(parsed)
        except ValueError as exc:
            raise ValueError(f"shard metrics #{i}: {exc}") from exc
    return (acc or _Metrics.empty()).to_dict(shards, metrics_missing)


def _load_metrics(check: ShardCheck) -> dict[str, object]:
    """Merge the metrics files of ``check.shards``, warning about and listing the missing or unreadable."""
    acc: _Metrics | None = None
    missing: list[str] = []
    for shard in check.shards:
        path = OutputPaths(shard.path).metrics
        try:
            parsed = _Metrics.parse(orjson.loads(path.read_bytes()))
            acc = parsed if acc is None else acc.merge(parsed)
        except FileNotFoundError:
            log.warning("%s: no metrics file; the merged metrics leave this shard out", path)
            missing.append(str(shard.path))
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable metrics (%s); the merged metrics leave this shard out", path, exc)
            missing.append(str(shard.path))
    return (acc or _Metrics.empty()).to_dict([str(s.path) for s in check.shards], missing)


@dataclass(frozen=True)
class MergeAggregation:
    """How ``merge_rollouts`` aggregates the union of the shards.

    ``head_server_url``: each group goes to the environment server (or agent) of that name in the head
    server's document; ``agent_url``: every group goes to this one server; neither: every group is aggregated
    locally. ``count_failure_classes_as_zero``, ``count_missing_rollouts_as_zero``: as ``collect_rollouts``'s
    keys, over every shard's failure records and materialized inputs. ``timeout_s``: per group's request (None:
    no limit); ``connect_timeout_s``: to reach the head server.
    """

    head_server_url: str | None = None
    agent_url: str | None = None
    count_failure_classes_as_zero: tuple[str, ...] = ()
    count_missing_rollouts_as_zero: bool = False
    timeout_s: float | None = 600.0
    connect_timeout_s: float = 10.0


async def _aggregate_union(check: ShardCheck, out: Path, how: MergeAggregation) -> None:
    """Aggregate the merged rows with every shard's failure records (all attempts: the latest stands) and
    materialized inputs; problems are log lines, never exceptions (``aggregate_files``). An unreachable head
    server leaves every group to the local default."""
    shards = [OutputPaths(s.path) for s in check.shards]
    sources = MetricSources((out,), tuple(s.failures for s in shards), tuple(s.materialized_inputs for s in shards))
    destination = OutputPaths(out).aggregate_metrics
    aggregate = partial(aggregate_files, sources=sources, destination=destination,
                        count_failure_classes_as_zero=how.count_failure_classes_as_zero,
                        count_missing_rollouts_as_zero=how.count_missing_rollouts_as_zero)
    locally = partial(aggregate, None, resolve=_no_server, grouper=Grouper({}, UNNAMED_AGENT))
    if how.head_server_url is None and how.agent_url is None:
        await locally()
        return
    async with AgentClient(connector_limit=64, connector_limit_per_host=16, connect_timeout_s=how.connect_timeout_s,
                           request_timeout_s=how.timeout_s,
                           secrets=url_secrets([how.head_server_url, how.agent_url])) as client:
        if how.agent_url is not None:
            everything = AggregationTarget(how.agent_url, None, is_environment_server=None)
            resolve: Callable[[str], AggregationTarget | None] = lambda group: everything  # noqa: E731
            grouper = Grouper({}, UNNAMED_AGENT)
        else:
            assert how.head_server_url is not None
            try:
                head = await fetch_head_document(client, how.head_server_url, how.connect_timeout_s,
                                                 instead="pass the right --head-server-url, or --agent-url URL")
            except GymCollectError as exc:
                log.warning("%s; every group is aggregated locally", client.redact(str(exc)))
                await locally()
                return
            resolve = targets_from_head(head).get
            grouper = Grouper({agent: servers[0] for agent, servers in head.environment_servers_by_agent.items()
                               if len(servers) == 1}, None)
        await aggregate(client.session, resolve=resolve, grouper=grouper, timeout_s=how.timeout_s,
                        redact=client.redact)


def _no_server(group: str) -> AggregationTarget | None:
    return None


def _write_temp(final: Path, fill: Callable[[BinaryIO], object]) -> Path:
    """Write ``final``'s content to a temp file beside it (same file system, for ``os.replace``)."""
    tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _copy(lines: Iterable[bytes], dst: BinaryIO) -> None:
    """Write each line, adding the newline a file's last line may lack."""
    for line in lines:
        dst.write(line if line.endswith(b"\n") else line + b"\n")


def merge_rollouts(paths: Sequence[str | os.PathLike[str]], output: str | os.PathLike[str], *,
                   expected_tasks: range | None = None, num_repeats: int | None = None,
                   strict: bool = False, use_manifests: bool = True, overwrite: bool = False,
                   aggregation: MergeAggregation | None = MergeAggregation()) -> ShardCheck:
    """Check the shards' manifests (``plan_from_manifests``, unless ``use_manifests`` is false) and coverage
    (``check_shards``), then write ``output``, ``<output stem>_failures.jsonl`` (only if any failure counts;
    a stale one is removed), ``<output stem>_materialized_inputs.jsonl`` (the shards' concatenated, only if
    a shard has one; a stale one is removed) and ``<output stem>_metrics.json``; then, unless ``aggregation``
    is None, aggregate the union into ``<output stem>_aggregate_metrics.json`` (a stale one is removed first).

    What is expected: when every shard has a manifest with its row range and a materialized inputs file, the
    (task, rollout) pairs those files list (NeMo Gym's indices, whatever they are), with the row ranges tiling
    the input (``expected_tasks``, when given, is then the input's rows); otherwise ``expected_tasks`` x
    ``num_repeats``, which default to the manifests' (1 and the tasks seen without manifests). Given values
    that contradict the manifests are refused. Each file is written to a temp file
    in its folder and moved into place with ``os.replace``; the rows file last.

    The output (a symbolic link's target) is never one of the shards' files or their input, is locked as a
    run's output is for the whole merge (a run writing it refuses the merge, and the other way round), and an
    existing one that is not an earlier merge (its metrics list the shards) is replaced only with
    ``overwrite``. Raises MergeMismatch if the manifests disagree, MergeRefused if the check fails; OutputError
    if an output path is one of the inputs, is locked, exists without ``overwrite`` or cannot be written (temp
    files are removed); InputError if a shard cannot be read or changes meanwhile. Nothing is written on any
    error. Aggregation problems are log lines: they never fail the merge. Returns the check.
    """
    out = followed(Path(output))
    merged = OutputPaths(out)
    targets = (out, merged.failures, merged.metrics, merged.materialized_inputs, merged.aggregate_metrics,
               merged.lock)
    inputs = {q.resolve() for s in map(OutputPaths, map(Path, paths)) for q in s.written}
    inputs.update(Path(m["input_path"]).resolve() for p in paths if (m := _manifest_or_none(Path(p)))
                  and isinstance(m.get("input_path"), str))
    for target in targets:
        if target.resolve() in inputs:
            raise OutputError(f"output {target} would overwrite an input file: choose another --output")
        if (kind := not_a_file(target)) is not None:
            raise OutputError(f"{target} is {kind}, which the merge would replace: move it away or choose "
                              "another --output")
    with OutputLock(merged.lock, out):
        if not overwrite and (what := _other_output(merged)) is not None:
            raise OutputError(f"{out} exists and holds {what}: pass --overwrite to replace it, or choose another "
                              "--output")
        return _merge(paths, out, merged, expected_tasks, num_repeats, strict, use_manifests, aggregation)


def _manifest_or_none(shard: Path) -> dict[str, Any] | None:
    try:
        return read_manifest(shard)
    except GymCollectError:
        return None  # reported by the manifest check


def _other_output(merged: OutputPaths) -> str | None:
    """What an existing output holds when it is not an earlier merge's (None: nothing, or an earlier merge)."""
    try:
        if merged.output.stat().st_size == 0:
            return None
    except FileNotFoundError:
        return None
    if merged.manifest.exists():
        return "a collect_rollouts run's rollouts (it has a run manifest)"
    try:
        earlier = orjson.loads(merged.metrics.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return "rows that no earlier merge wrote"
    return None if isinstance(earlier, dict) and isinstance(earlier.get("shards"), list) else \
        "rows that no earlier merge wrote"


def _merge(paths: Sequence[str | os.PathLike[str]], out: Path, merged: OutputPaths, expected_tasks: range | None,
           num_repeats: int | None, strict: bool, use_manifests: bool,
           aggregation: MergeAggregation | None) -> ShardCheck:
    plan = plan_from_manifests(paths) if use_manifests else ShardPlan({}, None, None, 0)
    if plan.num_repeats is not None and num_repeats not in (None, plan.num_repeats):
        raise MergeMismatch(f"--num-repeats {num_repeats} contradicts the shards' manifests "
                            f"(num_repeats={plan.num_repeats}); leave it out to use theirs")
    if plan.tasks is not None and expected_tasks is not None and not (
            expected_tasks.start <= plan.tasks.start and plan.tasks.stop <= expected_tasks.stop):
        raise MergeMismatch(f"the expected tasks {_span(expected_tasks)} do not contain the shards' row ranges "
                            f"{_span(plan.tasks)} (from their manifests)")
    if expected_tasks is None:
        expected_tasks = plan.input_rows  # shards made with num_shards hold every row of the input together
    listed = [OutputPaths(Path(p)).materialized_inputs for p in paths]
    ranges = plan.row_ranges or {}
    if all(Path(p) in ranges and m.is_file() for p, m in zip(paths, listed, strict=True)):
        # NeMo Gym's indices (shared by identical lines, a caller's own, a num_repeats map) are what the
        # shards' materialized inputs list; the manifests' row ranges show a shard missing altogether
        check = check_shards(paths, None, num_repeats or plan.num_repeats or 1, strict=strict,
                             materialized=listed, row_ranges=[ranges[Path(p)] for p in paths],
                             rows=expected_tasks)
    else:
        check = check_shards(paths, expected_tasks if expected_tasks is not None else plan.tasks,
                             num_repeats or plan.num_repeats or 1, strict=strict)
    if not check.ok:
        raise MergeRefused(check)
    metrics = _load_metrics(check)
    blob = orjson.dumps(metrics, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    materialized = [p for s in check.shards if (p := OutputPaths(s.path).materialized_inputs).is_file()]
    if materialized and len(materialized) < len(check.shards):
        log.warning("%d of %d shards have no %s file: %s lacks their rollouts", len(check.shards) - len(materialized),
                    len(check.shards), "_materialized_inputs.jsonl", merged.materialized_inputs)
    temps: list[tuple[Path, Path]] = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        temps.append((_write_temp(out, lambda f: _copy(check.row_lines(), f)), out))
        if check.failed:
            temps.append((_write_temp(merged.failures, lambda f: _copy(check.failure_lines(), f)), merged.failures))
        if materialized:
            temps.append((_write_temp(merged.materialized_inputs, lambda f: _copy(_nonblank(materialized), f)),
                          merged.materialized_inputs))
        temps.append((_write_temp(merged.metrics, lambda f: f.write(blob)), merged.metrics))
        for tmp, final in reversed(temps):  # the rows file last: once it is there, so is the rest
            os.replace(tmp, final)
        written = {final for _, final in temps}
        for stale, why in ((merged.failures, "no rollout failed this time"),
                           (merged.materialized_inputs, "no shard has materialized inputs"),
                           (merged.aggregate_metrics, "it describes other rows")):
            if stale not in written and stale.exists():
                log.info("removing %s, left by an earlier merge: %s", stale, why)
                stale.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write {out} ({exc}); nothing merged") from exc
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
    if aggregation is not None:
        asyncio.run(_aggregate_union(check, out, aggregation))
    return check


def _nonblank(paths: Iterable[Path]) -> Iterator[bytes]:
    for path in paths:
        with path.open("rb") as f:
            yield from (line for line in f if line.strip())


def _span(tasks: range) -> str:
    return f"{tasks.start}-{tasks.stop - 1}" if len(tasks) else "(none)"


SIDE_FILE_SUFFIXES = tuple(s for s in SIDE_SUFFIXES if s.endswith(".jsonl"))  # side files a `*.jsonl` glob matches


def without_side_files(paths: Sequence[Path]) -> list[Path]:
    """`paths` without the side files of another path among them (`r_failures.jsonl` beside `r.jsonl`: what a
    glob such as `r_shard-*.jsonl` also matches), each left out with one note."""
    given = {path.resolve() for path in paths}
    kept = []
    for path in paths:
        owner = next((path.with_name(path.name[:-len(suffix)] + ".jsonl") for suffix in SIDE_FILE_SUFFIXES
                      if path.name.endswith(suffix) and len(path.name) > len(suffix)), None)
        if owner is not None and owner.resolve() in given:
            log.info("leaving out %s: it is a side file of %s, not a shard", path, owner)
            continue
        kept.append(path)
    return kept


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as one line that names `--help`, not argparse's usage block followed by the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="merge_rollouts",
        description="Check that shard outputs hold every (task, rollout) exactly once (as a row or in "
                    "<stem>_failures.jsonl), then concatenate them in task order, with their failures and "
                    "merged metrics. The shards' run manifests (<stem>_run.json) must agree on the input, "
                    "repeats, overrides and agent routing; they give the rollouts per task and the expected "
                    "tasks. Exit 0 merged, 2 refused or failed (nothing written).")
    p.add_argument("shards", nargs="+", type=Path, help="shard output files (.jsonl)")
    p.add_argument("-o", "--output", required=True, type=Path, help="merged output file (.jsonl)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that is not an earlier merge (a run's rollouts, other rows)")
    p.add_argument("--num-repeats", type=int, default=None,
                   help="rollouts per task (default: from the shards' manifests, else 1)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--input", type=Path, help="the full input JSONL: expects one task per non-blank line")
    g.add_argument("--num-tasks", type=int, help="number of tasks expected")
    p.add_argument("--start-idx", type=int, default=None,
                   help="index of the first expected task (default 0); needs --input or --num-tasks")
    p.add_argument("--strict", action="store_true",
                   help="refuse if any rollout failed (default: failures count as accounted for)")
    p.add_argument("--ignore-manifests", action="store_true",
                   help="do not read the shards' run manifests (shards from an older collector)")
    a = p.add_argument_group(
        "aggregate metrics", "The union is aggregated into <output stem>_aggregate_metrics.json, by each group's "
        "server (POST /aggregate_metrics) or, without one, locally with NeMo Gym's default aggregation.")
    where = a.add_mutually_exclusive_group()
    where.add_argument("--head-server-url", metavar="URL",
                       help="NeMo Gym head server whose document gives each environment server's address")
    where.add_argument("--agent-url", metavar="URL", help="send every group to this one server")
    where.add_argument("--no-aggregation", action="store_true", help="write no aggregate metrics")
    a.add_argument("--count-failure-classes-as-zero", action="append", default=[], metavar="CLASS",
                   help="count the rollouts whose latest failure record has this _ng_failure_class as reward 0 "
                        "(repeat for several classes)")
    a.add_argument("--count-missing-rollouts-as-zero", action="store_true",
                   help="count materialized rollouts with neither a row nor a failure record as reward 0")
    a.add_argument("--aggregate-timeout-s", type=float, default=600.0, metavar="S",
                   help="seconds each server has to answer (default 600; 0: no limit)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``merge_rollouts``; returns the exit code: 0 merged, 2 refused or failed."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.num_repeats is not None and args.num_repeats < 1:
        parser.error("--num-repeats must be >= 1")
    if args.num_tasks is not None and args.num_tasks < 0:
        parser.error("--num-tasks must be >= 0")
    if args.start_idx is not None and (args.start_idx < 0 or (args.input is None and args.num_tasks is None)):
        parser.error("--start-idx must be >= 0 and needs --input or --num-tasks")
    if args.aggregate_timeout_s < 0:
        parser.error("--aggregate-timeout-s must be >= 0")
    try:
        check_url("--head-server-url", args.head_server_url)
        check_url("--agent-url", args.agent_url)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="merge_rollouts: %(levelname)s: %(message)s")
    shards = without_side_files(args.shards)
    start = args.start_idx or 0
    try:
        expected: range | None = None
        if args.input is not None:
            expected = range(start, start + count_rows(args.input))
        elif args.num_tasks is not None:
            expected = range(start, start + args.num_tasks)
        aggregation = None if args.no_aggregation else MergeAggregation(
            head_server_url=args.head_server_url, agent_url=args.agent_url,
            count_failure_classes_as_zero=tuple(args.count_failure_classes_as_zero),
            count_missing_rollouts_as_zero=args.count_missing_rollouts_as_zero,
            timeout_s=args.aggregate_timeout_s or None)
        check = merge_rollouts(shards, args.output, expected_tasks=expected, num_repeats=args.num_repeats,
                               strict=args.strict, use_manifests=not args.ignore_manifests, overwrite=args.overwrite,
                               aggregation=aggregation)
    except GymCollectError as exc:
        print(f"merge_rollouts: {exc}", file=sys.stderr)
        return exc.exit_code
    print(f"merge_rollouts: merged {check.describe()} into {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
