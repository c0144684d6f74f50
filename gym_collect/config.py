"""Typed configuration schema: the only place defaults live.

Hydra builds a `CollectConfig` from the command line (`cli.py`); everything past the CLI receives the
typed object. Validation runs in `__post_init__`, so a bad value fails at start-up, before any request.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from yarl import URL

from gym_collect.concurrency.spec import parse_parallelism
from gym_collect.errors import ConfigError
from gym_collect.nemo.keys import NemoGymOnlyKeys
from gym_collect.nemo.search_roots import resolve_read_path
from gym_collect.redact import Redactor, display_url, url_secrets

UNLIMITED_CONNECTIONS = 1 << 20  # capped by the open-file limit at start


@dataclass
class AutoConfig:
    """Bounds of the adaptive limit used when `num_samples_in_parallel=auto` (requests in flight)."""

    initial: int = 16
    min: int = 1
    max: int = 1024

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.initial <= self.max:
            raise ConfigError(
                f"auto needs 1 <= auto.min <= auto.initial <= auto.max, got min={self.min}, "
                f"initial={self.initial}, max={self.max}"
            )


@dataclass
class TuneConfig:
    """Settings of `tune_parallelism`: the doubling sweep over `num_samples_in_parallel`."""

    start: int = 8
    rows_per_step: int = 200
    min_gain: float = 0.10
    max_level: int = 1024
    max_error_rate: float = 0.0
    recommend_fraction: float = 0.8
    validate_rows: int = 0

    def __post_init__(self) -> None:
        _require(self.start >= 1, "tune.start", self.start, "an integer >= 1")
        _require(self.rows_per_step >= 1, "tune.rows_per_step", self.rows_per_step, "an integer >= 1")
        _require(self.min_gain >= 0, "tune.min_gain", self.min_gain, "a fraction >= 0")
        _require(self.max_level >= self.start, "tune.max_level", self.max_level, "an integer >= tune.start")
        _require(0 <= self.max_error_rate < 1, "tune.max_error_rate", self.max_error_rate, "a fraction in [0, 1)")
        _require(
            0 < self.recommend_fraction <= 1, "tune.recommend_fraction", self.recommend_fraction, "in (0, 1]"
        )
        _require(self.validate_rows >= 0, "tune.validate_rows", self.validate_rows, "an integer >= 0")


@dataclass
class SimSettings:
    """The built-in simulated agent server, started in-process for every agent name when `enabled`
    (demos and tuning practice without a GPU backend). See `gym_collect.sim_agent`."""

    enabled: bool = False
    capacity: int = 64
    service_time_s: float = 0.05
    service_sigma: float = 0.5
    mode: str = "queue"

    def __post_init__(self) -> None:
        _require(self.capacity >= 1, "sim.capacity", self.capacity, "an integer >= 1")
        _require(self.service_time_s >= 0, "sim.service_time_s", self.service_time_s, "seconds >= 0")
        _require(self.mode in ("queue", "gpu", "rate_limited"), "sim.mode", self.mode,
                 "'queue', 'gpu' or 'rate_limited'")


@dataclass
class HeadServerConfig:
    """NeMo Gym's `head_server.host` / `head_server.port`: where its head server listens."""

    host: str = "127.0.0.1"
    port: int = 11000


@dataclass
class CollectConfig(NemoGymOnlyKeys):
    """Everything `collect_rollouts` can be told; see the README's config table for each key's meaning.

    Units are in the names (`_s` seconds). `None` means unset/disabled. Raises `ConfigError` on a value
    out of range.
    """

    input_jsonl_fpath: str | None = None
    output_jsonl_fpath: str | None = None

    agent_name: str | None = None
    # empty, not None, by default: OmegaConf cannot merge `+agent_map={...}` or `agent_map.KEY=...` into a None node
    agent_map: dict[str, str] | None = field(default_factory=dict)
    fan_out: dict[str, list[str]] | None = field(default_factory=dict)
    agent_url: str | None = None
    agents: dict[str, str] = field(default_factory=dict)
    head_server: HeadServerConfig = field(default_factory=HeadServerConfig)
    head_server_url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    environment_routing_mode: str = "agent"
    environment_server_name: str | None = None
    environment_server_routes: dict[str, str] = field(default_factory=dict)

    start_idx: int = 0
    end_idx: int | None = None
    limit: int | None = None
    num_shards: int | None = None
    shard_id: int | None = None
    num_repeats: Any = 1
    num_repeats_add_seed: bool = False
    interleave_repeats: bool = False
    prompt_config: str | None = None
    responses_create_params: dict[str, Any] = field(default_factory=dict)

    num_samples_in_parallel: Any = None
    auto: AutoConfig = field(default_factory=AutoConfig)
    global_aiohttp_connector_limit: int = 65536
    global_aiohttp_connector_limit_per_host: int = 16384

    connect_timeout_s: float | None = 10.0
    request_timeout_s: float | None = 1800.0
    max_attempts: int = 5
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 60.0
    max_failures: int | None = None
    max_failure_rate: float | None = None
    min_rollouts_for_failure_rate: int = 50

    route_failures_to_sidecar: bool | None = None
    require_complete: bool | None = None

    disable_aggregation: bool = False
    count_failure_classes_as_zero: list[str] = field(default_factory=list)
    count_missing_rollouts_as_zero: bool = False
    aggregate_timeout_s: float | None = 600.0

    resume: bool = False
    resume_from_cache: bool = False
    keep_permanent_failures: bool = True
    retry_terminal_timeouts: bool = False
    overwrite: bool = False
    on_bad_row: str = "fail"
    output_order: str = "completion"
    reorder_window: int | None = None
    shutdown_grace_s: float = 30.0
    dispatch_budget_s: float | None = None
    drain_margin_s: float | None = None

    dry_run: bool = False

    progress: bool = True
    status_every_s: float = 5.0
    tune: TuneConfig = field(default_factory=TuneConfig)
    sim: SimSettings = field(default_factory=SimSettings)

    def __post_init__(self) -> None:
        self.resume = bool(self.resume or self.resume_from_cache)
        _require(self.start_idx >= 0, "start_idx", self.start_idx, "an integer >= 0")
        if self.end_idx is not None and self.end_idx < self.start_idx:
            raise ConfigError(f"end_idx={self.end_idx} is below start_idx={self.start_idx}: use end_idx >= start_idx")
        _require(self.limit is None or self.limit >= 0, "limit", self.limit, "an integer >= 0 (or null)")
        self.limit = self.limit or None  # NeMo Gym: 0 means no limit
        self.num_repeats = _parse_num_repeats(self.num_repeats)
        self._fold_agent_name_into_agent_map()
        self._check_fan_out()
        _require(self.environment_routing_mode in ("agent", "legacy", "taskset"), "environment_routing_mode",
                 self.environment_routing_mode, "'agent', 'legacy' or 'taskset'")
        if self.environment_routing_mode == "legacy" and not self.environment_server_name:
            raise ConfigError("environment_routing_mode=legacy needs environment_server_name=NAME (the server every "
                              "row is sent to)")
        if self.environment_routing_mode != "legacy" and self.environment_server_name:
            self.environment_routing_mode = "legacy"  # NeMo Gym: naming the server selects it for every row
        if self.head_server_url is None:
            self.head_server_url = f"http://{self.head_server.host}:{self.head_server.port}"
        self.num_samples_in_parallel = parse_parallelism(self.num_samples_in_parallel).to_config_value()
        if self.dispatch_budget_s is not None and self.num_samples_in_parallel is None:  # as 0.7 (`:1517-1524`)
            raise ConfigError("dispatch_budget_s needs num_samples_in_parallel (a number, or auto): without a limit "
                              "every rollout is sent at once, before the budget is checked again")
        for name in ("global_aiohttp_connector_limit", "global_aiohttp_connector_limit_per_host"):
            value = getattr(self, name)
            _require(value >= 0, name, value, "an integer >= 0 (0: as many as the open-file limit allows)")
            if value == 0:
                setattr(self, name, UNLIMITED_CONNECTIONS)
        for name in ("connect_timeout_s", "request_timeout_s", "aggregate_timeout_s"):
            value = getattr(self, name)
            _require(value is None or value > 0, name, value, "seconds > 0 (or null to disable)")
        _require(self.max_attempts >= 1, "max_attempts", self.max_attempts, "an integer >= 1")
        _require(self.backoff_initial_s >= 0, "backoff_initial_s", self.backoff_initial_s, "seconds >= 0")
        _require(self.backoff_max_s >= self.backoff_initial_s, "backoff_max_s", self.backoff_max_s,
                 "seconds >= backoff_initial_s")
        _require(self.max_failures is None or self.max_failures >= 1, "max_failures", self.max_failures,
                 "an integer >= 1 (or null)")
        _require(self.max_failure_rate is None or 0 < self.max_failure_rate <= 1, "max_failure_rate",
                 self.max_failure_rate, "a fraction in (0, 1] (or null)")
        _require(self.on_bad_row in ("fail", "skip"), "on_bad_row", self.on_bad_row, "'fail' or 'skip'")
        _require(self.output_order in ("completion", "input"), "output_order", self.output_order,
                 "'completion' or 'input'")
        _require(self.reorder_window is None or self.reorder_window >= 1, "reorder_window", self.reorder_window,
                 "an integer >= 1 (or null)")
        _require(self.dispatch_budget_s is None or self.dispatch_budget_s >= 0, "dispatch_budget_s",
                 self.dispatch_budget_s, "seconds >= 0 (or null)")
        _require(self.drain_margin_s is None or self.drain_margin_s >= 0, "drain_margin_s", self.drain_margin_s,
                 "seconds >= 0 (or null: the observed p75 rollout latency)")
        _require(self.shutdown_grace_s >= 0, "shutdown_grace_s", self.shutdown_grace_s, "seconds >= 0")
        _require(self.status_every_s > 0, "status_every_s", self.status_every_s, "seconds > 0")
        if (self.num_shards is None) != (self.shard_id is None):
            raise ConfigError("num_shards and shard_id go together: pass both (shard_id in [0, num_shards))")
        if self.num_shards is not None and self.shard_id is not None:
            _require(self.num_shards >= 1, "num_shards", self.num_shards, "an integer >= 1")
            _require(0 <= self.shard_id < self.num_shards, "shard_id", self.shard_id,
                     f"an integer in [0, {self.num_shards})")
            if self.start_idx != 0 or self.end_idx is not None:
                raise ConfigError("num_shards/shard_id choose the row range: do not also pass start_idx/end_idx")
        for name, url in (("agent_url", self.agent_url), ("head_server_url", self.head_server_url),
                          *((f"agents.{agent}", u) for agent, u in self.agents.items())):
            check_url(name, url)
        urls_with_credentials = [u for u in (self.agent_url, *self.agents.values()) if u and "@" in u]
        if urls_with_credentials and any(k.lower() == "authorization" for k in self.headers):
            raise ConfigError(
                "credentials are given twice: in headers.Authorization and in a server URL (user:password@); "
                "keep only one"
            )
        if self.resume and self.overwrite:
            raise ConfigError("resume=true and overwrite=true contradict each other: pass only one")

    def _fold_agent_name_into_agent_map(self) -> None:
        """NeMo Gym 0.7: `agent_name` is `agent_map._default` (it re-routes every row); both set must agree."""
        if self.agent_name is None:
            return
        default = (self.agent_map or {}).get("_default")
        if default is not None and default != self.agent_name:
            raise ConfigError(f"agent_name={self.agent_name!r} conflicts with agent_map._default={default!r}: "
                              "set only one of them")
        self.agent_map = {**(self.agent_map or {}), "_default": self.agent_name}

    def _check_fan_out(self) -> None:
        """NeMo Gym 0.7's checks (`rollout_collection.py:1526-1540`): no empty list, no agent listed twice."""
        for key, agents in (self.fan_out or {}).items():
            if not agents:
                raise ConfigError(f"fan_out.{key} is an empty list, which would drop every matching row: remove "
                                  "the key, or list at least one agent")
            twice = sorted({a for a in agents if list(agents).count(a) > 1})
            if twice:
                raise ConfigError(f"fan_out.{key} lists the same agent more than once ({', '.join(twice)}): each "
                                  "listed agent already runs every matching row; use num_repeats for repetition")

    def repeats_for(self, *keys: str | None) -> int | None:
        """`num_repeats` for a row routed by `keys` (the dispatched agent first, then the row's own routing
        key), as NeMo Gym 0.7 picks it: an int applies to all; a map takes the first key it has, else its
        `_default`; None when it has neither."""
        if isinstance(self.num_repeats, int):
            return self.num_repeats
        for key in keys:
            if key is not None and key in self.num_repeats:
                return int(self.num_repeats[key])
        default = self.num_repeats.get("_default")
        return None if default is None else int(default)

    def require_paths(self) -> tuple[Path, Path]:
        """The input and output paths; raises `ConfigError` naming whichever is missing. A relative input path is
        looked for as NeMo Gym 0.7 looks for it (`gym_collect.nemo.search_roots`); the output's is not."""
        for name in ("input_jsonl_fpath", "output_jsonl_fpath"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required: pass {name}=PATH")
        assert self.input_jsonl_fpath and self.output_jsonl_fpath
        return resolve_read_path(self.input_jsonl_fpath), Path(self.output_jsonl_fpath)

    @property
    def parallelism_limit(self) -> int | None:
        """The fixed in-flight limit shared by all backends, or None when unset, `auto` or a map."""
        value = self.num_samples_in_parallel
        return value if isinstance(value, int) else None

    @property
    def is_auto(self) -> bool:
        """True when some backend's limit is adaptive (`auto`, or `auto` in a map)."""
        return parse_parallelism(self.num_samples_in_parallel).any_auto


def config_keys(schema: type = CollectConfig, prefix: str = "") -> list[str]:
    """Every valid dotted key of the schema, nested dataclasses included (`tune.start`)."""
    keys: list[str] = []
    for f in fields(schema):
        default = f.default_factory() if callable(f.default_factory) else f.default
        keys.append(prefix + f.name)
        if hasattr(default, "__dataclass_fields__"):
            keys.extend(config_keys(type(default), prefix + f.name + "."))
    return keys


def open_keys(schema: type = CollectConfig) -> list[str]:
    """Keys whose values are free-form mappings: any sub-key is valid (`headers.Authorization`)."""
    return [f.name for f in fields(schema) if str(f.type).startswith(("dict", "Any"))]


def check_url(name: str, url: str | None) -> None:
    """Refuse a server address that is not `http(s)://host[:port][/path]`; raises `ConfigError` naming the key.

    The message shows the URL without its userinfo (it may hold a password).
    """
    if url is None:
        return
    try:
        parsed = URL(url)
        port = parsed.port
        problem = (
            "it has no http:// or https:// scheme" if parsed.scheme not in ("http", "https")
            else "it has no host" if not parsed.host
            else "its port is not in 1-65535" if port is None or not 1 <= port <= 65535
            else None
        )
    except (ValueError, TypeError) as exc:
        problem = Redactor(url_secrets([url]))(str(exc).removeprefix("Invalid URL: "))
    if problem is not None:
        raise ConfigError(
            f"{name}={display_url(str(url))!r} is not a server address ({problem}): use http://HOST:PORT, "
            "e.g. http://127.0.0.1:8000"
        )


def _parse_num_repeats(value: Any) -> int | dict[str, int]:
    """`num_repeats`: null -> 1, an int >= 1, or a map of agent (or routing key) -> int >= 1 with an optional
    `_default` (NeMo Gym 0.7, `rollout_collection.py:1447-1515`)."""
    if value is None:
        return 1
    if isinstance(value, dict):
        bad = {k: v for k, v in value.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
        if bad or not value:
            raise ConfigError(f"num_repeats map values must be integers >= 1, got {bad or value}")
        return {str(k): int(v) for k, v in value.items()}
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"num_repeats={value!r} is invalid: use an integer >= 1, or a map such as "
                          "num_repeats.my_agent=4 num_repeats._default=1")
    return value


def _require(ok: bool, name: str, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r} is invalid: use {expected}")
