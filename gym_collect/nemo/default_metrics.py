"""NeMo Gym's default aggregate metrics, computed locally, for a server that has no `/aggregate_metrics` or
fails it (`AggregateMetrics`, `nemo_gym/config_types.py:933-966`; `nemo_gym/reward_profile.py:1111-1236`).

Placeholder with the final signature and result shape: `mean/<field>` of every numeric top-level field in
`agent_metrics` and `key_metrics`, empty per-task and per-repeat lists. The full default aggregation
replaces it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def default_aggregate_metrics(verify_responses: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The `AggregateMetrics` document of `verify_responses` (stripped verify responses, in
    (`_ng_task_index`, `_ng_rollout_index`) order): `{"group_level_metrics": [...], "agent_metrics": {...},
    "key_metrics": {...}, "repeat_level_metrics": [...]}`. Fields starting with `_` are indices and stamps,
    not metrics. Reads `verify_responses` once; raises nothing for odd values (they are left out)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for row in verify_responses:
        for key, value in row.items():
            if key.startswith("_") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            sums[key] = sums.get(key, 0.0) + value
            counts[key] = counts.get(key, 0) + 1
    means = {f"mean/{key}": sums[key] / counts[key] for key in sorted(sums)}
    return {"group_level_metrics": [], "agent_metrics": dict(means), "key_metrics": dict(means),
            "repeat_level_metrics": []}
