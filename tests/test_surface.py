"""functional.surface against closed forms: quadratic bowls (widths, ellipse areas), dense values, nan handling."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_geometry.functional.closure import LossClosure
from lightning_geometry.functional.surface import (
    area_fraction,
    contour_threshold,
    contour_width,
    loss_along_line,
    loss_plane,
    random_directions,
    symmetric_grid,
)


class Bowl(nn.Module):
    r"""Parameters ``w`` (n,) and ``v`` (2, 2); loss :math:`c + \tfrac12 (x - x^*)^\top A (x - x^*)`, x = [w, v]."""

    def __init__(self, A: torch.Tensor, center: torch.Tensor, const: float = 0.0) -> None:
        super().__init__()
        n = A.shape[0] - 4
        self.w = nn.Parameter(center[:n].clone())
        self.v = nn.Parameter(center[n:].reshape(2, 2).clone())
        self.register_buffer("A", A)
        self.register_buffer("center", center)
        self.const = const

    def flat(self) -> torch.Tensor:
        return torch.cat([self.w, self.v.reshape(-1)])


def bowl_loss(model: Bowl, batch) -> torch.Tensor:
    x = model.flat() - model.center
    return model.const + 0.5 * x @ model.A @ x


def make_bowl(eigenvalues, seed=0, const=0.0):
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.tensor(eigenvalues, dtype=torch.float64)
    A = q @ torch.diag(lam) @ q.T
    center = torch.randn(n, generator=gen, dtype=torch.float64)
    model = Bowl(A, center, const)
    closure = LossClosure(model, bowl_loss, torch.zeros(1, 1, dtype=torch.float64))
    return model, closure, q, lam


def as_dir(model: Bowl, vec: torch.Tensor) -> dict[str, torch.Tensor]:
    n = model.w.numel()
    return {"w": vec[:n].clone(), "v": vec[n:].reshape(2, 2).clone()}


def snapshot(model: nn.Module):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        torch.get_rng_state(),
        np.random.get_state()[1].copy(),
        random.getstate(),
    )


def assert_unchanged(model: nn.Module, before) -> None:
    state, torch_rng, np_rng, py_rng = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], np_rng)
    assert random.getstate() == py_rng
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------- contour width
@pytest.mark.parametrize("delta", [0.05, 1.0, 7.0])
def test_contour_width_along_eigenvectors_is_sqrt_2delta_over_lambda(delta):
    lams = [0.3, 1.0, 2.5, 10.0, 0.7, 4.0]
    model, closure, q, lam = make_bowl(lams)
    dirs = [as_dir(model, s * q[:, i]) for i in range(len(lams)) for s in (1.0, -1.0)]
    result = contour_width(closure, dirs, delta=delta, max_radius=100.0, rtol=0.0, xtol=1e-10)
    expected = np.repeat(np.sqrt(2 * delta / lam.numpy()), 2)
    np.testing.assert_allclose(result.radii, expected, rtol=0, atol=1e-6)
    assert result.num_censored == 0 and not result.censored.any()
    assert result.loss0 == 0.0 and result.threshold == delta
    assert result.mean == pytest.approx(expected.mean(), abs=1e-6)
    assert result.std == pytest.approx(expected.std(), abs=1e-6)
    np.testing.assert_allclose(result.distances, expected, atol=1e-6)  # unit directions
    assert result.num_evaluations == 1 + result.evaluations_per_ray.sum()


def test_contour_width_relative_level_and_scaled_direction():
    model, closure, q, lam = make_bowl([2.0, 0.5, 1.0, 3.0, 1.5, 0.25], const=3.0)
    d = as_dir(model, 2.0 * q[:, 0])  # length 2: the radius halves, the distance does not
    result = contour_width(closure, [d], rel=0.1, max_radius=10.0, rtol=0.0, xtol=1e-11)
    width = math.sqrt(2 * 3.0 * 0.1 / 2.0)
    assert result.threshold == pytest.approx(3.3)
    assert result.radii[0] == pytest.approx(width / 2, abs=1e-6)
    assert result.distances[0] == pytest.approx(width, abs=1e-6)


def test_contour_width_default_tolerance_is_cheap_and_within_1e_3():
    model, closure, q, lam = make_bowl([0.3, 1.0, 2.5, 10.0, 0.7, 4.0])
    dirs = [as_dir(model, q[:, i]) for i in range(6)]
    result = contour_width(closure, dirs, delta=0.5, max_radius=50.0)
    expected = np.sqrt(1.0 / lam.numpy())
    np.testing.assert_allclose(result.radii, expected, rtol=1e-3)
    assert result.num_evaluations <= 1 + 6 * 6


def test_contour_width_censored_rays_are_kept_and_flagged():
    model, closure, q, lam = make_bowl([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])  # flat along q0
    dirs = [as_dir(model, q[:, 0]), as_dir(model, q[:, 1])]
    result = contour_width(closure, dirs, delta=0.5, max_radius=3.0, rtol=0.0, xtol=1e-10)
    assert result.censored.tolist() == [True, False]
    assert result.num_censored == 1
    assert result.radii[0] == 3.0  # a lower bound, kept
    assert result.radii[1] == pytest.approx(1.0, abs=1e-6)
    assert result.mean == pytest.approx(2.0, abs=1e-6)
    assert result.mean_uncensored == pytest.approx(1.0, abs=1e-6)


def test_contour_width_nonmonotone_first_crossing_on_double_well():
    # f(t) = (t^2 - 1)^2 from t = 0 (a maximum): the level 0.5 + ... first reached at small t? Use a ray from a minimum.
    class Well(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.tensor([-1.0], dtype=torch.float64))

    closure = LossClosure(Well(), lambda m, b: ((m.x**2 - 1) ** 2).sum(), torch.zeros(1, 1, dtype=torch.float64))
    # from x=-1 towards +: loss rises to 1 at x=0 and falls; level 0.5 first reached where (x^2-1)^2 = 0.5
    d = {"x": torch.ones(1, dtype=torch.float64)}
    result = contour_width(closure, [d], delta=0.5, max_radius=4.0, rtol=0, xtol=1e-12)
    expected = -math.sqrt(1 - math.sqrt(0.5)) + 1.0
    assert result.radii[0] == pytest.approx(expected, abs=1e-9)


# ----------------------------------------------------------------------------------------------- lines and planes
def test_loss_plane_and_line_match_closed_form():
    model, closure, q, lam = make_bowl([0.3, 1.0, 2.5, 10.0, 0.7, 4.0])
    gen = torch.Generator().manual_seed(3)
    dx, dy = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    alphas, betas = symmetric_grid(1.0, 5), symmetric_grid(2.0, 7)
    surface = loss_plane(closure, as_dir(model, dx), as_dir(model, dy), alphas, betas)
    A = model.A
    dense = np.array([[float(0.5 * (a * dx + b * dy) @ A @ (a * dx + b * dy)) for b in betas] for a in alphas])
    np.testing.assert_allclose(surface.losses, dense, rtol=1e-12, atol=1e-14)
    assert surface.losses.shape == (5, 7) and surface.loss0 == 0.0
    line = loss_along_line(closure, as_dir(model, dx), alphas)
    np.testing.assert_allclose(line.losses, dense[:, 3], rtol=1e-12, atol=1e-14)


def test_area_fraction_matches_ellipse():
    model, closure, q, lam = make_bowl([2.0, 8.0, 1.0, 1.0, 1.0, 1.0])
    delta, radius = 0.5, 1.0
    grid = symmetric_grid(radius, 81)
    surface = loss_plane(closure, as_dir(model, q[:, 0]), as_dir(model, q[:, 1]), grid)
    a, b = math.sqrt(2 * delta / 2.0), math.sqrt(2 * delta / 8.0)
    exact = math.pi * a * b / (2 * radius) ** 2
    area = area_fraction(surface.alphas, surface.betas, surface.losses, contour_threshold(0.0, delta=delta))
    assert area.nan_fraction == 0.0
    assert area.fraction == pytest.approx(exact, rel=1.5e-3)
    # the error is second order: a coarser grid is worse by about 4x per halving
    coarse = loss_plane(closure, as_dir(model, q[:, 0]), as_dir(model, q[:, 1]), symmetric_grid(radius, 41))
    err_coarse = abs(area_fraction(coarse.alphas, coarse.betas, coarse.losses, delta).fraction - exact)
    assert abs(area.fraction - exact) < err_coarse / 3


def test_area_fraction_exact_cases():
    xs = np.array([0.0, 1.0, 3.0])
    assert area_fraction(xs, xs, np.zeros((3, 3)), 1.0).fraction == 1.0
    assert area_fraction(xs, xs, np.full((3, 3), 2.0), 1.0).fraction == 0.0
    # a plane f = alpha on [0, 3]^2 is under 1.5 on half of [0,3] in alpha -> 0.5
    vals = np.repeat(xs[:, None], 3, axis=1)
    assert area_fraction(xs, xs, vals, 1.5).fraction == pytest.approx(0.5)
    with pytest.raises(ValueError, match="shape"):
        area_fraction(xs, xs, np.zeros((2, 3)), 1.0)
    with pytest.raises(ValueError, match="strictly increasing"):
        area_fraction(xs[::-1], xs, np.zeros((3, 3)), 1.0)


def test_nan_losses_are_recorded_not_replaced():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
            self.y = nn.Parameter(torch.tensor([0.0], dtype=torch.float64))

    # sqrt(x) is nan for x < 0: the left part of the plane (alpha < -1)
    closure = LossClosure(Root(), lambda m, b: (m.x.sqrt() + m.y**2).sum(), torch.zeros(1, 1, dtype=torch.float64))
    dx = {"x": torch.ones(1, dtype=torch.float64), "y": torch.zeros(1, dtype=torch.float64)}
    dy = {"x": torch.zeros(1, dtype=torch.float64), "y": torch.ones(1, dtype=torch.float64)}
    grid = symmetric_grid(2.0, 5)  # -2, -1, 0, 1, 2
    surface = loss_plane(closure, dx, dy, grid)
    assert np.isnan(surface.losses[0]).all() and np.isfinite(surface.losses[1:]).all()
    area = area_fraction(surface.alphas, surface.betas, surface.losses, 2.0)
    assert area.nan_fraction == pytest.approx(0.25)
    assert 0 < area.fraction < 1
    # a ray that meets nan before crossing: radius nan, not censored, counted
    result = contour_width(closure, [param_neg(dx), dy], delta=10.0, max_radius=4.0)
    assert math.isnan(result.radii[0]) and not result.censored[0] and result.num_nan == 1
    assert result.censored[1] or np.isfinite(result.radii[1])


def param_neg(d):
    return {k: -v for k, v in d.items()}


# ----------------------------------------------------------------------------------------------- no side effects
def _mlp_bn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)).eval()


def _ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def test_surface_functions_leave_model_buffers_and_rng_unchanged():
    model = _mlp_bn()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    with torch.no_grad():
        model[1].running_mean.add_(0.3)
    before = snapshot(model)
    closure = LossClosure(model, _ce, [(x[:20], y[:20]), (x[20:], y[20:])])
    dirs = random_directions(closure.params, 3, seed=4)
    loss_plane(closure, dirs[0], dirs[1], symmetric_grid(0.5, 3))
    loss_along_line(closure, dirs[2], symmetric_grid(0.5, 3))
    contour_width(closure, dirs, rel=0.5, max_radius=2.0)
    assert_unchanged(model, before)
    # the same in train mode: BatchNorm would update its running statistics, but the closure uses clones
    model.train()
    model[3].p = 0.0
    contour_width(closure, dirs, rel=0.5, max_radius=2.0)
    assert_unchanged(model, before)


def test_random_directions_private_seeded_filter_normalized():
    model = _mlp_bn()
    params = dict(model.named_parameters())
    state = torch.get_rng_state()
    a = random_directions(params, 2, seed=7)
    b = random_directions(params, 2, seed=7)
    c = random_directions(params, 2, seed=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a[i][k], b[i][k]) for i in range(2) for k in params)
    assert not torch.equal(a[0]["0.weight"], c[0]["0.weight"])
    assert not torch.equal(a[0]["0.weight"], a[1]["0.weight"])
    rows = a[0]["0.weight"].norm(dim=1)
    torch.testing.assert_close(rows, params["0.weight"].detach().norm(dim=1))
    assert torch.count_nonzero(a[0]["0.bias"]) == 0


# ----------------------------------------------------------------------------------------------- bad input
def test_bad_arguments_raise_naming_the_value():
    model, closure, q, lam = make_bowl([1.0] * 6)
    d = as_dir(model, q[:, 0])
    with pytest.raises(ValueError, match=r"delta must be a positive finite number, got -1"):
        contour_width(closure, [d], delta=-1.0)
    with pytest.raises(ValueError, match=r"delta must be a positive finite number, got 0"):
        contour_width(closure, [d], delta=0.0)
    with pytest.raises(ValueError, match=r"rel must be a positive finite number, got -0.5"):
        contour_width(closure, [d], rel=-0.5)
    with pytest.raises(ValueError, match="exactly one of delta and rel"):
        contour_width(closure, [d], delta=1.0, rel=1.0)
    with pytest.raises(ValueError, match=r"max_radius must be a positive finite number, got 0"):
        contour_width(closure, [d], delta=1.0, max_radius=0)
    with pytest.raises(ValueError, match="directions must hold at least one"):
        contour_width(closure, [], delta=1.0)
    with pytest.raises(ValueError, match=r"radius must be a positive finite number, got -1"):
        symmetric_grid(-1.0, 5)
    with pytest.raises(ValueError, match=r"num_points must be >= 3, got 2"):
        symmetric_grid(1.0, 2)
    with pytest.raises(TypeError, match="num_points must be an int"):
        symmetric_grid(1.0, 3.0)
    with pytest.raises(ValueError, match="num must be an int >= 1, got 0"):
        random_directions(closure.params, 0)
    bad = {"w": d["w"], "u": d["v"]}
    with pytest.raises(ValueError, match=r"direction has different parameter names: missing \['v'\]"):
        loss_along_line(closure, bad, [0.0])
    bad = {"w": d["w"][:-1], "v": d["v"]}
    with pytest.raises(ValueError, match=r"direction 0\['w'\] has shape \(1,\), expected \(2,\)"):
        loss_plane(closure, bad, d, [0.0])
    with pytest.raises(ValueError, match="alphas must be finite"):
        loss_along_line(closure, d, [0.0, math.nan])
