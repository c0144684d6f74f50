"""Resolving agent names to base URLs: `agent_url`, the `agents` map, then NeMo Gym's head server.

The head server answers `GET /global_config_dict_yaml` with a JSON string holding YAML: the whole NeMo Gym
config, API keys included. It is fetched once, read for host/port, and dropped: never logged or stored.
An agent's address sits at `cfg[name][server_type][impl]` (`host`, `port`), as NeMo Gym's `ServerClient`
reads it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from gym_collect.client import AgentClient
from gym_collect.config import check_url
from gym_collect.errors import AgentUnavailableError, ConfigError
from gym_collect.redact import display_url

log = logging.getLogger(__name__)

HEAD_SERVER_DEADLINE_S = 10.0  # when connect_timeout_s is null
HEAD_SERVER_RETRY_PAUSE_S = 0.5


async def resolve_agents(
    names: Iterable[str],
    *,
    client: AgentClient,
    agent_name: str | None,
    agent_url: str | None,
    agents: Mapping[str, str],
    head_server_url: str,
    deadline_s: float | None = None,
) -> dict[str, str]:
    """Map every name in `names` to a base URL (no trailing slash).

    `agent_url` serves `agent_name` (every row's agent when `agent_name` is unset); `agents` maps names
    directly; any name left is looked up on the head server (one fetch, retried on refused connections
    until `deadline_s`, default `HEAD_SERVER_DEADLINE_S`). Raises `ConfigError` for a name nobody knows or
    a head server entry without a valid host and port, and `AgentUnavailableError` when the head server is
    needed but has not answered by the deadline.
    """
    known = dict(agents)
    if agent_url and agent_name:
        known[agent_name] = agent_url
    elif agent_url:
        known.update({name: agent_url for name in names if name not in known})
    resolved = {name: known[name].rstrip("/") for name in names if name in known}
    missing = sorted(set(names) - set(resolved))
    if missing:
        document = await _fetch_head_config(client, head_server_url, deadline_s or HEAD_SERVER_DEADLINE_S)
        for name in missing:
            resolved[name] = _address_from_head(document, name, head_server_url)
        log.info("Resolved %d agent(s) through the head server at %s", len(missing), display_url(head_server_url))
    return resolved


async def _fetch_head_config(client: AgentClient, head_server_url: str, deadline_s: float) -> Mapping[str, Any]:
    url = head_server_url.rstrip("/") + "/global_config_dict_yaml"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            text = await client.get_json(url, max(0.1, deadline - loop.time()))
            break
        except AgentUnavailableError as exc:
            if loop.time() + HEAD_SERVER_RETRY_PAUSE_S >= deadline:
                raise AgentUnavailableError(
                    f"head server at {display_url(head_server_url)} did not answer within {deadline_s:g} s "
                    f"({exc}); start it, pass head_server_url=URL, or give the agent's address with "
                    "agent_url=URL or agents.NAME=URL"
                ) from None
            await asyncio.sleep(HEAD_SERVER_RETRY_PAUSE_S)
    try:
        document = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError:
        document = None
    if not isinstance(document, Mapping):
        raise AgentUnavailableError(
            f"head server at {display_url(head_server_url)} answered something that is not a NeMo Gym config document"
        )
    return document


def _address_from_head(document: Mapping[str, Any], name: str, head_server_url: str) -> str:
    entry = document.get(name)
    impl: Any = None
    if isinstance(entry, Mapping) and len(entry) == 1:
        (server_type,) = entry.values()
        if isinstance(server_type, Mapping) and len(server_type) == 1:
            (impl,) = server_type.values()
    if not isinstance(impl, Mapping):
        agents_known = sorted(k for k, v in document.items() if _looks_like_agent(v))
        raise ConfigError(
            f"agent {name!r} is not in agent_url/agents, and the head server at {display_url(head_server_url)} "
            f"does not know it (agents it knows: {', '.join(agents_known) or 'none'}); pass agents.{name}=URL"
        )
    host, port = impl.get("host"), impl.get("port")
    url = f"http://{host}:{port}"
    try:
        check_url(f"the head server's entry for {name!r}", url)
        if not isinstance(host, str) or not host:
            raise ConfigError("no host")
    except ConfigError:
        raise ConfigError(
            f"the head server at {display_url(head_server_url)} gives agent {name!r} no usable address "
            f"(host {host!r}, port {port!r}); fix that server's config, or pass agents.{name}=http://HOST:PORT"
        ) from None
    return url


def _looks_like_agent(value: Any) -> bool:
    return isinstance(value, Mapping) and "responses_api_agents" in value
