"""Mergeable statistics for the metrics file: latency percentiles and per-field moments.

Every class here is pure (no I/O, no clock) and mergeable: statistics of shards merged together equal, up
to float rounding where noted, the statistics of one run over all their values. Each serialises to a
JSON-safe dict and back (`to_dict` / `from_dict`), which is how shards hand them to `merge_rollouts`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

__all__ = ["MASK_SAMPLE_KEY", "FieldStats", "LatencyHistogram", "NumericFieldStats"]

MASK_SAMPLE_KEY = "mask_sample"  # NeMo Gym's flag for a rollout whose reward is not a measurement
_NO_USAGE: dict[str, Any] = {}


def _get(d: Mapping[str, object], key: str, what: str) -> object:
    if key not in d:
        raise ValueError(f"{what}: missing key {key!r}")
    return d[key]


def _int(d: Mapping[str, object], key: str, what: str) -> int:
    v = _get(d, key, what)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what}: {key!r} must be a non-negative int, got {v!r}")
    return v


def _float(d: Mapping[str, object], key: str, what: str) -> float:
    v = _get(d, key, what)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{what}: {key!r} must be a finite number, got {v!r}")
    return float(v)


class LatencyHistogram:
    """Log-bucketed histogram of durations in seconds, with a relative-error bound, mergeable across shards.

    Algorithm: DDSketch (Masson, Rieul, Lee, "DDSketch: A Fast and Fully-Mergeable Quantile Sketch with
    Relative-Error Guarantees", VLDB 2019). With ``gamma = (1 + a) / (1 - a)`` for ``a = relative_error``,
    a value ``x > 0`` goes to bucket ``i = ceil(log(x) / log(gamma))``, which covers ``(gamma**(i-1),
    gamma**i]``; the bucket is reported as ``2 * gamma**i / (gamma + 1)``, within a relative ``a`` of every
    value in it (plus float rounding of ``log``, ~1e-15). Exact zeros have their own bucket; percentiles are
    also clamped to ``[min_s, max_s]``. Memory: one dict entry per non-empty bucket, about
    ``ln(10) / ln(gamma)`` = 115 per decade at a = 1%: 1 ms to 1 h is at most ~760 buckets.

    Percentiles use the nearest-rank definition: ``percentile(q)`` is (an approximation within ``a`` of)
    the k-th smallest recorded value, ``k = max(1, ceil(q * count / 100))``, computed exactly.

    Merging is exact for buckets, ``count``, ``min_s`` and ``max_s``; ``sum_s`` is a float sum, so it
    depends on the order of additions in the last bits.

    Attributes: ``count`` values recorded; ``sum_s``, ``min_s``, ``max_s`` in seconds (``min_s`` and
    ``max_s`` are 0.0 while empty).
    """

    __slots__ = ("_buckets", "_inv_log_gamma", "_log_gamma", "_rep_factor", "count", "max_s", "min_s",
                 "relative_error", "sum_s", "zero_count")

    def __init__(self, relative_error: float = 0.01) -> None:
        """Raises ValueError unless ``0 < relative_error < 1``."""
        if not (0.0 < relative_error < 1.0):
            raise ValueError(f"relative_error must be in (0, 1), got {relative_error!r}")
        self.relative_error = float(relative_error)
        gamma = (1.0 + relative_error) / (1.0 - relative_error)
        self._log_gamma = math.log(gamma)
        self._inv_log_gamma = 1.0 / self._log_gamma
        self._rep_factor = 2.0 / (gamma + 1.0)
        self._buckets: dict[int, int] = {}
        self.zero_count = 0
        self.count = 0
        self.sum_s = 0.0
        self.min_s = 0.0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        """Add one duration (seconds, finite, >= 0). Raises ValueError on negative, NaN or infinite values."""
        if seconds > 0.0 and seconds != math.inf:
            index = math.ceil(math.log(seconds) * self._inv_log_gamma)
            buckets = self._buckets
            buckets[index] = buckets.get(index, 0) + 1
        elif seconds == 0.0:
            self.zero_count += 1
        else:
            raise ValueError(f"duration must be finite and >= 0 s, got {seconds!r}")
        if self.count == 0:
            self.min_s = self.max_s = seconds
        elif seconds < self.min_s:
            self.min_s = seconds
        elif seconds > self.max_s:
            self.max_s = seconds
        self.count += 1
        self.sum_s += seconds

    def merge(self, other: LatencyHistogram) -> None:
        """Add every value of ``other`` into this histogram. Raises ValueError if relative errors differ."""
        if other.relative_error != self.relative_error:
            raise ValueError(f"cannot merge histograms with relative_error {self.relative_error} "
                             f"and {other.relative_error}")
        if other.count == 0:
            return
        buckets = self._buckets
        for index, n in other._buckets.items():
            buckets[index] = buckets.get(index, 0) + n
        if self.count == 0:
            self.min_s, self.max_s = other.min_s, other.max_s
        else:
            self.min_s = min(self.min_s, other.min_s)
            self.max_s = max(self.max_s, other.max_s)
        self.zero_count += other.zero_count
        self.count += other.count
        self.sum_s += other.sum_s

    def _bucket_value(self, index: int) -> float:
        try:
            value = math.exp(index * self._log_gamma) * self._rep_factor
        except OverflowError:
            value = math.inf
        return min(max(value, self.min_s), self.max_s)

    def _percentiles(self, qs: list[float]) -> list[float]:
        for q in qs:
            if not (0.0 <= q <= 100.0):
                raise ValueError(f"percentile must be in [0, 100], got {q!r}")
        if self.count == 0:
            return [0.0] * len(qs)
        order = sorted(self._buckets)
        out: list[float] = []
        for q in qs:
            if q == 100.0:
                out.append(self.max_s)
                continue
            if q == 0.0:
                out.append(self.min_s)
                continue
            rank = max(1, math.ceil(Fraction(q) * self.count / 100))
            seen = self.zero_count
            if rank <= seen:
                out.append(0.0)
                continue
            value = self.max_s
            for index in order:
                seen += self._buckets[index]
                if seen >= rank:
                    value = self._bucket_value(index)
                    break
            out.append(value)
        return out

    def percentile(self, q: float) -> float:
        """The q-th percentile in seconds, q in [0, 100]; 0.0 when empty; exact min/max for q = 0/100.

        Raises ValueError for q outside [0, 100].
        """
        return self._percentiles([q])[0]

    def summary(self) -> dict[str, float]:
        """``{"p50", "p90", "p99", "max", "mean"}`` in seconds; all 0.0 when empty."""
        p50, p90, p99 = self._percentiles([50.0, 90.0, 99.0])
        mean = self.sum_s / self.count if self.count else 0.0
        return {"p50": p50, "p90": p90, "p99": p99, "max": self.max_s, "mean": mean}

    def to_dict(self) -> dict[str, object]:
        """JSON-safe dict: ``relative_error``, ``count``, ``zero_count``, ``sum_s``, ``min_s``, ``max_s`` and
        ``buckets`` ``{str(index): count}`` in ascending index order. ``from_dict`` restores it exactly."""
        return {
            "relative_error": self.relative_error,
            "count": self.count,
            "zero_count": self.zero_count,
            "sum_s": self.sum_s,
            "min_s": self.min_s,
            "max_s": self.max_s,
            "buckets": {str(i): self._buckets[i] for i in sorted(self._buckets)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> LatencyHistogram:
        """Inverse of ``to_dict``; unknown keys are ignored. Raises ValueError on missing keys, wrong types
        or inconsistent counts."""
        what = "latency histogram"
        if not isinstance(d, Mapping):
            raise ValueError(f"{what}: expected an object, got {type(d).__name__}")
        hist = cls(_float(d, "relative_error", what))
        raw = _get(d, "buckets", what)
        if not isinstance(raw, Mapping):
            raise ValueError(f"{what}: 'buckets' must be an object")
        for key, n in raw.items():
            try:
                index = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"{what}: bucket key {key!r} is not an integer") from None
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise ValueError(f"{what}: bucket {key!r} count must be a positive int, got {n!r}")
            hist._buckets[index] = n
        hist.zero_count = _int(d, "zero_count", what)
        hist.count = _int(d, "count", what)
        hist.sum_s = _float(d, "sum_s", what)
        hist.min_s = _float(d, "min_s", what)
        hist.max_s = _float(d, "max_s", what)
        if hist.count != hist.zero_count + sum(hist._buckets.values()):
            raise ValueError(f"{what}: count {hist.count} != zero_count + bucket counts")
        if hist.min_s < 0.0 or hist.min_s > hist.max_s or hist.sum_s < 0.0:
            raise ValueError(f"{what}: inconsistent min_s/max_s/sum_s")
        return hist


class FieldStats:
    """Count, mean, min, max and sample standard deviation of one numeric field, mergeable across shards.

    Per value: Welford's update (B. P. Welford, "Note on a method for calculating corrected sums of squares
    and products", Technometrics 1962; Knuth TAOCP vol. 2, 4.2.2). Across shards: the pairwise combination
    of Chan, Golub, LeVeque ("Updating formulae and a pairwise algorithm for computing sample variances",
    1979). ``m2`` is the sum of squared deviations from the mean and is what is kept and merged; ``std`` is
    derived from it as ``sqrt(m2 / (count - 1))``, the sample standard deviation (``ddof=1``, pandas' default
    and what NeMo Gym's ``std/<field>`` metrics report), and 0.0 for fewer than two values (NeMo Gym reports
    0 for a one-row group as well). While empty, ``mean``, ``min``, ``max`` and ``m2`` are 0.0 (JSON-safe).
    """

    __slots__ = ("count", "m2", "max", "mean", "min")

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.min = 0.0
        self.max = 0.0
        self.m2 = 0.0

    def add(self, x: float) -> None:
        """Add one finite value. Raises ValueError on NaN or infinity."""
        if not math.isfinite(x):
            raise ValueError(f"value must be finite, got {x!r}")
        self.add_finite(float(x))

    def add_finite(self, x: float) -> None:
        """Add one value already known to be a finite float."""
        n = self.count + 1
        if n == 1:
            self.min = self.max = x
        elif x < self.min:
            self.min = x
        elif x > self.max:
            self.max = x
        delta = x - self.mean
        self.mean += delta / n
        self.m2 += delta * (x - self.mean)
        self.count = n

    def merge(self, other: FieldStats) -> None:
        """Combine ``other`` into this one (Chan et al. 1979)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.min, self.max, self.m2 = (
                other.count, other.mean, other.min, other.max, other.m2)
            return
        na, nb = self.count, other.count
        n = na + nb
        delta = other.mean - self.mean
        self.mean += delta * (nb / n)
        self.m2 += other.m2 + delta * delta * (na * nb / n)
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count = n

    @property
    def std(self) -> float:
        """Sample standard deviation (``ddof=1``); 0.0 for fewer than two values."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def to_dict(self) -> dict[str, float]:
        """``{"count", "mean", "min", "max", "std", "m2"}``; ``std`` is derived, ``from_dict`` ignores it."""
        return {"count": self.count, "mean": self.mean, "min": self.min, "max": self.max, "std": self.std,
                "m2": self.m2}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> FieldStats:
        """Inverse of ``to_dict``. Raises ValueError on missing keys, wrong types or negative ``m2``."""
        what = "field stats"
        if not isinstance(d, Mapping):
            raise ValueError(f"{what}: expected an object, got {type(d).__name__}")
        fs = cls()
        fs.count = _int(d, "count", what)
        fs.mean = _float(d, "mean", what)
        fs.min = _float(d, "min", what)
        fs.max = _float(d, "max", what)
        fs.m2 = _float(d, "m2", what)
        if fs.m2 < 0.0 or (fs.count and fs.min > fs.max):
            raise ValueError(f"{what}: inconsistent values {dict(d)!r}")
        return fs


class NumericFieldStats:
    """``FieldStats`` per agent name, per numeric field of the rollouts, chosen as NeMo Gym chooses the fields
    its ``mean/<field>`` metrics average (``nemo_gym/reward_profile.py:405-422`` and ``856-891``, 0.7.0).

    - Rows with a truthy ``mask_sample`` are left out altogether (their reward is not a measurement);
      ``add_rollout`` says so, and the caller counts them.
    - Fields: the top-level keys, with the counts of ``response.usage`` merged over them under their own
      names (``input_tokens``, ``output_tokens``, ``total_tokens``; a usage count wins over a top-level field
      of the same name); nested objects, such as ``input_tokens_details``, are not descended into.
    - Keys starting with ``_`` (``_ng_task_index``, ...) and the ``mask_sample`` flag itself are not fields.
    - Values: ``int`` and ``float``, and ``bool`` as 0/1; NaN, infinities and ints too large for a float are
      skipped.

    ``agents`` maps agent -> field -> ``FieldStats``. Merging shards gives the statistics of one run over
    all their rows (counts, min and max exactly; mean and ``m2`` up to float rounding).
    """

    __slots__ = ("agents",)

    def __init__(self) -> None:
        self.agents: dict[str, dict[str, FieldStats]] = {}

    def add_rollout(self, agent: str, rollout: Mapping[str, Any]) -> bool:
        """Add the numeric fields of one rollout under ``agent``; False, adding nothing, when it is masked."""
        if rollout.get(MASK_SAMPLE_KEY):
            return False
        fields = self.agents.get(agent)
        if fields is None:
            fields = self.agents[agent] = {}
        response = rollout.get("response")
        usage = response.get("usage") if type(response) is dict else None
        if type(usage) is not dict:
            usage = _NO_USAGE
        for source, shadowed in ((rollout, usage), (usage, _NO_USAGE)):
            for key, value in source.items():
                kind = type(value)  # JSON values: exact types, so no isinstance walk on the hot path
                if kind is float:
                    if not math.isfinite(value):
                        continue
                elif kind is int or kind is bool:
                    try:
                        value = float(value)
                    except OverflowError:
                        continue
                else:
                    continue
                if key[:1] == "_" or key == MASK_SAMPLE_KEY or key in shadowed:
                    continue
                stats = fields.get(key)
                if stats is None:
                    stats = fields[key] = FieldStats()
                stats.add_finite(value)
        return True

    def merge(self, other: NumericFieldStats) -> None:
        """Combine ``other`` into this one, field by field."""
        for agent, other_fields in other.agents.items():
            fields = self.agents.setdefault(agent, {})
            for key, other_stats in other_fields.items():
                stats = fields.get(key)
                if stats is None:
                    stats = fields[key] = FieldStats()
                stats.merge(other_stats)

    def to_dict(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{agent: {field: FieldStats.to_dict()}}``."""
        return {agent: {key: s.to_dict() for key, s in fields.items()}
                for agent, fields in self.agents.items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> NumericFieldStats:
        """Inverse of ``to_dict``. Raises ValueError on malformed input."""
        if not isinstance(d, Mapping):
            raise ValueError(f"field stats: expected an object, got {type(d).__name__}")
        out = cls()
        for agent, fields in d.items():
            if not isinstance(fields, Mapping):
                raise ValueError(f"field stats of agent {agent!r}: expected an object")
            out.agents[str(agent)] = {str(k): FieldStats.from_dict(v) for k, v in fields.items()}
        return out
