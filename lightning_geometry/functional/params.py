r"""Parameter dictionaries: algebra, flattening, random and filter-normalized directions.

Parameter space is ``dict[str, Tensor]`` everywhere, the shape that ``named_parameters()`` and
:func:`torch.func.functional_call` use (the convention curvlinops adopted). A direction, a Hessian-vector product
and an eigenvector are all dictionaries with the same keys and shapes as the parameters.

Filter normalization follows Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets" (NeurIPS): a
random Gaussian direction :math:`d` is rescaled filter by filter so that

.. math::
    d_{i,j} \leftarrow \frac{d_{i,j}}{\lVert d_{i,j} \rVert} \lVert \theta_{i,j} \rVert,

where :math:`d_{i,j}` is the j-th filter (first-dimension slice) of layer i. With ``norm="layer"`` the whole
tensor is rescaled at once. One-dimensional tensors (biases, normalization-layer scales and shifts) are set to
zero by default (``ignore="biasbn"``, as in the reference ``net_plotter.py``), because a direction on them is not
comparable across networks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

ParamDict = dict[str, Tensor]
DirectionNorm = Literal["filter", "layer", "none"]
DirectionIgnore = Literal["biasbn", "none"]

_NORMS = ("filter", "layer", "none")
_IGNORES = ("biasbn", "none")


def trainable_parameters(model: nn.Module) -> ParamDict:
    """Return the model's trainable parameters as a name-to-tensor dictionary.

    The tensors are the model's own (no copy); callers that differentiate detach them first.

    Raises:
        ValueError: If the model has no parameter with ``requires_grad=True``.
    """
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"model has no trainable parameters (type {type(model).__name__}); nothing to measure")
    return params


def check_same_structure(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "direction") -> None:
    """Raise a ``ValueError`` naming the first key, shape, dtype or device that differs between ``a`` and ``b``."""
    if list(a) != list(b):
        missing = [k for k in a if k not in b]
        extra = [k for k in b if k not in a]
        raise ValueError(
            f"{what} has different parameter names: missing {missing[:3]}, unexpected {extra[:3]}"
            if missing or extra
            else f"{what} lists the parameters in a different order"
        )
    for name, ta in a.items():
        tb = b[name]
        if ta.shape != tb.shape:
            raise ValueError(f"{what}[{name!r}] has shape {tuple(tb.shape)}, expected {tuple(ta.shape)}")
        if ta.dtype != tb.dtype:
            raise ValueError(f"{what}[{name!r}] has dtype {tb.dtype}, expected {ta.dtype}")
        if ta.device != tb.device:
            raise ValueError(f"{what}[{name!r}] is on device {tb.device}, expected {ta.device}")


def param_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    r"""Inner product :math:`\sum_k \langle a_k, b_k \rangle` as a 0-d tensor."""
    return sum((torch.sum(a[k] * b[k]) for k in a), torch.zeros((), dtype=_dtype(a), device=_device(a)))


def param_norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm of the concatenated tensors, as a 0-d tensor."""
    return torch.sqrt(param_dot(a, a))


def param_axpy(alpha: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> ParamDict:
    r"""Return :math:`y + \alpha x` as a new dictionary."""
    return {k: y[k] + alpha * x[k] for k in y}


def param_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> ParamDict:
    """Return ``a - b`` as a new dictionary."""
    return {k: a[k] - b[k] for k in a}


def flatten_params(params: Mapping[str, Tensor]) -> Tensor:
    """Concatenate the tensors into one flat vector, in dictionary order."""
    return torch.cat([t.reshape(-1) for t in params.values()])


def unflatten_params(vector: Tensor, like: Mapping[str, Tensor]) -> ParamDict:
    """Split a flat vector into tensors shaped like ``like`` (inverse of :func:`flatten_params`).

    Raises:
        ValueError: If ``vector`` is not 1-D with as many entries as ``like`` holds.
    """
    total = sum(t.numel() for t in like.values())
    if vector.dim() != 1 or vector.numel() != total:
        raise ValueError(f"vector must be 1-D with {total} entries, got shape {tuple(vector.shape)}")
    out: ParamDict = {}
    offset = 0
    for name, t in like.items():
        out[name] = vector[offset : offset + t.numel()].view_as(t)
        offset += t.numel()
    return out


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator, so that drawing directions never touches the global RNG streams."""
    return torch.Generator(device=device).manual_seed(int(seed))


def random_direction(
    like: Mapping[str, Tensor],
    generator: torch.Generator,
    distribution: Literal["gaussian", "rademacher"] = "gaussian",
) -> ParamDict:
    """Draw a random direction shaped like ``like`` from a private generator.

    Values are drawn on the generator's device and moved to each tensor's device, so one CPU generator gives the
    same direction on any device.

    Raises:
        ValueError: If ``distribution`` is unknown.
    """
    if distribution not in ("gaussian", "rademacher"):
        raise ValueError(f"distribution must be 'gaussian' or 'rademacher', got {distribution!r}")
    out: ParamDict = {}
    for name, t in like.items():
        if distribution == "gaussian":
            sample = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device)
        else:
            bits = torch.randint(0, 2, t.shape, generator=generator, device=generator.device)
            sample = (2 * bits - 1).to(t.dtype)
        out[name] = sample.to(t.device)
    return out


def normalize_direction(
    direction: Mapping[str, Tensor],
    params: Mapping[str, Tensor],
    norm: DirectionNorm = "filter",
    ignore: DirectionIgnore = "biasbn",
) -> ParamDict:
    r"""Rescale a direction to the weights it perturbs (Li et al. 2018).

    Args:
        direction: The raw direction, same structure as ``params``.
        params: The weights :math:`\theta` whose filter (or layer) norms the direction takes.
        norm: ``"filter"`` rescales each first-dimension slice to the norm of the matching weight slice,
            ``"layer"`` each tensor as a whole, ``"none"`` leaves the direction as it is.
        ignore: ``"biasbn"`` zeroes the direction on 1-D tensors (biases, norm-layer parameters);
            ``"none"`` treats them like any other tensor (a 1-D tensor's filters are its scalars).

    Returns:
        The normalized direction, a new dictionary.

    Raises:
        ValueError: If ``norm`` or ``ignore`` is unknown, or the structures differ.
    """
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {_NORMS}, got {norm!r}")
    if ignore not in _IGNORES:
        raise ValueError(f"ignore must be one of {_IGNORES}, got {ignore!r}")
    check_same_structure(params, direction)
    out: ParamDict = {}
    for name, d in direction.items():
        w = params[name]
        if d.dim() <= 1 and ignore == "biasbn":
            out[name] = torch.zeros_like(d)
        elif norm == "none":
            out[name] = d.clone()
        elif norm == "layer":
            out[name] = d * (w.norm() / (d.norm() + 1e-10))
        else:
            rows = d.shape[0] if d.dim() else 1
            d2, w2 = d.reshape(rows, -1), w.reshape(rows, -1)
            scale = w2.norm(dim=1, keepdim=True) / (d2.norm(dim=1, keepdim=True) + 1e-10)
            out[name] = (d2 * scale).reshape(d.shape)
    return out


def filter_normalized_direction(
    params: Mapping[str, Tensor],
    generator: torch.Generator,
    norm: DirectionNorm = "filter",
    ignore: DirectionIgnore = "biasbn",
) -> ParamDict:
    """A Gaussian direction drawn from ``generator`` and normalized to ``params`` (see :func:`normalize_direction`)."""
    return normalize_direction(random_direction(params, generator), params, norm=norm, ignore=ignore)


def _dtype(a: Mapping[str, Tensor]) -> torch.dtype:
    return next(iter(a.values())).dtype


def _device(a: Mapping[str, Tensor]) -> torch.device:
    return next(iter(a.values())).device
