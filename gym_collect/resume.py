"""The rules of resuming: what defines a run, when an existing output may be finished, what is redone.

A run is defined by its manifest (`<stem>_run.json`): the input's content (size and a fingerprint of every
byte), the row range, `limit`, `num_repeats`, the `responses_create_params` overrides and the routing.
Resume refuses a run whose definition changed; it skips every (task, rollout) already written and redoes
failed ones (keeping permanent ones with `keep_permanent_failures=true`). The files themselves are the
writer's (`gym_collect.writer.outputs`).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gym_collect.errors import ConfigError

log = logging.getLogger(__name__)


def run_key(definition: dict[str, Any]) -> str:
    """A short stable hash of a run definition, used in every request's `Idempotency-Key`."""
    return hashlib.blake2b(orjson.dumps(definition, option=orjson.OPT_SORT_KEYS), digest_size=8).hexdigest()


def check_resumable(recorded: dict[str, Any] | None, definition: dict[str, Any], manifest: Path) -> None:
    """Refuse to resume when the recorded definition differs from this run's.

    `recorded` None (no manifest) only warns. Raises `ConfigError` listing each differing key as
    `key: old -> new`.
    """
    if recorded is None:
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


def failure_kept(keep_permanent_failures: bool) -> Callable[[dict[str, Any]], bool]:
    """Which failure records resume keeps rather than redoes: permanent ones when asked, else none."""
    return lambda record: keep_permanent_failures and bool(record.get("permanent"))


def _show(key: str, value: Any) -> str:
    if key == "input" and isinstance(value, dict):
        return f"{value.get('size')} bytes, fingerprint {str(value.get('fingerprint'))[:12]}"
    return repr(value)
