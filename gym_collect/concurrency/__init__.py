"""The in-flight limit: `InFlightLimits` (the one owner), per-backend `AdaptiveLimit`s with `SlowStart`,
the parsing of `num_samples_in_parallel`, the per-backend `Backlog` of requests read and not started (with
its `SpillQueue`), and a closed-loop simulation."""

from gym_collect.concurrency.backlog import Backlog
from gym_collect.concurrency.limiter import AdaptiveLimit, AdaptiveLimitConfig
from gym_collect.concurrency.limits import InFlightLimits
from gym_collect.concurrency.spec import ParallelismSpec, parse_parallelism
from gym_collect.concurrency.spill import SpillQueue

__all__ = ["AdaptiveLimit", "AdaptiveLimitConfig", "Backlog", "InFlightLimits", "ParallelismSpec", "SpillQueue",
           "parse_parallelism"]
