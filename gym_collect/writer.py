"""The run's output files: rollouts and failures as whole JSONL lines, and atomically replaced JSON files.

Every line goes to the file in one `write(2)` on an `O_APPEND` descriptor, so a crash or `kill -9` leaves
every line whole but possibly the last (which resume repairs); a failed write is rolled back to the last
whole line. With `output_order=input`, completed rollouts wait in a bounded reorder window and are written
in (task, rollout) order as soon as every earlier one is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from gym_collect.errors import OutputError


@dataclass(frozen=True)
class OutputPaths:
    """The files of a run, named from the output's stem: `rollouts.jsonl` -> `rollouts_failures.jsonl`..."""

    output: Path

    def _beside(self, suffix: str) -> Path:
        return self.output.with_name(self.output.stem + suffix)

    @property
    def failures(self) -> Path:
        """Rollouts that failed for good, one JSON object a line."""
        return self._beside("_failures.jsonl")

    @property
    def metrics(self) -> Path:
        """Counts, throughput, latency and field statistics, written at the end."""
        return self._beside("_metrics.json")

    @property
    def manifest(self) -> Path:
        """What defines the run, checked on resume."""
        return self._beside("_run.json")

    @property
    def status(self) -> Path:
        """Live progress, rewritten every few seconds."""
        return self._beside("_status.json")


class LineFile:
    """An append-only file of whole lines. Context manager; raises `OutputError` when it cannot write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self.size = 0

    def __enter__(self) -> LineFile:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open for writing ({exc.strerror}); check the folder") from exc
        self.size = os.fstat(self._fd).st_size
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def write(self, data: bytes) -> None:
        """Append `data` (whole `\\n`-terminated lines) in one go, or not at all."""
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self.size)
            raise OutputError(
                f"{self.path}: write failed ({exc.strerror}); every line written before is intact, "
                "free space or fix the folder, then rerun with resume=true"
            ) from exc
        self.size += len(data)


class RolloutWriter:
    """Writes each finished request once: a rollout line, a failure line, or nothing (`_ng_no_persist`).

    With `ordered=True`, outcomes are held until every earlier `seq` is done and then written in `seq`
    order; `wait_for_room(seq)` blocks dispatch while `seq` is `window` or more ahead of the next to write.
    Memory: at most `window` held lines.
    """

    def __init__(self, rollouts: LineFile, failures: LineFile, *, ordered: bool, window: int) -> None:
        self.rollouts = rollouts
        self.failures = failures
        self.ordered = ordered
        self.window = window
        self._next_seq = 0
        self._held: dict[int, bytes | None] = {}
        self._room_waiter: asyncio.Future[None] | None = None

    async def wait_for_room(self, seq: int) -> None:
        """Return once `seq` fits in the reorder window (at once when output is unordered).

        Only the dispatcher calls this, so there is at most one waiter.
        """
        while self.ordered and seq >= self._next_seq + self.window:
            self._room_waiter = asyncio.get_running_loop().create_future()
            try:
                await self._room_waiter
            finally:
                self._room_waiter = None

    def finish(self, seq: int, rollout_line: bytes | None, failure_line: bytes | None = None) -> None:
        """Record the outcome of request `seq`: its rollout line, its failure line, or neither."""
        if failure_line is not None:
            self.failures.write(failure_line)
        if not self.ordered:
            if rollout_line is not None:
                self.rollouts.write(rollout_line)
            return
        self._held[seq] = rollout_line
        if seq != self._next_seq:
            return
        ready: list[bytes] = []
        while self._next_seq in self._held:
            line = self._held.pop(self._next_seq)
            if line is not None:
                ready.append(line)
            self._next_seq += 1
        if ready:
            self.rollouts.write(b"".join(ready))
        if self._room_waiter is not None and not self._room_waiter.done():
            self._room_waiter.set_result(None)

    def flush_held(self) -> int:
        """Write every held line now, in order, gaps notwithstanding (at shutdown); returns how many."""
        lines = [line for _, line in sorted(self._held.items()) if line is not None]
        self._held.clear()
        if lines:
            self.rollouts.write(b"".join(lines))
        return len(lines)


def rollout_line(answer: dict[str, Any]) -> bytes:
    """One compact JSONL line (orjson, UTF-8, `\\n`-terminated) for an answer or failure record."""
    return orjson.dumps(answer, option=orjson.OPT_APPEND_NEWLINE)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON, never leaving it torn; raises `OutputError`."""
    replace_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))


def replace_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` through a temporary file in the same folder and `os.replace`.

    Raises `OutputError` when the folder cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from exc
