"""The exception tree, split by what the caller should do.

    GymCollectError                  root of everything this package raises on purpose
    ├── ConfigError                  bad or inconsistent settings: abort before any request
    ├── InputError                   the input file cannot be read or has a bad row: abort (or skip the row)
    ├── OutputError                  the output cannot be written, or would be overwritten: abort
    ├── AgentUnavailableError        an agent or the head server cannot be reached at start: abort
    └── RolloutError                 one rollout attempt failed: retry it or record a failure
        ├── TransientRolloutError    worth another attempt (connection, timeout, 408/425/429/5xx, bad body)
        └── PermanentRolloutError    not worth another attempt (other 4xx, a 5xx wrapping one)

aiohttp exceptions become `RolloutError`s in exactly one place, `gym_collect.client`.
"""

from __future__ import annotations

from typing import Any


class GymCollectError(Exception):
    """Root of the package's exceptions; `exit_code` is what the command exits with."""

    exit_code = 2


class ConfigError(GymCollectError):
    """A setting is missing, unknown or out of range; raised at start-up, before any request."""


class InputError(GymCollectError):
    """The input JSONL cannot be read, or a row is not a JSON object; the message starts with `file:line:`."""


class OutputError(GymCollectError):
    """An output file cannot be written, or exists and neither `resume` nor `overwrite` was given."""


class AgentUnavailableError(GymCollectError):
    """An agent server or the head server did not answer at start-up, or answered what it should not.

    `status`: the HTTP status it answered (200 for a body that is not what was asked for), None when no
    answer came (refused, reset, timed out).
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class RolloutError(GymCollectError):
    """One attempt at one rollout failed.

    Attributes:
        status: the HTTP status, or None when no response arrived.
        retry_after_s: the server's `Retry-After` in seconds (RFC 9110 §10.2.3), or None.
        failure_type: the name of what went wrong as NeMo Gym's failure records give it (the aiohttp or
            Python exception type, such as `ClientResponseError` or `TimeoutError`).
        failure_message: the message for a failure record (aiohttp's wording for a status).
        response_body: the answer's body as text (secrets redacted), or None.
    """

    def __init__(self, message: str, *, status: int | None = None, retry_after_s: float | None = None,
                 failure_type: str | None = None, failure_message: str | None = None,
                 response_body: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after_s = retry_after_s
        self.failure_type = failure_type or type(self).__name__
        self.failure_message = failure_message or message
        self.response_body = response_body

    @property
    def error_class(self) -> str:
        """A short name for failure records and metrics, such as `HTTP503` or `AgentTimeout`."""
        if self.status is not None:
            return f"HTTP{self.status}"
        return type(self).__name__.removesuffix("Error")


class TransientRolloutError(RolloutError):
    """An attempt failed in a way that another attempt may fix."""


class AgentConnectionError(TransientRolloutError):
    """The connection could not be made, or broke before a full answer arrived."""


class AgentTimeoutError(TransientRolloutError):
    """No full answer within `request_timeout_s` (or no connection within `connect_timeout_s`)."""


class AnsweredBadly:
    """Mixin of errors about a 200 answer that cannot be used: `status` is 200 (the server ran the rollout, so
    its failure record is an `agent_run_error`, as NeMo Gym 0.7 classes it), and `error_class` keeps the
    error's own name rather than `HTTP200`."""

    def __init__(self, message: str, **kwargs: Any) -> None:
        super().__init__(message, status=200, **kwargs)  # type: ignore[call-arg]

    @property
    def error_class(self) -> str:
        return type(self).__name__.removesuffix("Error")


class BadAnswerError(AnsweredBadly, TransientRolloutError):
    """The agent answered 200 with a body that is not a JSON object."""


class PermanentRolloutError(RolloutError):
    """An attempt failed in a way another attempt will not fix: a 4xx other than 408/425/429, or a 5xx whose
    body says it wraps such a client error from a server behind the agent."""
