"""Where NeMo Gym 0.7 looks for a file named by a relative path it reads (`input_jsonl_fpath`, `prompt_config`,
`env.yaml`): the `NEMO_GYM_EXTRA_ROOTS` folders (`os.pathsep`-separated), then the working directory, then NeMo
Gym's install root when NeMo Gym is installed beside this tool; the first root holding the path wins
(`component_search_roots`, `_resolve_under_cwd_or_install`, `nemo_gym/__init__.py:48-108`). Paths written to
are never searched for: they stay relative to the working directory.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

EXTRA_ROOTS_VAR = "NEMO_GYM_EXTRA_ROOTS"


def search_roots(cwd: Path | None = None) -> list[Path]:
    """The roots in order: `NEMO_GYM_EXTRA_ROOTS`, `cwd` (default: the working directory), NeMo Gym's install
    root (the folder above its package; none when NeMo Gym is not importable). Duplicates are dropped."""
    roots = [Path(d) for d in os.environ.get(EXTRA_ROOTS_VAR, "").split(os.pathsep) if d]
    roots.append(cwd or Path.cwd())
    install = _install_root()
    if install is not None:
        roots.append(install)
    unique: list[Path] = []
    seen: set[Path] = set()
    for root in roots:
        resolved = root.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(root)
    return unique


def resolve_read_path(path: str | Path, cwd: Path | None = None) -> Path:
    """`path` when absolute; a relative one under the first search root where it exists, else as given (so
    that a message names the path the user wrote)."""
    given = Path(path)
    if given.is_absolute():
        return given
    for root in search_roots(cwd):
        candidate = root / given
        if candidate.exists():
            return candidate if root != (cwd or Path.cwd()) else given
    return given


def _install_root() -> Path | None:
    try:
        spec = importlib.util.find_spec("nemo_gym")  # found without importing it
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent.parent
