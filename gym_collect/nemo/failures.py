"""NeMo Gym 0.7's failure records and resume attempts: the shape of a `<stem>_failures.jsonl` row, which
rows are terminal, and how many attempts a (task, rollout) has had across runs.

A failure record is the result a rollout would have had, with top-level `_ng_failure_*` fields:

- the agent or environment server reported the failure (`_ng_failure_class` in a 200 answer): the answer as
  it is, stamped like a result;
- the collector saw none (an HTTP error, a timeout, a broken connection, a body that is not JSON): class
  `agent_run_error` when the server answered with a status other than 429/502/503/504 (the rollout ran and
  broke), else `agent_request_failed`, with `_ng_failure_type`, `_ng_failure_message`,
  `_ng_failure_http_status` and `_ng_failure_response_body` (at most 2,000 characters). No reward: an
  infrastructure failure is not a score of zero.

Sources: `nemo_gym/rollout_collection.py:164-219` (sentinels), `:1617-1649` (collector-made rows),
`:2276-2312` (attempts across resumes), `:905-922` (`NEMO_GYM_MAX_ROLLOUT_ATTEMPTS`), `:1246-1287`
(`is_terminal_failure`).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Mapping
from typing import Any

from gym_collect.errors import RolloutError

log = logging.getLogger(__name__)

FAILURE_CLASS_KEY = "_ng_failure_class"
TERMINAL_KEY = "_ng_failure_terminal"
NO_PERSIST_KEY = "_ng_no_persist"
AGENT_RUN_ERROR = "agent_run_error"
AGENT_REQUEST_FAILED = "agent_request_failed"
BAD_INPUT_ROW = "bad_input_row"
SERVER_DID_NOT_RUN_STATUSES = frozenset({429, 502, 503, 504})
MAX_BODY_CHARS = 2000
MAX_ATTEMPTS_ENV = "NEMO_GYM_MAX_ROLLOUT_ATTEMPTS"
DEFAULT_MAX_ATTEMPTS = 3
# Classes an agent may have marked terminal per attempt; `retry_terminal_timeouts` retries them on resume.
RETRYABLE_WHEN_ASKED = frozenset({"timeout_exceeded", "reference_missing", "eval_missing", "transport_ineligible"})

Pair = tuple[int, int]


def collector_failure(error: RolloutError) -> dict[str, Any]:
    """The `_ng_failure_*` fields of a rollout that came back without a result (module docstring)."""
    ran = error.status is not None and error.status not in SERVER_DID_NOT_RUN_STATUSES
    body = error.response_body
    return {
        FAILURE_CLASS_KEY: AGENT_RUN_ERROR if ran else AGENT_REQUEST_FAILED,
        "_ng_failure_type": error.failure_type,
        "_ng_failure_message": error.failure_message,
        "_ng_failure_http_status": error.status,
        "_ng_failure_response_body": (body[:MAX_BODY_CHARS] + ("…" if len(body) > MAX_BODY_CHARS else ""))
        if body else None,
    }


def bad_row_failure(message: str) -> dict[str, Any]:
    """The failure fields of an input row that is not a JSON object (`on_bad_row=skip`): terminal, since the
    same row fails the same way until the input is fixed."""
    return {FAILURE_CLASS_KEY: BAD_INPUT_ROW, TERMINAL_KEY: True, "_ng_failure_message": message}


def is_terminal(record: Mapping[str, Any], *, retry_terminal_timeouts: bool = False) -> bool:
    """Whether resume must leave this failure alone (NeMo Gym's `is_terminal_failure`).

    A record is terminal when stamped `_ng_failure_terminal` (or `permanent`, in records of earlier
    gym_collect releases); with `retry_terminal_timeouts` the per-attempt classes in
    `RETRYABLE_WHEN_ASKED` are not, and `skipped` always is.
    """
    terminal = bool(record.get(TERMINAL_KEY, record.get("permanent")))
    if not retry_terminal_timeouts:
        return terminal
    failure_class = record.get(FAILURE_CLASS_KEY)
    if failure_class in RETRYABLE_WHEN_ASKED:
        return False
    return failure_class == "skipped" or terminal


def max_rollout_attempts() -> int:
    """`NEMO_GYM_MAX_ROLLOUT_ATTEMPTS` (an integer >= 1), else 3; an invalid value warns and gives 3."""
    raw = os.environ.get(MAX_ATTEMPTS_ENV, "")
    if not raw:
        return DEFAULT_MAX_ATTEMPTS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        log.warning("%s=%r is not an integer >= 1; using %d", MAX_ATTEMPTS_ENV, raw, DEFAULT_MAX_ATTEMPTS)
        return DEFAULT_MAX_ATTEMPTS
    return value


class PriorAttempts:
    """The failure history of an output: attempts per (task, rollout), and which pairs resume skips.

    Each failure record counts as one attempt (a record here is one rollout that failed for good after its
    retries within a run; in NeMo Gym one failed attempt). A pair is skipped ("gated") once a record of it
    is terminal or it has `max_attempts` records. Memory: one entry per failed pair.
    """

    def __init__(self, max_attempts: int, *, retry_terminal_timeouts: bool = False,
                 retry_terminal: bool = False) -> None:
        self.max_attempts = max_attempts
        self.retry_terminal_timeouts = retry_terminal_timeouts
        self.retry_terminal = retry_terminal
        self.attempts: Counter[Pair] = Counter()
        self.terminal: set[Pair] = set()

    def add(self, pair: Pair, record: Mapping[str, Any]) -> None:
        """Count one failure record of `pair`."""
        self.attempts[pair] += 1
        if not self.retry_terminal and is_terminal(record, retry_terminal_timeouts=self.retry_terminal_timeouts):
            self.terminal.add(pair)

    def attempt_index(self, task: int, rollout: int) -> int:
        """The `_ng_attempt_index` of the next attempt: how many attempts came before (0 for a first one)."""
        return self.attempts.get((task, rollout), 0)

    def gated(self, task: int, rollout: int) -> bool:
        """True when resume must not try `(task, rollout)` again."""
        pair = (task, rollout)
        return pair in self.terminal or self.attempts.get(pair, 0) >= self.max_attempts
