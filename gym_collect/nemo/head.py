"""NeMo Gym's head server document: which servers run, where, and which environment server fronts which agent.

The head server answers `GET /global_config_dict_yaml` with a JSON string holding YAML: the whole NeMo Gym
config, API keys included. It is fetched once, read for the routing facts below, and dropped: never logged
or stored. Each top-level instance holds one server type (`responses_api_agents`, `environment_servers`,
`resources_servers`, `responses_api_models`) with one implementation, whose `host`/`port` is its address
(NeMo Gym's `ServerClient`, `nemo_gym/server_utils.py:846-856`).

In 0.7 every agent is fronted by an environment server (an auto-generated `legacy_agent` relay when none
is declared, `nemo_gym/global_config.py:1128-1188`); head servers up to 0.5 have no environment servers.
"""

from __future__ import annotations

import asyncio
import difflib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from gym_collect.client import AgentClient
from gym_collect.config import check_url
from gym_collect.errors import AgentUnavailableError, ConfigError
from gym_collect.redact import display_url

AGENT_TYPE = "responses_api_agents"
ENVIRONMENT_TYPE = "environment_servers"
RESOURCES_TYPE = "resources_servers"
AGENT_SERVER_FIELD = "agent_server"
HEAD_SERVER_DEADLINE_S = 10.0  # when connect_timeout_s is null
HEAD_SERVER_RETRY_PAUSE_S = 0.5
NOT_READY_STATUSES = (502, 503, 504)  # a head server starting up, or a proxy in front of one
COLLECT_INSTEAD = ("pass the right head_server_url=URL, or give the agent's address with agent_url=URL or "
                   "agents.NAME=URL")


@dataclass(frozen=True)
class Instance:
    """One top-level server instance: `name`, its `server_type` and `impl` keys, and the impl's config."""

    name: str
    server_type: str
    impl: str
    config: Mapping[str, Any]


class HeadDocument:
    """The routing facts of a head server's document.

    Args:
        document: the parsed YAML mapping.
        source: the head server's URL, for messages (shown without userinfo).
    """

    def __init__(self, document: Mapping[str, Any], source: str) -> None:
        self.source = display_url(source)
        self.instances: dict[str, Instance] = {}
        for name, block in document.items():
            if isinstance(block, Mapping) and len(block) == 1:
                (server_type, impls), = block.items()
                if isinstance(impls, Mapping) and len(impls) == 1:
                    (impl, config), = impls.items()
                    if isinstance(config, Mapping):
                        self.instances[str(name)] = Instance(str(name), str(server_type), str(impl), config)
        self.environment_servers_by_agent: dict[str, list[str]] = {}
        for instance in self.of_type(ENVIRONMENT_TYPE):
            for agent in agent_names(instance.config):
                self.environment_servers_by_agent.setdefault(agent, []).append(instance.name)

    def of_type(self, server_type: str) -> list[Instance]:
        """The instances of one server type, in document order."""
        return [i for i in self.instances.values() if i.server_type == server_type]

    @property
    def has_environment_servers(self) -> bool:
        """False for head servers before NeMo Gym 0.7 (requests then go to the agents themselves)."""
        return bool(self.of_type(ENVIRONMENT_TYPE))

    def is_type(self, name: str, server_type: str) -> bool:
        """True when `name` is an instance of `server_type`."""
        instance = self.instances.get(name)
        return instance is not None and instance.server_type == server_type

    def address(self, name: str) -> str:
        """`http://host:port` of an instance; raises `ConfigError` when it has no usable host and port."""
        config = self.instances[name].config
        host, port = config.get("host"), config.get("port")
        url = f"http://{host}:{port}"
        try:
            if not isinstance(host, str) or not host:
                raise ConfigError("no host")
            check_url(name, url)
        except ConfigError:
            raise ConfigError(
                f"the head server at {self.source} gives {name!r} no usable address (host {host!r}, port "
                f"{port!r}); fix that server's config, or pass agents.{name}=http://HOST:PORT"
            ) from None
        return url

    def attributed_agent(self, environment_server: str) -> str | None:
        """The agent an environment server's results belong to: its `agent_server`, or its only agent
        (`nemo_gym/global_config.py:219-229`)."""
        config = self.instances[environment_server].config
        ref = config.get(AGENT_SERVER_FIELD)
        if isinstance(ref, Mapping) and isinstance(ref.get("name"), str):
            return str(ref["name"])
        agents = agent_names(config)
        return agents[0] if len(agents) == 1 else None

    def unknown_agent_error(self, name: str) -> ConfigError:
        """The error for an agent name the document does not hold as an agent, saying what to pass."""
        if self.is_type(name, ENVIRONMENT_TYPE):
            agent = self.attributed_agent(name)
            instead = f"agent_name={agent}" if agent else "the agent it fronts as agent_name"
            return ConfigError(
                f"{name!r} is an environment server, not an agent: pass {instead} (its requests go through "
                f"{name!r}), or environment_server_name={name} to send every row to it"
            )
        agents = sorted(i.name for i in self.of_type(AGENT_TYPE))
        close = difflib.get_close_matches(name, agents, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        what = "is not an agent" if name in self.instances else "does not know it"
        return ConfigError(
            f"agent {name!r} is not in agent_url/agents, and the head server at {self.source} {what} (agents it "
            f"knows: {', '.join(agents) or 'none'}){hint}; pass agents.{name}=URL to give its address"
        )

    def resolve_task_source(self, task_source: str) -> str:
        """The agent that runs rows whose `task_source` is `task_source`, as NeMo Gym 0.7 resolves it
        (`nemo_gym/global_config.py:1980-2085`, without dataset pins): the declaring agent itself, or the
        unique agent whose `resources_server` is the declaring resources server. Raises `ConfigError`."""
        instance = self.instances.get(task_source)
        if instance is None:
            close = difflib.get_close_matches(task_source, list(self.instances), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"task_source {task_source!r} is not a server of the head server at {self.source}"
                              f"{hint}; pass agent_map.{task_source}=AGENT")
        if instance.server_type == AGENT_TYPE:
            return instance.name
        if instance.server_type != RESOURCES_TYPE:
            raise ConfigError(f"task_source {task_source!r} is a {instance.server_type} instance, not an agent or "
                              "resources server; pass agent_map.{task_source}=AGENT")
        candidates = sorted(
            agent.name for agent in self.of_type(AGENT_TYPE)
            if isinstance(ref := agent.config.get("resources_server"), Mapping) and ref.get("name") == task_source
        )
        if len(candidates) != 1:
            found = f"{len(candidates)} agents use it ({', '.join(candidates)})" if candidates else "no agent uses it"
            raise ConfigError(f"task_source {task_source!r} names a resources server and {found}; pick one with "
                              f"agent_map.{task_source}=AGENT")
        return candidates[0]


def agent_names(environment_config: Mapping[str, Any]) -> list[str]:
    """The agents an environment server's config references: any field whose value has
    `type: responses_api_agents`, and `agent_server` without a type (`nemo_gym/global_config.py:191-216`)."""
    return [
        str(ref["name"])
        for key, ref in environment_config.items()
        if isinstance(ref, Mapping) and ref.get("name") is not None
        and (ref.get("type") == AGENT_TYPE or (key == AGENT_SERVER_FIELD and ref.get("type") is None))
    ]


async def fetch_head_document(client: AgentClient, head_server_url: str, deadline_s: float | None, *,
                              instead: str = COLLECT_INSTEAD) -> HeadDocument:
    """GET the head server's document, retrying while nothing answers, or a 502/503/504 does (a head server
    answers 503 until it is ready), until `deadline_s` (default `HEAD_SERVER_DEADLINE_S`). Raises
    `AgentUnavailableError` at once when something answered what a head server does not (a 404, a page that is
    not its document), else when no document came by the deadline; the message ends with `instead` (what to
    pass in its place, in the words of the command)."""
    deadline_s = deadline_s or HEAD_SERVER_DEADLINE_S
    url = head_server_url.rstrip("/") + "/global_config_dict_yaml"
    shown = display_url(head_server_url)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            text = await client.get_json(url, max(0.1, deadline - loop.time()))
            break
        except AgentUnavailableError as exc:
            if exc.status is not None and exc.status not in NOT_READY_STATUSES:
                raise AgentUnavailableError(f"{shown} is not a NeMo Gym head server ({exc}); {instead}") from None
            if loop.time() + HEAD_SERVER_RETRY_PAUSE_S >= deadline:
                raise AgentUnavailableError(
                    f"head server at {shown} did not answer within {deadline_s:g} s ({exc}); start it, or {instead}"
                ) from None
            await asyncio.sleep(HEAD_SERVER_RETRY_PAUSE_S)
    try:
        document = yaml.safe_load(text) if isinstance(text, str) else text
    except yaml.YAMLError:
        document = None
    if not isinstance(document, Mapping):
        raise AgentUnavailableError(f"{shown} is not a NeMo Gym head server (it answered something that is not a "
                                    f"NeMo Gym config document); {instead}")
    return HeadDocument(document, head_server_url)
