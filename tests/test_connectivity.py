"""functional.connectivity: barriers against closed forms, BatchNorm re-estimation, Bezier curves, weight matching."""

from __future__ import annotations

import copy
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from lightning_geometry.functional.closure import LossClosure
from lightning_geometry.functional.connectivity import (
    apply_permutation,
    bezier_point,
    fit_bezier,
    interpolate,
    interpolation_barrier,
    path_barrier,
    permutation_spec,
    reestimate_bn,
    weight_matching,
)


F64 = torch.float64


class XY(nn.Module):
    def __init__(self, x=0.0, y=0.0):
        super().__init__()
        self.x = nn.Parameter(torch.tensor([x], dtype=F64))
        self.y = nn.Parameter(torch.tensor([y], dtype=F64))


def point(x, y):
    return {"x": torch.tensor([x], dtype=F64), "y": torch.tensor([y], dtype=F64)}


DUMMY = torch.zeros(1, 1, dtype=F64)


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def err(model, batch):
    x, y = batch
    return (model(x).argmax(dim=1) != y).to(x.dtype).mean()


def data(n=48, d=6, classes=3, seed=0, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=dtype)
    y = torch.randint(0, classes, (n,), generator=gen)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, n, 16)]


def mlp(seed, bn=False, width=12, d=6, classes=3):
    torch.manual_seed(seed)
    layers = [nn.Linear(d, width)]
    if bn:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)]
    return nn.Sequential(*layers).double().eval()


def cnn(seed):
    torch.manual_seed(seed)
    return (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 5, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(5 * 4 * 4, 7),
            nn.ReLU(),
            nn.Linear(7, 3),
        )
        .double()
        .eval()
    )


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {m: (m.training, getattr(m, "momentum", None)) for m in model.modules()},
        torch.get_rng_state(),
        np.random.get_state()[1].copy(),
        random.getstate(),
    )


def assert_unchanged(model, before):
    state, modes, torch_rng, np_rng, py_rng = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert {m: (m.training, getattr(m, "momentum", None)) for m in model.modules()} == modes
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert np.array_equal(np.random.get_state()[1], np_rng)
    assert random.getstate() == py_rng
    assert all(p.grad is None for p in model.parameters())


# ----------------------------------------------------------------------------------------------- linear barrier
@pytest.mark.parametrize("bn", [False, True])
@pytest.mark.parametrize("reestimate", [False, True])
def test_barrier_of_a_model_with_itself_is_zero(bn, reestimate):
    model = mlp(0, bn=bn)
    closure = LossClosure(model, ce, data())
    result = interpolation_barrier(closure, None, params_of(model), num_points=5, error_fn=err, reestimate=reestimate)
    assert result.barrier == 0.0 and result.error_barrier == 0.0
    assert np.all(result.losses == result.losses[0])
    assert result.bn_reestimated == (bn and reestimate)


@pytest.mark.parametrize("num_points", [5, 21])
def test_double_well_barrier_matches_closed_form(num_points):
    # L = h ((x/s)^2 - 1)^2 + k y^2 between (-s, y0) and (s, y1): barrier h - k (y1 - y0)^2 / 4 at t = 1/2
    h, s, k, y0, y1 = 3.0, 2.0, 0.5, 0.4, -1.0
    closure = LossClosure(XY(), lambda m, b: (h * ((m.x / s) ** 2 - 1) ** 2 + k * m.y**2).sum(), DUMMY)
    result = interpolation_barrier(closure, point(-s, y0), point(s, y1), num_points=num_points)
    assert result.barrier == pytest.approx(h - k * (y1 - y0) ** 2 / 4, abs=1e-12)
    assert result.barrier_t == 0.5
    assert result.losses[0] == pytest.approx(k * y0**2) and result.losses[-1] == pytest.approx(k * y1**2)
    ts = np.linspace(0, 1, num_points)
    x = -s + ts * 2 * s
    y = y0 + ts * (y1 - y0)
    np.testing.assert_allclose(result.losses, h * ((x / s) ** 2 - 1) ** 2 + k * y**2, atol=1e-12)


def test_path_barrier_definition_and_nan():
    assert path_barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == (1.5, 0.5)
    assert path_barrier([0, 0.5, 1], [1.0, 1.0, 2.0]) == (0.0, 0.0)  # convex: the ends are the max
    assert math.isnan(path_barrier([0, 0.5, 1], [1.0, math.nan, 2.0])[0])
    with pytest.raises(ValueError, match="ts must start at 0 and end at 1"):
        path_barrier([0.1, 1.0], [1.0, 2.0])


def train(model, batches, steps=60, lr=0.05):
    """Full-batch Adam (a few distinct minima for barrier tests), then exact BatchNorm statistics on ``batches``."""
    x = torch.cat([bx for bx, _ in batches])
    y = torch.cat([by for _, by in batches])
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        ce(model, (x, y)).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    torch.optim.swa_utils.update_bn(batches, model)  # cumulative average over the batches
    return model.eval()


def test_batchnorm_reestimation_reproduces_endpoint_losses_and_changes_the_barrier():
    batches = data(n=64)
    a, b = train(mlp(0, bn=True), batches), train(mlp(1, bn=True), batches)
    la, lb = LossClosure(a, ce, batches)(), LossClosure(b, ce, batches)()
    closure = LossClosure(a, ce, batches)
    with_bn = interpolation_barrier(closure, None, params_of(b), num_points=5)
    assert with_bn.bn_reestimated
    assert with_bn.losses[0] == pytest.approx(float(la), rel=1e-12, abs=0)
    assert with_bn.losses[-1] == pytest.approx(float(lb), rel=1e-12, abs=0)
    # the re-estimated statistics equal update_bn's at the ends
    bufs = reestimate_bn(closure, params_of(b))
    torch.testing.assert_close(bufs["1.running_mean"], b[1].running_mean, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(bufs["1.running_var"], b[1].running_var, rtol=1e-12, atol=1e-14)
    stale = interpolation_barrier(
        closure, None, params_of(b), num_points=5, reestimate=False,
        buffers_a=dict(a.named_buffers()), buffers_b=dict(b.named_buffers()),
    )
    assert stale.losses[0] == pytest.approx(float(la), rel=1e-12)  # same ends
    assert with_bn.barrier > 0.1
    assert abs(stale.barrier - with_bn.barrier) > 0.1 * with_bn.barrier  # stale statistics: another barrier


def test_reestimate_bn_on_other_data_and_model_unchanged():
    model = mlp(0, bn=True)
    model[1].momentum = 0.3
    closure = LossClosure(model, ce, data())
    before = snapshot(model)
    other = data(seed=5)
    bufs = reestimate_bn(closure, params_of(model), other)
    x = torch.cat([bx for bx, _ in other])
    h = model[0](x)
    # cumulative average of per-batch means (equal batch sizes: the overall mean)
    torch.testing.assert_close(bufs["1.running_mean"], h.mean(0).detach(), rtol=1e-10, atol=1e-12)
    assert int(bufs["1.num_batches_tracked"]) == 3
    assert_unchanged(model, before)


# ----------------------------------------------------------------------------------------------- Bezier curve
def test_bezier_point_ends_and_midpoint_bend_is_the_line():
    a, b = point(-1.0, 0.0), point(1.0, 2.0)
    mid = interpolate(a, b, 0.5)
    for t in (0.0, 0.3, 1.0):
        line = interpolate(a, b, t)
        curve = bezier_point(a, mid, b, t)
        for k in a:
            torch.testing.assert_close(curve[k], line[k], rtol=0, atol=1e-15)


def test_bezier_lowers_the_barrier_of_a_ring():
    # L = (x^2 + y^2 - 1)^2: minima on the unit circle; the chord through the centre has barrier 1
    closure = LossClosure(XY(), lambda m, b: ((m.x**2 + m.y**2 - 1) ** 2).sum(), DUMMY)
    a, b = point(-1.0, 0.0), point(1.0, 0.0)
    linear = interpolation_barrier(closure, a, b, num_points=21)
    assert linear.barrier == pytest.approx(1.0, abs=1e-12)
    before = snapshot(closure.model)
    curve = fit_bezier(closure, a, b, steps=300, lr=0.05, seed=0, num_points=21, init_bend=point(0.0, 0.1))
    assert_unchanged(closure.model, before)
    assert curve.path.barrier < 0.1 * linear.barrier
    assert abs(float(curve.bend["y"])) > 0.8  # the bend moved off the chord
    # deterministic under the seed
    again = fit_bezier(closure, a, b, steps=300, lr=0.05, seed=0, num_points=21, init_bend=point(0.0, 0.1))
    assert torch.equal(again.bend["y"], curve.bend["y"])


def test_bezier_on_batchnorm_mlp_leaves_model_unchanged():
    batches = data()
    a, b = mlp(0, bn=True), mlp(1, bn=True)
    closure = LossClosure(a, ce, batches)
    before = snapshot(a)
    curve = fit_bezier(closure, None, params_of(b), steps=20, lr=1e-2, num_points=5, optimizer="sgd")
    assert_unchanged(a, before)
    assert curve.path.bn_reestimated and curve.train_losses.shape == (20,)
    assert np.isfinite(curve.path.losses).all()


# ----------------------------------------------------------------------------------------------- weight matching
def _random_perms(spec, seed):
    gen = torch.Generator().manual_seed(seed)
    return {p: torch.randperm(n, generator=gen) for p, n in spec.sizes.items()}


@pytest.mark.parametrize("make", [lambda: mlp(0), lambda: mlp(0, bn=True), lambda: cnn(0)])
def test_weight_matching_recovers_a_random_permutation(make):
    model = make()
    spec = permutation_spec(model)
    a = params_of(model)
    pi = _random_perms(spec, 3)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    b_state = apply_permutation(state, spec, pi)
    b = {k: b_state[k] for k in a}
    # the permuted network computes the same function
    x = torch.randn(5, 1, 8, 8, dtype=F64) if isinstance(model[0], nn.Conv2d) else torch.randn(5, 6, dtype=F64)
    torch.testing.assert_close(torch.func.functional_call(model, b_state, (x,)), model(x))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    before = snapshot(model)
    perms = weight_matching(a, b, spec, seed=1)
    for p in spec.sizes:  # b[perm] = a[pi[perm]] = a  <=>  perm = pi^{-1}
        assert torch.equal(pi[p][perms[p]], torch.arange(spec.sizes[p]))
    aligned = apply_permutation(b, spec, perms)
    assert all(torch.equal(aligned[k], a[k]) for k in a)
    if isinstance(model[0], nn.Conv2d):
        gen = torch.Generator().manual_seed(0)
        batches = [(torch.randn(8, 1, 8, 8, dtype=F64, generator=gen), torch.randint(0, 3, (8,), generator=gen))]
    else:
        batches = data()
    closure = LossClosure(model, ce, batches)
    result = interpolation_barrier(closure, None, aligned, num_points=5)
    assert result.barrier == 0.0
    assert_unchanged(model, before)


def test_weight_matching_aligned_barrier_no_higher_on_independent_nets():
    a, b = mlp(0, width=16), mlp(1, width=16)
    spec = permutation_spec(a)
    closure = LossClosure(a, ce, data())
    perms = weight_matching(params_of(a), params_of(b), spec)
    aligned = apply_permutation(params_of(b), spec, perms)
    # the matching objective can only grow: <a, P b> >= <a, b> summed over the matched tensors
    def inner(x):
        return sum(float((params_of(a)[k] * x[k]).sum()) for k in x)
    assert inner(aligned) >= inner(params_of(b)) - 1e-12
    # alignment does not change b's loss
    assert closure(aligned) == pytest.approx(float(LossClosure(b, ce, data())()), rel=1e-12)


def test_permutation_spec_layout_and_errors():
    spec = permutation_spec(cnn(0))
    assert spec.sizes == {"P_0": 4, "P_3": 5, "P_6": 7}
    assert ("6.weight", 1, 16) in spec.perms["P_3"]
    assert ("1.running_mean", 0, 1) in spec.perms["P_0"]
    with pytest.raises(TypeError, match=r"module '1' of type LayerNorm holds parameters"):
        permutation_spec(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)))
    with pytest.raises(ValueError, match=r"layer '1' takes 5 inputs, which does not match the 4 outputs of '0'"):
        permutation_spec(nn.Sequential(nn.Linear(3, 4), nn.Linear(5, 2)))
    with pytest.raises(ValueError, match="at least two Linear/Conv layers, got 1"):
        permutation_spec(nn.Sequential(nn.Linear(3, 4)))
    spec = permutation_spec(mlp(0))
    with pytest.raises(ValueError, match=r"perms\['P_0'\] has 3 entries, expected 12"):
        apply_permutation(params_of(mlp(0)), spec, {"P_0": torch.arange(3), "P_2": torch.arange(12)})


# ----------------------------------------------------------------------------------------------- bad input
def test_mismatched_reference_names_the_first_mismatch():
    model = mlp(0)
    closure = LossClosure(model, ce, data())
    other = params_of(mlp(1, width=13))
    with pytest.raises(ValueError, match=r"params_b\['0.weight'\] has shape \(13, 6\), expected \(12, 6\)"):
        interpolation_barrier(closure, None, other)
    renamed = {("w" if k == "0.weight" else k): v for k, v in params_of(model).items()}
    with pytest.raises(ValueError, match=r"params_b has different parameter names: missing \['0.weight'\]"):
        interpolation_barrier(closure, None, renamed)
    with pytest.raises(ValueError, match=r"params_b\['0.weight'\] has shape"):
        fit_bezier(closure, None, other)
    with pytest.raises(ValueError, match=r"params_b\['0.weight'\] has shape"):
        weight_matching(params_of(model), other, permutation_spec(model))


def test_bad_arguments():
    model = mlp(0)
    closure = LossClosure(model, ce, data())
    p = params_of(model)
    with pytest.raises(ValueError, match="num_points must be >= 3, got 2"):
        interpolation_barrier(closure, None, p, num_points=2)
    with pytest.raises(TypeError, match="num_points must be an int, got float"):
        interpolation_barrier(closure, None, p, num_points=3.0)
    with pytest.raises(ValueError, match="steps must be a positive integer, got 0"):
        fit_bezier(closure, None, p, steps=0)
    with pytest.raises(ValueError, match=r"lr must be a positive finite number, got -0.1"):
        fit_bezier(closure, None, p, lr=-0.1)
    with pytest.raises(ValueError, match="optimizer must be 'adam' or 'sgd', got 'lbfgs'"):
        fit_bezier(closure, None, p, optimizer="lbfgs")
    with pytest.raises(TypeError, match="error_fn must be callable"):
        interpolation_barrier(closure, None, p, error_fn=3)


def test_functions_leave_model_and_rng_unchanged_in_train_mode():
    other = params_of(mlp(1, bn=True))
    model = mlp(0, bn=True).train()
    closure = LossClosure(model, ce, data())
    before = snapshot(model)
    interpolation_barrier(closure, None, other, num_points=3, error_fn=err)
    interpolation_barrier(closure, None, other, num_points=3, reestimate=False)
    reestimate_bn(closure, other)
    weight_matching(params_of(model), other, permutation_spec(model))
    assert_unchanged(model, before)
    assert copy.deepcopy(model).training
