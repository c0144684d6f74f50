"""JSON arrays too long to hold in memory: their items are kept in an unnamed temporary file and produced one by
one when the array is written (`gym_collect.nemo.aggregation` writes the aggregate metrics file this way)."""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import Any

import orjson


class StreamedList(ABC):
    """A JSON array whose items are read back one at a time; `close` frees what holds them."""

    @abstractmethod
    def __iter__(self) -> Iterator[Any]:
        """The items, in order (each call starts again from the first)."""

    @abstractmethod
    def close(self) -> None:
        """Release the storage (idempotent)."""


class SpooledList(StreamedList):
    """Items appended as JSON lines (orjson) to an unnamed temporary file in `TMPDIR`; memory: one item at a time.

    Raises `OSError` when the temporary file cannot be written.
    """

    def __init__(self) -> None:
        self._file = tempfile.TemporaryFile()  # noqa: SIM115 (closed by close())
        self.count = 0
        self.map: Callable[[Any], Any] | None = None  # applied to each item as it is read back

    def append(self, item: Any) -> None:
        """Add one JSON-serialisable item at the end."""
        self._file.write(orjson.dumps(item, option=orjson.OPT_APPEND_NEWLINE))
        self.count += 1

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Any]:
        self._file.seek(0)
        for _ in range(self.count):
            item = orjson.loads(self._file.readline())
            yield item if self.map is None else self.map(item)

    def close(self) -> None:
        self._file.close()
