"""Counters, latency percentiles, the progress display and the metrics and status files of a run."""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from gym_collect.stats import LatencyHistogram, NumericFieldStats

log = logging.getLogger(__name__)

METRICS_SCHEMA = "gym_collect.metrics/1"
RATE_WINDOW_S = 60.0


class RunMetrics:
    """Everything counted during a run; `snapshot()` is the `<stem>_metrics.json` document.

    Latency is per successful attempt, in seconds, from a monotonic clock. `fields` holds count/mean/min/max
    and sample std of each numeric field of the rollouts per agent, the fields NeMo Gym's `mean/<field>`
    metrics average (`reward`, booleans as 0/1, the `response.usage` token counts; see `NumericFieldStats`),
    including rollouts already in the output when resuming. Rollouts flagged `mask_sample` are left out of
    `fields` and counted in `masked` (`rollouts.masked` in the document).
    """

    def __init__(self, expected: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.started = clock()
        self.started_at = datetime.now(UTC).isoformat(timespec="seconds")
        self.expected = expected
        self.succeeded = 0
        self.failed = 0
        self.skipped_resume = 0
        self.not_persisted = 0
        self.interrupted = 0
        self.masked = 0
        self.attempts = 0
        self.retries = 0
        self.latency = LatencyHistogram()
        self.fields = NumericFieldStats()
        self.by_agent: dict[str, Counter[str]] = {}
        self.failures_by_class: Counter[str] = Counter()
        self.stopped_reason: str | None = None
        self.first_request: float | None = None
        self._recent: deque[tuple[float, int]] = deque()

    @property
    def done(self) -> int:
        """Rollouts finished in this invocation, whatever the outcome."""
        return self.succeeded + self.failed + self.not_persisted

    def stop_clock(self) -> None:
        """Freeze every duration (wall time, active time, rates) at now: what follows the run, such as its
        aggregation, is not collection time."""
        now = self.clock()
        self.clock = lambda: now

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started (monotonic)."""
        return self.clock() - self.started

    def add_success(self, agent: str, latency_s: float, rollout: dict[str, Any]) -> None:
        """Count one rollout written to the output."""
        self.succeeded += 1
        self.latency.record(latency_s)
        if not self.fields.add_rollout(agent, rollout):
            self.masked += 1
        self._agent(agent)["succeeded"] += 1

    def add_prior(self, rollout: dict[str, Any]) -> None:
        """Count one rollout already in the output when resuming (fields only)."""
        self.skipped_resume += 1
        ref = rollout.get("agent_ref")
        agent = ref.get("name") if isinstance(ref, dict) else None
        if not self.fields.add_rollout(str(agent) if agent is not None else "unknown", rollout):
            self.masked += 1

    def add_failure(self, agent: str, error_class: str) -> None:
        """Count one rollout written to the failures file."""
        self.failed += 1
        self.failures_by_class[error_class] += 1
        self._agent(agent)["failed"] += 1

    def note_request(self) -> None:
        """Count one attempt; the first marks the start of `active_s` (set-up time excluded)."""
        self.attempts += 1
        if self.first_request is None:
            self.first_request = self.clock()

    def rate_last_minute(self) -> float:
        """Rollouts/s over the last minute (since the start when younger); call it on a schedule."""
        now = self.clock()
        self._recent.append((now, self.done))
        while len(self._recent) > 1 and now - self._recent[1][0] >= RATE_WINDOW_S:
            self._recent.popleft()
        t0, d0 = self._recent[0] if now - self.started >= RATE_WINDOW_S else (self.started, 0)
        return (self.done - d0) / max(now - t0, 1e-9)

    def snapshot(self, limit_history: list[tuple[float, int]] | None = None) -> dict[str, Any]:
        """The metrics document (schema `gym_collect.metrics/1`), JSON-safe; `limit_history` is the
        adaptive limit's (seconds since the start, limit) points, when there is one."""
        wall = self.elapsed_s
        active = 0.0 if self.first_request is None else self.clock() - self.first_request
        return {
            "schema": METRICS_SCHEMA,
            "started_at": self.started_at,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "stopped": self.stopped_reason,
            "rollouts": {
                "expected": self.expected,
                "succeeded": self.succeeded,
                "failed": self.failed,
                "skipped_resume": self.skipped_resume,
                "not_persisted": self.not_persisted,
                "interrupted": self.interrupted,
                "masked": self.masked,
            },
            "attempts": self.attempts,
            "retries": self.retries,
            "wall_time_s": round(wall, 3),
            "rollouts_per_s": round(self.succeeded / wall, 3) if wall > 0 else 0.0,
            "active_s": round(active, 3),
            "active_rollouts_per_s": round(self.succeeded / active, 3) if active > 0 else 0.0,
            "latency_s": self.latency.summary(),
            "latency_histogram": self.latency.to_dict(),
            "fields": self.fields.to_dict(),
            "by_agent": {agent: dict(c) for agent, c in sorted(self.by_agent.items())},
            "failures_by_class": dict(self.failures_by_class),
            "limit_history": limit_history or [],
        }

    def summary_lines(self) -> list[str]:
        """Human summary printed at the end: counts, throughput, latency, field means by agent."""
        snap = self.snapshot()
        lat = snap["latency_s"]
        lines = [
            f"Rollouts: {self.succeeded} written, {self.failed} failed, {self.skipped_resume} already done "
            f"(of {self.expected}) in {snap['wall_time_s']:.1f} s, {snap['rollouts_per_s']:.2f} rollouts/s",
            f"Latency s: p50 {lat['p50']:.3f}  p90 {lat['p90']:.3f}  p99 {lat['p99']:.3f}  max {lat['max']:.3f}"
            if self.latency.count else "Latency s: none measured (no rollout answered in this run)",
        ]
        for agent, by_field in snap["fields"].items():
            means = ", ".join(f"{name}={_mean(stats['mean'])}" for name, stats in sorted(by_field.items()))
            lines.append(f"Means for {agent}: {means}")
        if self.masked:
            lines.append(f"Means exclude {self.masked} rollouts flagged mask_sample (they are in the output)")
        if self.failures_by_class:
            lines.append("Failures by class: " + ", ".join(f"{k}={v}" for k, v in self.failures_by_class.items()))
        return lines

    def status(self, in_flight: int, limit: int | None) -> dict[str, Any]:
        """The live status document for `<stem>_status.json`."""
        rate = self.rate_last_minute()
        remaining = max(0, self.expected - self.skipped_resume - self.done)
        return {
            "updated_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "elapsed_s": round(self.elapsed_s, 1),
            "expected": self.expected,
            "done": self.done + self.skipped_resume,
            "succeeded": self.succeeded + self.skipped_resume,
            "failed": self.failed,
            "in_flight": in_flight,
            "limit": limit,
            "rollouts_per_s_last_minute": round(rate, 3),
            "eta_s": round(remaining / rate, 1) if rate > 0 else None,
            "stopped": self.stopped_reason,
        }

    def relabel(self, labels: Mapping[str, str]) -> None:
        """Report each routing key of `labels` under its label (a materialized taskset row's environment server
        under the agent its results belong to); what meets under one label is merged."""
        for key, label in labels.items():
            counts = self.by_agent.pop(key, None)
            if counts is not None:
                self._agent(label).update(counts)
            fields = self.fields.agents.pop(key, None)
            if fields is not None:
                merged = NumericFieldStats()
                merged.agents = {label: fields}
                self.fields.merge(merged)

    def _agent(self, agent: str) -> Counter[str]:
        counts = self.by_agent.get(agent)
        if counts is None:
            counts = self.by_agent[agent] = Counter()
        return counts


class Progress:
    """A tqdm bar `Collecting rollouts` on a terminal; plain periodic log lines otherwise.

    Context manager. `update()` per finished rollout; `tick()` from a periodic task.
    """

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self._bar: tqdm[Any] | None = None
        self._redirect: contextlib.AbstractContextManager[None] | None = None
        self._enabled = enabled
        self._total, self._initial = total, initial
        self._last_log = time.monotonic()

    def __enter__(self) -> Progress:
        if self._enabled and sys.stderr.isatty():
            self._bar = tqdm(
                total=self._total, initial=self._initial, desc="Collecting rollouts", unit="rollout",
                dynamic_ncols=True, smoothing=0.05,
            )
            self._redirect = logging_redirect_tqdm()  # log lines above the bar, not through it
            self._redirect.__enter__()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._redirect is not None:
            self._redirect.__exit__(exc_type, exc, tb)
            self._redirect = None
        if self._bar is not None:
            self._bar.close()

    def update(self) -> None:
        """One more rollout finished."""
        if self._bar is not None:
            self._bar.update(1)

    def tick(self, status: dict[str, Any], log_every_s: float, final: bool = False) -> None:
        """Show the current limit and failures; without a terminal, log a line every `log_every_s` and at
        the end (`final`)."""
        if self._bar is not None:
            self._bar.set_postfix(limit=status["limit"], failed=status["failed"], refresh=final)
            return
        now = time.monotonic()
        if self._enabled and (final or now - self._last_log >= log_every_s):
            self._last_log = now
            log.info(
                "Collecting rollouts: %d/%d done, %d failed, %d in flight, %.1f rollouts/s, ETA %s s",
                status["done"], status["expected"], status["failed"], status["in_flight"],
                status["rollouts_per_s_last_minute"], status["eta_s"],
            )


def _mean(value: float) -> str:
    """A mean for a summary line: four significant digits, but never an exponent for a number a person reads
    whole (59999.5 is `59999.5`, not `6e+04`)."""
    return f"{value:.4g}" if abs(value) < 1e4 or abs(value) >= 1e12 else f"{value:.1f}"
