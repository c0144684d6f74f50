"""The lifecycle of a run's output files, in one owner: check, lock, prepare (fresh, overwrite or resume),
append, side files, close, release.

    with RunOutputs(paths, reads=[input_path]) as outputs:   # refuses a path the run reads; takes the lock
        recorded = outputs.recorded_definition()              # resume: the manifest, checked by the caller
        prior = outputs.prepare(done, ...)                    # fill `done` (a resume only reads)
        outputs.write_materialized(...)                       # or, on resume, the caller checks them
        outputs.commit(manifest)                              # once every check has passed: repair, manifest
        writer = outputs.open_writer(...)                     # the rollout and failure lines
        ...
        outputs.write_metrics(doc)
    # closed; lock released
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from gym_collect.errors import OutputError
from gym_collect.writer.atomic import replace_atomic, write_json_atomic
from gym_collect.writer.done import DoneSet
from gym_collect.writer.lines import LineFile, read_records, repair_torn_tail
from gym_collect.writer.lock import FileLock, OutputLock
from gym_collect.writer.paths import OutputPaths, check_output_folder, check_output_paths
from gym_collect.writer.reorder import RolloutWriter

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "gym_collect.run/1"
TASK_INDEX_KEY = "_ng_task_index"
ROLLOUT_INDEX_KEY = "_ng_rollout_index"


@dataclass
class PriorOutput:
    """What an existing output held when the run started (all zero for a fresh run)."""

    rollouts: int = 0
    failure_records: int = 0
    duplicates: int = 0
    removed: bool = False  # `overwrite` removed an earlier run's files


class RunOutputs:
    """Owns the files of one run for the life of the `with` block (see the module docstring).

    Args:
        paths: the run's files.
        reads: files the run reads (the input); none of `paths.written` may be one of them.

    Raises `ConfigError` when a written path is a file the run reads or the output is a directory,
    `OutputLockedError` when another live run holds the output, `OutputError` when a file cannot be written.
    """

    def __init__(self, paths: OutputPaths, *, reads: list[Path]) -> None:
        self.paths = paths
        check_output_paths(paths, reads)
        check_output_folder(paths)
        self._lock = OutputLock(paths.lock, paths.output)
        self._output_lock = FileLock(paths.output)  # the same file under another name (a hard link)
        self._files: list[LineFile] = []
        self._status_failed = False  # warned once until a write succeeds again

    def __enter__(self) -> RunOutputs:
        self._lock.__enter__()
        try:
            self._output_lock.hold()
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            for f in self._files:
                f.__exit__(None, None, None)
            self._files.clear()
        finally:
            self._output_lock.release()
            self._lock.__exit__(exc_type, exc, tb)

    def existing(self) -> list[Path]:
        """The non-empty output and failures files already there."""
        return [p for p in (self.paths.output, self.paths.failures) if p.exists() and p.stat().st_size > 0]

    def recorded_definition(self) -> dict[str, Any] | None:
        """The definition in the existing manifest, or None when there is none.

        Raises `OutputError` when the manifest is unreadable.
        """
        path = self.paths.manifest
        if not path.exists():
            return None
        try:
            recorded = orjson.loads(path.read_bytes())["definition"]
            if not isinstance(recorded, dict):
                raise TypeError("definition is not an object")
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise OutputError(f"{path}: unreadable run manifest ({exc}); use overwrite=true to start over") from exc
        return recorded

    def prepare(
        self,
        done: DoneSet,
        *,
        resume: bool,
        overwrite: bool,
        on_prior_rollout: Callable[[dict[str, Any]], None],
        on_prior_failure: Callable[[tuple[int, int], dict[str, Any]], None],
    ) -> PriorOutput:
        """Make the files ready for this run and fill `done` with what the output already holds.

        Fresh: refuse an existing non-empty output (`OutputError`) unless `resume` or `overwrite`.
        Fresh or overwrite: remove every file of the run (but the lock). Resume, reading only: mark each written
        pair in `done` (a pair written twice or outside the selection is counted in `duplicates` and left
        alone; a torn last line is passed over) and hand every failure record to `on_prior_failure` (the
        failures file is history: it is only appended to). What a resume changes waits for `commit`, once the
        caller's checks have passed: a refused resume changes nothing.
        """
        prior = PriorOutput()
        self._check_side_files_are_its_own()
        existing = self.existing()
        if existing and not (resume or overwrite):
            raise OutputError(
                f"{existing[0]} already exists and is not empty: pass resume=true to finish that run, "
                "or overwrite=true to start over"
            )
        if overwrite or not existing:  # a fresh start inherits no attempts, inputs or metrics
            for p in self.paths.written:
                if p != self.paths.lock and p.exists():
                    p.unlink()
                    prior.removed = bool(existing)
        else:
            for line_no, record in read_records(self.paths.output, skip_torn_tail=True):
                if done.add(*record_pair(record, self.paths.output, line_no)):
                    prior.rollouts += 1
                    on_prior_rollout(record)
                else:
                    prior.duplicates += 1
            for line_no, record in read_records(self.paths.failures, skip_torn_tail=True):
                on_prior_failure(record_pair(record, self.paths.failures, line_no), record)
                prior.failure_records += 1
        return prior

    def commit(self, manifest: dict[str, Any]) -> None:
        """Once the caller's checks have passed: cut the torn last lines a crash left (appends follow), remove an
        aggregate-metrics file that no longer describes the output, and replace `<stem>_run.json` with `manifest`
        (plus the schema and the output's name), atomically."""
        for path in (self.paths.output, self.paths.failures):
            repair_torn_tail(path)
        self.paths.aggregate_metrics.unlink(missing_ok=True)
        write_json_atomic(self.paths.manifest, {"schema": MANIFEST_SCHEMA, "output_name": self.paths.output.name,
                                                **manifest})

    def _check_side_files_are_its_own(self) -> None:
        """Refuse when the side files belong to another output of the same stem beside it (`rollouts` and
        `rollouts.json` share `rollouts_*`): a fresh run would remove that output's manifest, materialized inputs
        and metrics. Raises `OutputError`."""
        try:
            owner = orjson.loads(self.paths.manifest.read_bytes()).get("output_name")
        except (OSError, orjson.JSONDecodeError, AttributeError):
            return
        if isinstance(owner, str) and owner != self.paths.output.name and (self.paths.output.parent / owner).exists():
            raise OutputError(
                f"{self.paths.output}: its side files ({self.paths.output.stem}_*) belong to "
                f"{self.paths.output.parent / owner}, an output of the same stem; choose another output_jsonl_fpath"
            )

    def failure_records(self) -> Iterator[tuple[tuple[int, int], dict[str, Any]]]:
        """((task, rollout), record) of every failure record already there, reading only (a torn last line is
        passed over). Raises `OutputError` for a line that is not a failure record."""
        if self.paths.failures.exists():
            for line_no, record in read_records(self.paths.failures, skip_torn_tail=True):
                yield record_pair(record, self.paths.failures, line_no), record

    def materialized_records(self) -> Iterator[tuple[int, dict[str, Any]]] | None:
        """(line number, record) of the existing `<stem>_materialized_inputs.jsonl`, or None when there is none."""
        path = self.paths.materialized_inputs
        return read_records(path) if path.exists() else None

    def write_materialized(self, lines: Iterable[bytes]) -> None:
        """Replace `<stem>_materialized_inputs.jsonl` with `lines` (whole JSON lines), streamed, atomically:
        NeMo Gym's tools never see a partial file. Raises `OutputError`."""
        replace_atomic(self.paths.materialized_inputs, lines)

    def open_writer(self, *, ordered: bool, window: int) -> RolloutWriter:
        """Open the rollout and failure files for appending (closed when the block ends)."""
        rollouts, failures = LineFile(self.paths.output), LineFile(self.paths.failures)
        for f in (rollouts, failures):
            f.__enter__()
            self._files.append(f)
        self._output_lock.hold()  # the file this run appends to, now that it exists
        return RolloutWriter(rollouts, failures, ordered=ordered, window=window)

    def write_status(self, status: dict[str, Any]) -> None:
        """Replace `<stem>_status.json` (live progress; not fsynced, it is rewritten every few seconds). A status
        file that cannot be written (a full disk, a directory in its place) is one warning, not the end of the
        run: the rollouts file's own write errors are what stop it."""
        try:
            replace_atomic(self.paths.status, orjson.dumps(status, option=orjson.OPT_INDENT_2), durable=False)
        except OutputError as exc:
            if not self._status_failed:
                log.warning("%s; live progress is not written there until it can be", exc)
            self._status_failed = True
        else:
            self._status_failed = False

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """Replace `<stem>_metrics.json` durably."""
        write_json_atomic(self.paths.metrics, metrics)


def count_done(paths: OutputPaths, done: DoneSet) -> int:
    """Mark in `done` the pairs the existing output holds, reading only (a torn last line is passed over);
    returns how many were marked. Raises `OutputError` for a line that is not a rollout."""
    marked = 0
    for line_no, record in read_records(paths.output, skip_torn_tail=True):
        marked += done.add(*record_pair(record, paths.output, line_no))
    return marked


def record_pair(record: dict[str, Any], path: Path, line_no: int) -> tuple[int, int]:
    """(task, rollout) of an output or failure record; raises `OutputError` naming `file:line` without them."""
    task, rollout = record.get(TASK_INDEX_KEY), record.get(ROLLOUT_INDEX_KEY)
    if not isinstance(task, int) or not isinstance(rollout, int) or isinstance(task, bool):
        raise OutputError(f"{path}:{line_no}: no {TASK_INDEX_KEY}/{ROLLOUT_INDEX_KEY}; cannot resume from it")
    return task, rollout
