"""NeMo Gym's `env.yaml`: where NeMo Gym users pin the head server (`head_server.host`, `head_server.port`).

NeMo Gym 0.7 merges the first `env.yaml` found under its search roots (`gym_collect.nemo.search_roots`) below the
command line (`nemo_gym/global_config.py:1404-1413`). This tool reads only the file's `head_server`, as overrides
placed before the command line's own (so the command line and `head_server_url` still win). The rest of the file
belongs to NeMo Gym's servers (API keys among them): it is never put into the config, logged or saved.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from gym_collect.errors import ConfigError
from gym_collect.nemo.search_roots import search_roots
from gym_collect.yaml_file import read_yaml

ENV_YAML = "env.yaml"
HOST = re.compile(r"[A-Za-z0-9._\-:\[\]]+")  # a name or an IPv4/IPv6 address: safe unquoted in a Hydra override


def find_env_yaml(cwd: Path | None = None) -> Path | None:
    """The `env.yaml` NeMo Gym would read: the first under its search roots (`NEMO_GYM_EXTRA_ROOTS`, `cwd`
    (default: the working directory), its install root); None when there is none."""
    for root in search_roots(cwd):
        candidate = root / ENV_YAML
        if candidate.is_file():
            return candidate
    return None


def head_server_overrides(path: Path) -> list[str]:
    """`++head_server.host=...` and `++head_server.port=...` for what `path` sets of them (none when it has no
    `head_server`). Raises `ConfigError` naming the file when it cannot be read, is not YAML, or its
    `head_server` is not `{host: NAME, port: INTEGER}`; the message never quotes the file."""
    document = read_yaml(path, str(path))
    head = document.get("head_server") if isinstance(document, Mapping) else None
    if head is None:
        return []
    if not isinstance(head, Mapping):
        raise ConfigError(f"{path}: head_server must be a mapping {{host: NAME, port: INTEGER}}")
    overrides = []
    host, port = head.get("host"), head.get("port")
    if host is not None:
        if not isinstance(host, str) or not HOST.fullmatch(host):
            raise ConfigError(f"{path}: head_server.host must be a host name or an IP address")
        overrides.append(f"++head_server.host={host}")
    if port is not None:
        if isinstance(port, bool) or not isinstance(port, int):
            raise ConfigError(f"{path}: head_server.port must be an integer")
        overrides.append(f"++head_server.port={port}")
    return overrides
