"""The one HTTP client of a run: one `ClientSession` over one `TCPConnector`, and `POST /run`.

This is the only module that catches aiohttp exceptions; each becomes a `RolloutError` (or
`AgentUnavailableError` at start-up) raised `from` the original.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any

import aiohttp
import orjson
from yarl import URL

from gym_collect.errors import (
    AgentConnectionError,
    AgentTimeoutError,
    AgentUnavailableError,
    BadAnswerError,
    PermanentRolloutError,
    RolloutError,
)
from gym_collect.redact import Redactor, display_url
from gym_collect.retry import error_for_status

JSON_HEADERS = {"Content-Type": "application/json"}
MAX_ERROR_TEXT = 200
MAX_REDIRECTS = 5
MAX_ERROR_BODY_BYTES = 8000  # of an error answer kept for its failure record (2,000 characters are written)
FD_RESERVE = 64  # descriptors kept free for output files, logs, DNS and the event loop
REDIRECT_STATUSES_KEEPING_POST = (307, 308)  # RFC 9110 §15.4.8-9: the method and body must not change


class AgentClient:
    """Async context manager owning the run's `ClientSession`.

    Requests first wait for a connection slot (at most `connector_limit` in all and
    `connector_limit_per_host` per server, the connector's own limits), and only then does the attempt's
    `request_timeout_s` start: waiting for the pool never counts as the server being slow.

    Args:
        connector_limit: `TCPConnector(limit=...)`, connections in all.
        connector_limit_per_host: `TCPConnector(limit_per_host=...)`.
        connect_timeout_s: seconds to open a connection (None: no limit).
        request_timeout_s: seconds for one whole attempt once it has a connection slot (None: no limit).
        headers: sent with every request (may hold secrets: never logged).
        secrets: further strings no message may show (passwords in URLs); header values are included.
    """

    def __init__(
        self,
        *,
        connector_limit: int,
        connector_limit_per_host: int,
        connect_timeout_s: float | None,
        request_timeout_s: float | None,
        headers: Mapping[str, str] | None = None,
        secrets: Iterable[str] = (),
    ) -> None:
        self._connector_limits = (connector_limit, connector_limit_per_host)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s)
        self._connect_timeout_s = connect_timeout_s
        self._request_timeout_s = request_timeout_s
        self._headers = {**JSON_HEADERS, **(headers or {})}
        self.redact = Redactor([*(headers or {}).values(), *secrets])
        self._session: aiohttp.ClientSession | None = None
        self._slots: asyncio.Semaphore | None = None
        self._host_slots: dict[tuple[str, str | None, int | None], asyncio.Semaphore] = {}
        self._run_urls: dict[str, tuple[URL, _Slots]] = {}  # parsed once per server, not per request

    async def __aenter__(self) -> AgentClient:
        limit, limit_per_host = self._connector_limits
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=limit_per_host)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers, json_serialize=_dumps_str
        )
        self._slots = asyncio.Semaphore(limit)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def connection_limits(self) -> tuple[int, int]:
        """(connections in all, connections per server) this client opens at most."""
        return self._connector_limits

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared session; raises `RuntimeError` outside `async with`."""
        if self._session is None:
            raise RuntimeError("AgentClient is not open: use `async with AgentClient(...)`")
        return self._session

    async def run(self, base_url: str, body: bytes, idempotency_key: str) -> dict[str, Any]:
        """`POST {base_url}/run` with `body` (JSON bytes); the answer as a dict.

        A 307/308 to the same server is followed with the same body (at most `MAX_REDIRECTS` times); any
        other redirect is a permanent failure naming its `Location`, never a body-less GET.
        Raises `TransientRolloutError` (connection, timeout, 408/425/429/5xx, a body that is not a JSON
        object) or `PermanentRolloutError` (redirects, other non-200 statuses). Messages never hold a secret.
        """
        cached = self._run_urls.get(base_url)
        if cached is None:
            url = URL(base_url + "/run")
            cached = self._run_urls[base_url] = (url, self._connection_slot(url))
        url, slot = cached
        async with slot:
            try:
                async with asyncio.timeout(self._request_timeout_s):
                    payload = await self._post_following_redirects(url, body, idempotency_key)
            except RolloutError:
                raise
            except aiohttp.ConnectionTimeoutError as exc:
                raise AgentTimeoutError("no connection within connect_timeout_s",
                                        failure_type=type(exc).__name__) from exc
            except TimeoutError as exc:
                raise AgentTimeoutError("no answer within request_timeout_s", failure_type="TimeoutError") from exc
            except aiohttp.ClientError as exc:
                raise AgentConnectionError(self._message(f"{type(exc).__name__}: {exc}"),
                                           failure_type=type(exc).__name__,
                                           failure_message=self.redact(str(exc) or repr(exc))) from exc
        try:
            answer = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise BadAnswerError(f"answer is not JSON ({len(payload)} bytes)", failure_type="JSONDecodeError",
                                 failure_message=str(exc),
                                 response_body=self.redact(payload[: MAX_ERROR_BODY_BYTES].decode("utf-8", "replace"))
                                 ) from exc
        if not isinstance(answer, dict):
            raise BadAnswerError(f"answer is a JSON {type(answer).__name__}, not an object")
        return answer

    async def _post_following_redirects(self, url: URL, body: bytes, idempotency_key: str) -> bytes:
        headers = {"Idempotency-Key": idempotency_key}
        for _ in range(MAX_REDIRECTS + 1):
            async with self.session.post(url, data=body, headers=headers, allow_redirects=False) as resp:
                payload = await resp.read()
                status, location = resp.status, resp.headers.get("Location")
                if status == 200:
                    return payload
                if not 300 <= status < 400:
                    raise self._status_error(status, resp.reason, url, resp.headers.get("Retry-After"), payload)
            target = url.join(URL(location)) if location else None
            if status in REDIRECT_STATUSES_KEEPING_POST and target is not None and target.origin() == url.origin():
                url = target
                continue
            raise PermanentRolloutError(self._message(
                f"HTTP {status} redirect to {display_url(str(target)) if target else 'nowhere (no Location)'}: "
                "POST /run is not re-sent elsewhere or as a GET; point agent_url at the address that serves /run"
            ), status=status)
        raise PermanentRolloutError(f"more than {MAX_REDIRECTS} redirects from {display_url(str(url))}", status=None)

    def _connection_slot(self, url: URL) -> _Slots:
        key = (url.scheme, url.host, url.port)
        host = self._host_slots.get(key)
        if host is None:
            host = self._host_slots[key] = asyncio.Semaphore(self._connector_limits[1])
        assert self._slots is not None, "AgentClient is not open"
        return _Slots(self._slots, host)

    async def get_json(self, url: str, timeout_s: float) -> Any:
        """`GET url` and parse its JSON; raises `AgentUnavailableError` on any failure (start-up use), with the
        status the server answered (200 for a body that is not JSON) or None when no answer came."""
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                if resp.status != 200:
                    raise AgentUnavailableError(f"GET {display_url(url)} answered HTTP {resp.status}",
                                                status=resp.status)
                payload = await resp.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            reason = "no answer in time" if isinstance(exc, TimeoutError) else f"{type(exc).__name__}: {exc}"
            raise AgentUnavailableError(self._message(f"GET {display_url(url)} failed: {reason}")) from exc
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise AgentUnavailableError(f"GET {display_url(url)} answered something that is not JSON",
                                        status=200) from exc

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
            f"agent server at {display_url(base_url)} is unreachable after {attempts} attempts ({reason}); "
            "check that it is running and that the URL is right"
        )

    def _status_error(self, status: int, reason: str | None, url: URL, retry_after: str | None,
                      payload: bytes) -> RolloutError:
        body = self.redact(payload[: MAX_ERROR_BODY_BYTES].decode("utf-8", "replace"))
        text = _short(body)
        # aiohttp's wording of a `ClientResponseError`, which NeMo Gym records as `_ng_failure_message`.
        record_message = f"{status}, message={reason or ''!r}, url={display_url(str(url))!r}"
        return error_for_status(status, retry_after, f"HTTP {status}: {text}" if text else f"HTTP {status}",
                                body=body, failure_message=record_message)

    def _message(self, text: str) -> str:
        """`text` shortened to one line, without secrets (redacted before shortening, so no part survives)."""
        return _short(self.redact(text))


class _Slots(AbstractAsyncContextManager[None]):
    """Holds one connection slot in all and one for the host."""

    __slots__ = ("_all", "_host")

    def __init__(self, all_slots: asyncio.Semaphore, host: asyncio.Semaphore) -> None:
        self._all, self._host = all_slots, host

    async def __aenter__(self) -> None:
        await self._host.acquire()
        try:
            await self._all.acquire()
        except BaseException:
            self._host.release()
            raise

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._all.release()
        self._host.release()


def socket_budget() -> tuple[int, int]:
    """Raise the soft `RLIMIT_NOFILE` to the hard limit and return (the soft limit now, how many sockets fit).

    The sockets that fit are the soft limit less the descriptors open now and `FD_RESERVE`; the run's
    connection limits are capped to it so that no request fails with "Too many open files".
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return soft, 1 << 20
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 32
    return soft, max(1, soft - open_now - FD_RESERVE)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_TEXT else text[: MAX_ERROR_TEXT - 3] + "..."


def _dumps_str(obj: Any) -> str:
    return orjson.dumps(obj).decode()
