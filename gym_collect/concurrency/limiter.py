"""The adaptive concurrency limit of one backend under `num_samples_in_parallel=auto`: pure arithmetic.

`gym_collect.concurrency.limits.InFlightLimits` keeps one per backend and feeds it outcomes with a monotonic
`now_s`; `gym_collect.concurrency.sim` drives the same object against modelled backends in simulated time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gym_collect.concurrency.slow_start import SlowStart, SlowStartExit

_RTT_FLOOR_S = 1e-6


@dataclass
class AdaptiveLimitConfig:
    """Tuning of `AdaptiveLimit` (see there for the algorithm); ValueError from `__post_init__` if invalid.

    `initial`, `min`, `max`: limits in requests in flight, `1 <= min <= initial <= max`.
    `rtt_tolerance` (>= 1): a window's mean latency up to `rtt_tolerance * rtt_noload` counts as unqueued.
    `smoothing` (0, 1]: weight of the new estimate when the latency gradient is < 1 (Gradient2's 0.2).
    `queue_min` (> 0), `queue_ratio` (None or > 0): the standing queue allowed is `max(queue_min,
    queue_ratio * limit)` requests (None: Gradient2's sqrt(limit)).
    `growth_min` (> 0), `growth_sqrt` (> 0): the growth step while unqueued is `max(growth_min, growth_sqrt *
    sqrt(limit))` requests per window.
    `fast_decrease_below` (>= 1): when rtt > rtt_tolerance * rtt_noload * this, the limit moves to its
    new estimate at once instead of by `smoothing`.
    `window_min_samples` (>= 1), `window_rtts` (>= 0): a window (and a probe's measurement) needs
    min(`window_min_samples`, 4 * limit) successes; a window also lasts `window_rtts` RTTs.
    `probe_interval_s` (> 0), `probe_interval_rtts` (>= 0): re-measure rtt_noload every max(s, rtts * RTT).
    `probe_ratio` (0, 1): a probe's limit, as a fraction of the concurrency estimated to leave no queue.
    `probe_rtts` (> 0): a probe measures throughput for that many RTTs (after draining and one RTT).
    `backoff_ratio` (0, 1): multiplicative decrease on an overload (429 / 5xx / timeout).
    `decrease_cooldown_s` (>= 0): least time between two overload decreases (the other floor is one RTT).
    `ceiling_step` (> 0): growth per window across the last request below the last overload's limit.
    `history_max_points` (>= 2): bound on `AdaptiveLimit.history`.
    `slow_start`: start with `SlowStart` (doubling per round trip) before the steady-state law.
    """

    initial: int = 16
    min: int = 1
    max: int = 1024
    rtt_tolerance: float = 1.05
    smoothing: float = 0.2
    queue_min: float = 1.0
    growth_min: float = 1.0
    window_min_samples: int = 32
    window_rtts: float = 1.0
    probe_interval_s: float = 10.0
    probe_interval_rtts: float = 30.0
    probe_ratio: float = 0.9
    probe_rtts: float = 2.0
    backoff_ratio: float = 0.9
    decrease_cooldown_s: float = 0.1
    ceiling_step: float = 0.1
    history_max_points: int = 1000
    slow_start: bool = True
    queue_ratio: float | None = 0.05
    fast_decrease_below: float = 1.0 / 0.75
    growth_sqrt: float = 0.5

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.initial <= self.max:
            raise ValueError(f"need 1 <= min <= initial <= max, got {self.min}, {self.initial}, {self.max}")
        checks = {
            "rtt_tolerance >= 1": self.rtt_tolerance >= 1.0,
            "0 < smoothing <= 1": 0.0 < self.smoothing <= 1.0,
            "queue_min > 0": self.queue_min > 0.0,
            "growth_min > 0": self.growth_min > 0.0,
            "window_min_samples >= 1": self.window_min_samples >= 1,
            "window_rtts >= 0": self.window_rtts >= 0.0,
            "probe_interval_s > 0": self.probe_interval_s > 0.0,
            "probe_interval_rtts >= 0": self.probe_interval_rtts >= 0.0,
            "0 < probe_ratio < 1": 0.0 < self.probe_ratio < 1.0,
            "probe_rtts > 0": self.probe_rtts > 0.0,
            "0 < backoff_ratio < 1": 0.0 < self.backoff_ratio < 1.0,
            "decrease_cooldown_s >= 0": self.decrease_cooldown_s >= 0.0,
            "ceiling_step > 0": self.ceiling_step > 0.0,
            "history_max_points >= 2": self.history_max_points >= 2,
            "queue_ratio None or > 0": self.queue_ratio is None or self.queue_ratio > 0.0,
            "growth_sqrt > 0": self.growth_sqrt > 0.0,
            "fast_decrease_below >= 1": self.fast_decrease_below >= 1.0,
        }
        failed = [name for name, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"invalid AdaptiveLimitConfig: need {', '.join(failed)}")


@dataclass
class _Probe:
    """One no-load latency measurement in progress (see `AdaptiveLimit`)."""

    limit: int
    saved_est: float
    start_s: float
    rate_before_per_s: float | None  # None: calibration at the current limit, no comparison
    expected_ratio: float = 1.0  # throughput ratio to rate_before if the backend does not queue at `limit`
    drained_s: float | None = None
    measure_from_s: float | None = None
    completions: int = 0
    in_flight_sum: int = 0
    cost_sum: float = 0.0


class AdaptiveLimit:
    """Adaptive concurrency limit from latency and overload signals; pure (no asyncio, no clock, no I/O).

    Every call passes `now_s` (monotonic seconds) and returns the new integer limit (requests in flight),
    always within [`config.min`, `config.max`]. Not thread-safe.

    Start: `SlowStart` (RFC 5681 slow start clocked by completions, HyStart++ and BBR full-pipe exits), so
    the limit doubles per round trip from `initial` whether a rollout takes 100 ms or 10 minutes; a "delay"
    exit hands over its no-load latency and the no-queue limit, other exits the cold-start calibration below.

    Signal: work-normalized latency. Each success may carry a cost (tokens from `response.usage`), and a
    window's `rtt` is sum(latency) / sum(cost), seconds per token, so that a long task is not read as a
    queue (latency per output token, TPOT, is the LLM-serving literature's load signal: Agrawal et al.,
    "Taming Throughput-Latency Tradeoff in LLM Inference with Sarathi-Serve", OSDI 2024; Vegas' expected
    vs actual rate compares the same quantity per byte). Without a cost every success weighs 1 and `rtt` is
    the mean latency. Probes measure rtt_noload per unit of work by Little's law: mean in-flight / work
    throughput. Windows, cooldowns and probe timing stay in seconds of latency.

    Update law: Netflix concurrency-limits `Gradient2Limit` (https://github.com/Netflix/concurrency-limits,
    `concurrency-limits-core/src/main/java/com/netflix/concurrency/limits/limit/Gradient2Limit.java`),
    applied once per sample window as its `WindowedLimit` does, with the queue allowance of `GradientLimit`::

        gradient = max(0.5, min(1.0, rtt_tolerance * rtt_noload / rtt))
        queue    = max(queue_min, queue_ratio * limit)
        limit    = limit + step                                                       if gradient == 1
                   limit * (1 - w) + (limit * gradient + queue) * w                   otherwise
        w        = 1 if gradient < 1 / fast_decrease_below else smoothing

    `rtt` is the mean latency (s) of a window of at least min(`window_min_samples`, 4 * limit) successes
    spanning `window_rtts` RTTs; the mean, as in `WindowedLimit`, because by Little's law it is in-flight /
    throughput. Past a capacity C the backend queues, rtt = rtt_noload * limit / C, and the fixed point is
    limit = rtt_tolerance * C / (1 - queue_ratio): about 10% over C with the defaults (Gradient2's own
    tolerance 1.1 and sqrt(limit) queue stand 20-30% over C, which costs throughput on a backend whose
    throughput falls past capacity). `step` = max(`growth_min`, `growth_sqrt` * sqrt(limit)) except near
    the last overload (below). No growth while the window's peak in-flight + queue < limit (application-limited, as in
    `GradientLimit`).

    Departure from Gradient2: its `rtt_noload` is a long-term EMA of the RTT, which absorbs a standing queue,
    so the limit creeps up for as long as it grows slower than the EMA (in `simulate_closed_loop` against
    C=32, Gradient2 with its defaults and 1 s windows stands at 54 after 60 s and 142 after 600 s, p99 3x
    unloaded). Here `rtt_noload` is the no-load RTT of TCP Vegas (Brakmo, O'Malley & Peterson, "TCP Vegas:
    New Techniques for Congestion Detection and Avoidance", SIGCOMM 1994), measured as BBR measures RTprop
    (Cardwell et al., "BBR: Congestion-Based Congestion Control", ACM Queue 14(5), 2016: ProbeRTT), by a
    probe: the limit drops to `probe_ratio` * limit * rtt_noload / rtt (the concurrency estimated to leave
    no queue); once in-flight has drained to it and one RTT has passed, `probe_rtts` RTTs of completions
    give rtt_noload = mean in-flight / throughput (Little's law, which heavy-tailed latencies do not bias as
    they bias the first completions). Probes run every max(`probe_interval_s`, `probe_interval_rtts` * RTT),
    and early when a window is faster than rtt_noload / rtt_tolerance by two standard errors. If a probe's
    throughput hardly fell with its limit, the backend still queued and rtt_noload is only an upper bound:
    after a deep probe (to half) the limit drops to the probe's and a probe at half of that follows (a binary
    search down, up to 10 times); after a shallow one, which noise can mislead, another follows one window
    later. At start the first window is biased towards fast requests, so it only starts a calibration (the
    same measurement at the current limit) and then a probe at half the limit, which recognises a start far
    above capacity. A shifted baseline, up or down, is re-learned within one probe interval: it never pins
    the limit.

    Overload (`on_overload`: 429, 5xx, timeout): multiplicative decrease, limit *= `backoff_ratio`
    (Jacobson, "Congestion Avoidance and Control", SIGCOMM 1988; RFC 5681 §3.1; concurrency-limits
    `AIMDLimit`), at most once per max(`decrease_cooldown_s`, RTT): a burst of errors from the requests of
    one RTT costs one decrease. Growth then slows near the limit that overloaded, in the manner of CUBIC
    (RFC 9438): full steps up to one request below it, `ceiling_step` per window across that last request,
    then doubling per window past it until a full step, when it is forgotten. `on_error` changes nothing.

    `history`: (now_s, limit) each time the integer limit changed (the initial limit is not listed). It
    keeps at most `history_max_points`: when full, every second point is dropped and from then on only
    every 2nd (then 4th, ...) change is recorded, so it spans the whole run at uniform resolution.
    """

    def __init__(self, config: AdaptiveLimitConfig) -> None:
        self._cfg = config
        self._est = float(config.initial)
        self._published = config.initial
        self._base_s: float | None = None
        self._base_u: float | None = None
        self._rtt_s: float | None = None
        self._rtt_u: float | None = None
        self._rate_per_s: float | None = None
        self._last_latency_s: float | None = None
        self._win_sum_s = 0.0
        self._win_cost = 0.0
        self._win_u_sum = 0.0
        self._win_u_sq_sum = 0.0
        self._win_count = 0
        self._win_start_s: float | None = None
        self._win_peak = 0
        self._slow_start: SlowStart | None = SlowStart() if config.slow_start else None
        self._rate_from_s: float | None = None
        self._rate_count = 0
        self._ignore_until_s = -math.inf
        self._probe: _Probe | None = None
        self._next_probe_s = math.inf
        self._last_probe_end_s = -math.inf
        self._reprobes = 0
        self._last_decrease_s: float | None = None
        self._ceiling: float | None = None
        self._windows_past_ceiling = 0
        self._history: list[tuple[float, int]] = []
        self._hist_stride = 1
        self._hist_changes = 0

    @property
    def config(self) -> AdaptiveLimitConfig:
        return self._cfg

    @property
    def limit(self) -> int:
        """Current limit, `config.min <= limit <= config.max`."""
        if self._probe is not None:
            return self._probe.limit
        return self._clamp_int(self._est)

    @property
    def rtt_noload_s(self) -> float | None:
        """Current no-load mean latency estimate (s); None until the start-up calibration ends."""
        return self._base_s

    @property
    def history(self) -> list[tuple[float, int]]:
        """(now_s, limit) at changes of the integer limit, decimated to `history_max_points` (a copy)."""
        return list(self._history)

    @property
    def in_slow_start(self) -> bool:
        """True until slow start has ended (see `SlowStart`)."""
        return self._slow_start is not None

    def on_success(self, latency_s: float, in_flight: int, now_s: float, cost: float | None = None) -> int:
        """Feed one success: latency (s, floored at 1 us), requests in flight as it completed (itself
        included), and its cost in work units (the tokens its `response.usage` reports; None: 1, so the
        signal is plain latency). ValueError if `latency_s` is negative or not finite, or `cost` <= 0."""
        if not (math.isfinite(latency_s) and latency_s >= 0.0):
            raise ValueError(f"latency_s must be finite and >= 0, got {latency_s}")
        if cost is not None and not (math.isfinite(cost) and cost > 0.0):
            raise ValueError(f"cost must be finite and > 0, got {cost}")
        lat = max(latency_s, _RTT_FLOOR_S)
        work = 1.0 if cost is None else cost
        self._last_latency_s = lat
        if self._slow_start is not None and self._probe is None:
            self._est, done = self._slow_start.on_success(
                self._est, lat, work, in_flight, now_s, float(self._cfg.max)
            )
            if done is not None:
                self._end_slow_start(done, now_s)
            return self._publish(now_s)
        if self._probe is not None:
            self._probe_sample(self._probe, in_flight, now_s, work)
        elif now_s >= self._ignore_until_s:
            if self._rate_from_s is None:
                self._rate_from_s = now_s
            else:
                self._rate_count += 1
            if self._win_start_s is None:
                self._win_start_s = now_s
            self._win_sum_s += lat
            self._win_cost += work
            self._win_u_sum += lat / work
            self._win_u_sq_sum += (lat / work) ** 2
            self._win_count += 1
            self._win_peak = max(self._win_peak, in_flight)
            ref_s = self._rtt_s if self._rtt_s is not None else self._win_sum_s / self._win_count
            if self._win_count >= self._min_samples(self.limit) and (
                now_s - self._win_start_s >= self._cfg.window_rtts * ref_s
            ):
                self._close_window(now_s)
        return self._publish(now_s)

    def on_overload(self, now_s: float) -> int:
        """429 / 5xx / timeout: limit *= backoff_ratio, at most once per max(decrease_cooldown_s, RTT).
        Ends slow start."""
        if self._slow_start is not None:
            self._end_slow_start(self._slow_start.learned(), now_s)
        if self._probe is not None:
            self._end_probe(now_s, None)
        cooldown_s = max(self._cfg.decrease_cooldown_s, self._rtt_s or self._last_latency_s or 0.0)
        if self._last_decrease_s is None or now_s - self._last_decrease_s >= cooldown_s:
            self._ceiling = self._est if self._ceiling is None else min(self._ceiling, self._est)
            self._windows_past_ceiling = 0
            self._est = self._clamp(self._est * self._cfg.backoff_ratio)
            self._last_decrease_s = now_s
        return self._publish(now_s)

    def on_error(self, now_s: float) -> int:
        """Failure that says nothing about backend load (4xx, connection reset): the limit is unchanged."""
        return self._publish(now_s)

    def _close_window(self, now_s: float) -> None:
        cfg = self._cfg
        count = self._win_count
        rtt_s = self._win_sum_s / count
        rtt_u = self._win_sum_s / self._win_cost
        mean_u = self._win_u_sum / count
        sd_u = math.sqrt(max(0.0, self._win_u_sq_sum / count - mean_u * mean_u))
        stderr_u = sd_u / math.sqrt(count) * rtt_u / max(mean_u, 1e-300)
        peak = self._win_peak
        self._reset_window()
        self._rtt_s, self._rtt_u = rtt_s, rtt_u
        assert self._rate_from_s is not None
        if now_s > self._rate_from_s and self._rate_count > 0:
            rate_per_s = self._rate_count / (now_s - self._rate_from_s)
            previous = self._rate_per_s
            self._rate_per_s = rate_per_s if previous is None else 0.5 * (previous + rate_per_s)
            self._rate_from_s, self._rate_count = now_s, 0
        if self._base_u is None:  # start-up: this window is biased to fast requests, calibrate instead
            self._probe = _Probe(limit=self.limit, saved_est=self._est, start_s=now_s, rate_before_per_s=None)
            return
        base_u = self._base_u
        faster = (rtt_u + 2.0 * stderr_u) * cfg.rtt_tolerance < base_u
        if self._rate_per_s is not None and (
            now_s >= self._next_probe_s or (faster and now_s - self._last_probe_end_s >= 5.0 * rtt_s)
        ):
            no_queue = self._est * min(1.0, base_u / rtt_u)
            limit = self._clamp_int(math.floor(cfg.probe_ratio * no_queue))
            self._probe = _Probe(limit, self._est, now_s, self._rate_per_s, limit / max(no_queue, 1.0))
            return
        est = self._est
        queue = max(cfg.queue_min, math.sqrt(est) if cfg.queue_ratio is None else cfg.queue_ratio * est)
        gradient = max(0.5, min(1.0, cfg.rtt_tolerance * base_u / rtt_u))
        if gradient < 1.0:
            # Far past the knee (latency up by more than a third) move at once, as Vegas would; else smooth.
            weight = 1.0 if gradient * cfg.fast_decrease_below < 1.0 else cfg.smoothing
            self._est = self._clamp(est * (1.0 - weight) + (est * gradient + queue) * weight)
        elif peak + queue >= est:
            self._est = self._clamp(est + self._growth_step(est, max(cfg.growth_min, cfg.growth_sqrt * math.sqrt(est))))

    def _growth_step(self, est: float, full_step: float) -> float:
        ceiling = self._ceiling
        if ceiling is None:
            return full_step
        if est < ceiling - 1.0:
            return max(self._cfg.ceiling_step, min(full_step, ceiling - 1.0 - est))
        if est < ceiling:
            return self._cfg.ceiling_step
        step = self._cfg.ceiling_step * 2.0**self._windows_past_ceiling
        self._windows_past_ceiling += 1
        if step >= full_step:
            self._ceiling = None
        return min(step, full_step)

    def _probe_sample(self, probe: _Probe, in_flight: int, now_s: float, cost: float) -> None:
        # Phases: drain to probe.limit in flight; settle one RTT (requests admitted before the drain leave);
        # measure throughput over probe_rtts RTTs, counting completions in [first, last).
        cfg = self._cfg
        assert self._rtt_s is not None
        ref_s = self._base_s or self._rtt_s
        slowest_s = max(ref_s, self._rtt_s, self._last_latency_s or 0.0)
        if now_s - probe.start_s > 4.0 * (cfg.probe_rtts + 2.0) * slowest_s:
            self._end_probe(now_s, None)  # never drained or too few completions: keep the old baseline
            return
        if probe.drained_s is None:
            if in_flight <= probe.limit:
                probe.drained_s = now_s
            return
        if probe.measure_from_s is None:
            if now_s - probe.drained_s < ref_s:
                return
            probe.measure_from_s = now_s
        elapsed_s = now_s - probe.measure_from_s
        if probe.completions >= self._min_samples(probe.limit) and elapsed_s > 0.0:
            mean_in_flight = probe.in_flight_sum / probe.completions
            rtt_noload_s = mean_in_flight * elapsed_s / probe.completions
            if elapsed_s >= cfg.probe_rtts * max(ref_s, rtt_noload_s):
                self._end_probe(now_s, rtt_noload_s, mean_in_flight * elapsed_s / probe.cost_sum)
                return
        probe.completions += 1
        probe.in_flight_sum += max(1, in_flight)
        probe.cost_sum += cost

    def _end_probe(self, now_s: float, rtt_noload_s: float | None, rtt_noload_u: float | None = None) -> None:
        probe = self._probe
        assert probe is not None
        self._probe = None
        self._est = probe.saved_est
        self._last_probe_end_s = now_s
        self._ignore_until_s = now_s + 2.0 * (self._rtt_s or 0.0)
        self._reset_window()
        self._rate_from_s, self._rate_count = None, 0
        if rtt_noload_s is not None and rtt_noload_u is not None and probe.measure_from_s is not None:
            self._base_s, self._base_u = rtt_noload_s, rtt_noload_u
            rate_per_s = probe.completions / (now_s - probe.measure_from_s)
            if probe.rate_before_per_s is None:  # calibration done: now the start-up probe at half
                half = self._clamp_int(0.5 * self._est)
                if half < self.limit:
                    self._probe = _Probe(half, self._est, now_s, rate_per_s, half / self.limit)
                    return
            else:
                # Unqueued, throughput falls by `drop`. If it fell by less than a quarter of that, the
                # backend still queued at probe.limit and rtt_noload is only an upper bound. After a deep
                # probe that is clear: probe.limit serves as well as the old limit, keep it and probe again
                # at half of it. After a shallow one it may be noise: probe again after one window.
                drop = 1.0 - probe.expected_ratio
                saturated = rate_per_s >= (1.0 - 0.25 * drop) * probe.rate_before_per_s
                if saturated and probe.limit > self._cfg.min and self._reprobes < 10:
                    self._reprobes += 1
                    if drop < 0.25:
                        self._next_probe_s = now_s
                        return
                    self._est = min(self._est, float(probe.limit))
                    half = self._clamp_int(probe.limit // 2)
                    self._probe = _Probe(half, self._est, now_s, rate_per_s, half / probe.limit)
                    return
        self._reprobes = 0
        self._next_probe_s = now_s + self._probe_interval_s()

    def _end_slow_start(self, done: SlowStartExit, now_s: float) -> None:
        # "delay": the rounds measured the no-load work-normalized latency; start from the no-queue level.
        # Otherwise (plateau, max, overload) they may all have queued: calibrate as at a cold start, unless
        # an overload ended it, whose backend answers at once rather than queueing.
        self._slow_start = None
        if done.reason == "delay":
            self._ignore_until_s = now_s + 2.0 * (self._last_latency_s or 0.0)  # let the overshoot drain
        self._reset_window()
        self._rate_from_s, self._rate_count = None, 0
        if done.base_u is not None and done.base_s is not None and done.reason in ("delay", "overload"):
            self._base_u, self._base_s = done.base_u, done.base_s
            self._rtt_s = done.base_s
            self._next_probe_s = now_s + self._probe_interval_s()
            if done.no_queue is not None:
                self._est = self._clamp(max(done.no_queue, 0.5 * self._est))
        elif done.reason == "plateau" and done.no_queue is not None:
            self._est = self._clamp(min(self._est, done.no_queue))

    def _reset_window(self) -> None:
        self._win_sum_s = 0.0
        self._win_cost = 0.0
        self._win_u_sum = 0.0
        self._win_u_sq_sum = 0.0
        self._win_count = 0
        self._win_start_s = None
        self._win_peak = 0

    def _min_samples(self, limit: int) -> int:
        # At a small limit, window_min_samples successes would take many RTTs: four RTTs' worth suffice.
        return min(self._cfg.window_min_samples, 4 * limit)

    def _probe_interval_s(self) -> float:
        return max(self._cfg.probe_interval_s, self._cfg.probe_interval_rtts * (self._base_s or 0.0))

    def _clamp(self, value: float) -> float:
        return max(float(self._cfg.min), min(float(self._cfg.max), value))

    def _clamp_int(self, value: float) -> int:
        return max(self._cfg.min, min(self._cfg.max, int(value)))

    def _publish(self, now_s: float) -> int:
        limit = self.limit
        if limit != self._published:
            self._published = limit
            self._hist_changes += 1
            if self._hist_changes % self._hist_stride == 0:
                if len(self._history) >= self._cfg.history_max_points:
                    self._history = self._history[1::2]
                    self._hist_stride *= 2
                self._history.append((now_s, limit))
        return limit
