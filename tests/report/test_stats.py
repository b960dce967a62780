import math

import pytest

from hardmine.report.stats import (
    format_interval,
    format_mean_std,
    format_number,
    paired_difference,
    t_cdf,
    t_interval,
    t_quantile,
    verdict,
)

# Student's t 97.5 % quantiles from printed tables (e.g. NIST/SEMATECH e-Handbook, Table 1.3.6.7.2).
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042, 100: 1.984}


@pytest.mark.parametrize("df", sorted(T_975))
def test_t_quantile_matches_the_table(df: int) -> None:
    assert t_quantile(0.975, df) == pytest.approx(T_975[df], abs=6e-4)
    assert t_quantile(0.025, df) == pytest.approx(-T_975[df], abs=6e-4)


def test_t_cdf_known_values() -> None:
    assert t_cdf(0.0, 3) == 0.5
    # df = 1 is the Cauchy distribution: F(t) = 1/2 + atan(t) / pi.
    for t in (-3.0, -0.5, 0.7, 4.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    # df = 2 has a closed form too: F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-2.0, 0.3, 5.0):
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_t_interval_by_hand() -> None:
    # mean 2, sample std 1, n 3: half-width t(0.975, 2) / sqrt(3). With df = 2 the quantile has
    # a closed form (invert F(t) = 1/2 + t / (2 sqrt(2 + t^2))): sqrt(2 / (1 - (2p - 1)^2) - 2).
    t2 = math.sqrt(2 / (1 - (2 * 0.975 - 1) ** 2) - 2)
    interval = t_interval([1.0, 2.0, 3.0])
    assert interval.mean == 2.0 and interval.std == 1.0 and interval.n == 3
    assert interval.low == pytest.approx(2 - t2 / math.sqrt(3), abs=1e-9)
    assert interval.high == pytest.approx(2 + t2 / math.sqrt(3), abs=1e-9)
    assert interval.half_width == pytest.approx(t2 / math.sqrt(3), abs=1e-9)


def test_t_interval_one_value_and_bad_input() -> None:
    one = t_interval([0.25])
    assert one.mean == 0.25 and one.std == 0 and math.isnan(one.low) and math.isnan(one.high)
    with pytest.raises(ValueError, match="at least one"):
        t_interval([])
    with pytest.raises(ValueError, match="finite"):
        t_interval([1.0, float("nan")])


def test_paired_difference_uses_common_seeds_only() -> None:
    method = {0: 0.50, 1: 0.52, 2: 0.47, 3: 0.99}
    baseline = {0: 0.48, 1: 0.50, 2: 0.44}
    diff = paired_difference(method, baseline)
    assert diff is not None and diff.n == 3
    assert diff.mean == pytest.approx((0.02 + 0.02 + 0.03) / 3)
    assert paired_difference({0: 1.0}, {1: 1.0}) is None


def test_paired_beats_unpaired_when_seeds_share_their_luck() -> None:
    # Seed 1 is a lucky seed for both: the paired difference is steady, the means overlap.
    method = {0: 0.40, 1: 0.50, 2: 0.45}
    baseline = {0: 0.39, 1: 0.49, 2: 0.44}
    diff = paired_difference(method, baseline)
    assert diff is not None and verdict(diff) == "better"
    a, b = t_interval(list(method.values())), t_interval(list(baseline.values()))
    assert a.low < b.high  # unpaired intervals overlap


def test_verdicts() -> None:
    assert verdict(t_interval([0.010, 0.012, 0.009])) == "better"
    assert verdict(t_interval([-0.010, -0.012, -0.009])) == "worse"
    assert verdict(t_interval([0.010, -0.012, 0.004])) == "no detectable difference"
    assert verdict(t_interval([0.5])) == "one seed: no interval"


def test_formatting_has_no_negative_zero() -> None:
    assert format_number(-0.04) == "0.0"
    assert format_number(-0.04, signed=True) == "+0.0"
    assert format_number(-0.06, signed=True) == "-0.1"
    assert format_number(float("nan")) == "—"
    interval = t_interval([0.010, 0.012, 0.009])
    assert format_interval(interval, signed=True).startswith("+1.0 [+0.")
    assert format_mean_std(interval) == "1.0 ± 0.2"
    assert format_interval(t_interval([-0.0001])) == "0.0"
