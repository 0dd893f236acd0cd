"""Cross-checks against the peers on the same model and data, in float64: PyHessian and hessian-eigenthings for
the top eigenvalues, loss-landscapes for the loss along a straight line between two models."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_geometry.functional import LossClosure, interpolation_barrier, top_hessian_eigenvalues


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def case(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    return model, (x, torch.randint(0, 3, (40,), generator=g))


def test_top_eigenvalues_match_pyhessian() -> None:
    from pyhessian import hessian

    model, batch = case()
    ours = top_hessian_eigenvalues(model, cross_entropy, batch, k=2, tol=1e-10)
    torch.manual_seed(0)
    theirs, _ = hessian(copy.deepcopy(model), nn.CrossEntropyLoss(), data=batch, cuda=False).eigenvalues(
        maxIter=2000, tol=1e-12, top_n=2
    )
    # PyHessian normalizes with v / (|v| + 1e-6), which biases its eigenvalues low by 2e-6 relative.
    assert ours.eigenvalues.tolist() == pytest.approx([t * (1 + 2e-6) for t in theirs], rel=1e-9)


def test_top_eigenvalues_match_hessian_eigenthings() -> None:
    from hessian_eigenthings import HessianOperator, lanczos

    model, batch = case(1)
    ours = top_hessian_eigenvalues(model, cross_entropy, batch, k=3, tol=1e-10)
    # 40 steps: at 80 (near the 83 dimensions) its Lanczos returned three copies of λ_max (ghost eigenvalues).
    theirs = lanczos(HessianOperator(copy.deepcopy(model), [batch], cross_entropy), k=3, max_iter=40, which="LA")
    assert ours.eigenvalues.tolist() == pytest.approx(sorted(np.asarray(theirs.eigenvalues).tolist(), reverse=True),
                                                      rel=1e-10)


def test_linear_path_matches_loss_landscapes() -> None:
    import loss_landscapes
    from loss_landscapes.metrics import Loss

    model, batch = case(2)
    other, _ = case(3)
    ours = interpolation_barrier(LossClosure(model, cross_entropy, batch), None,
                                 {k: p.detach() for k, p in other.named_parameters()}, num_points=21)
    theirs = loss_landscapes.linear_interpolation(copy.deepcopy(model), copy.deepcopy(other),
                                                  Loss(F.cross_entropy, *batch), steps=20, deepcopy_model=True)
    # loss-landscapes steps first and then evaluates: its i-th value is at t = (i + 1) / 20, ours at t = i / 20.
    np.testing.assert_allclose(ours.losses[1:], np.asarray(theirs, dtype=np.float64), rtol=1e-10)
