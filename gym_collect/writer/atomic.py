"""Whole-file replacement that never leaves a torn file: temporary file, fsync, rename, fsync of the folder."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

from gym_collect.errors import OutputError


def file_mode() -> int:
    """The mode a new file gets from `open(..., 0o666)` under the current umask (0o644 under umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_json_atomic(path: Path, obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON, never leaving it torn; raises `OutputError`."""
    replace_atomic(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))


def replace_atomic(path: Path, data: bytes | Iterable[bytes], *, durable: bool = True) -> None:
    """Replace `path` with `data` (bytes, or chunks written as they come, so a large file is streamed)
    through a temporary file in the same folder and `os.replace`.

    With `durable` the data and the rename are fsynced first (POSIX rename is atomic, but without fsync
    a power loss may leave an empty file under the new name). The file gets the same mode as the
    output lines (`file_mode()`). Raises `OutputError` when the folder cannot be written; an exception
    from the chunks' iterator leaves `path` as it was.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), file_mode())
                if isinstance(data, bytes):
                    f.write(data)
                else:
                    for chunk in data:
                        f.write(chunk)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        if durable:
            fsync_folder(path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write ({exc.strerror})") from exc


def fsync_folder(folder: Path) -> None:
    """Make a rename or unlink in `folder` durable (a no-op where folders cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
