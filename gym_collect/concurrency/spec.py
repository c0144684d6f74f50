"""What `num_samples_in_parallel` says: a number, `auto`, null, or a map by agent with `_default`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gym_collect.errors import ConfigError

AUTO = "auto"
DEFAULT_KEY = "_default"

Level = int | str | None  # requests in flight, AUTO, or None (no limit of its own)


@dataclass(frozen=True)
class ParallelismSpec:
    """The parsed `num_samples_in_parallel`.

    `shared`: an int is one limit shared by every backend (requests in flight in all); None when unset,
    `auto` or a map. `per_backend`: the level of each backend not named in `by_agent`: AUTO (one adaptive
    limit per backend), an int (a fixed limit per backend), or None (only the shared and connector limits).
    `by_agent`: agent name -> AUTO or an int, from a map.
    """

    shared: int | None = None
    per_backend: Level = None
    by_agent: Mapping[str, Level] = field(default_factory=dict)

    def level(self, agent: str) -> Level:
        """The per-backend level of `agent`'s backend."""
        return self.by_agent.get(agent, self.per_backend)

    @property
    def any_auto(self) -> bool:
        """True when some backend has an adaptive limit."""
        return self.per_backend == AUTO or AUTO in self.by_agent.values()

    def to_config_value(self) -> int | str | dict[str, int | str] | None:
        """The value as the config holds it after parsing (int, "auto", None, or a map with `_default`)."""
        if self.shared is not None:
            return self.shared
        if not self.by_agent:
            return self.per_backend
        mapped: dict[str, int | str] = {k: v for k, v in self.by_agent.items() if v is not None}
        if self.per_backend is not None:
            mapped[DEFAULT_KEY] = self.per_backend
        return mapped


def parse_parallelism(value: Any) -> ParallelismSpec:
    """Parse `num_samples_in_parallel`: an int >= 1 (or its digits), "auto", None, or a mapping agent ->
    int or "auto", where `_default` covers the agents not named (absent: no limit of their own).
    An already parsed `ParallelismSpec` is returned as is. Raises `ConfigError` naming the bad value."""
    if isinstance(value, ParallelismSpec):
        return value
    if isinstance(value, Mapping):
        by_agent: dict[str, Level] = {}
        for key, item in value.items():
            by_agent[str(key)] = _level(item, f"num_samples_in_parallel.{key}")
        default = by_agent.pop(DEFAULT_KEY, None)
        return ParallelismSpec(None, default, by_agent)
    level = _level(value, "num_samples_in_parallel", allow_none=True)
    if isinstance(level, int):
        return ParallelismSpec(shared=level)
    return ParallelismSpec(per_backend=level)


def _level(value: Any, name: str, allow_none: bool = False) -> Level:
    if value is None and allow_none:
        return None
    if isinstance(value, str) and value.strip().lower() == AUTO:
        return AUTO
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        also = ", or null (no limit)" if allow_none else ""
        mapping = ", or a map by agent name with _default" if allow_none else ""
        raise ConfigError(f"{name}={value!r} is invalid: use an integer >= 1, 'auto'{also}{mapping}")
    return value
