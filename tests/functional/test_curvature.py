"""Eigenvalues, trace and directional curvature against the dense Hessian and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import CASES, assert_untouched, dense_reference_hessian, flat_loss, make_case, snapshot
from torch import nn

from lightning_geometry.functional.curvature import directional_curvature, hessian_trace, top_hessian_eigenvalues
from lightning_geometry.functional.hessian import hessian_operator
from lightning_geometry.functional.params import (
    filter_normalized_direction,
    flatten_params,
    make_generator,
    param_axpy,
)


class Quadratic(nn.Module):
    r"""Loss :math:`\tfrac12 (w - c)^\top A (w - c)`: Hessian ``A`` everywhere."""

    def __init__(self, matrix: torch.Tensor, center: torch.Tensor) -> None:
        super().__init__()
        self.matrix, self.center = matrix, center
        self.w = nn.Parameter(torch.zeros_like(center))

    def loss(self, batch: object) -> torch.Tensor:
        d = self.w - self.center
        return 0.5 * d @ self.matrix @ d


def quadratic_loss(model: nn.Module, batch: object) -> torch.Tensor:
    return model.loss(batch)


def random_quadratic(n: int, seed: int = 0) -> Quadratic:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eigenvalues = torch.linspace(-1.0, 5.0, n, dtype=torch.float64)
    return Quadratic(q @ torch.diag(eigenvalues) @ q.T, torch.randn(n, generator=g, dtype=torch.float64))


DUMMY_BATCH = torch.zeros(1, 1, dtype=torch.float64)


@pytest.mark.parametrize("route", ["graph", "func"])
@pytest.mark.parametrize("name", CASES)
def test_top_k_eigenvalues_match_dense(name: str, route: str) -> None:
    case = make_case(name)
    exact = torch.linalg.eigvalsh(dense_reference_hessian(case))
    result = top_hessian_eigenvalues(
        case.model, case.loss_fn, case.batches, k=3, tol=1e-8, negative=True, route=route
    )
    assert result.converged and result.finite
    assert torch.allclose(result.eigenvalues, exact.flip(0)[:3], rtol=1e-6, atol=1e-9)
    assert result.min_eigenvalue == pytest.approx(float(exact[0]), rel=1e-6, abs=1e-9)
    dense = dense_reference_hessian(case)
    for value, vector in zip(result.eigenvalues, result.eigenvectors):
        v = flatten_params(vector)
        assert float(v.norm()) == pytest.approx(1.0, rel=1e-10)
        assert (dense @ v - value * v).norm() <= 1e-5 * abs(float(exact[-1]))


def test_default_tolerance_bounds_the_eigenvalue_error() -> None:
    case = make_case("cnn_ce")
    exact = float(torch.linalg.eigvalsh(dense_reference_hessian(case))[-1])
    result = top_hessian_eigenvalues(case.model, case.loss_fn, case.batches)
    assert result.converged
    residual = float(result.residuals[0])
    assert residual <= 1e-3 * exact
    # A symmetric operator has an eigenvalue within the residual of each Ritz value; in practice far closer.
    assert abs(float(result.eigenvalues[0]) - exact) <= residual
    assert float(result.eigenvalues[0]) == pytest.approx(exact, rel=1e-4)


def test_warm_start_from_eigenvector_converges_at_once() -> None:
    case = make_case("mlp_ce")
    cold = top_hessian_eigenvalues(case.model, case.loss_fn, case.batches, tol=1e-6)
    warm = top_hessian_eigenvalues(case.model, case.loss_fn, case.batches, tol=1e-6, init=cold.eigenvectors[0])
    assert warm.num_products <= 2 < cold.num_products
    assert float(warm.eigenvalues[0]) == pytest.approx(float(cold.eigenvalues[0]), rel=1e-8)


def test_closed_form_quadratic_and_negative_curvature() -> None:
    model = random_quadratic(12)
    result = top_hessian_eigenvalues(model, quadratic_loss, DUMMY_BATCH, k=2, negative=True, tol=1e-10)
    assert result.eigenvalues.tolist() == pytest.approx([5.0, 5.0 - 6.0 / 11], rel=1e-10)
    assert result.min_eigenvalue == pytest.approx(-1.0, rel=1e-10)


def test_same_number_twice_and_model_untouched() -> None:
    case = make_case("mlp_ce")
    case.model.zero_grad()
    case.loss_fn(case.model, case.batches[0]).backward()  # a .grad that must survive
    before = snapshot(case.model)
    first = top_hessian_eigenvalues(case.model, case.loss_fn, case.batches)
    second = top_hessian_eigenvalues(case.model, case.loss_fn, case.batches)
    assert torch.equal(first.eigenvalues, second.eigenvalues)
    assert_untouched(before, case.model)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimators_converge_to_exact_trace(method: str) -> None:
    case = make_case("mlp_ce")
    exact = float(torch.trace(dense_reference_hessian(case)))
    errors = []
    for samples in (30, 480):
        result = hessian_trace(case.model, case.loss_fn, case.batches, num_samples=samples, method=method, seed=1)
        assert result.num_products <= samples
        assert abs(result.trace - exact) <= 4 * result.std_error + 1e-10
        errors.append(abs(result.trace - exact))
    assert errors[1] < errors[0]


def test_hutch_plus_plus_is_exact_when_the_sketch_spans_the_space() -> None:
    model = random_quadratic(10)
    result = hessian_trace(model, quadratic_loss, DUMMY_BATCH, num_samples=33, method="hutch++")
    assert result.trace == pytest.approx(float(torch.trace(model.matrix)), abs=1e-10)
    assert result.std_error == pytest.approx(0.0, abs=1e-10)


def test_hutchinson_is_unbiased_over_seeds() -> None:
    model = random_quadratic(10)
    estimates = [
        hessian_trace(model, quadratic_loss, DUMMY_BATCH, num_samples=5, method="hutchinson", seed=s).trace
        for s in range(400)
    ]
    mean = sum(estimates) / len(estimates)
    spread = torch.tensor(estimates).std().item() / math.sqrt(len(estimates))
    assert abs(mean - float(torch.trace(model.matrix))) <= 4 * spread


def test_directional_curvature_equals_dHd_on_a_quadratic() -> None:
    model = random_quadratic(8)
    model.w.data = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)
    result = directional_curvature(
        model, quadratic_loss, DUMMY_BATCH, num_directions=5, h=0.3, norm="filter", ignore="none", exact=True, seed=3
    )
    params = {"w": model.w.detach()}
    generator = make_generator(3)
    for value, exact in zip(result.values, result.exact):
        d = filter_normalized_direction(params, generator, "filter", "none")["w"]
        assert float(value) == pytest.approx(float(d @ model.matrix @ d), rel=1e-9)
        assert float(exact) == pytest.approx(float(d @ model.matrix @ d), rel=1e-12)


def test_directional_curvature_second_difference_by_hand() -> None:
    case = make_case("cnn_ce")
    f, flat, params = flat_loss(case)
    result = directional_curvature(case.model, case.loss_fn, case.batches, num_directions=3, h=1e-3, seed=5, exact=True)
    generator = make_generator(5)
    dense = dense_reference_hessian(case)
    for value, exact in zip(result.values, result.exact):
        d = flatten_params(filter_normalized_direction(params, generator))
        by_hand = (f(flat + 1e-3 * d) - 2 * f(flat) + f(flat - 1e-3 * d)) / 1e-6
        # Round-off of a second difference: a few eps·L/h² ≈ 1e-9 absolute (batches sum in another order).
        assert float(value) == pytest.approx(float(by_hand), abs=4e-9)
        assert float(exact) == pytest.approx(float(d @ dense @ d), rel=1e-9)
        assert float(value) == pytest.approx(float(exact), rel=1e-3, abs=1e-6)  # smooth net: O(h²) apart


def test_non_finite_loss_is_flagged_not_raised() -> None:
    case = make_case("mlp_ce")
    with torch.no_grad():
        case.model[0].weight[0, 0] = float("nan")
    eig = top_hessian_eigenvalues(case.model, case.loss_fn, case.batches)
    assert not eig.finite and math.isnan(float(eig.eigenvalues[0]))
    trace = hessian_trace(case.model, case.loss_fn, case.batches)
    assert not trace.finite and math.isnan(trace.trace)
    curv = directional_curvature(case.model, case.loss_fn, case.batches, num_directions=2)
    assert not curv.finite and torch.isnan(curv.values).all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"k": 0}, "k must be a positive integer, got 0"),
        ({"k": 2.5}, "k must be a positive integer, got 2.5"),
        ({"tol": 0.0}, "tol must be a positive finite number, got 0.0"),
        ({"max_iter": -1}, "max_iter must be a positive integer, got -1"),
        ({"k": 1000}, r"k must be at most the number of parameters \(43\), got 1000"),
        ({"route": "fd"}, "route must be one of .*got 'fd'"),
    ],
)
def test_eigenvalue_errors(kwargs: dict, message: str) -> None:
    case = make_case("mlp_ce")
    with pytest.raises(ValueError, match=message):
        top_hessian_eigenvalues(case.model, case.loss_fn, case.batches, **kwargs)


def test_input_errors_name_the_value() -> None:
    case = make_case("mlp_ce")
    with pytest.raises(ValueError, match="batches is empty"):
        hessian_trace(case.model, case.loss_fn, [])
    with pytest.raises(ValueError, match="a batch has 0 samples"):
        hessian_trace(case.model, case.loss_fn, (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0)))
    with pytest.raises(ValueError, match="batch tensor is on device meta, but the model is on cpu"):
        hessian_trace(case.model, case.loss_fn, (case.batches[0][0].to("meta"), case.batches[0][1]))
    with pytest.raises(ValueError, match="dtype torch.float32, but the model's parameters are torch.float64"):
        hessian_trace(case.model, case.loss_fn, (case.batches[0][0].float(), case.batches[0][1]))
    with pytest.raises(ValueError, match="loss_fn must return a scalar loss, got shape \\(7, 3\\)"):
        hessian_trace(case.model, lambda m, b: m(b[0]), case.batches[0])
    with pytest.raises(TypeError, match="loss_fn must return a Tensor, got float"):
        hessian_trace(case.model, lambda m, b: 1.0, case.batches[0])
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        hessian_trace(case.model, "not callable", case.batches[0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_trace(nn.ReLU(), case.loss_fn, case.batches[0])
    with pytest.raises(ValueError, match="method must be one of .*got 'exact'"):
        hessian_trace(case.model, case.loss_fn, case.batches, method="exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_samples must be at least 3 for hutch\\+\\+, got 2"):
        hessian_trace(case.model, case.loss_fn, case.batches, num_samples=2)
    with pytest.raises(ValueError, match="h must be a positive finite number, got 0"):
        directional_curvature(case.model, case.loss_fn, case.batches, h=0)
    with pytest.raises(ValueError, match="h must be a positive finite number, got -0.1"):
        directional_curvature(case.model, case.loss_fn, case.batches, h=-0.1)
    with pytest.raises(ValueError, match="num_directions must be a positive integer, got 0"):
        directional_curvature(case.model, case.loss_fn, case.batches, num_directions=0)
    with pytest.raises(ValueError, match="norm must be one of .*got 'dfilter'"):
        directional_curvature(case.model, case.loss_fn, case.batches, norm="dfilter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"init\['0.weight'\] has shape \(2,\), expected \(5, 4\)"):
        init = {k: torch.zeros(2, dtype=torch.float64) for k, _ in case.model.named_parameters()}
        top_hessian_eigenvalues(case.model, case.loss_fn, case.batches, init=init)


def test_measurements_leave_a_batchnorm_dropout_model_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    model.train()
    x = torch.randn(16, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (16,))
    model(x)  # non-trivial running statistics
    before = snapshot(model)
    for train_mode in (False, True):
        top_hessian_eigenvalues(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x, y),
                                train_mode=train_mode, negative=True)
        hessian_trace(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x, y), train_mode=train_mode)
        directional_curvature(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x, y),
                              train_mode=train_mode, exact=True)
    with hessian_operator(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x, y), route="func") as op:
        op.matvec(param_axpy(0.0, op.params, op.params))
    assert_untouched(before, model)
