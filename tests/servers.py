"""Scripted loopback HTTP servers for tests: an aiohttp application run in its own thread and event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
START_TIMEOUT_S = 10.0


class LoopbackServer:
    """`with LoopbackServer({"POST /run": handler, ...}) as server: server.url` serves the routes on
    127.0.0.1 (a free port) from a daemon thread; leaving the block stops it and closes its connections.

    `requests` counts every request by "METHOD /path".
    """

    def __init__(self, routes: dict[str, Handler]) -> None:
        self.routes = routes
        self.requests: dict[str, int] = {}
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __enter__(self) -> LoopbackServer:
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S):
            raise TimeoutError("loopback server did not start")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(START_TIMEOUT_S)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application(client_max_size=1 << 30)
        for route, handler in self.routes.items():
            method, path = route.split(" ", 1)
            app.router.add_route(method, path, self._counted(route, handler))
        runner = web.AppRunner(app, shutdown_timeout=0.5)
        try:
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            raise
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def _counted(self, route: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            self.requests[route] = self.requests.get(route, 0) + 1
            return await handler(request)

        return counted


async def echo_rollout(request: web.Request) -> web.Response:
    """An agent's answer: the request body with a reward of 1."""
    body = await request.json()
    return web.json_response({**body, "reward": 1.0, "response": {"object": "response", "output": []}})
