"""The in-flight limit: `InFlightLimits` (the one owner), per-backend `AdaptiveLimit`s with `SlowStart`,
the parsing of `num_samples_in_parallel`, the per-backend `ReadAhead`, and a closed-loop simulation."""

from gym_collect.concurrency.limiter import AdaptiveLimit, AdaptiveLimitConfig
from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.concurrency.read_ahead import ReadAhead
from gym_collect.concurrency.spec import ParallelismSpec, parse_parallelism

__all__ = ["AdaptiveLimit", "AdaptiveLimitConfig", "InFlightLimits", "ParallelismSpec", "ReadAhead",
           "parse_parallelism"]
