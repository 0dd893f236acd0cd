"""Parameter-dict algebra and filter normalization (Li et al. 2018) against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_geometry.functional.params import (
    filter_normalized_direction,
    flatten_params,
    make_generator,
    normalize_direction,
    param_axpy,
    param_dot,
    param_norm,
    random_direction,
    trainable_parameters,
    unflatten_params,
)


def conv_params() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 3)).double()
    return {k: v.detach() for k, v in trainable_parameters(model).items()}


def test_algebra_matches_flat_vectors() -> None:
    a = conv_params()
    b = random_direction(a, make_generator(1))
    fa, fb = flatten_params(a), flatten_params(b)
    assert float(param_dot(a, b)) == pytest.approx(float(fa @ fb), rel=1e-12)
    assert float(param_norm(a)) == pytest.approx(float(fa.norm()), rel=1e-12)
    assert torch.equal(flatten_params(param_axpy(2.0, a, b)), fb + 2.0 * fa)
    round_trip = unflatten_params(fa, a)
    assert all(torch.equal(round_trip[k], a[k]) for k in a)
    with pytest.raises(ValueError, match=r"vector must be 1-D with 99 entries, got shape \(3,\)"):
        unflatten_params(torch.zeros(3), a)


@pytest.mark.parametrize("ignore", ["biasbn", "none"])
def test_filter_norms_match_weight_filters(ignore: str) -> None:
    params = conv_params()
    direction = filter_normalized_direction(params, make_generator(0), "filter", ignore)
    for name, d in direction.items():
        w = params[name]
        if w.dim() <= 1 and ignore == "biasbn":
            assert torch.count_nonzero(d) == 0
            continue
        rows = w.shape[0]
        assert torch.allclose(d.reshape(rows, -1).norm(dim=1), w.reshape(rows, -1).norm(dim=1), rtol=1e-8)


def test_layer_and_none_normalization() -> None:
    params = conv_params()
    raw = random_direction(params, make_generator(2))
    layer = normalize_direction(raw, params, "layer", "none")
    none = normalize_direction(raw, params, "none", "none")
    for name in params:
        assert float(layer[name].norm()) == pytest.approx(float(params[name].norm()), rel=1e-8, abs=1e-12)
        assert torch.equal(none[name], raw[name])


def test_directions_are_reproducible_and_leave_global_rng_alone() -> None:
    params = conv_params()
    state = torch.get_rng_state()
    first = filter_normalized_direction(params, make_generator(7))
    second = filter_normalized_direction(params, make_generator(7))
    assert all(torch.equal(first[k], second[k]) for k in params)
    assert torch.equal(state, torch.get_rng_state())
    rademacher = random_direction(params, make_generator(0), "rademacher")
    assert all(set(v.unique().tolist()) <= {-1.0, 1.0} for v in rademacher.values())


def test_errors_name_the_value() -> None:
    params = conv_params()
    with pytest.raises(ValueError, match="norm must be one of .*got 'dfilter'"):
        normalize_direction(params, params, "dfilter")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="ignore must be one of .*got 'bias'"):
        normalize_direction(params, params, "filter", "bias")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="distribution must be 'gaussian' or 'rademacher', got 'uniform'"):
        random_direction(params, make_generator(0), "uniform")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no trainable parameters"):
        trainable_parameters(nn.Sequential(nn.ReLU()))
