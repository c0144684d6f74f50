"""Simulated NeMo Gym agent server modelling a GPU inference backend, for demos, tests and benchmarks.

Serves ``POST /run`` (answers a NeMo Gym verify response: the row echoed plus ``response`` and ``reward``),
``POST /aggregate_metrics`` (NeMo Gym's default aggregation, as a server without metrics of its own answers),
``GET /global_config_dict_yaml`` (the head server's config document) and ``GET /health``.

Per request, in this order: parse the body (not a JSON object: 400); ``fail_status``; ``fail_first_k``;
one random fault (reset, hang, 500, 429, non-JSON), drawn from ``random.Random`` seeded with
``f"{seed}:{task}:{rollout}:{attempt}"`` so a given attempt of a given row always meets the same fate
whatever the arrival order; then service under ``mode``. Every fault answers (or resets) at once without
taking a service slot, except a hang, which sleeps ``hang_s`` *before* taking a slot and then is served
normally (so hung requests never starve capacity). A request whose connection is closed before its answer
(simulated reset, client gave up, :meth:`SimAgent.stop_listening`) counts under status 0, not as succeeded.
"""

import argparse
import asyncio
import dataclasses
import math
import secrets
import signal
import sys
import threading
import time
import types
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from random import Random
from typing import Any

import orjson
import yaml
from aiohttp import web

from gym_collect.nemo.default_metrics import default_aggregate_metrics
from gym_collect.sim_faults import Fault, FifoSlots, SharedProcessor, draw_fault, retry_after_value

SIM_HEAD_SECRET = "sk-sim-SECRET-do-not-leak"
MODES = ("queue", "gpu", "rate_limited")
RowKey = tuple[int, int]


@dataclass
class SimAgentConfig:
    """Behaviour of a :class:`SimAgent`; mutable while the server runs. Rates are probabilities per request.

    ``mode``: ``"queue"`` waits FIFO for one of ``capacity`` slots; ``"gpu"`` serves everything at once as
    processor sharing (each request progresses at ``min(1, capacity / in_service)`` seconds of work per
    second, i.e. service time stretched by ``max(1, in_service / capacity)``, re-evaluated at every arrival
    and departure); ``"rate_limited"`` answers 429 beyond ``capacity``. Service time 0 never waits or limits.
    ``degrade`` (mode ``"gpu"``): past capacity throughput falls (see :class:`SharedProcessor`).
    ``task_sigma``: long-rollout mode, a lognormal factor of shape ``task_sigma`` drawn per task (seeded by
    ``seed`` and ``_ng_task_index``), so a rollout's length is a property of its task (heavy-tailed for a
    sigma near 1), times the per-attempt ``service_sigma`` factor. ``usage_tokens_per_s``: the answer's
    ``response.usage.output_tokens`` is the work in seconds times this (matching usage; None: from the
    answer's text).
    ``capacity_halve_at_s`` counts from server start; the halved capacity is ``max(1, capacity // 2)``.
    Error answers are JSON ``{"detail": str}``; 429 (and ``fail_status`` 429/503) carry ``Retry-After``, sent
    as ``f"{s:g}"`` (fractions are a tolerant-parser test; RFC 9110 allows integers only) or, with
    ``retry_after_as_date``, as an IMF-fixdate rounded up to the second. The non-JSON answer is an HTML page
    labelled ``application/json``. Raises ``ValueError`` on out-of-range values.
    """

    capacity: int = 64  # concurrent service slots
    service_time_s: float = 0.1  # median service time of one rollout
    service_sigma: float = 0.0  # lognormal sigma of the service time (0: constant)
    mode: str = "queue"  # one of MODES
    rate_limit_retry_after_s: float = 1.0  # Retry-After of mode "rate_limited" 429s
    capacity_halve_at_s: float | None = None
    degrade: float = 0.0
    task_sigma: float = 0.0
    usage_tokens_per_s: float | None = None
    fail_500_rate: float = 0.0
    fail_429_rate: float = 0.0
    retry_after_s: float = 0.5  # Retry-After of fail_429_rate (and fail_status 429/503) answers
    retry_after_as_date: bool = False
    reset_rate: float = 0.0  # close the connection without an answer (TCP RST)
    hang_rate: float = 0.0  # sleep hang_s, then serve normally
    hang_s: float = 3600.0
    non_json_rate: float = 0.0  # 200 with a body that is not JSON
    fail_first_k: int = 0  # every (task, rollout) gets 500 on its first k attempts
    fail_status: int | None = None  # every request answers this status
    response_pad_bytes: int = 0  # size of the "sim_padding" string field added to each answer
    seed: int = 0

    def __post_init__(self) -> None:
        rates = self.fault_rates().values()
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {self.fault_rates()}")
        if min(self.degrade, self.task_sigma, self.usage_tokens_per_s or 0.0) < 0:
            raise ValueError("degrade, task_sigma and usage_tokens_per_s must be >= 0")
        if min(self.service_time_s, self.service_sigma, self.hang_s, self.retry_after_s) < 0:
            raise ValueError("service_time_s, service_sigma, hang_s and retry_after_s must be >= 0")
        if min(self.fail_first_k, self.response_pad_bytes, self.rate_limit_retry_after_s) < 0:
            raise ValueError("fail_first_k, response_pad_bytes and rate_limit_retry_after_s must be >= 0")
        if self.fail_status is not None and not 100 <= self.fail_status <= 599:
            raise ValueError(f"fail_status must be an HTTP status, got {self.fail_status}")

    def fault_rates(self) -> dict[Fault, float]:
        """Per-request probability of each random fault."""
        return {Fault.RESET: self.reset_rate, Fault.HANG: self.hang_rate, Fault.ERROR_500: self.fail_500_rate,
                Fault.RATE_LIMIT_429: self.fail_429_rate, Fault.NON_JSON: self.non_json_rate}  # fmt: skip


@dataclass
class SimAgentStats:
    """Counters of a :class:`SimAgent`, keyed by ``(task, rollout)`` from ``_ng_task_index`` and
    ``_ng_rollout_index`` (-1 when absent). ``statuses`` counts non-JSON answers under 200, and under 0 the
    requests whose connection closed before an answer (resets, clients that left, ``stop_listening``).
    ``headers_seen`` holds request header *names* (lower case). Read from the server's loop, or after
    traffic stops when the server runs in a :class:`SimAgentThread`.
    """

    requests: int = 0
    in_flight: int = 0
    max_in_flight: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    succeeded: Counter[RowKey] = field(default_factory=Counter)
    attempts: Counter[RowKey] = field(default_factory=Counter)
    idempotency_keys: dict[RowKey, set[str]] = field(default_factory=dict)
    headers_seen: set[str] = field(default_factory=set)
    authorization_values: set[str] = field(default_factory=set)
    bodies_last: dict[RowKey, dict[str, Any]] = field(default_factory=dict)

    def reset(self) -> None:
        """Zero the counters; ``in_flight`` is live state and stays, ``max_in_flight`` restarts from it."""
        self.__dict__.update(SimAgentStats(in_flight=self.in_flight, max_in_flight=self.in_flight).__dict__)


def sim_reward(task: int, rollout: int) -> float:
    """Deterministic reward: 1.0 for ~70% of ``(task, rollout)`` pairs, else 0.0 (by ``zlib.crc32`` of
    ``"task:rollout"``, so stable across processes and Python versions).
    """
    return 1.0 if zlib.crc32(f"{task}:{rollout}".encode()) % 100 < 70 else 0.0


def _index(row: dict[str, Any], name: str) -> int:
    value = row.get(name, -1)
    return value if isinstance(value, int) else -1


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


def _answer(row: dict[str, Any], key: RowKey, body_bytes: int, pad_bytes: int,
            output_tokens: int | None = None) -> bytes:
    """The verify response as JSON bytes: ``row``'s keys, ``response``, ``reward`` (and ``sim_padding``)."""
    reward = sim_reward(*key)
    expected = row.get("expected_answer")
    if expected is None:
        text = f"Simulated answer for task {key[0]}, rollout {key[1]}."
    elif reward:
        text = f"The answer is \\boxed{{{expected}}}."
    else:
        text = "I could not work this one out."
    input_tokens = max(1, body_bytes // 4)
    output_tokens = max(1, len(text) // 4) if output_tokens is None else max(1, output_tokens)
    part: dict[str, Any] = {"annotations": [], "text": text, "type": "output_text", "logprobs": None}
    message = {"id": f"msg_{secrets.token_hex(16)}", "content": [part], "role": "assistant",
               "status": "completed", "type": "message"}  # fmt: skip
    usage = {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
             "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
             "total_tokens": input_tokens + output_tokens}  # fmt: skip
    answer = dict(row)
    answer["response"] = {
        "id": f"resp_{secrets.token_hex(16)}", "created_at": float(int(time.time())), "error": None,
        "incomplete_details": None, "instructions": None, "metadata": None, "model": "sim-model",
        "object": "response", "output": [message], "parallel_tool_calls": True, "temperature": None,
        "tool_choice": "auto", "tools": [], "top_p": None, "status": "completed", "usage": usage,
    }  # fmt: skip
    answer["reward"] = reward
    if pad_bytes:
        answer["sim_padding"] = "x" * pad_bytes
    return orjson.dumps(answer)


class SimAgent:
    """Simulated agent server on ``host:port`` (0 picks a free port), as an async context manager.

    ``url`` and ``port`` are valid once entered (entering raises ``OSError`` if the port cannot be bound);
    ``config`` may be changed or replaced between phases; ``stats`` counts traffic. ``agent_names`` are
    advertised by the head server document (route absent, so 404, when ``head_server`` is False), shaped as
    NeMo Gym 0.7 shapes it (each agent fronted by a ``legacy_agent`` environment server and bound to a
    resources server ``<agent>_resources``; every server's address is this one) or, with
    ``head_shape="0.5"``, as older head servers do (agents only).
    """

    def __init__(
        self,
        config: SimAgentConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        agent_names: Sequence[str] = ("sim_agent",),
        head_server: bool = True,
    ) -> None:
        self.config = config or SimAgentConfig()
        self.stats = SimAgentStats()
        self.host = host
        self.port = port
        self.agent_names = tuple(agent_names)
        self.head_shape = "0.7"
        self._head_server = head_server
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._started_at = time.monotonic()
        self._slots = FifoSlots(self._capacity)
        self._gpu = SharedProcessor(self._capacity, lambda: self.config.degrade)

    @property
    def url(self) -> str:
        """Base URL, ``"http://HOST:PORT"``."""
        return f"http://{self.host}:{self.port}"

    async def __aenter__(self) -> "SimAgent":
        # a run's /aggregate_metrics body holds every rollout's fields (about 700 MB at a million rollouts)
        app = web.Application(client_max_size=4 * 1024**3)
        app.router.add_post("/run", self._handle_run)
        app.router.add_post("/aggregate_metrics", self._handle_aggregate_metrics)
        app.router.add_get("/health", self._handle_health)
        app.router.add_get("/stats", self._handle_stats)
        if self._head_server:
            app.router.add_get("/global_config_dict_yaml", self._handle_head)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.25)
        await self._runner.setup()
        self._started_at = time.monotonic()
        try:
            await self.start_listening()
        except BaseException:
            await self._runner.cleanup()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = self._site = None

    async def start_listening(self) -> None:
        """Listen on ``host:port``; after :meth:`stop_listening`, on the same port ("agent back up").

        Raises ``OSError`` if the port cannot be bound.
        """
        if self._runner is None or self._site is not None:
            return
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self._site = site
        self.port = self._runner.addresses[-1][1]

    async def stop_listening(self) -> None:
        """Close the listening socket and every open connection, dropping requests in flight ("agent down":
        new connections are refused, pooled keep-alive connections see a disconnect).
        """
        if self._runner is None or self._site is None:
            return
        await self._site.stop()
        self._site = None
        if self._runner.server is not None:
            for conn in self._runner.server.connections:
                conn.force_close()

    def _capacity(self) -> int:
        cfg = self.config
        halve = cfg.capacity_halve_at_s
        if halve is not None and time.monotonic() - self._started_at >= halve:
            return max(1, cfg.capacity // 2)
        return cfg.capacity

    def _reply(self, status: int, detail: str, retry_after_s: float | None = None) -> web.Response:
        self.stats.statuses[status] += 1
        headers = {}
        if retry_after_s is not None:
            headers["Retry-After"] = retry_after_value(retry_after_s, self.config.retry_after_as_date)
        body = orjson.dumps({"detail": detail})
        return web.Response(status=status, body=body, content_type="application/json", headers=headers)

    def _dropped(self) -> web.Response:
        """Count a request whose connection is closed; aiohttp drops the write of the returned response."""
        self.stats.statuses[0] += 1
        return web.Response(status=500)

    async def _handle_run(self, request: web.Request) -> web.StreamResponse:
        stats = self.stats
        stats.requests += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            return await self._run(request)
        finally:
            stats.in_flight -= 1

    async def _run(self, request: web.Request) -> web.StreamResponse:
        cfg, stats = self.config, self.stats
        raw = await request.read()
        try:
            row = orjson.loads(raw)
        except orjson.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            return self._reply(400, "body must be a JSON object")
        key = (_index(row, "_ng_task_index"), _index(row, "_ng_rollout_index"))
        stats.attempts[key] += 1
        attempt = stats.attempts[key]
        stats.bodies_last[key] = row
        stats.headers_seen.update(name.lower() for name in request.headers)
        if (auth := request.headers.get("Authorization")) is not None:
            stats.authorization_values.add(auth)
        if (idem := request.headers.get("Idempotency-Key")) is not None:
            stats.idempotency_keys.setdefault(key, set()).add(idem)

        if cfg.fail_status is not None:
            retry = cfg.retry_after_s if cfg.fail_status in (429, 503) else None
            return self._reply(cfg.fail_status, f"scripted status {cfg.fail_status}", retry)
        if attempt <= cfg.fail_first_k:
            return self._reply(500, f"scripted failure {attempt} of {cfg.fail_first_k}")
        rates = cfg.fault_rates()
        faulty = any(rates.values())
        rng = Random(f"{cfg.seed}:{key[0]}:{key[1]}:{attempt}") if faulty or cfg.service_sigma else None
        fault = draw_fault(rng.random(), rates) if rng is not None and faulty else None
        if fault is Fault.RESET:
            if request.transport is not None:
                request.transport.abort()
            return self._dropped()
        if fault is Fault.HANG:
            await asyncio.sleep(cfg.hang_s)
            if _gone(request):
                return self._dropped()
        elif fault is Fault.ERROR_500:
            return self._reply(500, "simulated internal error")
        elif fault is Fault.RATE_LIMIT_429:
            return self._reply(429, "simulated rate limit", cfg.retry_after_s)
        elif fault is Fault.NON_JSON:
            stats.statuses[200] += 1
            return web.Response(body=b"<html>502 Bad Gateway</html>", content_type="application/json")

        work_s = cfg.service_time_s
        if rng is not None and cfg.service_sigma and work_s > 0:
            work_s = rng.lognormvariate(math.log(work_s), cfg.service_sigma)
        if cfg.task_sigma and work_s > 0:
            work_s *= Random(f"{cfg.seed}:task:{key[0]}").lognormvariate(0.0, cfg.task_sigma)
        if work_s > 0:
            if cfg.mode == "gpu":
                await self._gpu.serve(work_s)
            else:
                if cfg.mode == "queue":
                    await self._slots.acquire()
                elif not self._slots.try_acquire():
                    return self._reply(429, "over capacity", cfg.rate_limit_retry_after_s)
                try:
                    if not _gone(request):  # the client may have left while queued
                        await asyncio.sleep(work_s)
                finally:
                    self._slots.release()
        if _gone(request):
            return self._dropped()
        tokens = None if cfg.usage_tokens_per_s is None else round(work_s * cfg.usage_tokens_per_s)
        body = _answer(row, key, len(raw), cfg.response_pad_bytes, tokens)
        stats.statuses[200] += 1
        stats.succeeded[key] += 1
        return web.Response(body=body, content_type="application/json")

    async def _handle_aggregate_metrics(self, request: web.Request) -> web.Response:
        rows = orjson.loads(await request.read()).get("verify_responses", [])
        body = orjson.dumps(default_aggregate_metrics(rows))
        return web.Response(body=body, content_type="application/json")

    async def _handle_health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _handle_stats(self, request: web.Request) -> web.Response:
        """The traffic counters, for a client in another process: ``{"requests", "max_in_flight",
        "statuses": {status: count}}``."""
        stats = self.stats
        return web.json_response({"requests": stats.requests, "max_in_flight": stats.max_in_flight,
                                  "statuses": {str(k): v for k, v in stats.statuses.items()}})

    async def _handle_head(self, request: web.Request) -> web.Response:
        server = {"host": "127.0.0.1" if self.host in ("", "0.0.0.0", "::") else self.host, "port": self.port}
        doc: dict[str, Any] = {}
        for name in self.agent_names:
            agent = {**server, "entrypoint": "app.py"}
            if self.head_shape != "0.5":
                resources = f"{name}_resources"
                doc[resources] = {"resources_servers": {"sim_resources": {**server, "entrypoint": "app.py"}}}
                agent["resources_server"] = {"type": "resources_servers", "name": resources}
                relay = {**server, "entrypoint": "app.py",
                         "agent_server": {"type": "responses_api_agents", "name": name}}
                doc[f"{name}_environment_server"] = {"environment_servers": {"legacy_agent": relay}}
            doc[name] = {"responses_api_agents": {"simple_agent": agent}}
        model = {**server, "entrypoint": "app.py", "openai_api_key": SIM_HEAD_SECRET}
        doc["policy_model"] = {"responses_api_models": {"openai_model": model}}
        text = yaml.safe_dump(doc, sort_keys=False)
        return web.Response(body=orjson.dumps(text), content_type="application/json")


class SimAgentThread:
    """A :class:`SimAgent` run in a daemon thread with its own event loop, for synchronous tests.

    ``with SimAgentThread(cfg, port=0) as sim: sim.url, sim.stats``. Start-up errors (e.g. ``OSError`` for a
    busy port) are raised from ``__enter__``; ``start_timeout_s`` bounds the wait for start-up.
    """

    def __init__(
        self,
        config: SimAgentConfig | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        agent_names: Sequence[str] = ("sim_agent",),
        head_server: bool = True,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.agent = SimAgent(config, host, port, agent_names, head_server)
        self._start_timeout_s = start_timeout_s
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL, ``"http://HOST:PORT"``."""
        return self.agent.url

    @property
    def port(self) -> int:
        """Listening port."""
        return self.agent.port

    @property
    def stats(self) -> SimAgentStats:
        """The server's counters."""
        return self.agent.stats

    @property
    def config(self) -> SimAgentConfig:
        """The live config; assigning or mutating it takes effect for the next requests."""
        return self.agent.config

    @config.setter
    def config(self, value: SimAgentConfig) -> None:
        self.agent.config = value

    def __enter__(self) -> "SimAgentThread":
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), name="sim_agent")
        self._thread.daemon = True
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            raise TimeoutError(f"sim agent did not start within {self._start_timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join()

    def stop_listening(self) -> None:
        """Blocking :meth:`SimAgent.stop_listening`."""
        self._call(self.agent.stop_listening)

    def start_listening(self) -> None:
        """Blocking :meth:`SimAgent.start_listening`."""
        self._call(self.agent.start_listening)

    def _call(self, method: Callable[[], Any]) -> None:
        assert self._loop is not None, "SimAgentThread is not running"
        asyncio.run_coroutine_threadsafe(method(), self._loop).result(self._start_timeout_s)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            async with self.agent:
                self._ready.set()
                await self._stop.wait()
        except BaseException as exc:  # handed to __enter__
            self._error = exc
            self._ready.set()


def _flag_type(annotation: object) -> Callable[[str], object]:
    inner = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
    if isinstance(annotation, types.UnionType) and len(inner) == 1:
        convert: Callable[[str], object] = inner[0]
        return lambda text: None if text.lower() in ("none", "") else convert(text)
    assert callable(annotation)
    return annotation


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: serve until SIGINT/SIGTERM; prints ``sim_agent listening on URL`` once ready. Every config field
    is a flag (``--service-time-s``; booleans as ``--retry-after-as-date``/``--no-...``; ``none`` for None).
    """
    parser = argparse.ArgumentParser(prog="python -m gym_collect.sim_agent", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--agent-name", action="append", dest="agent_names", help="repeatable")
    parser.add_argument("--no-head-server", action="store_true")
    for f in dataclasses.fields(SimAgentConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            choices = MODES if f.name == "mode" else None
            parser.add_argument(flag, type=_flag_type(f.type), default=f.default, choices=choices)
    args = vars(parser.parse_args(argv))
    try:
        config = SimAgentConfig(**{f.name: args[f.name] for f in dataclasses.fields(SimAgentConfig)})
    except ValueError as exc:
        parser.error(str(exc))
    names = args["agent_names"] or ["sim_agent"]

    async def serve() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        async with SimAgent(config, args["host"], args["port"], names, not args["no_head_server"]) as sim:
            print(f"sim_agent listening on {sim.url}", flush=True)
            await stop.wait()

    try:
        import uvloop
    except ImportError:
        asyncio.run(serve())
    else:
        uvloop.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
