"""A deterministic stand-in for an OpenAI-compatible policy model, for NeMo Gym's `openai_model` server.

Every answer is a pure function of the request body: ids are hashes of the request, `created_at` is fixed, token
counts are derived from lengths. Two collectors that send the same rows therefore get byte-identical rollouts, and
any difference between their outputs comes from the collectors.

Behaviour, by request (Responses API, https://platform.openai.com/docs/api-reference/responses/create):
- tools include `get_weather` and the input has no `function_call_output` yet: one `function_call` to `get_weather`
  (what `example_single_tool_call` rewards with 1.0);
- the last input item is a `function_call_output`: a final message quoting that output;
- otherwise (`example_multi_turn_gymnasium`): an answer looked up in `ANSWERS` by a keyword of the last user message;
- any input text containing `FAIL_MARKER`: HTTP 400 with an OpenAI-shaped error body (NeMo Gym's model client does
  not retry 400), so that row's rollout fails on both collectors.

Endpoints: `GET /v1/models` (probed by `gym env start`), `POST /v1/responses`. Listens on 127.0.0.1 only.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from typing import Any

from aiohttp import web

from tests.servers import LoopbackServer

FAIL_MARKER = "CONFORMANCE_FAIL_400"
MODEL_NAME = "stub"
CREATED_AT = 1_700_000_000.0
# Keyword of the last user message -> answer. Covers the five example_multi_turn_gymnasium rows and their follow-ups;
# the final answers contain each row's expected_answer, so every episode earns reward 1.0.
ANSWERS: tuple[tuple[str, str], ...] = (
    ("capital of france", "The capital of France is Paris."),
    ("population of that city", "Paris has about 2.1 million inhabitants."),
    ("famous landmark", "The Eiffel Tower."),
    ("15 multiplied by 8", "15 multiplied by 8 is 120."),
    ("divide that result by 6", "120 divided by 6 is 20."),
    ("largest planet", "Jupiter is the largest planet."),
    ("how many moons", "Jupiter has 95 known moons."),
    ("guido van rossum", "Python was created by Guido van Rossum."),
    ("first released", "Python was first released in 1991."),
    ("chemical symbol for water", "The chemical formula of water is H2O."),
    ("hydrogen atoms", "One water molecule contains 2 hydrogen atoms."),
)
CITIES: tuple[tuple[str, str], ...] = (("sf", "San Francisco"), ("new york", "New York"), ("nyc", "New York"))


def _digest(value: Any) -> str:
    """Hex SHA-256 of `value`'s canonical JSON (sorted keys, compact)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _texts(item: Any) -> Iterator[str]:
    """Every string under `item` (a Responses API input item, message content, or plain string)."""
    if isinstance(item, str):
        yield item
    elif isinstance(item, dict):
        for value in item.values():
            yield from _texts(value)
    elif isinstance(item, list):
        for value in item:
            yield from _texts(value)


def _last_user_text(items: list[Any]) -> str:
    """The text of the last `role: user` item, lower-cased; "" when there is none."""
    for item in reversed(items):
        if isinstance(item, dict) and item.get("role") == "user":
            return " ".join(_texts(item.get("content"))).lower()
    return ""


def _usage(body: dict[str, Any], output: list[dict[str, Any]]) -> dict[str, Any]:
    """Token counts as 1 token per 4 characters of the serialized input and output (deterministic, plausible)."""
    input_tokens = max(1, len(json.dumps(body.get("input"), sort_keys=True)) // 4)
    output_tokens = max(1, len(json.dumps(output, sort_keys=True)) // 4)
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens}


def _message(text: str, digest: str) -> dict[str, Any]:
    """An assistant output message item."""
    return {"id": f"msg_{digest[:32]}", "type": "message", "role": "assistant", "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def respond(body: dict[str, Any], fail_marked: bool = True) -> tuple[int, dict[str, Any]]:
    """The stub's answer to a `POST /v1/responses` body: (HTTP status, JSON body). Pure.

    `fail_marked=False` answers rows marked with `FAIL_MARKER` like any other (a failure that heals, for resume).
    """
    items = body.get("input")
    items = [{"role": "user", "content": items}] if isinstance(items, str) else list(items or [])
    digest = _digest(body)
    if fail_marked and any(FAIL_MARKER in text for text in _texts(items)):
        return 400, {"error": {"message": f"stub model rejects rows marked {FAIL_MARKER}",
                               "type": "invalid_request_error", "param": "input", "code": None}}
    tool_names = {t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)}
    last = items[-1] if items else {}
    if isinstance(last, dict) and last.get("type") == "function_call_output":
        output = [_message(f"Here is what I found: {last.get('output')}", digest)]
    elif "get_weather" in tool_names and not any(
            isinstance(i, dict) and i.get("type") == "function_call_output" for i in items):
        question = _last_user_text(items)
        city = next((name for key, name in CITIES if key in question.split() or key in question), "San Francisco")
        output = [{"id": f"fc_{digest[:32]}", "type": "function_call", "status": "completed",
                   "call_id": f"call_{digest[32:56]}", "name": "get_weather",
                   "arguments": json.dumps({"city": city})}]
    else:
        question = _last_user_text(items)
        text = next((answer for key, answer in ANSWERS if key in question), "I do not know.")
        output = [_message(text, digest)]
    return 200, {
        "id": f"resp_{digest[:48]}", "object": "response", "created_at": CREATED_AT, "status": "completed",
        "model": body.get("model") or MODEL_NAME, "output": output, "error": None, "incomplete_details": None,
        "instructions": body.get("instructions"), "metadata": body.get("metadata") or {},
        "parallel_tool_calls": body.get("parallel_tool_calls", True), "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0), "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [], "max_output_tokens": body.get("max_output_tokens"),
        "previous_response_id": None, "reasoning": None, "text": {"format": {"type": "text"}},
        "truncation": "disabled", "usage": _usage(body, output), "user": None, "store": False,
    }


class StubModel:
    """The stub as an aiohttp server in a daemon thread with its own event loop (usable from synchronous tests):
    a `tests.servers.LoopbackServer` serving `GET /v1/models` and `POST /v1/responses`.

    `with StubModel() as stub: stub.base_url` ("http://127.0.0.1:PORT/v1"). `take_requests()` returns and clears
    the `/v1/responses` bodies received so far, in arrival order. `fail_marked` (default True) switches the
    failure of marked rows on and off between runs. The server stops on `__exit__` and, being a daemon
    thread of the test process, never outlives it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._server = LoopbackServer({"GET /v1/models": self._models, "POST /v1/responses": self._responses})
        self.port = 0
        self.fail_marked = True

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL, `http://127.0.0.1:PORT/v1`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def take_requests(self) -> list[dict[str, Any]]:
        """The `/v1/responses` request bodies received since the last call, in arrival order."""
        with self._lock:
            taken, self._requests = self._requests, []
        return taken

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": MODEL_NAME, "object": "model", "created": int(CREATED_AT), "owned_by": "conformance"}]})

    async def _responses(self, request: web.Request) -> web.Response:
        body = await request.json()
        with self._lock:
            self._requests.append(body)
        status, answer = respond(body, self.fail_marked)
        return web.json_response(answer, status=status)

    def __enter__(self) -> StubModel:
        self._server.__enter__()
        self.port = int(self._server.url.rsplit(":", 1)[1])
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.__exit__(*exc_info)
