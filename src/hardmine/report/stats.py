"""Did a method differ from its baseline? Paired differences over seeds, t-intervals, verdicts.

A comparison trains every method with the same seeds; two runs with the same seed share the
initial weights and the order of the data, so the fair question is about the per-seed differences
``d_s = x_s - b_s`` (method minus baseline). With ``n`` seeds, mean ``d̄`` and sample standard
deviation ``s_d`` (``n - 1`` in the denominator), the 95 % interval for the mean difference is
Student's t-interval

    d̄ ± t(0.975, n - 1) · s_d / √n,

which assumes the differences are roughly normal and the seeds independent. It speaks about
seed-to-seed variation of training (initial weights, data order, the samplers' draws) on this
validation set, not about the sampling of the validation images. The verdict reads the interval:
above 0 is *better*, below 0 *worse*, otherwise *no detectable difference* at this budget (the
interval's half-width says how large an effect could hide in it). The verdicts of several methods
are not corrected for multiple comparisons: with four 95 % intervals, one false verdict in about
five comparisons is expected when nothing differs.

Pure Python (``math``, ``statistics``): Student's t quantile comes from its CDF, the regularised
incomplete beta function (continued fraction, Numerical Recipes 3rd ed., Sec. 6.4), inverted by
bisection.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["better", "worse", "no detectable difference", "one seed: no interval"]
#: The confidence level of every interval in a report.
LEVEL = 0.95


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def regularized_beta(a: float, b: float, x: float) -> float:
    """``I_x(a, b)``, the regularised incomplete beta function (``a, b > 0``, ``0 <= x <= 1``)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    front = math.exp(log_front)
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry
    # I_x(a, b) = 1 - I_{1-x}(b, a) elsewhere.
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """Student's t distribution function with ``df > 0`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"df must be positive, got {df}")
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``).

    Example:
        >>> round(t_quantile(0.975, 2), 3)
        4.303
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    for _ in range(200):  # bisection to float precision
        mid = 0.5 * (low + high)
        if t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * max(1.0, high):
            break
    return 0.5 * (low + high)


@dataclass(frozen=True)
class Interval:
    """A mean over seeds with its 95 % t-interval.

    Attributes:
        mean: the mean.
        std: the sample standard deviation (0 for one value).
        n: how many values.
        low: the interval's lower end (NaN for one value).
        high: its upper end (NaN for one value).
    """

    mean: float
    std: float
    n: int
    low: float
    high: float

    @property
    def half_width(self) -> float:
        """Half the interval's width: how large an effect could hide in it."""
        return (self.high - self.low) / 2


def t_interval(values: Sequence[float], *, level: float = LEVEL) -> Interval:
    """Mean, standard deviation and the ``level`` t-interval of ``values``.

    ``mean ± t((1 + level) / 2, n - 1) · std / √n``, with ``std`` the sample standard deviation.

    Raises:
        ValueError: no values, or a non-finite one.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("t_interval needs at least one value")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"t_interval needs finite values, got {values}")
    n = len(values)
    mean = statistics.fmean(values)
    if n == 1:
        return Interval(mean, 0.0, 1, math.nan, math.nan)
    std = statistics.stdev(values)
    half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half)


def paired_difference(
    values: dict[int, float], baseline: dict[int, float], *, level: float = LEVEL
) -> Interval | None:
    """The t-interval of ``values[s] - baseline[s]`` over the seeds ``s`` both have.

    Args:
        values: seed -> the method's metric.
        baseline: seed -> the baseline's metric.
        level: the confidence level.

    Returns:
        The interval, None without a common seed.
    """
    common = sorted(set(values) & set(baseline))
    if not common:
        return None
    return t_interval([values[s] - baseline[s] for s in common], level=level)


def verdict(difference: Interval) -> Verdict:
    """``better`` if the interval lies above 0, ``worse`` below, else no detectable difference."""
    if difference.n < 2:
        return "one seed: no interval"
    if difference.low > 0:
        return "better"
    if difference.high < 0:
        return "worse"
    return "no detectable difference"


def format_number(value: float, *, signed: bool = False, digits: int = 1) -> str:
    """``value`` rounded, without a negative zero: ``-0.04`` -> ``0.0`` (``+0.0`` when signed)."""
    if math.isnan(value):
        return "—"
    rounded = round(value, digits)
    if rounded == 0:
        rounded = 0.0  # drops the sign of -0.0
    return f"{rounded:+.{digits}f}" if signed else f"{rounded:.{digits}f}"


def format_interval(interval: Interval, *, scale: float = 100.0, signed: bool = False) -> str:
    """``mean [low, high]`` scaled (AP in percent), or just the mean for one value."""
    mean = format_number(scale * interval.mean, signed=signed)
    if interval.n < 2:
        return mean
    low, high = (format_number(scale * v, signed=signed) for v in (interval.low, interval.high))
    return f"{mean} [{low}, {high}]"


def format_mean_std(interval: Interval, *, scale: float = 100.0) -> str:
    """``mean ± std`` scaled (AP in percent), or just the mean for one value."""
    mean = format_number(scale * interval.mean)
    return mean if interval.n < 2 else f"{mean} ± {format_number(scale * interval.std)}"
