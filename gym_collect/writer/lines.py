"""Append-only JSONL files of whole lines: writing, repairing a torn last line, reading records back.

Every line goes to the file in one `write(2)` on an `O_APPEND` descriptor, so a crash or `kill -9` leaves
every line whole but possibly the last, which `repair_torn_tail` cuts; a failed write is rolled back to the
last whole line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

from gym_collect.errors import OutputError
from gym_collect.writer.atomic import file_mode

log = logging.getLogger(__name__)


class LineFile:
    """An append-only file of whole lines. Context manager; raises `OutputError` when it cannot write."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self.size = 0

    def __enter__(self) -> LineFile:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, file_mode())
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
        try:
            written = os.write(self._fd, data)
            if written < len(data):  # a short write (a signal, a full pipe): write the rest
                view = memoryview(data)[written:]
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


def exact_copy(data: bytes) -> bytes:
    """`data` in an allocation of its own size. orjson's output keeps the capacity it grew to (at least 4 KiB
    however short the JSON), which costs nothing for a line written at once but dominates one that is held."""
    return bytes(memoryview(data))


def rollout_line(record: dict[str, Any]) -> bytes:
    """One compact JSONL line (orjson, UTF-8, `\\n`-terminated) for a rollout or failure record."""
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def torn_tail_bytes(path: Path) -> int:
    """How many bytes at the end of `path` follow its last `\\n` (a line cut short by a crash); 0 if none."""
    with path.open("rb") as f:
        size = keep = f.seek(0, os.SEEK_END)
        while keep > 0:
            start = max(0, keep - 65536)
            f.seek(start)
            cut = f.read(keep - start).rfind(b"\n")
            if cut >= 0:
                return size - (start + cut + 1)
            keep = start
    return size


def repair_torn_tail(path: Path) -> None:
    """Cut a last line that lacks its `\\n` (a write cut short by a crash); raises `OutputError`."""
    if not path.exists():
        return
    try:
        torn = torn_tail_bytes(path)
        if torn:
            size = path.stat().st_size
            os.truncate(path, size - torn)
            log.warning("%s: removed a torn last line (%d bytes) left by an interrupted run", path, torn)
    except OSError as exc:
        raise OutputError(f"{path}: cannot repair ({exc.strerror})") from exc


def read_records(path: Path, *, skip_torn_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) of every non-blank line of a JSONL output file; nothing if it does not exist.

    With `skip_torn_tail`, a last line without `\\n` is passed over (read-only look at a live or crashed
    run). Raises `OutputError` naming `file:line` for a line that is not a JSON object.
    """
    if not path.exists():
        return
    end = path.stat().st_size - (torn_tail_bytes(path) if skip_torn_tail else 0)
    with path.open("rb") as f:
        read = 0
        for line_no, raw in enumerate(f, 1):
            read += len(raw)
            if read > end:
                return
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
            except orjson.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                raise OutputError(f"{path}:{line_no}: not a JSON object; fix or remove that line, then resume")
            yield line_no, record
