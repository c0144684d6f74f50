"""The rules of resuming: what defines a run, when an existing output may be finished, what is redone.

A run is defined by its manifest (`<stem>_run.json`): the input's content (size and a fingerprint of every
byte), the row range, `limit`, `num_repeats`, the `responses_create_params` overrides and the routing.
Resume refuses a run whose definition changed (or, without a manifest, whose materialized inputs differ from
what this run would send); it skips every (task, rollout) already written and redoes failed ones, within
NeMo Gym's attempt rules (`gym_collect.nemo.failures.PriorAttempts`). The files themselves are the writer's
(`gym_collect.writer.outputs`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from itertools import zip_longest
from pathlib import Path
from typing import Any

import orjson

from gym_collect.errors import ConfigError

log = logging.getLogger(__name__)


def run_key(definition: dict[str, Any]) -> str:
    """A short stable hash of a run definition, used in every request's `Idempotency-Key`."""
    return hashlib.blake2b(orjson.dumps(definition, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def check_resumable(recorded: dict[str, Any] | None, definition: dict[str, Any], manifest: Path, *,
                    materialized: bool = False) -> None:
    """Refuse to resume when the recorded definition differs from this run's.

    `recorded` None (no manifest): with `materialized` (the output has materialized inputs, as NeMo Gym's
    outputs do) the caller checks those instead (`check_materialized`); else one warning. Raises `ConfigError`
    listing each differing key as `key: old -> new`.
    """
    if recorded is None:
        if materialized:
            log.info("%s is missing (a NeMo Gym output?): this run is checked against the materialized inputs",
                     manifest)
        else:
            log.warning("%s is missing: resuming without checking that the run's settings are unchanged", manifest)
        return
    changes = [
        f"{key}: {_show(key, recorded.get(key))} -> {_show(key, definition.get(key))}"
        for key in sorted(set(recorded) | set(definition))
        if recorded.get(key) != definition.get(key)
    ]
    if changes:
        raise ConfigError(
            f"resume refused: this run's definition differs from the one in {manifest}: " + "; ".join(changes)
            + ". Rerun with the original settings, or pass overwrite=true (or a new output path) to start over"
        )


def check_materialized(recorded: Iterator[tuple[int, dict[str, Any]]], bodies: Iterator[bytes], path: Path) -> int:
    """Compare an output's `<stem>_materialized_inputs.jsonl` (`recorded`: (line number, record)) with the
    bodies this run would send, in order, as parsed JSON; the number of lines.

    This is how resume checks an output without a manifest (one NeMo Gym wrote) against this run's input
    and settings. Raises `ConfigError` naming the first line that differs.
    """
    count = 0
    for entry, body in zip_longest(recorded, bodies, fillvalue=None):
        if entry is None or body is None:
            which = "fewer" if entry is None else "more"
            raise ConfigError(f"resume refused: {path} lists {which} rollouts than this run's input and settings "
                              f"give (from line {count + 1}); rerun with the original settings, or pass "
                              "overwrite=true (or a new output path) to start over")
        line_no, record = entry
        if orjson.loads(body) != record:
            raise ConfigError(f"resume refused: {path}:{line_no} is not the request this run's input and settings "
                              "give for it; rerun with the original settings, or pass overwrite=true (or a new "
                              "output path) to start over")
        count += 1
    return count


def _show(key: str, value: Any) -> str:
    if key == "input" and isinstance(value, dict):
        return f"{value.get('size')} bytes, fingerprint {str(value.get('fingerprint'))[:12]}"
    return repr(value)
