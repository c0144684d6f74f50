"""NeMo Gym 0.7 collector keys that this tool accepts so that 0.7 command lines run unchanged, but that
change nothing here (features of NeMo Gym's own stack); each one set away from its default gets a
one-line notice at start.

Source: `RolloutCollectionConfig` and `SharedRolloutCollectionConfig` in NeMo Gym 0.7.0's
`nemo_gym/rollout_collection.py` (lines 930-1603), and the global keys its collector reads
(`nemo_gym/global_config.py`, `nemo_gym/config_types.py:850-883`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

NOTICES: dict[str, str | None] = {  # None: accepted silently (nothing to do here when set)
    "max_resident_rollout_tasks": "rollout tasks are always bounded by the in-flight limit here",
    "retain_results_in_memory": "results are never held in memory here",
    "disable_health_check": "health reports (quality_summary.json, rollout_verdicts.jsonl) are not written here",
    "health_check_workers": "health reports are not written here",
    "health_check_ignored_checks": "health reports are not written here",
    "rollout_collection_driver": "applies to NeMo Gym's end-to-end `gym eval run`, not to a collector",
    "dispatch_longest_first": "rows are dispatched in input order",
    "retry_invalid_judge_responses": "failures are retried by class here (max_attempts)",
    "skills": "skills are not stamped here (no skills_ref)",
    "upload_rollouts": "rollouts are not uploaded to an exporter (W&B, MLflow) here",
    "upload_rollouts_to_wandb": "rollouts are not uploaded to an exporter (W&B, MLflow) here",
    "config_paths": "servers are not started by this tool; point it at a running head server",
    "observability_enabled": "model-call capture is not merged into rollouts here",
    "model_call_capture_dir": "model-call capture is not merged into rollouts here",
    "token_id_capture": "token-ID capture is not finalized here",
    "allow_unsupported_pairing": "agent/verifier pairings are not validated here",
}


@dataclass
class NemoGymOnlyKeys:
    """Keys of NeMo Gym 0.7's collector that are accepted and noticed, not acted on (see `NOTICES`)."""

    max_resident_rollout_tasks: int | None = None
    retain_results_in_memory: bool = True
    disable_health_check: bool = False
    health_check_workers: int | None = None
    health_check_ignored_checks: list[str] = field(default_factory=list)
    rollout_collection_driver: str | None = None
    dispatch_longest_first: bool = False
    retry_invalid_judge_responses: bool = False
    skills: Any = None
    upload_rollouts: bool = True
    upload_rollouts_to_wandb: bool | None = None
    config_paths: Any = None
    observability_enabled: bool = False
    model_call_capture_dir: str | None = None
    token_id_capture: Any = None
    allow_unsupported_pairing: bool = False


def notices(keys: NemoGymOnlyKeys) -> list[str]:
    """One line for each NeMo Gym-only key set away from its default, saying what happens instead."""
    defaults = NemoGymOnlyKeys()
    lines = []
    for f in fields(NemoGymOnlyKeys):
        value = getattr(keys, f.name)
        if value != getattr(defaults, f.name) and NOTICES[f.name] is not None:
            lines.append(f"{f.name}={value!r} is NeMo Gym's and has no effect here: {NOTICES[f.name]}")
    return lines
