"""Descriptive statistics of a whole sample, as numpy, pandas and scipy compute them, in pure Python.

For reproducing figures of tools built on those libraries (NeMo Gym's aggregate metrics) without depending on
them. Sums are exact-rounded (``math.fsum``), so results agree with numpy's pairwise sums to ~1e-15 relative
and do not depend on the order of the values.

- ``mean``, ``sample_std`` (``ddof=1``), ``median`` and ``quantile`` (numpy's default ``linear`` method, the one
  ``pandas.Series.quantile`` uses) of a sorted sequence;
- ``t_quantile``: Student's t quantile, ``scipy.stats.t.ppf`` to a few units in the last place. Method:
  Newton's iteration on the upper tail ``Q(t) = I_x(nu/2, 1/2) / 2``, ``x = nu / (nu + t**2)``, with the
  regularized incomplete beta ``I`` from its continued fraction (modified Lentz; Press et al., *Numerical
  Recipes*, 3rd ed., 6.4; Abramowitz and Stegun 26.5.8, 26.7.1); ``Gamma(a + 1/2) / Gamma(a)`` from
  Stirling's series for large ``a``; for large ``nu``, where the continued fraction loses digits near
  ``x = 1``, the expansion about the normal quantile (Abramowitz and Stegun 26.7.5); ``nu = 1`` and
  ``nu = 2`` in closed form.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist

__all__ = ["mean", "median", "quantile", "sample_std", "t_quantile"]


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean of a non-empty sequence. Raises ZeroDivisionError when empty."""
    return math.fsum(xs) / len(xs)


def sample_std(xs: Sequence[float], xs_mean: float) -> float:
    """Standard deviation with ``ddof=1`` (pandas' default), two-pass about ``xs_mean``; needs ``len(xs) >= 2``.

    Raises ZeroDivisionError for one value (pandas gives NaN there; callers decide what NeMo Gym reports).
    """
    return math.sqrt(math.fsum((x - xs_mean) ** 2 for x in xs) / (len(xs) - 1))


def median(ordered: Sequence[float]) -> float:
    """Median of a non-empty sorted sequence: the middle value, or the mean of the two middle values."""
    n = len(ordered)
    mid = n // 2
    return float(ordered[mid]) if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def quantile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-quantile (``0 <= q <= 1``) of a non-empty sorted sequence by linear interpolation between
    closest ranks, numpy's ``method="linear"`` including its two-sided interpolation (``numpy/lib/
    _function_base_impl.py``, ``_lerp``), so values match ``pandas.Series.quantile`` bit for bit or nearly."""
    h = (len(ordered) - 1) * q
    lo = math.floor(h)
    a = float(ordered[lo])
    b = float(ordered[min(lo + 1, len(ordered) - 1)])
    frac = h - lo
    diff = b - a
    return b - diff * (1.0 - frac) if frac >= 0.5 else a + diff * frac


_EPS = 1e-16
_TINY = 1e-300
_MAX_TERMS = 100_000


def _log_stirling_rest(x: float) -> float:
    """``lgamma(x) - ((x - 1/2) ln x - x + ln(2 pi) / 2)`` for ``x >= 10``, to ~1e-17 (Stirling's series)."""
    x2 = x * x
    return (1 / 12 - (1 / 360 - (1 / 1260 - (1 / 1680 - 1 / (1188 * x2)) / x2) / x2) / x2) / x


def _log_gamma_ratio_half(a: float) -> float:
    """``ln(Gamma(a + 1/2) / Gamma(a))`` for ``a > 0``."""
    if a < 10.0:
        return math.lgamma(a + 0.5) - math.lgamma(a)
    return a * math.log1p(0.5 / a) + 0.5 * math.log(a) - 0.5 + _log_stirling_rest(a + 0.5) - _log_stirling_rest(a)


def _beta_cf(x: float, a: float, b: float) -> float:
    """Continued fraction of ``I_x(a, b)`` (converges fast for ``x < (a + 1) / (a + b + 2)``)."""
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, _MAX_TERMS):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
                    -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > _TINY else _TINY)
            c = 1.0 + num / c
            c = c if abs(c) > _TINY else _TINY
            h *= d * c
        if abs(d * c - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (x={x}, a={a}, b={b})")


def _upper_tail(t: float, nu: float) -> float:
    """``P(T > t)`` for ``t >= 0``: ``I_x(nu/2, 1/2) / 2`` with ``x = nu / (nu + t**2)``."""
    a, b = 0.5 * nu, 0.5
    r = t * t / nu
    log_x = -math.log1p(r)  # ln(nu / (nu + t^2)), without rounding x first
    x = math.exp(log_x)
    one_minus_x = r / (1.0 + r)
    # x^a (1-x)^b / (a B(a, b)), with B(a, 1/2) = Gamma(a) sqrt(pi) / Gamma(a + 1/2)
    front = math.exp(a * log_x + b * math.log(one_minus_x) + _log_gamma_ratio_half(a) - 0.5 * math.log(math.pi))
    if x < (a + 1.0) / (a + b + 2.0):
        return 0.5 * front / a * _beta_cf(x, a, b)
    return 0.5 * (1.0 - front / b * _beta_cf(one_minus_x, b, a))


def _density(t: float, nu: float) -> float:
    return math.exp(_log_gamma_ratio_half(0.5 * nu) - 0.5 * math.log(nu * math.pi)
                    - 0.5 * (nu + 1.0) * math.log1p(t * t / nu))


def t_quantile(p: float, df: float) -> float:
    """The ``p``-quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf(p, df)``).

    ``0 < p < 1``, ``df > 0`` (need not be an integer); symmetric: ``t_quantile(1 - p, df) == -t_quantile(p, df)``.
    Relative error about 1e-15 (checked against scipy for df from 1 to 10**7 in the test suite).

    Raises:
        ValueError: ``p`` outside (0, 1) or ``df <= 0``.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p!r}")
    if not df > 0.0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    q = 1.0 - p  # exact for p >= 1/2 (Sterbenz), unlike p - 1/2 near 1
    if df == 1.0:
        return 1.0 / math.tan(math.pi * q)
    if df == 2.0:
        return (2.0 * p - 1.0) / math.sqrt(2.0 * p * q)
    z = -NormalDist().inv_cdf(q)
    terms = _cornish_fisher_terms(z, df)
    if abs(terms[-1]) < 1e-13 * z:
        # the expansion has converged to double precision, where the continued fraction would lose digits
        return z + math.fsum(terms)
    t = z + terms[0] + terms[1] if z + terms[0] + terms[1] > 0.0 else z
    for _ in range(100):
        step = (_upper_tail(t, df) - q) / _density(t, df)
        nxt = t + step
        if nxt <= 0.0:
            nxt = 0.5 * t  # stay on the positive side, where the tail function is defined
        if abs(nxt - t) <= 4e-16 * abs(nxt):
            return nxt
        t = nxt
    return t



def _cornish_fisher_terms(z: float, df: float) -> tuple[float, float, float, float]:
    """The terms in ``1/df .. 1/df**4`` of the expansion of the t quantile about the normal one ``z``
    (Abramowitz and Stegun 26.7.5)."""
    z2 = z * z
    g1 = (z2 + 1.0) * z / 4.0
    g2 = ((5.0 * z2 + 16.0) * z2 + 3.0) * z / 96.0
    g3 = (((3.0 * z2 + 19.0) * z2 + 17.0) * z2 - 15.0) * z / 384.0
    g4 = ((((79.0 * z2 + 776.0) * z2 + 1482.0) * z2 - 1920.0) * z2 - 945.0) * z / 92160.0
    return g1 / df, g2 / df**2, g3 / df**3, g4 / df**4
