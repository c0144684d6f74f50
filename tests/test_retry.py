"""The retry policy as a table: no network, no sleeping."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest

from gym_collect.errors import (
    AgentConnectionError,
    AgentTimeoutError,
    BadAnswerError,
    PermanentRolloutError,
    RolloutError,
    TransientRolloutError,
)
from gym_collect.retry import RetryPolicy, error_for_status, parse_retry_after

RETRYABLE = [408, 425, 429, 500, 502, 503, 504]
NOT_RETRYABLE = [400, 401, 403, 404, 405, 409, 410, 413, 422, 501, 505]


@pytest.mark.parametrize("status", RETRYABLE)
def test_retryable_statuses_retry(status: int) -> None:
    error = error_for_status(status, None, "busy")
    assert isinstance(error, TransientRolloutError) and error.status == status
    assert RetryPolicy(max_attempts=3).next_wait_s(error, 1) is not None


@pytest.mark.parametrize("status", NOT_RETRYABLE)
def test_other_statuses_never_retry(status: int) -> None:
    error = error_for_status(status, None, "bad request")
    assert isinstance(error, PermanentRolloutError)
    assert RetryPolicy(max_attempts=5).next_wait_s(error, 1) is None
    assert error.error_class == f"HTTP{status}"


@pytest.mark.parametrize(
    "error", [AgentConnectionError("reset"), AgentTimeoutError("slow"), BadAnswerError("not json")]
)
def test_transport_failures_retry_until_attempts_are_spent(error: RolloutError) -> None:
    policy = RetryPolicy(max_attempts=3, rng=random.Random(0))
    assert policy.next_wait_s(error, 1) is not None
    assert policy.next_wait_s(error, 2) is not None
    assert policy.next_wait_s(error, 3) is None


def test_full_jitter_stays_under_the_exponential_cap() -> None:
    policy = RetryPolicy(max_attempts=100, backoff_initial_s=1.0, backoff_max_s=8.0, rng=random.Random(7))
    error = AgentConnectionError("reset")
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]:
        waits = [policy.next_wait_s(error, attempt) for _ in range(500)]
        assert all(w is not None and 0 <= w <= cap for w in waits)
        assert max(w for w in waits if w is not None) > 0.8 * cap  # spread over the whole range


def test_retry_after_is_a_floor_on_the_wait() -> None:
    policy = RetryPolicy(max_attempts=5, backoff_initial_s=0.1, backoff_max_s=0.1, rng=random.Random(0))
    error = error_for_status(429, "3", "")
    assert error.retry_after_s == 3.0
    assert policy.next_wait_s(error, 1) == 3.0


def test_retry_after_both_forms() -> None:
    now = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30.0
    assert parse_retry_after("Sat, 21 Nov 2026 11:00:00 GMT", now) == 0.0
    assert parse_retry_after("0.5", now) == 0.5
    assert parse_retry_after("-3", now) is None
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("999999", now) == 3600.0
