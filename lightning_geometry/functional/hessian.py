r"""Hessian-vector products of the loss closure, through one interface with two routes.

The operator is the Hessian of the size-weighted empirical risk (see :mod:`.closure`)

.. math::
    H = \nabla^2_\theta L(\theta) = \sum_b \frac{n_b}{N} \nabla^2_\theta \ell(\theta; B_b),

applied to parameter dictionaries without ever forming it (Pearlmutter 1994, "Fast exact multiplication by the
Hessian").

Routes (``route=``):

``"graph"`` (default)
    Reverse-over-reverse with the gradient graph built once per operator: :math:`g = \nabla L` is computed with
    ``create_graph=True`` and every product is one ``torch.autograd.grad(g, θ, v, retain_graph=True)``. It costs
    one backward pass through the gradient graph per product, and keeps the graph (about two activations' worth
    per batch) alive while the operator lives. Measured on 2 CPU cores, full-batch digits
    (``benchmarks/RESULTS.md``): 1.93–1.96 gradient costs per product on the MLP 64-256-256-10, 2.10 on a
    small CNN — the cheapest route here, level with PyHessian's reused graph (1.92–2.04, 2.12–2.23), against
    3.1–3.4 for a fresh double backward per product.
``"func"``
    Forward-over-reverse, ``torch.func.jvp`` of ``torch.func.grad`` over ``functional_call`` (the route of
    curvlinops and the torch.func tutorial). No graph is kept between products, so memory stays at one batch's
    worth whatever the number of batches, at 3.6 gradient costs per product here plus a fixed ~1.7 ms per
    product for the transforms. Use it when the probe data or the model is large, and on accelerators where
    the extra forward pass is cheap. Operators without a forward-mode rule in their backward (``mse_loss`` in
    torch 2.13) fall back to ``vjp`` of ``grad``, which gives the same product because :math:`H` is symmetric.

:meth:`HessianOperator.matmat` applies the operator to several vectors; ``batched=True`` vectorises them
(``is_grads_batched`` on the graph route, ``vmap`` on the func route). Over 10 vectors on CPU that cost 2.7 and
2.5 gradients per product on the MLP (2.55, 2.57 on the CNN): it beats the func loop, not the graph loop, so
loops over the reused graph are the default and the option is there for accelerators and dense references.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_geometry.functional.closure import LossClosure, LossFn, is_finite, measurement
from lightning_geometry.functional.params import ParamDict, check_same_structure, flatten_params, unflatten_params

HvpRoute = Literal["graph", "func"]
_ROUTES = ("graph", "func")


class HessianOperator:
    """The Hessian of a :class:`LossClosure` at the model's weights, as a linear operator on parameter dicts.

    Build it with :func:`hessian_operator`, which also holds the measurement context open while it is used.

    Attributes:
        params: The point :math:`\\theta` (detached views of the model's trainable parameters).
        loss: :math:`L(\\theta)` as a float (nan or inf if the loss is not finite).
        num_products: Hessian-vector products computed so far (each vector of a ``matmat`` counts one).
        route: The differentiation route in use.
    """

    def __init__(self, closure: LossClosure, route: HvpRoute = "graph") -> None:
        if route not in _ROUTES:
            raise ValueError(f"route must be one of {_ROUTES}, got {route!r}")
        self.closure = closure
        self.route = route
        self.num_products = 0
        self.params: ParamDict = dict(closure.params)
        self.dim = sum(p.numel() for p in self.params.values())
        self._forward_over_reverse = True
        if route == "graph":
            self._leaves = {k: v.detach().requires_grad_(True) for k, v in self.params.items()}
            loss = sum(w * closure.batch_loss(self._leaves, b) for w, b in zip(closure.weights, closure.batches))
            grads = torch.autograd.grad(loss, list(self._leaves.values()), create_graph=True, allow_unused=True)
            # Only gradient entries that depend on θ carry second-order information; the rest have H = 0 rows.
            self._linked = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
            self._grads = [grads[i] for i in self._linked]
            self.loss = float(loss.detach())
        else:
            self.loss = float(closure())

    @property
    def finite(self) -> bool:
        """Whether the loss at :math:`\\theta` is finite (a non-finite loss makes every product meaningless)."""
        return is_finite(self.loss)

    def matvec(self, vector: Mapping[str, Tensor]) -> ParamDict:
        """:math:`Hv` for one parameter dictionary ``v``."""
        check_same_structure(self.params, vector, "vector")
        self.num_products += 1
        if self.route == "graph":
            return self._graph_hvp(list(vector.values()), batched=False)
        return self._func_hvp(vector)

    def matmat(self, vectors: Sequence[Mapping[str, Tensor]], batched: bool = False) -> list[ParamDict]:
        """:math:`Hv_i` for several vectors; ``batched=True`` vectorises them (see the module notes)."""
        if not batched or len(vectors) == 1:
            return [self.matvec(v) for v in vectors]
        for v in vectors:
            check_same_structure(self.params, v, "vector")
        self.num_products += len(vectors)
        stacked = {k: torch.stack([v[k] for v in vectors]) for k in self.params}
        if self.route == "graph":
            out = self._graph_hvp(list(stacked.values()), batched=True)
        else:
            out = torch.func.vmap(self._func_hvp, randomness="same")(stacked)
        return [{k: out[k][i] for k in self.params} for i in range(len(vectors))]

    def matvec_flat(self, vector: Tensor) -> Tensor:
        """:math:`Hv` for a flat vector in the order of :attr:`params`."""
        return flatten_params(self.matvec(unflatten_params(vector, self.params)))

    def _graph_hvp(self, vector: list[Tensor], batched: bool) -> ParamDict:
        leaves = list(self._leaves.values())
        if not self._grads:
            zeros = [torch.zeros_like(v) for v in vector]
            return dict(zip(self.params, zeros))
        hv = torch.autograd.grad(
            self._grads,
            leaves,
            [vector[i] for i in self._linked],
            retain_graph=True,
            allow_unused=True,
            materialize_grads=True,
            is_grads_batched=batched,
        )
        return {k: t.detach() for k, t in zip(self.params, hv)}

    def _func_hvp(self, vector: Mapping[str, Tensor]) -> ParamDict:
        closure = self.closure
        total: ParamDict | None = None
        for w, batch in zip(closure.weights, closure.batches):
            grad_fn = torch.func.grad(lambda p, b=batch: closure.batch_loss(p, b))
            hv = self._func_product(grad_fn, dict(vector))
            total = {k: w * t for k, t in hv.items()} if total is None else {k: total[k] + w * hv[k] for k in hv}
        assert total is not None
        return total

    def _func_product(self, grad_fn: Any, vector: ParamDict) -> ParamDict:
        """Forward-over-reverse; reverse-over-reverse (``vjp`` of ``grad``, equal since H is symmetric) for
        operators whose backward has no forward-mode rule (seen: ``mse_loss`` in torch 2.13 raises
        "ZeroTensors are immutable")."""
        if self._forward_over_reverse:
            try:
                return torch.func.jvp(grad_fn, (self.params,), (vector,))[1]
            except (RuntimeError, NotImplementedError):
                self._forward_over_reverse = False
        return torch.func.vjp(grad_fn, self.params)[1](vector)[0]


@contextlib.contextmanager
def hessian_operator(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    *,
    route: HvpRoute = "graph",
    train_mode: bool = False,
) -> Iterator[HessianOperator]:
    """Open a Hessian operator at the model's current weights, inside a :func:`~.closure.measurement` context.

    Args:
        model: The module; its parameters, buffers, ``.grad`` and modes are left as they were.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: One batch or an iterable of batches.
        route: ``"graph"`` or ``"func"`` (see the module notes).
        train_mode: Measure in train mode (dropout active, BatchNorm on batch statistics) instead of eval mode.

    Yields:
        The operator; products are valid only inside the ``with`` block.

    Raises:
        ValueError: If ``route`` is unknown, the batches are empty or on another device, or the model has no
            trainable parameters.
    """
    if route not in _ROUTES:
        raise ValueError(f"route must be one of {_ROUTES}, got {route!r}")
    closure = LossClosure(model, loss_fn, batches)
    with measurement(model, train_mode):
        yield HessianOperator(closure, route)


def dense_hessian(
    model: nn.Module, loss_fn: LossFn, batches: Any, train_mode: bool = False, chunk_size: int = 64
) -> Tensor:
    """The full Hessian matrix of the loss closure, in the flattened order of the trainable parameters.

    Built from Hessian-vector products with the unit vectors, ``chunk_size`` columns at a time on the reused
    gradient graph, so memory stays at one graph plus ``chunk_size`` columns (``torch.func.hessian`` would hold
    every column's activations at once). Costs one product per parameter: for references on small models.
    """
    with hessian_operator(model, loss_fn, batches, train_mode=train_mode) as operator:
        like = operator.params
        first = next(iter(like.values()))
        eye = torch.eye(operator.dim, dtype=first.dtype, device=first.device)
        columns = []
        for start in range(0, operator.dim, chunk_size):
            units = [unflatten_params(e, like) for e in eye[start : start + chunk_size]]
            columns += [flatten_params(hv) for hv in operator.matmat(units, batched=True)]
        return torch.stack(columns, dim=1)
