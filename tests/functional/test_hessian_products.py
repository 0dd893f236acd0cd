"""Hessian-vector products against the dense Hessian, on every route, and the operator's bad-input errors."""

from __future__ import annotations

import pytest
import torch
from _cases import CASES, dense_reference_hessian, make_case

from lightning_geometry.functional.hessian import dense_hessian, hessian_operator
from lightning_geometry.functional.params import flatten_params, make_generator, random_direction


@pytest.mark.parametrize("route", ["graph", "func"])
@pytest.mark.parametrize("name", CASES)
def test_hvp_matches_dense_hessian(name: str, route: str) -> None:
    case = make_case(name)
    dense = dense_reference_hessian(case)
    with hessian_operator(case.model, case.loss_fn, case.batches, route=route) as op:
        vectors = [random_direction(op.params, make_generator(i)) for i in range(3)]
        singles = [flatten_params(op.matvec(v)) for v in vectors]
        batched = [flatten_params(hv) for hv in op.matmat(vectors, batched=True)]
        assert op.num_products == 6
    for v, single, vec in zip(vectors, singles, batched):
        expected = dense @ flatten_params(v)
        assert torch.allclose(single, expected, rtol=1e-8, atol=1e-12 * expected.norm())
        assert (single - expected).norm() <= 1e-8 * expected.norm()
        assert (vec - expected).norm() <= 1e-8 * expected.norm()


def test_dense_hessian_helper_matches_reference() -> None:
    case = make_case("cnn_ce")
    ours = dense_hessian(case.model, case.loss_fn, case.batches)
    assert torch.allclose(ours, dense_reference_hessian(case), rtol=1e-10, atol=1e-12)


def test_loss_over_batches_equals_loss_over_concatenation() -> None:
    case = make_case("mlp_ce")
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])
    with hessian_operator(case.model, case.loss_fn, case.batches) as split:
        split_loss = split.loss
        hv_split = flatten_params(split.matvec(random_direction(split.params, make_generator(1))))
    with hessian_operator(case.model, case.loss_fn, (x, y)) as whole:
        hv_whole = flatten_params(whole.matvec(random_direction(whole.params, make_generator(1))))
        assert split_loss == pytest.approx(whole.loss, rel=1e-12)
    assert torch.allclose(hv_split, hv_whole, rtol=1e-10, atol=1e-14)


def test_parameters_outside_the_loss_have_zero_rows() -> None:
    case = make_case("mlp_ce")
    case.model[0].register_parameter("unused", torch.nn.Parameter(torch.ones(2, dtype=torch.float64)))
    with hessian_operator(case.model, case.loss_fn, case.batches) as op:
        hv = op.matvec(random_direction(op.params, make_generator(0)))
    assert torch.count_nonzero(hv["0.unused"]) == 0


def test_operator_errors() -> None:
    case = make_case("mlp_ce")
    with pytest.raises(ValueError, match="route must be one of .* got 'backpack'"):
        with hessian_operator(case.model, case.loss_fn, case.batches, route="backpack"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="batches is empty"):
        with hessian_operator(case.model, case.loss_fn, []):
            pass
    with hessian_operator(case.model, case.loss_fn, case.batches) as op:
        bad = {k: v.float() for k, v in op.params.items()}
        with pytest.raises(ValueError, match=r"vector\['0.weight'\] has dtype torch.float32, expected torch.float64"):
            op.matvec(bad)
        with pytest.raises(ValueError, match="different parameter names"):
            op.matvec({"w": torch.zeros(1)})
