"""The one writer of a run's rollout and failure lines, in completion order or through a bounded reorder
window in (task, rollout) order. It counts the rollouts it writes, so the run knows exactly what is in the output
when it ends.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from gym_collect.writer.lines import LineFile, exact_copy


class RequestKey(Protocol):
    """What the writer needs to know of a request: its place in input order and its (task, rollout)."""

    seq: int
    task_index: int
    rollout_index: int


class RolloutWriter:
    """Writes each finished request once: a rollout line, a failure line, or nothing (`_ng_no_persist`).

    With `ordered=True`, outcomes are held until every earlier `seq` is done and then written in `seq`
    order; `wait_for_room(seq)` blocks dispatch while `seq` is `window` or more ahead of the next to write.
    Memory: at most `window` held lines. `written` counts the rollout lines written (dispatch sends each pair
    of the selection once, so they are distinct).
    """

    def __init__(self, rollouts: LineFile, failures: LineFile, *, ordered: bool, window: int) -> None:
        self.rollouts = rollouts
        self.failures = failures
        self.ordered = ordered
        self.window = window
        self.written = 0
        self._next_seq = 0
        self._held: dict[int, tuple[int, int, bytes] | None] = {}
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

    def finish(self, request: RequestKey, rollout_line: bytes | None, failure_line: bytes | None = None) -> None:
        """Record the outcome of `request`: its rollout line, its failure line, or neither.

        Raises `OutputError` when a file cannot be written (what was written before stays whole).
        """
        if failure_line is not None:
            self.failures.write(failure_line)
        if not self.ordered:
            if rollout_line is not None:
                self.rollouts.write(rollout_line)
                self.written += 1
            return
        if request.seq != self._next_seq and rollout_line is not None:
            rollout_line = exact_copy(rollout_line)  # held a while: without orjson's spare capacity
        held = None if rollout_line is None else (request.task_index, request.rollout_index, rollout_line)
        self._held[request.seq] = held
        if request.seq != self._next_seq:
            return
        ready: list[tuple[int, int, bytes]] = []
        while self._next_seq in self._held:
            line = self._held.pop(self._next_seq)
            if line is not None:
                ready.append(line)
            self._next_seq += 1
        self._write_held(ready)
        if self._room_waiter is not None and not self._room_waiter.done():
            self._room_waiter.set_result(None)

    def flush_held(self) -> int:
        """Write every held line now, in order, gaps notwithstanding (at shutdown); returns how many."""
        lines = [line for _, line in sorted(self._held.items()) if line is not None]
        self._held.clear()
        self._write_held(lines)
        return len(lines)

    def _write_held(self, lines: list[tuple[int, int, bytes]]) -> None:
        if not lines:
            return
        self.rollouts.write(b"".join(line for _, _, line in lines))
        self.written += len(lines)
