"""When to stop starting rollouts: NeMo Gym 0.7's `dispatch_budget_s` / `drain_margin_s`, and a Slurm job's end.

A rollout that cannot finish before the allocation ends is pure waste: it is killed mid-flight and redone
on resume. So dispatch stops once less than a margin is left before the deadline, and the rollouts in
flight finish and are written; the rest are left for `resume=true` (NeMo Gym 0.7,
`nemo_gym/rollout_collection.py:1546-1578, 3394-3420`).

    deadline = min(start + dispatch_budget_s, SLURM_JOB_END_TIME - shutdown_grace_s)
    margin   = drain_margin_s, else the 75th percentile of the rollout latencies seen (after 5 of them)
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
ADAPTIVE_MARGIN_AFTER = 5
ADAPTIVE_MARGIN_PERCENTILE = 75.0
SLURM_END_TIME_VAR = "SLURM_JOB_END_TIME"
REASON = "dispatch budget spent"


@dataclass
class DispatchDeadline:
    """Stops a stream of requests once fewer than `margin` seconds are left before `deadline` (monotonic).

    Args:
        deadline: monotonic seconds after which nothing starts; None: no deadline.
        drain_margin_s: a fixed margin, or None for the adaptive one.
        latency_p75_s: (completed rollouts, their 75th-percentile latency in seconds), for the adaptive margin.
        on_stop: called once with the reason when dispatch stops.
    """

    deadline: float | None
    drain_margin_s: float | None
    latency_p75_s: Callable[[], tuple[int, float]]
    on_stop: Callable[[str], None]
    clock: Callable[[], float] = time.monotonic
    _stopped: bool = field(default=False, init=False, repr=False)

    @classmethod
    def from_settings(cls, dispatch_budget_s: float | None, drain_margin_s: float | None, shutdown_grace_s: float,
                      latency_p75_s: Callable[[], tuple[int, float]], on_stop: Callable[[str], None],
                      clock: Callable[[], float] = time.monotonic) -> DispatchDeadline:
        """The deadline from the budget and `SLURM_JOB_END_TIME` (Unix seconds, set by Slurm in the job)."""
        now = clock()
        candidates = [] if dispatch_budget_s is None else [now + dispatch_budget_s]
        end = os.environ.get(SLURM_END_TIME_VAR, "")
        if end.isdigit():
            candidates.append(now + int(end) - time.time() - shutdown_grace_s)
        deadline = min(candidates, default=None)
        if deadline is not None:
            log.info("Dispatch stops %.0f s from now, less the drain margin (%s)", deadline - now,
                     f"{drain_margin_s:g} s" if drain_margin_s is not None else "p75 rollout latency")
        return cls(deadline, drain_margin_s, latency_p75_s, on_stop, clock)

    def margin_s(self) -> float:
        """The margin now: the fixed one, or the observed p75 latency (0 until enough rollouts finished)."""
        if self.drain_margin_s is not None:
            return self.drain_margin_s
        done, p75 = self.latency_p75_s()
        return p75 if done >= ADAPTIVE_MARGIN_AFTER else 0.0

    def expired(self) -> bool:
        """True once the deadline less the margin has passed (then and after; `on_stop` is called once)."""
        if self.deadline is None:
            return False
        if self._stopped:
            return True
        left = self.deadline - self.clock()
        if left > self.margin_s():
            return False
        self._stopped = True
        self.on_stop(f"{REASON}: {max(0.0, left):.0f} s left, margin {self.margin_s():.3g} s")
        return True

    def limit(self, requests: Iterator[T]) -> Iterator[T]:
        """`requests`, ending early when the deadline less the margin has passed."""
        if self.deadline is None:
            yield from requests
            return
        for request in requests:
            if self.expired():
                return
            yield request
