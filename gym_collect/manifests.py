"""The shards' run manifests: do a set of shard outputs come from one `collect_rollouts` run?

Each shard output has a manifest beside it, ``<stem>_run.json`` (schema ``gym_collect.run/1``, written by the
writer): ``{"schema", "output_name", "input_path", "definition": {"input": {"size", "fingerprint"}, "start_idx",
"stop_idx", "num_repeats", "responses_create_params", "agent_name", ...}, "sharding"?: {"num_shards",
"input_rows"}}``.
Shards belong to one run when their definitions agree on every key but the row range (``start_idx``/``stop_idx``),
including keys a later collector adds; the run's tasks are then ``[min start_idx, max stop_idx)``. Shards made
with ``num_shards`` (and no ``limit``) also say that together they hold every row of the input, so a shard missing
altogether, even the first or the last, shows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from gym_collect.errors import InputError
from gym_collect.writer import OutputPaths
from gym_collect.writer.outputs import MANIFEST_SCHEMA

__all__ = ["MergeMismatch", "ShardPlan", "plan_from_manifests", "read_manifest"]

RANGE_KEYS = ("start_idx", "stop_idx")


@dataclass(frozen=True)
class ShardPlan:
    """What the shards' manifests agree on. ``definition``: the shared run definition without the row range;
    ``tasks``: ``[min start_idx, max stop_idx)``; ``num_repeats`` from the definition; ``manifests``: how many
    shards had one (0: none had, and nothing was checked); ``row_ranges``: each shard's ``(start_idx,
    stop_idx)`` of input rows by its path as given, when every manifest has both; ``input_rows``: every row of
    the input, when the shards were made with ``num_shards`` (their ``sharding`` agrees)."""

    definition: dict[str, object]
    tasks: range | None
    num_repeats: int | None
    manifests: int
    row_ranges: dict[Path, tuple[int, int]] | None = None
    input_rows: range | None = None


def read_manifest(shard: Path) -> dict[str, Any] | None:
    """``<shard stem>_run.json``, whole; None when the file does not exist.

    Raises InputError when it exists but is not a ``gym_collect.run/1`` manifest with a definition object."""
    path = OutputPaths(shard).manifest
    try:
        doc = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, orjson.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable run manifest ({exc})") from exc
    definition = doc.get("definition") if isinstance(doc, dict) else None
    if not isinstance(definition, dict) or doc.get("schema") != MANIFEST_SCHEMA:
        raise InputError(f"{path}: not a {MANIFEST_SCHEMA} run manifest with a definition")
    return dict(doc)


def plan_from_manifests(paths: Sequence[str | os.PathLike[str]]) -> ShardPlan:
    """Read every shard's manifest and check that the shards belong to one run.

    Raises MergeMismatch naming the shards and the differing values when definitions differ (every key but
    ``start_idx``/``stop_idx``) or when some shards have a manifest and others do not; InputError when a
    manifest is unreadable. Shards whose files are missing are skipped (the coverage check reports them).
    """
    found: list[tuple[Path, dict[str, object]]] = []
    lacking: list[Path] = []
    shardings: list[object] = []
    for p in map(Path, paths):
        if not p.is_file():
            continue
        doc = read_manifest(p)
        if doc is None:
            lacking.append(p)
        else:
            found.append((p, doc["definition"]))
            shardings.append(doc.get("sharding"))
    if not found:
        return ShardPlan({}, None, None, 0)
    if lacking:
        raise MergeMismatch(f"{', '.join(map(str, lacking))} {'has' if len(lacking) == 1 else 'have'} no run "
                            f"manifest ({OutputPaths(lacking[0]).manifest.name}) while "
                            f"{found[0][0]} has one: these shards do not come from one collect_rollouts run")
    shared = {k: v for k, v in found[0][1].items() if k not in RANGE_KEYS}
    problems: list[str] = []
    for key in sorted({k for _, d in found for k in d} - set(RANGE_KEYS)):
        values: dict[bytes, list[Path]] = {}
        for p, d in found:
            values.setdefault(orjson.dumps(d.get(key), option=orjson.OPT_SORT_KEYS), []).append(p)
        if len(values) > 1:
            groups = "; ".join(f"{_names(ps)}: {v.decode()}" for v, ps in values.items())
            problems.append(f"{key} differs: {groups}")
    if problems:
        raise MergeMismatch("refused to merge shards of different runs; nothing written:\n  "
                            + "\n  ".join(problems))
    starts = [d.get("start_idx") for _, d in found]
    stops = [d.get("stop_idx") for _, d in found]
    tasks: range | None = None
    row_ranges: dict[Path, tuple[int, int]] | None = None
    ranges = [(p, a, b) for (p, _), a, b in zip(found, starts, stops, strict=True)
              if isinstance(a, int) and isinstance(b, int)]
    if len(ranges) == len(found):
        tasks = range(min(a for _, a, _ in ranges), max(b for _, _, b in ranges))
        row_ranges = {p: (a, b) for p, a, b in ranges}
    repeats = shared.get("num_repeats")
    whole = shardings[0]
    input_rows = whole.get("input_rows") if isinstance(whole, dict) and all(s == whole for s in shardings) else None
    return ShardPlan(shared, tasks, repeats if isinstance(repeats, int) else None, len(found), row_ranges,
                     range(input_rows) if isinstance(input_rows, int) else None)


class MergeMismatch(InputError):
    """The shards' manifests say they come from different runs (or some have none); nothing was written."""


def _names(paths: Sequence[Path]) -> str:
    shown = ", ".join(map(str, paths[:4]))
    return shown + (f" and {len(paths) - 4} more" if len(paths) > 4 else "")
