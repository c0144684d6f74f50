"""A first-in first-out queue of items in a temporary file: what dispatch reads past a backend's share of
memory waits here, in input order, until that backend can take it."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import IO, Generic, TypeVar

from gym_collect.errors import OutputError

T = TypeVar("T")


class SpillQueue(Generic[T]):
    """Items given to `put` come back from `take` in the same order, as copies.

    The file is created on the first `put` under `folder` (default: the system's temporary folder, `TMPDIR`)
    by `tempfile.TemporaryFile`, which leaves no name behind (unlinked at once), so nothing remains even when
    the process is killed. It is truncated whenever the queue empties and closed by `close()`, so its size is
    what is queued: the pickled items, no more. Items must be picklable (the file is private to the process).
    Memory: Python's file buffers, whatever the queue's length.

    Raises `OutputError` when the file cannot be created or written (a full disk), with the folder to free.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = folder
        self.size = 0  # items queued
        self._file: IO[bytes] | None = None
        self._read_at = 0
        self._end = 0

    @property
    def bytes_on_disk(self) -> int:
        """Size of the file now (bytes)."""
        return self._end

    def put(self, item: T) -> None:
        """Append `item` at the back."""
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="gym_collect_backlog_", dir=self.folder)  # noqa: SIM115 (closed by close())
            self._file.seek(self._end)
            pickle.dump(item, self._file, protocol=pickle.HIGHEST_PROTOCOL)
            self._end = self._file.tell()
        except OSError as exc:
            where = self.folder or tempfile.gettempdir()
            raise OutputError(f"{where}: cannot queue requests read ahead for dispatch ({exc.strerror}); free space "
                              "there or point TMPDIR to a folder with room") from exc
        self.size += 1

    def take(self, n: int) -> list[T]:
        """Up to `n` items from the front, oldest first (empty when the queue is)."""
        if self.size == 0 or n < 1 or self._file is None:
            return []
        file = self._file
        file.seek(self._read_at)
        items: list[T] = [pickle.load(file) for _ in range(min(n, self.size))]
        self.size -= len(items)
        if self.size == 0:
            file.seek(0)
            file.truncate()
            self._read_at = self._end = 0
        else:
            self._read_at = file.tell()
        return items

    def close(self) -> None:
        """Drop whatever is queued and remove the file. Idempotent."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.size = self._read_at = self._end = 0
