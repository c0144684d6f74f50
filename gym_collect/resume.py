"""Starting a run over existing output: refuse, overwrite, or resume.

A run is defined by its manifest (`<stem>_run.json`): the input file's identity, the row range, `limit`,
`num_repeats`, the `responses_create_params` overrides and the agent. Resume refuses a run whose
definition changed, repairs a torn last line, skips every (task, rollout) already written, and drops the
failure records it will redo (keeping permanent ones with `keep_permanent_failures=true`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gym_collect.errors import ConfigError, OutputError
from gym_collect.reader import ROLLOUT_INDEX_KEY, TASK_INDEX_KEY
from gym_collect.writer import OutputPaths, replace_atomic, write_json_atomic

log = logging.getLogger(__name__)

MANIFEST_SCHEMA = "gym_collect.run/1"
FINGERPRINT_BYTES = 1 << 20


class DoneSet:
    """Which (task, rollout) pairs of the selection are finished: one bit each, so 1M rows x 4 repeats
    take 500 KB. Tasks are `[start_idx, start_idx + num_rows)`, rollouts `[0, num_repeats)`."""

    def __init__(self, start_idx: int, num_rows: int, num_repeats: int) -> None:
        self.start_idx, self.num_rows, self.num_repeats = start_idx, num_rows, num_repeats
        self._bits = bytearray((num_rows * num_repeats + 7) // 8)
        self.count = 0

    def _bit(self, task: int, rollout: int) -> int | None:
        offset = task - self.start_idx
        if not (0 <= offset < self.num_rows and 0 <= rollout < self.num_repeats):
            return None
        return offset * self.num_repeats + rollout

    def add(self, task: int, rollout: int) -> bool:
        """Mark a pair done; False when it was done already or lies outside the selection."""
        bit = self._bit(task, rollout)
        if bit is None or self._bits[bit >> 3] & (1 << (bit & 7)):
            return False
        self._bits[bit >> 3] |= 1 << (bit & 7)
        self.count += 1
        return True

    def __contains__(self, pair: tuple[int, int]) -> bool:
        bit = self._bit(*pair)
        return bit is not None and bool(self._bits[bit >> 3] & (1 << (bit & 7)))

    def is_done(self, task: int, rollout: int) -> bool:
        """True when (task, rollout) is finished."""
        return (task, rollout) in self


@dataclass
class PriorOutput:
    """What an existing output held when the run started (all zero for a fresh run)."""

    rollouts: int = 0
    failures_kept: int = 0
    failures_redone: int = 0
    duplicates: int = 0


def input_identity(path: Path) -> dict[str, Any]:
    """The input file's size and a BLAKE2b fingerprint of its first and last MiB (cheap on any size)."""
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=16)
    with path.open("rb") as f:
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read())
    return {"size": size, "fingerprint": digest.hexdigest()}


def run_key(definition: dict[str, Any]) -> str:
    """A short stable hash of a run definition, used in every request's `Idempotency-Key`."""
    return hashlib.blake2b(orjson.dumps(definition, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def prepare_outputs(
    paths: OutputPaths,
    definition: dict[str, Any],
    done: DoneSet,
    *,
    input_path: Path,
    resume: bool,
    overwrite: bool,
    keep_permanent_failures: bool,
    on_prior_rollout: Callable[[dict[str, Any]], None],
) -> PriorOutput:
    """Make the output files ready for this run and fill `done` with what they already hold.

    The manifest records `definition` (checked on resume; the input by size and fingerprint, so a moved or
    copied input still resumes) and, for people, where the input was.

    Raises `OutputError` when output exists and neither `resume` nor `overwrite` is set, or a file in the
    middle is corrupt; `ConfigError` when resuming a run whose definition changed.
    """
    prior = PriorOutput()
    existing = [p for p in (paths.output, paths.failures) if p.exists() and p.stat().st_size > 0]
    if existing and not (resume or overwrite):
        raise OutputError(
            f"{existing[0]} already exists and is not empty: pass resume=true to finish that run, "
            "or overwrite=true to start over"
        )
    if overwrite:
        for p in (paths.output, paths.failures, paths.metrics, paths.manifest, paths.status):
            p.unlink(missing_ok=True)
    elif resume and existing:
        _check_manifest(paths.manifest, definition)
        _repair_torn_tail(paths.output)
        for line_no, record in _records(paths.output):
            if done.add(*_pair(record, paths.output, line_no)):
                prior.rollouts += 1
                on_prior_rollout(record)
            else:
                prior.duplicates += 1
        _keep_failures(paths.failures, done, keep_permanent_failures, prior)
    manifest = {"schema": MANIFEST_SCHEMA, "input_path": str(input_path.resolve()), "definition": definition}
    write_json_atomic(paths.manifest, manifest)
    return prior


def _check_manifest(path: Path, definition: dict[str, Any]) -> None:
    if not path.exists():
        log.warning("%s is missing: resuming without checking that the run's settings are unchanged", path)
        return
    try:
        recorded = orjson.loads(path.read_bytes())["definition"]
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise OutputError(f"{path}: unreadable run manifest ({exc}); use overwrite=true to start over") from exc
    changes = [
        f"{key}: {recorded.get(key)!r} -> {definition.get(key)!r}"
        for key in sorted(set(recorded) | set(definition))
        if recorded.get(key) != definition.get(key)
    ]
    if changes:
        raise ConfigError(
            f"resume refused: this run's definition differs from the one in {path}: " + "; ".join(changes)
            + ". Rerun with the original settings, or pass overwrite=true (or a new output path) to start over"
        )


def _repair_torn_tail(path: Path) -> None:
    """Cut a last line that lacks its `\n` (a write cut short by a crash)."""
    if not path.exists():
        return
    with path.open("rb+") as f:
        size = keep = f.seek(0, os.SEEK_END)
        while keep > 0:
            start = max(0, keep - 65536)
            f.seek(start)
            cut = f.read(keep - start).rfind(b"\n")
            keep = start + cut + 1 if cut >= 0 else start
            if cut >= 0:
                break
        if keep < size:
            f.truncate(keep)
            log.warning("%s: removed a torn last line (%d bytes) left by an interrupted run", path, size - keep)


def _records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    if not path.exists():
        return
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise OutputError(f"{path}:{line_no}: not a JSON object; fix or remove that line, then resume")
            yield line_no, record


def _pair(record: dict[str, Any], path: Path, line_no: int) -> tuple[int, int]:
    task, rollout = record.get(TASK_INDEX_KEY), record.get(ROLLOUT_INDEX_KEY)
    if not isinstance(task, int) or not isinstance(rollout, int):
        raise OutputError(f"{path}:{line_no}: no {TASK_INDEX_KEY}/{ROLLOUT_INDEX_KEY}; cannot resume from it")
    return task, rollout


def _keep_failures(path: Path, done: DoneSet, keep_permanent: bool, prior: PriorOutput) -> None:
    if not path.exists():
        return
    _repair_torn_tail(path)
    kept: list[bytes] = []
    for line_no, record in _records(path):
        pair = _pair(record, path, line_no)
        if keep_permanent and record.get("permanent") and done.add(*pair):
            kept.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
        else:
            prior.failures_redone += 1
    prior.failures_kept = len(kept)
    replace_atomic(path, b"".join(kept))
