r"""Robust trends of short, noisy series: the Theil–Sen slope and Sen's confidence interval.

A probe measures sharpness a handful of times per run, each value with estimator noise (Lanczos on a probe
batch) and with the occasional spike. A least-squares slope over a short window follows one outlier; the
**Theil–Sen** estimator (Theil 1950, "A rank-invariant method of linear and polynomial regression analysis";
Sen 1968, "Estimates of the regression coefficient based on Kendall's tau") takes the median of all pairwise
slopes

.. math::
    \hat\beta = \operatorname{median}\Big\{ \frac{y_j - y_i}{x_j - x_i} : x_i < x_j \Big\},

which tolerates up to :math:`1 - 1/\sqrt 2 \approx 29\%` of arbitrarily bad points (breakdown point). Sen's
distribution-free confidence interval takes the order statistics of the sorted pairwise slopes at ranks
:math:`(N \mp z_{\alpha/2}\,\sigma_S)/2` (with :math:`N` pairwise slopes and :math:`\sigma_S^2` the variance of
Kendall's :math:`S` under no trend, corrected for ties), exactly as ``scipy.stats.theilslopes`` does.

Pure Python on floats: the windows are a few dozen points at most. No Lightning, no torch state, no RNG.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TheilSenResult", "relative_slope", "theil_sen"]


@dataclass(frozen=True)
class TheilSenResult:
    """A Theil–Sen fit :math:`y \\approx \\text{intercept} + \\text{slope}\\cdot x`.

    Attributes:
        slope: Median of the pairwise slopes.
        intercept: :math:`\\operatorname{median}(y) - \\text{slope}\\cdot\\operatorname{median}(x)`.
        low_slope: Lower end of Sen's confidence interval of the slope (``nan`` if undefined).
        high_slope: Upper end of Sen's confidence interval of the slope (``nan`` if undefined).
        level: Median of ``y``, the level a relative slope is measured against.
        n: Number of points.
    """

    slope: float
    intercept: float
    low_slope: float
    high_slope: float
    level: float
    n: int

    @property
    def relative_slope(self) -> float:
        """``slope / |level|``: the fractional rise per unit of ``x`` (``nan`` when the level is 0 or nan)."""
        return relative_slope(self.slope, self.level)


def relative_slope(slope: float, level: float) -> float:
    r"""The slope as a fraction of the level, :math:`\hat\beta / |\tilde y|`; ``nan`` when the level is 0 or nan."""
    if not math.isfinite(level) or level == 0.0 or math.isnan(slope):
        return math.nan
    return slope / abs(level)


def _tie_term(values: Sequence[float]) -> float:
    return float(sum(k * (k - 1) * (2 * k + 5) for k in Counter(values).values() if k > 1))


def theil_sen(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> TheilSenResult:
    r"""Theil–Sen slope of ``y`` against ``x`` with Sen's (1968) confidence interval.

    .. math::
        \hat\beta = \operatorname{median}_{i<j,\ x_i \ne x_j} \frac{y_j - y_i}{x_j - x_i}, \qquad
        \sigma_S^2 = \tfrac{1}{18}\Big(n(n-1)(2n+5) - \sum_{t} t(t-1)(2t+5) - \sum_{u} u(u-1)(2u+5)\Big),

    where :math:`t` and :math:`u` run over the sizes of groups of tied ``x`` and tied ``y``. The interval is
    the pair of sorted pairwise slopes at 0-based ranks :math:`\operatorname{round}((N - z\sigma_S)/2) - 1` and
    :math:`\operatorname{round}((N + z\sigma_S)/2)` with :math:`z = \Phi^{-1}(1 - \alpha/2)`, clipped to the
    available slopes (``scipy.stats.theilslopes``, Sen 1968 eq. 2.6).

    Args:
        x: Abscissae (e.g. epochs); need not be evenly spaced; ties are allowed.
        y: Values, the same length as ``x``; all finite.
        confidence: Confidence level of the interval, in (0, 1).

    Returns:
        A :class:`TheilSenResult`.

    Raises:
        ValueError: If the lengths differ, fewer than 2 points are given, a value is not finite, all ``x``
            are equal, or ``confidence`` is outside (0, 1).

    Example:
        >>> r = theil_sen([0, 1, 2, 3, 4], [1.0, 2.0, 3.0, 40.0, 5.0])  # one spike does not move the slope
        >>> r.slope, r.intercept
        (1.0, 1.0)
    """
    xs = [float(v) for v in x]
    ys = [float(v) for v in y]
    if len(xs) != len(ys):
        raise ValueError(f"x and y must have the same length, got {len(xs)} and {len(ys)}")
    if len(xs) < 2:
        raise ValueError(f"theil_sen needs at least 2 points, got {len(xs)}")
    if not all(math.isfinite(v) for v in xs + ys):
        raise ValueError(f"x and y must be finite, got x={xs!r}, y={ys!r}")
    if not (isinstance(confidence, (int, float)) and 0.0 < confidence < 1.0):
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    n = len(xs)
    slopes = sorted(
        (ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(n) for j in range(n) if xs[j] > xs[i]
    )
    if not slopes:
        raise ValueError(f"all x are equal ({xs[0]!r}): the slope is undefined")
    slope = statistics.median(slopes)
    intercept = statistics.median(ys) - slope * statistics.median(xs)
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
    sigma_sq = (n * (n - 1) * (2 * n + 5) - _tie_term(xs) - _tie_term(ys)) / 18.0
    count = len(slopes)
    if sigma_sq > 0:
        sigma = math.sqrt(sigma_sq)
        upper = min(int(round((count + z * sigma) / 2.0)), count - 1)
        lower = max(int(round((count - z * sigma) / 2.0)) - 1, 0)
        low, high = slopes[lower], slopes[upper]
    else:
        low = high = math.nan
    return TheilSenResult(
        slope=float(slope),
        intercept=float(intercept),
        low_slope=float(low),
        high_slope=float(high),
        level=float(statistics.median(ys)),
        n=n,
    )
