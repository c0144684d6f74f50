"""Which agent a row runs on, and which server its `POST /run` goes to: NeMo Gym 0.7's routing.

Per row (`RowRouter`, pure and cheap; NeMo Gym 0.7 `nemo_gym/rollout_collection.py:2091-2131`):
`agent_map[<row agent_ref.name>]` > `agent_map[<row task_source>]` > `agent_map._default` (`agent_name` is
that default, and re-routes every row) > the row's own `agent_ref` > its `task_source`, resolved through
the head server's document; `fan_out[<routing key>]` runs the row once per listed agent. With
`environment_server_name` (`environment_routing_mode=legacy`) every row goes to that environment server.

Per agent, decided once at start-up (`resolve_routes`): `agents.NAME` or `agent_url` give an address
directly; otherwise the head server's document does: the one environment server fronting the agent
(0.7), or the agent itself (head servers without environment servers, NeMo Gym up to 0.5).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from gym_collect.errors import ConfigError
from gym_collect.nemo.head import AGENT_TYPE, ENVIRONMENT_TYPE, HeadDocument

log = logging.getLogger(__name__)

AGENT_REF_KEY = "agent_ref"
TASK_SOURCE_KEY = "task_source"
ENVIRONMENT_SERVER_KEY = "_ng_environment_server"
RESULT_TYPE_KEY = "_ng_result_type"
UNNAMED_AGENT = "(agent_url)"  # routing key of rows without `agent_ref` when only `agent_url` is given
ENVIRONMENT_TARGET = "environment_server:"  # prefix of the routing key of a materialized taskset row


@dataclass(frozen=True)
class Route:
    """Where one agent's requests go: `POST {url}/run`, and the stamps its results get (0.7 stamps
    `_ng_environment_server` and `_ng_result_type` when an environment server runs the episode)."""

    url: str
    environment_server: str | None = None
    result_type: str | None = None
    # of an environment server: the agent its results belong to (`attributed_agent`), for labels only
    agent: str | None = field(default=None, compare=False)

    def label(self, key: str) -> str | None:
        """The agent name that reports and aggregate entries show for the routing key `key`: the key itself for
        an agent, the attributed agent for a materialized taskset row's environment server (None: unknown),
        None for rows sent to `agent_url` without an `agent_ref`."""
        if key == UNNAMED_AGENT:
            return None
        if key.startswith(ENVIRONMENT_TARGET):
            return self.agent
        return key

    @property
    def stamps(self) -> dict[str, str]:
        """The stamps to set on every result and failure record of this route."""
        if self.environment_server is None:
            return {}
        stamps = {ENVIRONMENT_SERVER_KEY: self.environment_server}
        if self.result_type is not None:
            stamps[RESULT_TYPE_KEY] = self.result_type
        return stamps


MAX_CACHED_KEYS = 4096


class RouteKey(NamedTuple):
    """How one row routes, before `task_source` resolution: hashable, so a scan counts rows per key.

    `targets` are agent names (`""` stands for "the agent of `task_source`"); `basis` is the row's own
    routing key (its `agent_ref.name`, else its `task_source`), used by a `num_repeats` map; `stamp` is
    the `agent_ref` name to set on the row (an `agent_map` re-route or a resolved `task_source`).
    """

    targets: tuple[str, ...]
    basis: str | None
    task_source: str | None
    stamp: str | None
    overridden: str | None


class RowRouter:
    """Decides, per row, the agents it runs on (see the module docstring).

    Args:
        agent_map: NeMo Gym's `agent_map` with `agent_name` folded in as `_default`.
        fan_out: routing key -> agents, each running the row.
        unnamed_agent: the target of rows that name no agent (`UNNAMED_AGENT` with `agent_url` alone).
        environment_server: `environment_server_name` (legacy routing), whose `legacy_agent` is the agent
            stamped on rows without one.
    """

    def __init__(self, *, agent_map: Mapping[str, str] | None, fan_out: Mapping[str, list[str]] | None,
                 unnamed_agent: str | None, environment_server: str | None = None,
                 taskset_routes: Mapping[str, str] | None = None, tasksets_only: bool = False) -> None:
        self.agent_map = dict(agent_map or {})
        self.taskset_routes = dict(taskset_routes or {})
        self.tasksets_only = tasksets_only
        self.fan_out = {k: tuple(v) for k, v in (fan_out or {}).items()}
        self.unnamed_agent = unnamed_agent
        self.environment_server = environment_server
        self.legacy_agent: str | None = None
        self.task_source_agents: dict[str, str] = {}
        self._keys: dict[tuple[str | None, str | None], RouteKey] = {}  # rows name few (agent, task_source) pairs

    def key(self, row: Mapping[str, Any], where: str) -> RouteKey:
        """The row's `RouteKey`; raises `ConfigError` naming `where` when nothing routes it."""
        ref = row.get(AGENT_REF_KEY)
        agent = ref.get("name") if isinstance(ref, dict) and isinstance(ref.get("name"), str) else None
        source = row.get(TASK_SOURCE_KEY)
        source = source if isinstance(source, str) else None
        basis = agent if agent is not None else source
        taskset = materialized_taskset(row)
        if taskset is not None:
            server = self.taskset_routes.get(taskset)
            if server is None:
                raise ConfigError(f"{where}: no environment server route for taskset {taskset!r}: pass "
                                  f"environment_server_routes.{taskset}=SERVER")
            return RouteKey((ENVIRONMENT_TARGET + server,), taskset, None, None, None)
        cached = self._keys.get((agent, source))
        if cached is not None:
            return cached
        key = self._agent_key(agent, source, basis, where)
        if len(self._keys) < MAX_CACHED_KEYS:
            self._keys[(agent, source)] = key
        return key

    def _agent_key(self, agent: str | None, source: str | None, basis: str | None, where: str) -> RouteKey:
        if self.tasksets_only:
            raise ConfigError(f"{where}: environment_routing_mode=taskset takes only materialized task rows "
                              "(task_id.taskset and task_input); use environment_routing_mode=agent to mix them")
        if self.environment_server is not None:
            return RouteKey((agent or "",), source or self.environment_server, source, None, None)
        stamp = overridden = None
        mapped = next((self.agent_map[k] for k in (agent, source) if k is not None and k in self.agent_map),
                      self.agent_map.get("_default"))
        if mapped is not None:
            overridden = agent if agent is not None and agent != mapped else None
            agent = stamp = mapped
        if basis is not None and basis in self.fan_out:
            targets = self.fan_out[basis]
        elif agent is not None:
            targets = (agent,)
        elif source is not None:
            targets = ("",)
        elif self.unnamed_agent is not None:
            targets = (self.unnamed_agent,)
        else:
            raise ConfigError(
                f"{where}: the row has no agent_ref.name and no task_source, and neither agent_name nor agent_url "
                "is set: pass agent_name=NAME (an agent the head server knows), agent_map._default=NAME or "
                "agent_url=URL"
            )
        return RouteKey(targets, basis, source, stamp, overridden)

    def targets(self, key: RouteKey) -> tuple[str, ...]:
        """The agents of a key, with `task_source` resolved (after `resolve_task_sources`)."""
        if "" not in key.targets:
            return key.targets
        if self.environment_server is not None:
            agent = self.legacy_agent or ""
        else:
            agent = self.task_source_agents[key.task_source or ""]
        return tuple(agent if t == "" else t for t in key.targets)

    def stamp(self, key: RouteKey) -> str | None:
        """The `agent_ref.name` to set on the row before it is sent, or None to keep the row's own."""
        if key.stamp is not None:
            return key.stamp
        if "" in key.targets and key.targets == ("",):
            return self.targets(key)[0]
        return None

    def resolve(self, keys: Iterable[RouteKey], head: HeadDocument | None) -> None:
        """Resolve every `task_source` (and the legacy server's agent) through `head`; raises `ConfigError`."""
        if self.environment_server is not None:
            if head is None or not head.is_type(self.environment_server, ENVIRONMENT_TYPE):
                raise ConfigError(f"environment_server_name={self.environment_server!r} is not an environment server "
                                  "of the head server; check the name")
            self.legacy_agent = head.attributed_agent(self.environment_server)
            if self.legacy_agent is None and any("" in k.targets for k in keys):
                raise ConfigError(f"environment server {self.environment_server!r} fronts several agents: rows "
                                  "without agent_ref cannot be attributed; give them an agent_ref")
            return
        sources = sorted({k.task_source for k in keys if "" in k.targets and k.task_source is not None})
        if sources and head is None:
            raise ConfigError(f"rows route by task_source ({', '.join(sources)}), which needs the head server; "
                              "pass agent_map.SOURCE=AGENT or agent_name=AGENT")
        for source in sources:
            assert head is not None
            self.task_source_agents[source] = head.resolve_task_source(source)


def materialized_taskset(row: Mapping[str, Any]) -> str | None:
    """The taskset of a materialized task row (`task_id.taskset` and `task_input`), else None
    (`nemo_gym/episode_types.py:58-65`)."""
    task_id = row.get("task_id")
    if not isinstance(task_id, dict) or "task_input" not in row:
        return None
    taskset = task_id.get("taskset")
    return taskset if isinstance(taskset, str) and taskset else None


def needs_head(agents: Iterable[str], keys: Iterable[RouteKey], *, agent_url: str | None,
               direct: Mapping[str, str], environment_server: str | None) -> bool:
    """True when some agent has no direct address, or rows route by `task_source` or to an environment server."""
    if environment_server is not None or any("" in k.targets for k in keys):
        return True
    if any(a.startswith(ENVIRONMENT_TARGET) for a in agents):
        return True
    return any(a not in direct and not agent_url for a in agents)


def resolve_routes(agents: Iterable[str], *, agent_name: str | None, agent_url: str | None,
                   direct: Mapping[str, str], head: HeadDocument | None,
                   environment_server: str | None) -> dict[str, Route]:
    """A `Route` for every agent name, decided once at start-up (see the module docstring).

    Raises `ConfigError` for an agent nobody knows, an environment server given as an agent, or an agent
    fronted by no or several environment servers on a 0.7 head server.
    """
    routes: dict[str, Route] = {}
    for agent in sorted(set(agents)):
        if agent.startswith(ENVIRONMENT_TARGET):
            name = agent.removeprefix(ENVIRONMENT_TARGET)
            if head is None or not head.is_type(name, ENVIRONMENT_TYPE):
                raise ConfigError(f"environment_server_routes names {name!r}, which is not an environment server of "
                                  "the head server; check the route")
            routes[agent] = _environment_route(head, name)
        elif agent in direct:
            routes[agent] = Route(direct[agent].rstrip("/"))
        elif agent_url and (agent_name is None or agent in (agent_name, UNNAMED_AGENT)):
            routes[agent] = Route(agent_url.rstrip("/"))
        elif head is None:
            raise ConfigError(f"agent {agent!r} has no address: pass agents.{agent}=URL or a head server")
        elif environment_server is not None:
            routes[agent] = _environment_route(head, environment_server)
        else:
            routes[agent] = _agent_route(head, agent)
    return routes


def _agent_route(head: HeadDocument, agent: str) -> Route:
    if not head.is_type(agent, AGENT_TYPE):
        raise head.unknown_agent_error(agent)
    if not head.has_environment_servers:
        return Route(head.address(agent))
    servers = head.environment_servers_by_agent.get(agent, [])
    if not servers:
        raise ConfigError(f"agent {agent!r} has no environment server on the head server at {head.source}, so "
                          "NeMo Gym 0.7 cannot reach it either; add one (a legacy_agent relay) or pass "
                          f"agents.{agent}=URL")
    if len(servers) > 1:
        raise ConfigError(f"agent {agent!r} is fronted by several environment servers ({', '.join(sorted(servers))}); "
                          "rows routed by agent cannot choose: pass environment_server_name=NAME")
    return _environment_route(head, servers[0])


def _environment_route(head: HeadDocument, name: str) -> Route:
    return Route(head.address(name), name, head.instances[name].impl, head.attributed_agent(name))


def warn_overrides(keys: Iterable[RouteKey]) -> None:
    """NeMo Gym 0.7's warning when `agent_map`/`agent_name` re-routes rows that name another agent."""
    pairs = sorted({(k.overridden, k.stamp) for k in keys if k.overridden is not None})
    if pairs:
        log.warning("agent_map overrode agent_ref values already present in the data: %s. Before NeMo Gym 0.7, "
                    "agent_name only filled rows missing an agent_ref; it now re-routes every row", pairs)
