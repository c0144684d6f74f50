"""Slow start of the adaptive limit: grow fast, clocked by completions, until the first sign of a queue."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class SlowStartExit:
    """Why slow start ended, with what it learned.

    `reason`: "delay" (work-normalized latency rose: a queue formed), "plateau" (work throughput stopped
    growing without a latency rise: started at or past capacity), or "max" (reached the upper bound).
    `base_u`: the lowest round's work-normalized latency (s per unit of work), None before a round closed.
    `base_s`: that round's mean latency (s). `no_queue`: for "delay", the requests in flight estimated to
    leave no queue (mean in-flight of the round * base_u / its latency); for "plateau", the limit at the
    start of the last round whose throughput grew (growth past it bought nothing); else None.
    """

    reason: str
    base_u: float | None
    base_s: float | None
    no_queue: float | None


class SlowStart:
    """TCP slow start clocked by completions, with two exits; pure (no clock, no I/O).

    Growth: +1 request per success while the peak in-flight of this round or the last >= half the limit
    (RFC 5681 §3.1: cwnd += SMSS per ACK,
    which doubles the window per round trip; the in-flight test is RFC 7661's guard against growth while
    application-limited). Being clocked by completions, it doubles per round trip whether a rollout takes
    100 ms or 10 minutes.

    A round is `max(min_round_samples, limit at its start)` successes (one round trip's worth, by
    Little's law). Each success carries a cost (work units: tokens from `response.usage`, else 1), and
    rounds are compared on work-normalized latency sum(latency) / sum(cost), so that a long task is not
    mistaken for a queue (latency per token: the decode-time metric of LLM serving, e.g. TPOT in
    Agrawal et al., "Taming Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve", OSDI 2024).

    Exits: "delay" as HyStart++ (RFC 9406 §4.2: the current round's latency, once it has `min_round_samples`,
    exceeds the lowest earlier round's by `delay_threshold`, here relative and beyond two standard errors of
    the round so far), trusted once throughput grew over two rounds or when the knee it implies lies well
    above the lowest round's in-flight (otherwise that round may have queued too); "plateau" as BBR's
    full-pipe test (Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM Queue 14(5), 2016: work
    throughput, mean in-flight / latency per unit of work, grew less than `plateau_gain` for
    `plateau_rounds` rounds).
    """

    def __init__(
        self,
        delay_threshold: float = 0.125,
        min_round_samples: int = 8,
        plateau_gain: float = 1.25,
        plateau_rounds: int = 3,
    ) -> None:
        self.delay_threshold = delay_threshold
        self.min_round_samples = min_round_samples
        self.plateau_gain = plateau_gain
        self.plateau_rounds = plateau_rounds
        self._target = 0
        self._start_s: float | None = None
        self._count = 0
        self._lat_sum_s = 0.0
        self._cost_sum = 0.0
        self._u_sum = 0.0
        self._u_sq_sum = 0.0
        self._in_flight_sum = 0
        self._min_u: float | None = None
        self._min_s: float | None = None
        self._best_rate = 0.0
        self._flat_rounds = 0
        self._grown_rounds = 0
        self._round_peak = 0
        self._last_peak = 0
        self._min_in_flight = 0.0
        self._round_est = 0.0
        self._grown_est = 0.0

    def on_success(
        self, est: float, latency_s: float, cost: float, in_flight: int, now_s: float, max_limit: float
    ) -> tuple[float, SlowStartExit | None]:
        """One success (latency s, cost > 0, in-flight at completion): the new limit and an exit or None."""
        self._round_peak = max(self._round_peak, in_flight)
        if max(self._round_peak, self._last_peak) >= 0.5 * est:
            est = min(max_limit, est + 1.0)
        if self._start_s is None:
            self._start_s, self._target = now_s, max(self.min_round_samples, math.ceil(est))
            self._round_est = self._grown_est = est
            return est, None
        u = latency_s / cost
        self._count += 1
        self._lat_sum_s += latency_s
        self._cost_sum += cost
        self._u_sum += u
        self._u_sq_sum += u * u
        self._in_flight_sum += in_flight
        n = self._count
        cur_u = self._lat_sum_s / self._cost_sum
        if self._min_u is not None and n >= self.min_round_samples:
            mean_u = self._u_sum / n
            sd_u = math.sqrt(max(0.0, self._u_sq_sum / n - mean_u * mean_u))
            stderr_u = sd_u / math.sqrt(n) * cur_u / max(mean_u, 1e-12)
            if cur_u - 2.0 * stderr_u > (1.0 + self.delay_threshold) * self._min_u:
                no_queue = self._in_flight_sum / n * self._min_u / cur_u
                # Trust the lowest round as unqueued once throughput grew past it, or when the knee this
                # implies lies well above that round's in-flight; else it may have queued too.
                if self._grown_rounds < 2 and no_queue < 1.25 * self._min_in_flight:
                    return est, SlowStartExit("plateau", self._min_u, self._min_s, self._grown_est)
                return est, SlowStartExit("delay", self._min_u, self._min_s, no_queue)
        if n >= self._target:
            # Work throughput by Little's law (mean in-flight / latency per unit of work): a count of
            # completions over the round's span would read the synchronized first wave as a burst.
            rate = self._in_flight_sum / n / max(cur_u, 1e-300)
            if rate >= self.plateau_gain * self._best_rate:
                self._best_rate, self._flat_rounds = rate, 0
                self._grown_rounds += 1
                self._grown_est = self._round_est
            else:
                self._flat_rounds += 1
            if self._min_u is None or cur_u < self._min_u:
                self._min_u, self._min_s = cur_u, self._lat_sum_s / n
                self._min_in_flight = self._in_flight_sum / n
            self._start_s, self._target = now_s, max(self.min_round_samples, math.ceil(est))
            self._round_est = est
            self._last_peak, self._round_peak = self._round_peak, 0
            self._count, self._lat_sum_s, self._cost_sum = 0, 0.0, 0.0
            self._u_sum = self._u_sq_sum = 0.0
            self._in_flight_sum = 0
            if self._flat_rounds >= self.plateau_rounds or (est >= max_limit and self._grown_rounds < 2):
                return est, SlowStartExit("plateau", self._min_u, self._min_s, self._grown_est)
            if est >= max_limit:
                return est, SlowStartExit("max", self._min_u, self._min_s, None)
        return est, None

    def learned(self) -> SlowStartExit:
        """What the rounds so far taught, for an exit forced from outside (an overload)."""
        return SlowStartExit("overload", self._min_u, self._min_s, None)
