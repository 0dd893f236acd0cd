"""Theil–Sen slope and Sen's interval against scipy.stats.theilslopes, and its robustness to spikes."""

from __future__ import annotations

import math
import random

import pytest

from lightning_geometry.functional.trend import TheilSenResult, relative_slope, theil_sen

scipy_stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_matches_scipy(seed: int, confidence: float) -> None:
    rng = random.Random(seed)
    n = rng.randint(3, 12)
    x = sorted(rng.choice([0.0, 1.0, 2.0, 3.5, 5.0, 7.0, 8.0, 11.0]) for _ in range(n))  # ties in x
    if len(set(x)) < 2:
        x[-1] = x[0] + 1.0
    y = [rng.choice([1.0, 1.5]) if rng.random() < 0.2 else 2.0 + 0.3 * xi + rng.gauss(0, 0.5) for xi in x]
    ours = theil_sen(x, y, confidence=confidence)
    ref = scipy_stats.theilslopes(y, x, alpha=confidence, method="separate")
    assert ours.slope == pytest.approx(ref.slope, rel=1e-12, abs=1e-12)
    assert ours.intercept == pytest.approx(ref.intercept, rel=1e-12, abs=1e-12)
    assert ours.low_slope == pytest.approx(ref.low_slope, rel=1e-12, abs=1e-12)
    assert ours.high_slope == pytest.approx(ref.high_slope, rel=1e-12, abs=1e-12)
    assert ours.n == n
    assert ours.low_slope <= ours.slope <= ours.high_slope


def test_exact_line_and_relative_slope() -> None:
    r = theil_sen([0, 2, 3, 7], [10.0, 12.0, 13.0, 17.0])
    assert isinstance(r, TheilSenResult)
    assert (r.slope, r.intercept) == (1.0, 10.0)
    assert r.level == 12.5
    assert r.relative_slope == pytest.approx(1.0 / 12.5)


def test_spike_does_not_move_the_slope() -> None:
    flat = [5.0, 5.1, 4.9, 5.0, 5.05, 4.95, 5.0]
    spiked = list(flat)
    spiked[3] = 500.0
    x = list(range(len(flat)))
    assert abs(theil_sen(x, spiked).slope) < 0.1
    # least squares would report a large slope for the late spike; Theil-Sen does not
    late = list(flat)
    late[-1] = 500.0
    assert abs(theil_sen(x, late).relative_slope) < 0.02


def test_relative_slope_undefined_level() -> None:
    assert math.isnan(relative_slope(1.0, 0.0))
    assert math.isnan(relative_slope(1.0, math.nan))
    assert relative_slope(-2.0, -4.0) == -0.5


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [
        ([0, 1], [1.0], "same length"),
        ([0], [1.0], "at least 2 points"),
        ([0, 1], [1.0, math.nan], "finite"),
        ([3, 3, 3], [1.0, 2.0, 3.0], "all x are equal"),
    ],
)
def test_bad_input(x: list, y: list, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        theil_sen(x, y)


@pytest.mark.parametrize("confidence", [0.0, 1.0, -0.5, 2])
def test_bad_confidence(confidence: float) -> None:
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got"):
        theil_sen([0, 1, 2], [1.0, 2.0, 3.0], confidence=confidence)


def test_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = (
        "import sys, lightning_geometry.functional.trend; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
