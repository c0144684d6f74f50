"""Bounded dispatch: the only module that creates tasks.

Task topology of `Runner.run`, all in one `asyncio.TaskGroup`:

    run
    ├── dispatch     reads requests for backends with room and nothing queued into a per-backend
    │                backlog (bounded memory, the rest spilled to disk) and starts the first one whose
    │                backend has room in the in-flight limits (and, in input order, the reorder window)
    ├── rollout ×N   N <= the in-flight limits; attempts with retries (parked without a permit between
    │                them), reports each outcome to the limits, then hands it to the writer
    └── report       every `status_every_s`: status file, progress postfix / log line

Stopping (signal or failure budget) cancels `dispatch`, lets in-flight rollouts finish for up to the grace
period, then cancels them; a cancelled rollout is written nowhere, so resume redoes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gym_collect.client import AgentClient
from gym_collect.concurrency.backlog import DEFAULT_PER_BACKEND, Backlog
from gym_collect.concurrency.cost import usage_cost
from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.deadline import DispatchDeadline
from gym_collect.errors import AgentTimeoutError, GymCollectError, RolloutError
from gym_collect.metrics import Progress, RunMetrics
from gym_collect.nemo.failures import (
    AGENT_RUN_ERROR,
    BAD_INPUT_ROW,
    FAILURE_CLASS_KEY,
    NO_PERSIST_KEY,
    bad_row_failure,
    collector_failure,
)
from gym_collect.nemo.routing import AGENT_REF_KEY, ENVIRONMENT_TARGET
from gym_collect.nemo.rows import ATTEMPT_INDEX_KEY, ROLLOUT_INDEX_KEY, TASK_INDEX_KEY, episode_record
from gym_collect.reader import RolloutRequest
from gym_collect.retry import RetryPolicy
from gym_collect.writer import RolloutWriter, rollout_line

log = logging.getLogger(__name__)

DISPATCH_GC_THRESHOLD = 10_000  # first-generation allocations between collections while dispatching

PROGRESS_LOG_EVERY_S = 30.0
YIELD_EVERY_READS = 256  # requests read between two turns of the event loop
FAILURE_STOPS_RUN = "route_failures_to_sidecar=false and a rollout failed"


@dataclass
class FailureBudget:
    """Stop the run once `max_failures` rollouts failed, or the failed fraction exceeds `max_rate` after
    at least `min_rollouts` finished. None disables a bound."""

    max_failures: int | None = None
    max_rate: float | None = None
    min_rollouts: int = 50

    def exceeded(self, failed: int, finished: int) -> str | None:
        """Why the budget is spent, or None."""
        if self.max_failures is not None and failed >= self.max_failures:
            return f"{failed} rollouts failed (max_failures={self.max_failures})"
        if self.max_rate is not None and finished >= self.min_rollouts and failed / finished > self.max_rate:
            return f"{failed}/{finished} rollouts failed (max_failure_rate={self.max_rate})"
        return None


class Runner:
    """Runs every request under the in-flight limits and hands each outcome to the writer once.

    Args:
        client: the open `AgentClient`.
        agent_urls: agent name -> base URL.
        result_fields: agent name -> fields set on each of its results and failure records (the
            environment server stamps).
        limits: the in-flight limits (per backend and in all); the runner acquires and reports.
        read_ahead_per_backend: requests read and not yet started held in memory per backend, at most
            (more wait in a temporary file).
        rollouts_by_agent: rollouts each agent gets in the selection (done ones included), so that
            dispatch stops reading ahead for a backend whose rows are all read; None: unknown.
        deadline: when to stop starting rollouts (a dispatch budget); requests read before it and not
            started are left for resume.
        run_key: stable per run definition; with task and rollout it forms the `Idempotency-Key`.
        record_failures: write a rollout the collector gets no answer for to the failures file and go on
            (else stop the run there, writing nothing for it: `route_failures_to_sidecar=false`).
    """

    def __init__(
        self,
        *,
        client: AgentClient,
        agent_urls: dict[str, str],
        result_fields: dict[str, dict[str, Any]] | None = None,
        writer: RolloutWriter,
        metrics: RunMetrics,
        progress: Progress,
        policy: RetryPolicy,
        limits: InFlightLimits,
        budget: FailureBudget,
        write_status: Callable[[dict[str, Any]], None],
        run_key: str,
        status_every_s: float,
        clock: Callable[[], float] = time.monotonic,
        read_ahead_per_backend: int = DEFAULT_PER_BACKEND,
        rollouts_by_agent: Mapping[str, int] | None = None,
        deadline: DispatchDeadline | None = None,
        record_failures: bool = True,
    ) -> None:
        self.record_failures = record_failures
        self.client, self.agent_urls, self.writer = client, agent_urls, writer
        self.result_fields = result_fields or {}
        self.metrics, self.progress, self.policy = metrics, progress, policy
        self.limits, self.budget = limits, budget
        self.read_ahead_per_backend, self.rollouts_by_agent = read_ahead_per_backend, rollouts_by_agent
        self.deadline = deadline
        self.write_status, self.run_key = write_status, run_key
        self.status_every_s, self.clock = status_every_s, clock
        self._paused_until: dict[str, float] = {}
        self._in_flight: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._finished = asyncio.Event()
        self._grace_timer: asyncio.TimerHandle | None = None
        # an agent may echo the request's headers into its answer: no secret reaches a file
        self._line = rollout_line if not client.redact else lambda record: client.redact.line(rollout_line(record))

    async def run(self, requests: Iterator[RolloutRequest]) -> None:
        """Dispatch every request and wait for all outcomes (or a stop). Raises the first
        `GymCollectError` a task raised (an output write failure), after the group has wound down."""
        try:
            with dispatch_gc():
                await self._run(requests)
        finally:
            if self._grace_timer is not None:
                self._grace_timer.cancel()
            flushed = self.writer.flush_held()
            if flushed:
                log.info("Wrote %d held rollouts out of order at shutdown", flushed)
            self.progress.tick(self._write_status(), PROGRESS_LOG_EVERY_S, final=True)

    async def _run(self, requests: Iterator[RolloutRequest]) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._report())
                self._dispatcher = tg.create_task(self._dispatch(tg, requests))
                await asyncio.wait([self._dispatcher])
                while self._in_flight:
                    await asyncio.wait(set(self._in_flight))
                self._finished.set()
        except BaseExceptionGroup as group:
            errors = [e for e in _leaves(group) if isinstance(e, GymCollectError)]
            if errors:
                raise errors[0] from group
            raise

    def stop(self, reason: str, grace_s: float) -> None:
        """Stop dispatching now; cancel what is still in flight after `grace_s` seconds. Idempotent."""
        if self.metrics.stopped_reason is not None:
            return
        self.metrics.stopped_reason = reason
        log.warning("Stopping: %s; waiting up to %g s for %d rollouts in flight", reason, grace_s,
                    len(self._in_flight))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        self._grace_timer = asyncio.get_running_loop().call_later(grace_s, self._cancel_in_flight)

    def _cancel_in_flight(self) -> None:
        for task in self._in_flight:
            task.cancel()

    async def _dispatch(self, tg: asyncio.TaskGroup, requests: Iterator[RolloutRequest]) -> None:
        remaining: dict[str, int] | None = None
        if self.rollouts_by_agent is not None:
            remaining = {}
            for agent, count in self.rollouts_by_agent.items():
                backend = self.limits.backend_of(agent)
                remaining[backend] = remaining.get(backend, 0) + count
        window = self.writer.window if self.writer.ordered else None
        with Backlog[RolloutRequest](self.limits, self.read_ahead_per_backend, remaining=remaining,
                                     max_span=window) as pending:
            source = iter(requests)
            exhausted = False
            while True:
                read = 0
                while not exhausted and pending.wants_more():
                    request = next(source, None)
                    if request is None:
                        exhausted = True
                        break
                    pending.add(request.seq, self.limits.backend_of(request.agent_name), request,
                                counted=request.error is None)
                    read += 1
                    if read % YIELD_EVERY_READS == 0:
                        await asyncio.sleep(0)  # reading far ahead for a starved backend: let answers in
                while (pick := pending.next_startable()) is not None:
                    seq, backend = pick
                    await self.writer.wait_for_room(seq)  # output_order=input: within the reorder window
                    if self.deadline is not None and self.deadline.expired():
                        return  # what was read and not started is left for resume
                    if not self.limits.has_room(backend):
                        continue  # the limits changed while it waited
                    self.limits.take(backend)
                    task = tg.create_task(self._collect(pending.pop(backend)))
                    self._in_flight.add(task)
                    task.add_done_callback(self._in_flight.discard)
                if exhausted and pending.size == 0:
                    return
                if exhausted or not pending.wants_more():
                    await self.limits.wait_for_change()

    async def _collect(self, request: RolloutRequest) -> None:
        try:
            if request.error is not None:
                self._record_failure(request, bad_row_failure(request.error), BAD_INPUT_ROW)
                return
            await self._attempts(request)
        except asyncio.CancelledError:
            self.metrics.interrupted += 1
            raise
        finally:
            self.limits.release(self.limits.backend_of(request.agent_name))
            self.progress.update()

    async def _attempts(self, request: RolloutRequest) -> None:
        url = self.agent_urls[request.agent_name]
        backend = self.limits.backend_of(request.agent_name)
        key = f"{self.run_key}-{request.task_index}-{request.rollout_index}"
        episode = request.route is not None and request.route.startswith(ENVIRONMENT_TARGET)
        attempt = 0
        while True:
            attempt += 1
            if self._paused_until:  # a 429's Retry-After paused some agent (rare): no await otherwise
                await self._wait_if_paused(request.agent_name)
            start = self.clock()
            self.metrics.note_request()
            try:
                answer = await self.client.run(url, request.body, key)
                if episode:
                    answer = episode_record(answer)
            except RolloutError as error:
                self._adapt(backend, error)
                wait_s = self.policy.next_wait_s(error, attempt)
                if wait_s is None:
                    self._give_up(request, error, attempt)
                    return
                if error.status == 429 and error.retry_after_s and self.limits.adaptive(backend) is None:
                    self._pause(request.agent_name, error.retry_after_s)  # under auto, the limit backs off
                self.metrics.retries += 1
                log.debug("Retrying task %d rollout %d in %.2f s after %s", request.task_index,
                          request.rollout_index, wait_s, error.error_class)
                await self.limits.retry_wait(backend, wait_s)  # no permit held while waiting
                continue
            now = self.clock()
            latency_s = now - start
            cost = usage_cost(answer) if self.limits.adaptive(backend) is not None else None
            self.limits.report_success(backend, latency_s, cost, now)
            self._deliver(request, answer, latency_s)
            return

    def _deliver(self, request: RolloutRequest, answer: dict[str, Any], latency_s: float) -> None:
        if answer.get(NO_PERSIST_KEY):
            self.metrics.not_persisted += 1
            self.writer.finish(request, None)
            return
        if answer.get(FAILURE_CLASS_KEY):
            self._record_failure(request, answer, str(answer[FAILURE_CLASS_KEY]))
            return
        try:
            line = self._line(self._stamp(request, answer))
        except TypeError as exc:  # orjson writes at most 255 levels of nesting (it reads 1024)
            if "Recursion limit" not in str(exc):
                raise
            self._record_failure(request, {FAILURE_CLASS_KEY: AGENT_RUN_ERROR, "_ng_failure_type": "TypeError",
                                           "_ng_failure_message": f"the answer cannot be written as a line: {exc} "
                                           "(nested more than 255 levels deep)"}, AGENT_RUN_ERROR)
            return
        self.writer.finish(request, line)
        self.metrics.add_success(request.agent_name, latency_s, answer)

    def _stamp(self, request: RolloutRequest, record: dict[str, Any]) -> dict[str, Any]:
        """Set NeMo Gym 0.7's result stamps (`rollout_collection.py:2597-2616`) on a result or failure record."""
        record[TASK_INDEX_KEY] = request.task_index
        record[ROLLOUT_INDEX_KEY] = request.rollout_index
        if request.agent_ref is not None:
            record[AGENT_REF_KEY] = request.agent_ref
        if request.stamps:
            record.update(request.stamps)
        if request.attempt:
            record[ATTEMPT_INDEX_KEY] = request.attempt  # this run's, over the row's own
        record.update(self.result_fields.get(request.agent_name, ()))
        return record

    def _give_up(self, request: RolloutRequest, error: RolloutError, attempts: int) -> None:
        """A rollout the collector could not get an answer for, after `attempts` attempts."""
        what = f"task {request.task_index} rollout {request.rollout_index} failed after {attempts} attempt(s): {error}"
        if not self.record_failures:
            log.error("%s", what)
            self.metrics.add_failure(request.agent_name, str(collector_failure(error)[FAILURE_CLASS_KEY]))
            self.writer.finish(request, None)
            self.stop(f"{FAILURE_STOPS_RUN} ({what})", grace_s=0.0)
            return
        log.warning("%s", what)
        record = collector_failure(error)  # counted by the class its record holds, as count_*_as_zero names it
        self._record_failure(request, record, str(record[FAILURE_CLASS_KEY]))

    def _record_failure(self, request: RolloutRequest, record: dict[str, Any], failure_class: str) -> None:
        self.writer.finish(request, None, self._line(self._stamp(request, record)))
        self.metrics.add_failure(request.agent_name, failure_class)
        reason = self.budget.exceeded(self.metrics.failed, self.metrics.done)
        if reason is not None:
            self.stop(f"failure budget spent: {reason}", grace_s=0.0)

    def _adapt(self, backend: str, error: RolloutError) -> None:
        if error.status in (429, 500, 502, 503, 504) or isinstance(error, AgentTimeoutError):
            self.limits.report_overload(backend, self.clock())
        else:
            self.limits.report_error(backend, self.clock())

    def _pause(self, agent: str, seconds: float) -> None:
        until = self.clock() + seconds
        if until > self._paused_until.get(agent, 0.0):
            self._paused_until[agent] = until
            log.info("Agent %s asked to slow down: pausing new requests to it for %.1f s", agent, seconds)

    async def _wait_if_paused(self, agent: str) -> None:
        delay = self._paused_until.get(agent, 0.0) - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _report(self) -> None:
        while not self._finished.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._finished.wait(), self.status_every_s)
            status = self._write_status()
            self.progress.tick(status, PROGRESS_LOG_EVERY_S)

    def _write_status(self) -> dict[str, Any]:
        status = self.metrics.status(self.limits.in_flight, self.limits.limit)
        self.write_status(status)
        return status


def _leaves(group: BaseExceptionGroup[Any]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


@contextlib.contextmanager
def dispatch_gc() -> Iterator[None]:
    """The garbage collector's settings for the dispatch phase, restored after it.

    Each rollout allocates a few dozen short-lived containers (a task, futures, a request and its answer) and
    leaves no reference cycles behind, while CPython's default first-generation threshold (700) runs a
    collection every ~20 rollouts, and every full one walks the whole start-up heap (Hydra, OmegaConf,
    aiohttp): 7-9% of the CPU of a fast run. So the heap that exists when dispatch starts is frozen out of
    the collector's view (`gc.freeze`, https://docs.python.org/3/library/gc.html#gc.freeze) and young
    objects are collected every `DISPATCH_GC_THRESHOLD` allocations; cycles are still freed, a little later.
    When the process had frozen objects of its own, everything stays frozen afterwards.
    """
    threshold = gc.get_threshold()
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    gc.set_threshold(DISPATCH_GC_THRESHOLD, *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if not frozen_before:
            gc.unfreeze()
