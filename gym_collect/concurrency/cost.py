"""The work an answer says it did: the congestion signal's unit (see `AdaptiveLimit.on_success`)."""

from __future__ import annotations

from typing import Any


def usage_cost(answer: dict[str, Any]) -> float | None:
    """Tokens of a NeMo Gym answer: `response.usage.input_tokens + output_tokens` (or `total_tokens`),
    None when the answer carries no positive count (the limit then reads plain latency)."""
    response = answer.get("response")
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    parts = [usage.get("input_tokens"), usage.get("output_tokens")]
    if all(isinstance(p, int | float) and not isinstance(p, bool) for p in parts):
        total = float(parts[0]) + float(parts[1])  # type: ignore[arg-type]
    else:
        value = usage.get("total_tokens")
        total = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
    return total if total > 0.0 else None
