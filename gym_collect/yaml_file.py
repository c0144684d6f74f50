"""Reading a YAML file the user points at, with one line for what is wrong with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gym_collect.errors import ConfigError


def read_yaml(path: Path, name: str) -> Any:
    """`path` parsed (`yaml.safe_load`). Raises `ConfigError` beginning with `name` (how the user knows the file)
    when it cannot be read or is not YAML, with the line of the problem; the message never quotes the file."""
    try:
        return yaml.safe_load(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{name}: cannot be read ({exc.strerror}); fix it or point at another file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{name}: not valid YAML{where}; fix the file") from None
