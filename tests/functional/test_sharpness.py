"""Sharpness measures against closed forms on quadratics."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_geometry.functional.sharpness import (
    average_adaptive_sharpness,
    epsilon_sharpness,
    stability_ratio,
    stability_threshold,
    worst_case_sharpness,
)

BATCH = torch.zeros(1, 1, dtype=torch.float64)


class Bowl(nn.Module):
    r"""At its minimum ``w*``: loss :math:`\tfrac12 (w - w^*)^\top A (w - w^*)`."""

    def __init__(self, n: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        b = torch.randn(n, n, generator=g, dtype=torch.float64)
        self.matrix = b @ b.T + torch.eye(n, dtype=torch.float64)
        self.center = torch.randn(n, generator=g, dtype=torch.float64)
        self.w = nn.Parameter(self.center.clone())


def bowl_loss(model: Bowl, batch: object) -> torch.Tensor:
    d = model.w - model.center
    return 0.5 * d @ model.matrix @ d


def test_stability_threshold_and_ratio() -> None:
    assert stability_threshold(0.01) == pytest.approx(200.0)
    assert stability_threshold(0.01, momentum=0.9) == pytest.approx(380.0)
    assert stability_ratio(100.0, 0.01) == pytest.approx(100.0 * 0.01 / 2)
    with pytest.raises(ValueError, match="lr must be a positive finite number, got 0"):
        stability_threshold(0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\), got 1.0"):
        stability_threshold(0.1, momentum=1.0)


def test_worst_case_adaptive_sharpness_is_the_top_eigenvalue_of_CAC() -> None:
    model = Bowl()
    scaled = torch.diag(model.center.abs()) @ model.matrix @ torch.diag(model.center.abs())
    result = worst_case_sharpness(model, bowl_loss, BATCH, rho=0.1, steps=300)
    assert result.value == pytest.approx(0.5 * 0.1**2 * float(torch.linalg.eigvalsh(scaled)[-1]), rel=1e-6)


def test_average_adaptive_sharpness_is_half_rho_squared_trace_of_CAC() -> None:
    model = Bowl()
    scaled = torch.diag(model.center.abs()) @ model.matrix @ torch.diag(model.center.abs())
    result = average_adaptive_sharpness(model, bowl_loss, BATCH, rho=0.1, num_samples=2000, seed=1)
    expected = 0.5 * 0.1**2 * float(torch.trace(scaled))
    assert abs(result.value - expected) <= 4 * result.std_error
    assert result.std_error < 0.05 * expected


def _vertex_values(model: Bowl, radius: torch.Tensor) -> dict[tuple[float, ...], float]:
    values = {}
    for signs in itertools.product((-1.0, 1.0), repeat=len(radius)):
        delta = radius * torch.tensor(signs, dtype=torch.float64)
        values[signs] = float(0.5 * delta @ model.matrix @ delta)
    return values


def test_epsilon_sharpness_on_a_diagonal_bowl_is_exact() -> None:
    model = Bowl(n=5)
    model.matrix = torch.diag(torch.diagonal(model.matrix))  # every vertex of the box is a maximum
    radius = 1e-3 * (model.center.abs() + 1)
    expected = max(_vertex_values(model, radius).values())
    result = epsilon_sharpness(model, bowl_loss, BATCH, epsilon=1e-3, steps=5)
    assert result.value == pytest.approx(100 * expected / (1 + 0.0), rel=1e-9)


def test_epsilon_sharpness_is_a_local_maximum_vertex_and_a_lower_bound() -> None:
    model = Bowl(n=5)
    radius = 1e-3 * (model.center.abs() + 1)
    values = _vertex_values(model, radius)
    result = epsilon_sharpness(model, bowl_loss, BATCH, epsilon=1e-3, steps=50)
    found = [s for s, v in values.items() if 100 * v == pytest.approx(result.value, rel=1e-9)]
    assert found, "the ascent must end on a vertex of the box"
    signs = torch.tensor(found[0], dtype=torch.float64)
    assert torch.equal(torch.sign(model.matrix @ (radius * signs)), signs)  # no sign flip improves: local max
    assert result.value <= 100 * max(values.values()) * (1 + 1e-12)


def test_sharpness_errors() -> None:
    model = Bowl()
    with pytest.raises(ValueError, match="rho must be a positive finite number, got -1"):
        average_adaptive_sharpness(model, bowl_loss, BATCH, rho=-1)
    with pytest.raises(ValueError, match="p must be 2 or 'inf', got 1"):
        worst_case_sharpness(model, bowl_loss, BATCH, p=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset must be positive when adaptive=False"):
        worst_case_sharpness(model, bowl_loss, BATCH, adaptive=False)
    with pytest.raises(ValueError, match="epsilon must be a positive finite number, got 0"):
        epsilon_sharpness(model, bowl_loss, BATCH, epsilon=0)
