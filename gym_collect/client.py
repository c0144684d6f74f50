"""The one HTTP client of a run: one `ClientSession` over one `TCPConnector`, and `POST /run`.

This is the only module that catches aiohttp exceptions; each becomes a `RolloutError` (or
`AgentUnavailableError` at start-up) raised `from` the original.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from yarl import URL

from gym_collect.config import RETRYABLE_STATUSES
from gym_collect.errors import (
    AgentConnectionError,
    AgentTimeoutError,
    AgentUnavailableError,
    BadAnswerError,
    PermanentRolloutError,
    RolloutError,
    TransientRolloutError,
)
from gym_collect.retry import parse_retry_after

JSON_HEADERS = {"Content-Type": "application/json"}
MAX_ERROR_TEXT = 200


class AgentClient:
    """Async context manager owning the run's `ClientSession`.

    Args:
        connector_limit: `TCPConnector(limit=...)`, connections in all.
        connector_limit_per_host: `TCPConnector(limit_per_host=...)`.
        connect_timeout_s: seconds to open a connection (None: no limit).
        request_timeout_s: seconds for one whole attempt (None: no limit).
        headers: sent with every request (may hold secrets: never logged).
    """

    def __init__(
        self,
        *,
        connector_limit: int,
        connector_limit_per_host: int,
        connect_timeout_s: float | None,
        request_timeout_s: float | None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self._connector_limits = (connector_limit, connector_limit_per_host)
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._headers = {**JSON_HEADERS, **(headers or {})}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AgentClient:
        limit, limit_per_host = self._connector_limits
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers, json_serialize=_dumps_str
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session; raises `RuntimeError` outside `async with`."""
        if self._session is None:
            raise RuntimeError("AgentClient is not open: use `async with AgentClient(...)`")
        return self._session

    async def run(self, base_url: str, body: bytes, idempotency_key: str) -> dict[str, Any]:
        """`POST {base_url}/run` with `body` (JSON bytes); the answer as a dict.

        Raises `TransientRolloutError` (connection, timeout, 408/425/429/5xx, a body that is not a JSON
        object) or `PermanentRolloutError` (other non-200 statuses).
        """
        try:
            async with self.session.post(
                base_url + "/run", data=body, headers={"Idempotency-Key": idempotency_key}
            ) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    raise _status_error(resp.status, resp.headers.get("Retry-After"), payload)
        except RolloutError:
            raise
        except (TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise AgentTimeoutError("no answer within request_timeout_s") from exc
        except aiohttp.ClientError as exc:
            raise AgentConnectionError(_short(f"{type(exc).__name__}: {exc}")) from exc
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise BadAnswerError(f"answer is not JSON ({len(payload)} bytes)", status=None) from exc
        if not isinstance(answer, dict):
            raise BadAnswerError(f"answer is a JSON {type(answer).__name__}, not an object")
        return answer

    async def get_json(self, url: str, timeout_s: float) -> Any:
        """`GET url` and parse its JSON; raises `AgentUnavailableError` on any failure (start-up use)."""
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                resp.raise_for_status()
                return orjson.loads(await resp.read())
        except (TimeoutError, aiohttp.ClientError, orjson.JSONDecodeError) as exc:
            raise AgentUnavailableError(f"GET {url} failed: {_short(type(exc).__name__ + ': ' + str(exc))}") from exc

    async def probe(self, base_url: str, attempts: int = 3) -> None:
        """Check that a TCP connection to `base_url` opens, trying `attempts` times with a short pause.

        Raises `AgentUnavailableError` naming the URL when none succeeds (within about
        `attempts * connect_timeout_s` seconds).
        """
        url = URL(base_url)
        timeout_s = self._connect_timeout_s or 10.0
        last: BaseException | None = None
        for attempt in range(attempts):
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(url.host, url.port), timeout_s)
            except (OSError, TimeoutError) as exc:
                last = exc
                if attempt + 1 < attempts:
                    await asyncio.sleep(min(1.0, timeout_s))
                continue
            writer.close()
            await writer.wait_closed()
            return
        reason = type(last).__name__ if isinstance(last, TimeoutError) else str(last)
        raise AgentUnavailableError(
            f"agent server at {base_url} is unreachable after {attempts} attempts ({reason}); "
            "check that it is running and that the URL is right"
        )


def _status_error(status: int, retry_after: str | None, payload: bytes) -> RolloutError:
    text = _short(payload.decode("utf-8", "replace"))
    message = f"HTTP {status}: {text}" if text else f"HTTP {status}"
    if status in RETRYABLE_STATUSES:
        return TransientRolloutError(message, status=status, retry_after_s=parse_retry_after(retry_after))
    return PermanentRolloutError(message, status=status)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def _dumps_str(obj: Any) -> str:
    return orjson.dumps(obj).decode()
