"""Retry policy: which failed attempts retry, how long to wait, when to stop.

Backoff is "full jitter" from the AWS Architecture Blog, *Exponential Backoff and Jitter* (Brooker, 2015):
wait = uniform(0, min(cap, base * 2**(attempt - 1))). A server's `Retry-After` (RFC 9110 §10.2.3, either
delay-seconds or an HTTP-date) is a floor on the wait.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from gym_collect.errors import PermanentRolloutError, RolloutError, TransientRolloutError

MAX_RETRY_AFTER_S = 3600.0
RETRYABLE_STATUSES = (408, 425, 429, 500, 502, 503, 504)  # RFC 9110 §15.5.9, §15.5.10 (RFC 8470), §15.5.20, 5xx


# A client error from a model server, as OpenAI (`invalid_request_error`), vLLM and the OpenAI Python client
# (`BadRequestError`, `"code": 400`) word it, possibly JSON-escaped inside the 500 that NeMo Gym's servers
# answer when a server behind them failed (`nemo_gym/server_utils.py:1220-1233`: "Hit an exception in X
# calling an inner server: <its body>").
WRAPPED_CLIENT_ERROR = re.compile(
    r"invalid_request_error|BadRequestError|NotFoundError|UnprocessableEntityError|context_length_exceeded"
    r'|\bcode\\*"\s*:\s*(?:400|404|413|422)\b'
)


def error_for_status(status: int, retry_after: str | None, message: str, *, body: str = "",
                     failure_message: str | None = None) -> RolloutError:
    """What a non-200 answer means.

    `TransientRolloutError` for `RETRYABLE_STATUSES` (with the server's `Retry-After` in seconds), except a 500
    whose `body` wraps a model server's client error (`WRAPPED_CLIENT_ERROR`): the same request fails the
    same way every time, so it is a `PermanentRolloutError`, as is any other status. `body` is kept on the
    error for the failure record.
    """
    kind: type[RolloutError] = PermanentRolloutError
    if status == 500 and WRAPPED_CLIENT_ERROR.search(body):
        message += " (a client error wrapped in a 500: retrying cannot heal it)"
    elif status in RETRYABLE_STATUSES:
        kind = TransientRolloutError
    retry_after_s = parse_retry_after(retry_after) if kind is TransientRolloutError else None
    return kind(message, status=status, retry_after_s=retry_after_s, failure_type="ClientResponseError",
                failure_message=failure_message, response_body=body or None)


@dataclass
class RetryPolicy:
    """Decides, after a failed attempt, whether and when to try again.

    Attributes:
        max_attempts: attempts per rollout in all (1 = never retry).
        backoff_initial_s: the first backoff's cap, seconds.
        backoff_max_s: the cap of every backoff, seconds.
        rng: the jitter's random source (seed it in tests).
    """

    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    rng: random.Random = field(default_factory=random.Random)

    def next_wait_s(self, error: RolloutError, attempt: int) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None to give up.

        `attempt` is the 1-based number of the attempt that just failed. Only `TransientRolloutError`s
        retry; the wait is the full-jitter backoff, raised to the server's `Retry-After` when it gave one.
        """
        if not isinstance(error, TransientRolloutError) or attempt >= self.max_attempts:
            return None
        ceiling = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        wait = self.rng.uniform(0, ceiling)
        if error.retry_after_s is not None:
            wait = max(wait, error.retry_after_s)
        return wait


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from `now` given by a `Retry-After` header value, or None if absent or malformed.

    Accepts delay-seconds (`"120"`, tolerating fractions such as `"0.5"`) and an HTTP-date
    (`"Wed, 21 Oct 2015 07:28:00 GMT"`), per RFC 9110
    §10.2.3. A date in the past gives 0. The result is capped at one hour.
    """
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)  # RFC 9110 says integer; fractions are common and harmless
    except ValueError:
        pass
    else:
        return min(seconds, MAX_RETRY_AFTER_S) if seconds >= 0 and math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return min(max(0.0, (when - now).total_seconds()), MAX_RETRY_AFTER_S)
