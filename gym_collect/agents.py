"""Resolving agent names to base URLs: `agent_url`, the `agents` map, then NeMo Gym's head server.

The head server answers `GET /global_config_dict_yaml` with a JSON string holding YAML: the whole NeMo Gym
config, API keys included. It is fetched once, read for host/port, and dropped: never logged or stored.
An agent's address sits at `cfg[name][server_type][impl]` (`host`, `port`), as NeMo Gym's `ServerClient`
reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from gym_collect.client import AgentClient
from gym_collect.errors import AgentUnavailableError, ConfigError

log = logging.getLogger(__name__)

HEAD_SERVER_TIMEOUT_S = 10.0
HEAD_SERVER_ATTEMPTS = 3


async def resolve_agents(
    names: Iterable[str],
    *,
    client: AgentClient,
    agent_name: str | None,
    agent_url: str | None,
    agents: Mapping[str, str],
    head_server_url: str,
) -> dict[str, str]:
    """Map every name in `names` to a base URL (no trailing slash).

    `agent_url` serves `agent_name` (every row's agent when `agent_name` is unset); `agents` maps names
    directly; any name left is looked up on the head server (one fetch). Raises `ConfigError` for a name
    nobody knows and `AgentUnavailableError` when the head server is needed but does not answer within
    about `HEAD_SERVER_ATTEMPTS * HEAD_SERVER_TIMEOUT_S`.
    """
    known = dict(agents)
    if agent_url and agent_name:
        known[agent_name] = agent_url
    elif agent_url:
        known.update({name: agent_url for name in names if name not in known})
    resolved = {name: known[name].rstrip("/") for name in names if name in known}
    missing = sorted(set(names) - set(resolved))
    if missing:
        document = await _fetch_head_config(client, head_server_url)
        for name in missing:
            resolved[name] = _address_from_head(document, name, head_server_url)
        log.info("Resolved %d agent(s) through the head server at %s", len(missing), head_server_url)
    return resolved


async def _fetch_head_config(client: AgentClient, head_server_url: str) -> Mapping[str, Any]:
    url = head_server_url.rstrip("/") + "/global_config_dict_yaml"
    last: AgentUnavailableError | None = None
    for _ in range(HEAD_SERVER_ATTEMPTS):
        try:
            text = await client.get_json(url, HEAD_SERVER_TIMEOUT_S)
            break
        except AgentUnavailableError as exc:
            last = exc
    else:
        raise AgentUnavailableError(
            f"head server at {head_server_url} did not answer after {HEAD_SERVER_ATTEMPTS} attempts ({last}); "
            "start it, pass head_server_url=URL, or give the agent's address with agent_url=URL or agents.NAME=URL"
        )
    try:
        document = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError:
        document = None
    if not isinstance(document, Mapping):
        raise AgentUnavailableError(
            f"head server at {head_server_url} answered something that is not a NeMo Gym config document"
        )
    return document


def _address_from_head(document: Mapping[str, Any], name: str, head_server_url: str) -> str:
    entry = document.get(name)
    try:
        assert isinstance(entry, Mapping)
        (server_type,) = entry.values()
        (impl,) = server_type.values()
        host, port = impl["host"], impl["port"]
    except (AssertionError, AttributeError, ValueError, KeyError, TypeError):
        agents_known = sorted(k for k, v in document.items() if _looks_like_agent(v))
        raise ConfigError(
            f"agent {name!r} is not in agent_url/agents, and the head server at {head_server_url} does not "
            f"know it (agents it knows: {', '.join(agents_known) or 'none'}); pass agents.{name}=URL"
        ) from None
    return f"http://{host}:{port}"


def _looks_like_agent(value: Any) -> bool:
    return isinstance(value, Mapping) and "responses_api_agents" in value
