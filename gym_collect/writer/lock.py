"""One run at a time per output: an exclusive `flock(2)` on `<stem>_run.lock`, held for the whole run.

The kernel releases the lock when the process dies, however it dies, so a stale lock file never blocks a
rerun. The file holds the holder's host, pid and start time, for the refusal message. After taking the
lock, the holder checks that the path still names the file it locked (another process may have removed
it in between) and tries again if not; the holder removes the file when it lets go.

On NFS, Linux maps `flock` to POSIX byte-range locks served by the NFS lock manager (NLM, or NFSv4's own
locks), so two nodes exclude each other as long as the mount has locking enabled (not `nolock`/`local_lock`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType

import orjson

from gym_collect.errors import OutputError
from gym_collect.writer.atomic import file_mode

ATTEMPTS = 5


class OutputLockedError(OutputError):
    """Another live process holds the output's lock."""


class OutputLock:
    """Exclusive, non-blocking lock on `path` for the life of the `with` block.

    Raises `OutputLockedError` naming the holder when another process holds it, `OutputError` when the
    lock file cannot be created.
    """

    def __init__(self, path: Path, output: Path) -> None:
        self.path = path
        self.output = output
        self._fd = -1
        self._made: list[Path] = []  # folders the lock file's creation made

    def __enter__(self) -> OutputLock:
        for _ in range(ATTEMPTS):
            fd = self._open()
            _lock_or_close(fd, self.path, lambda: (
                f"{self.output} is being written by another run ({self._holder()}); wait for it to end or stop it "
                "(a kill releases the lock), or choose another output_jsonl_fpath"))
            if _same_inode(fd, self.path):
                self._fd = fd
                self._write_holder()
                return self
            os.close(fd)  # the file was replaced between open and flock: lock the new one
        raise OutputError(f"{self.path}: the lock file keeps changing; another run is starting on this output")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = -1
        for folder in self._made:  # a run refused before it wrote anything leaves no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()  # fails, as it should, when the run put something there
        self._made = []

    def _open(self) -> int:
        try:
            missing = [f for f in (self.path.parent, *self.path.parent.parents) if not f.exists()]
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made = self._made or missing  # innermost first, as they are removed
            return os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot create the lock file ({exc.strerror}); check the folder") from exc

    def _write_holder(self) -> None:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, orjson.dumps(holder), 0)

    def _holder(self) -> str:
        try:
            holder = orjson.loads(self.path.read_bytes())
            return f"host {holder['host']}, pid {holder['pid']}, started {holder['started_at']}"
        except (OSError, orjson.JSONDecodeError, KeyError, TypeError):
            return f"see {self.path}"


def _lock_or_close(fd: int, path: Path, held: Callable[[], str]) -> None:
    """An exclusive, non-blocking `flock` on `fd`; on failure `fd` is closed and `OutputLockedError(held())` raised
    when another process holds it, `OutputError` otherwise."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
            raise OutputLockedError(held()) from None
        raise OutputError(f"{path}: cannot lock ({exc.strerror})") from exc


def _same_inode(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), path.stat()
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class FileLock:
    """An exclusive, non-blocking `flock` on a file itself, held while the run writes it: a second run that
    reaches the same file under another name (a hard link) is refused, which the lock file named after the
    output cannot see. `hold()` (again after the file was replaced) raises `OutputLockedError` when another
    process holds it; `release()` ends it. A file that does not exist is not locked."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def hold(self) -> None:
        """Lock the file as it is now (nothing when it does not exist); a file already held stays held."""
        if self._fd >= 0 and _same_inode(self._fd, self.path):
            return
        self.release()
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open ({exc.strerror})") from exc
        _lock_or_close(fd, self.path, lambda: (
            f"{self.path} is being written by another run, under another name (a hard link to it); wait for that "
            "run to end, or choose another output_jsonl_fpath"))
        self._fd = fd

    def release(self) -> None:
        """Unlock (and close) it."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

