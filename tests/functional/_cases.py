"""Small float64 cases and independent dense references for the functional core.

The references never go through ``lightning_geometry``: they build the flat loss with
``torch.func.functional_call`` on the model directly and differentiate it with ``torch.func.hessian``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


def cross_entropy(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def mse(model: nn.Module, batch: Any) -> Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


@dataclass
class Case:
    name: str
    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    batches: list[tuple[Tensor, Tensor]]


def _split(x: Tensor, y: Tensor, sizes: list[int]) -> list[tuple[Tensor, Tensor]]:
    return list(zip(torch.split(x, sizes), torch.split(y, sizes)))


def make_case(name: str, seed: int = 0) -> Case:
    """``mlp_ce``, ``mlp_mse``, ``cnn_ce``, ``cnn_mse``: float64, uneven batches (7 + 13 samples)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    arch, loss = name.split("_")
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
        x = torch.randn(20, 1, 5, 5, generator=g, dtype=torch.float64)
    model = model.double()
    if loss == "ce":
        y = torch.randint(0, 3, (20,), generator=g)
        fn = cross_entropy
    else:
        y = torch.randn(20, 3, generator=g, dtype=torch.float64)
        fn = mse
    return Case(name, model, fn, _split(x, y, [7, 13]))


CASES = ["mlp_ce", "mlp_mse", "cnn_ce", "cnn_mse"]


def flat_loss(case: Case) -> tuple[Callable[[Tensor], Tensor], Tensor, dict[str, Tensor]]:
    """The loss over the concatenated batches as a function of the flat parameter vector."""
    params = {k: p.detach() for k, p in case.model.named_parameters()}
    x = torch.cat([b[0] for b in case.batches])
    y = torch.cat([b[1] for b in case.batches])

    def f(vec: Tensor) -> Tensor:
        out, offset = {}, 0
        for k, p in params.items():
            out[k] = vec[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return case.loss_fn(lambda inp: torch.func.functional_call(case.model, out, (inp,)), (x, y))

    return f, torch.cat([p.reshape(-1) for p in params.values()]), params


def dense_reference_hessian(case: Case) -> Tensor:
    f, flat, _ = flat_loss(case)
    return torch.func.hessian(f)(flat)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a measurement must leave alone."""
    import random

    import numpy as np

    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {k: None if p.grad is None else p.grad.clone() for k, p in model.named_parameters()},
        "modes": [m.training for m in model.modules()],
        "torch_rng": torch.get_rng_state(),
        "np_rng": np.random.get_state()[1].copy(),
        "py_rng": random.getstate(),
    }


def assert_untouched(before: dict[str, Any], model: nn.Module) -> None:
    after = snapshot(model)
    for k, v in before["state"].items():
        assert torch.equal(v, after["state"][k]), f"state {k} changed"
    for k, g in before["grads"].items():
        assert (g is None and after["grads"][k] is None) or torch.equal(g, after["grads"][k]), f"grad {k} changed"
    assert before["modes"] == after["modes"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    assert (before["np_rng"] == after["np_rng"]).all()
    assert before["py_rng"] == after["py_rng"]
