"""SIGINT, SIGTERM and SIGHUP from a run's first line to its last.

What a signal does depends on the phase the run is in:

    start-up    (paths, lock, input scan, head server, resume preparation) the run is cancelled where it
                waits; files are left as they were or whole; exit 130
    running     dispatch stops; rollouts in flight get `shutdown_grace_s` to finish and be written; a
                second signal exits at once (every line written is whole); exit 130 unless every
                selected rollout is in the output by then
    aggregating (every rollout written; `/aggregate_metrics` asked) the aggregation stops at once (its file
                is written whole or not at all); the metrics are written; the exit code is the run's own,
                and `resume=true` computes the aggregate metrics later
    finishing   (final writes, metrics) the signal is noted and the writes complete; the exit code is
                the run's own

Outside a run (before the event loop starts, after it ends) `install_process_handlers` turns SIGTERM and
SIGHUP into `Interrupted` (SIGINT already raises `KeyboardInterrupt`), so the command can end with one
line instead of a traceback or a silent kill.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType, TracebackType

log = logging.getLogger(__name__)

EXIT_INTERRUPTED = 130
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived outside a run's own handling (treated like Ctrl-C)."""


_received: list[str] = []  # the signals this process received, for jobs that run after an interrupted one


def received_earlier() -> str | None:
    """The first signal this process received (a sweep's earlier job was interrupted by it), or None: the jobs a
    launcher runs one after another in this process do not start after it."""
    return _received[0] if _received else None


def note_signal(name: str) -> None:
    """Record a signal the process received (see `received_earlier`)."""
    _received.append(name)


def install_process_handlers() -> None:
    """Make SIGTERM and SIGHUP raise `Interrupted` in the main thread (no-op outside it)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def raise_interrupted(signum: int, frame: FrameType | None) -> None:
        note_signal(signal.Signals(signum).name)
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_interrupted)


class Shutdown:
    """The run's signal handling, phase by phase (see the module docstring). Context manager inside the loop.

    Attributes:
        signal_name: the first signal received (`SIGTERM`...), or None.
        stopping: set with the first signal; a worker thread (the input scan) polls it to give up early.
    """

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.output_removed = False  # set by the run once `overwrite` removed an earlier output (for messages)
        self.signal_name: str | None = None
        self.stopping = threading.Event()
        self._phase = "start-up"
        self._task: asyncio.Task[object] | None = None
        self._stop_run: Callable[[str], None] | None = None
        self._stop_aggregation: Callable[[], object] | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> Shutdown:
        self._task = asyncio.current_task()
        if self.enabled:
            loop = asyncio.get_running_loop()
            for sig in SIGNALS:
                self._previous[sig] = signal.getsignal(sig)
                loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.enabled:
            return
        loop = asyncio.get_running_loop()
        for sig, previous in self._previous.items():
            loop.remove_signal_handler(sig)
            if callable(previous) or previous in (signal.SIG_IGN, signal.SIG_DFL):
                signal.signal(sig, previous)  # type: ignore[arg-type]

    def running(self, stop_run: Callable[[str], None]) -> None:
        """Enter the running phase: a signal now calls `stop_run(reason)`."""
        self._phase, self._stop_run = "running", stop_run
        if self.signal_name is not None:
            stop_run(f"interrupted by {self.signal_name}")

    def aggregating(self, stop_aggregation: Callable[[], object]) -> None:
        """Enter the aggregating phase: a signal now calls `stop_aggregation()`."""
        self._phase, self._stop_aggregation = "aggregating", stop_aggregation

    def finishing(self) -> None:
        """Enter the finishing phase: a signal no longer changes anything."""
        self._phase = "finishing"

    def check(self) -> None:
        """Raise `Interrupted` if a signal arrived (for work in a worker thread during start-up)."""
        if self.stopping.is_set():
            raise Interrupted(self.signal_name or "signal")

    def _on_signal(self, sig: signal.Signals) -> None:
        name = sig.name
        note_signal(name)
        if self.signal_name is not None and self._phase != "finishing":
            log.warning("Second signal (%s): exiting now; every line written is whole, resume=true finishes the run",
                        name)
            os._exit(EXIT_INTERRUPTED)
        if self._phase == "finishing":
            log.info("%s received while the final files are written: finishing them first", name)
            self.signal_name = self.signal_name or name
            return
        self.signal_name = name
        self.stopping.set()
        if self._phase == "aggregating" and self._stop_aggregation is not None:
            log.warning("%s during aggregation: stopping it; every rollout is written, resume=true computes the "
                        "aggregate metrics", name)
            self._stop_aggregation()
        elif self._phase == "start-up":
            log.warning("%s during start-up: stopping", name)
            if self._task is not None:
                self._task.cancel()
        elif self._stop_run is not None:
            self._stop_run(f"interrupted by {name}")
