"""NeMo Gym 0.7.0's `perf_summary` block of `/aggregate_metrics` (`nemo_gym/reward_profile.py:983-1063`).

Collection with observability on stamps an `ng_perf` object on each rollout (token counts, turns, latency);
`compute_perf_summary` summarizes them over every verify response, masked or not. Statistics as NeMo Gym takes
them: `statistics.fmean`, `statistics.median`, `statistics.pstdev`, `sum`, `min`, `max`, and linear quantiles.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

from gym_collect.sample_stats import quantile

__all__ = ["PERF_KEY", "PerfSummary"]

Number = int | float

PERF_KEY = "ng_perf"
# reward_profile.py:983-1000: each summarized by mean, median and total
_TOKEN_FIELDS = ("prompt_tokens", "cached_prompt_tokens", "completion_tokens", "reasoning_tokens")


class PerfSummary:
    """`compute_perf_summary` over the `ng_perf` objects of a run's verify responses, fed one response at a time.

    Keeps the count of responses, the count with `ng_perf`, and each reported value (in lists: `min`, `max`,
    `median` and `sum` keep ints as ints and booleans as they are, as NeMo Gym's do).
    """

    def __init__(self) -> None:
        self.rollouts = self.records = self.token_observed = 0
        self.values: dict[str, list[Number]] = {}
        self.tokens_per_turn: list[float] = []

    def add(self, verify_response: Mapping[str, Any]) -> None:
        """Count one verify response and take in its `ng_perf` object, if it has one."""
        self.rollouts += 1
        perf = verify_response.get(PERF_KEY)
        if not isinstance(perf, dict):
            return
        self.records += 1
        coverage = perf.get("token_observability_coverage")
        if isinstance(coverage, int | float) and coverage > 0:
            self.token_observed += 1
        for key in (*_TOKEN_FIELDS, "num_turns", "total_latency_ms"):
            if isinstance(perf.get(key), int | float):
                self.values.setdefault(key, []).append(perf[key])
        tokens, turns = perf.get("completion_tokens"), perf.get("num_turns")
        if isinstance(tokens, int | float) and isinstance(turns, int | float) and turns > 0:
            self.tokens_per_turn.append(tokens / turns)

    def summary(self) -> dict[str, Any] | None:
        """The `perf_summary` block; None when no response carried `ng_perf`."""
        if not self.records:
            return None
        out: dict[str, Any] = {"overall_observability_coverage": self.records / self.rollouts,
                               "token_observability_coverage": self.token_observed / self.rollouts}
        for key in _TOKEN_FIELDS:
            if xs := self.values.get(key):
                out.update({f"mean_{key}": statistics.fmean(xs), f"median_{key}": statistics.median(xs),
                            f"total_{key}": sum(xs)})
        if xs := self.values.get("num_turns"):
            out.update(mean_num_turns=statistics.fmean(xs), median_num_turns=statistics.median(xs),
                       std_num_turns=statistics.pstdev(xs), min_num_turns=min(xs),
                       p90_num_turns=quantile(sorted(xs), 0.9), max_num_turns=max(xs))
        if self.tokens_per_turn:
            out.update(mean_tokens_per_turn=statistics.fmean(self.tokens_per_turn),
                       median_tokens_per_turn=statistics.median(self.tokens_per_turn))
        if xs := self.values.get("total_latency_ms"):
            ordered = sorted(xs)
            out.update(total_latency_p50_ms=quantile(ordered, 0.5), total_latency_p90_ms=quantile(ordered, 0.9),
                       total_latency_p99_ms=quantile(ordered, 0.99), total_latency_mean_ms=statistics.fmean(xs))
        return out
