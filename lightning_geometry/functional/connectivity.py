r"""Mode connectivity: loss barriers on linear paths and Bezier curves, and permutation alignment of hidden units.

Linear interpolation barrier (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis";
Entezari et al. 2022). For two weight sets :math:`\theta_0, \theta_1` and the path
:math:`\theta(t) = \theta_0 + t(\theta_1 - \theta_0)`,

.. math::
    B = \max_{t \in [0, 1]} \Big( L(\theta(t)) - \big[(1 - t) L(\theta_0) + t L(\theta_1)\big] \Big),

the height of the loss above the straight line between the end losses; the same with the test error gives the
error barrier. BatchNorm running statistics are *re-estimated* at every point of a path on given data (fresh
statistics, cumulative average over the batches, as ``torch.optim.swa_utils.update_bn`` does): the statistics
stored with either end model do not describe the interpolated network, and a barrier measured with them is largely
an artefact (Jordan et al. 2023, "REPAIR").

Quadratic Bezier curve (Garipov et al. 2018, "Loss Surfaces, Mode Connectivity, and Fast Ensembling of DNNs"):

.. math::
    \theta(t) = (1 - t)^2 \theta_0 + 2 t (1 - t) \theta_b + t^2 \theta_1,

with one trainable bend :math:`\theta_b` fitted by minimizing :math:`\mathbb{E}_{t \sim U(0, 1)} L(\theta(t))`
with stochastic gradients, :math:`t` and the batch drawn from a private generator. The curve is a function of
parameter dictionaries evaluated with :func:`torch.func.functional_call`, so no model is rewritten with curve
layers. With the bend at the midpoint the curve is the straight line.

Weight matching (Ainsworth et al. 2023, "Git Re-Basin: Merging Models modulo Permutation Symmetries", ICLR,
Algorithm 1): hidden units of a feed-forward network can be permuted without changing its function. For each
hidden layer's permutation :math:`P_\ell` in turn, holding the others fixed, solve the linear assignment problem

.. math::
    \max_{P_\ell} \Big\langle \textstyle\sum_{W \ni \ell} W^{(0)}_{[\ell]} , P_\ell W^{(1)}_{[\ell]} \Big\rangle_F

over every tensor that the permutation touches (its layer's weights and bias as rows, BatchNorm parameters, the
next layer's weights as columns), and sweep until no permutation changes. A barrier that vanishes after alignment
says "same basin up to a permutation of units"; one that persists says "different basins".

The functions here take a :class:`~lightning_geometry.functional.closure.LossClosure` and evaluate the model in
the mode it is in. Call them inside :func:`~lightning_geometry.functional.closure.measurement` (eval mode, global
RNG streams restored), as the callbacks do, unless you mean to measure with dropout active.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from lightning_geometry.functional._checks import check_positive, check_positive_int
from lightning_geometry.functional.closure import LossClosure, LossFn, as_batch_list
from lightning_geometry.functional.params import ParamDict, check_same_structure, make_generator

Progress = Callable[[int], object]

__all__ = [
    "BezierCurve",
    "PathResult",
    "PermutationSpec",
    "apply_permutation",
    "bezier_barrier",
    "bezier_point",
    "evaluate_path",
    "fit_bezier",
    "interpolate",
    "interpolation_barrier",
    "path_barrier",
    "permutation_spec",
    "reestimate_bn",
    "weight_matching",
]


# --------------------------------------------------------------------------------------------------- evaluation
def batchnorm_modules(model: nn.Module) -> dict[str, _BatchNorm]:
    """The model's BatchNorm layers that keep running statistics, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats}


def _weighted_mean(closure: LossClosure, fn: Callable[[Any], Tensor]) -> float:
    return float(sum(w * fn(b).detach() for w, b in zip(closure.weights, closure.batches)))


def reestimate_bn(
    closure: LossClosure, params: Mapping[str, Tensor], batches: Any | None = None
) -> dict[str, Tensor]:
    r"""Fresh BatchNorm running statistics for the network at ``params``, computed on ``batches``.

    Every buffer of the model is cloned; the BatchNorm ones are reset (mean 0, variance 1, count 0) and updated by
    forward passes over ``batches`` with the BatchNorm layers in train mode and ``momentum=None`` (a cumulative
    average over the batches, as ``torch.optim.swa_utils.update_bn``), every other module in eval mode, all through
    :func:`torch.func.functional_call` on the clones. The model's tensors are never written; its modules' ``training``
    flags and ``momentum`` attributes are set for the passes and restored after.

    Args:
        closure: The loss closure (its model and loss function make the forward pass).
        params: The weights at which to estimate the statistics.
        batches: Data for the estimate; the closure's batches if ``None``.

    Returns:
        A new dictionary of every buffer of the model, BatchNorm statistics re-estimated.
    """
    model = closure.model
    buffers = {k: b.detach().clone() for k, b in model.named_buffers()}
    bns = batchnorm_modules(model)
    if not bns:
        return buffers
    data = closure.batches if batches is None else as_batch_list(batches)
    for name in bns:
        prefix = f"{name}." if name else ""
        buffers[f"{prefix}running_mean"].zero_()
        buffers[f"{prefix}running_var"].fill_(1.0)
        buffers[f"{prefix}num_batches_tracked"].zero_()
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in bns.values()}
    try:
        for m in model.modules():
            m.training = isinstance(m, _BatchNorm) and m in momenta
        for m in bns.values():
            m.momentum = None
        with torch.no_grad():
            for batch in data:
                closure.batch_loss(params, batch, buffers)
    finally:
        for m, mode in modes.items():
            m.training = mode
        for m, momentum in momenta.items():
            m.momentum = momentum
    return buffers


@dataclass
class PathResult:
    r"""Loss (and error) along a path :math:`t \mapsto \theta(t)`, :math:`t \in [0, 1]`.

    Attributes:
        ts: The path coordinates.
        losses: :math:`L(\theta(t))`; non-finite values are kept.
        barrier: :math:`\max_t L(\theta(t)) - [(1-t)L(\theta(0)) + tL(\theta(1))]` over ``ts``.
        barrier_t: The :math:`t` where the maximum is reached.
        errors: The error along the path if an ``error_fn`` was given, else ``None``.
        error_barrier: The same barrier for ``errors`` (``None`` without ``error_fn``).
        bn_reestimated: Whether BatchNorm statistics were re-estimated at each point.
    """

    ts: np.ndarray
    losses: np.ndarray
    barrier: float
    barrier_t: float
    errors: np.ndarray | None = None
    error_barrier: float | None = None
    bn_reestimated: bool = False


def path_barrier(ts: Sequence[float] | np.ndarray, values: Sequence[float] | np.ndarray) -> tuple[float, float]:
    r"""Barrier :math:`\max_i v_i - [v_0 + t_i (v_{-1} - v_0)]` of values along a path, and the :math:`t_i` of it.

    ``ts`` must run from 0 to 1. The value is nan if any value is nan (a barrier over an unknown point is unknown).

    Raises:
        ValueError: If the lengths differ, there are fewer than 2 points, or ``ts`` does not start at 0 and end at 1.
    """
    t = np.asarray(ts, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    if t.shape != v.shape or t.ndim != 1 or t.size < 2:
        raise ValueError(f"ts and values must be 1-D of the same length >= 2, got {t.shape} and {v.shape}")
    if t[0] != 0.0 or t[-1] != 1.0:
        raise ValueError(f"ts must start at 0 and end at 1, got {t[0]} and {t[-1]}")
    if np.isnan(v).any():
        return math.nan, math.nan
    excess = v - (v[0] + t * (v[-1] - v[0]))
    i = int(np.argmax(excess))
    return float(excess[i]), float(t[i])


def _path_ts(num_points: int) -> np.ndarray:
    if isinstance(num_points, bool) or not isinstance(num_points, int):
        raise TypeError(f"num_points must be an int, got {type(num_points).__name__}")
    if num_points < 3:
        raise ValueError(f"num_points must be >= 3, got {num_points}")
    return np.arange(num_points, dtype=np.float64) / (num_points - 1)


def evaluate_path(
    closure: LossClosure,
    point: Callable[[float], ParamDict],
    ts: Sequence[float] | np.ndarray,
    *,
    error_fn: LossFn | None = None,
    reestimate: bool = True,
    bn_batches: Any | None = None,
    buffers: Callable[[float], Mapping[str, Tensor]] | None = None,
    progress: Progress | None = None,
) -> PathResult:
    r"""Loss (and error) at :math:`\theta(t)` = ``point(t)`` for each ``t`` in ``ts``, and the barrier.

    Args:
        closure: The loss closure; its batches and weights are used for the loss and the error.
        point: ``t -> parameter dictionary``.
        ts: Coordinates from 0 to 1.
        error_fn: ``error_fn(model, batch) -> scalar Tensor`` (e.g. the misclassification rate), averaged like the
            loss.
        reestimate: Re-estimate BatchNorm statistics at each point (see :func:`reestimate_bn`); a no-op for a
            model without BatchNorm.
        bn_batches: Data for the re-estimation; the closure's batches if ``None``.
        buffers: ``t -> buffers`` used when not re-estimating; the model's own buffers if ``None``.
        progress: Called with 1 after each point.

    Returns:
        A :class:`PathResult`.
    """
    model = closure.model
    bn = bool(batchnorm_modules(model)) and reestimate
    bn_data = None if bn_batches is None else as_batch_list(bn_batches)
    own = {k: b.detach() for k, b in model.named_buffers()}
    ts = np.asarray(ts, dtype=np.float64)
    losses = np.empty(ts.size)
    errors = np.empty(ts.size) if error_fn is not None else None
    if error_fn is not None and not callable(error_fn):
        raise TypeError(f"error_fn must be callable as error_fn(model, batch), got {type(error_fn).__name__}")
    error_closure = closure.with_loss_fn(error_fn) if error_fn is not None else None
    with torch.no_grad():
        for i, t in enumerate(ts):
            params = point(float(t))
            if bn:
                bufs = reestimate_bn(closure, params, bn_data)
            else:
                bufs = {k: v.clone() for k, v in (own if buffers is None else buffers(float(t))).items()}
            losses[i] = _weighted_mean(closure, lambda b: closure.batch_loss(params, b, bufs))
            if error_closure is not None:
                errors[i] = _weighted_mean(closure, lambda b: error_closure.batch_loss(params, b, bufs))
            if progress is not None:
                progress(1)
    barrier, barrier_t = path_barrier(ts, losses)
    error_barrier = path_barrier(ts, errors)[0] if errors is not None else None
    return PathResult(
        ts=ts,
        losses=losses,
        barrier=barrier,
        barrier_t=barrier_t,
        errors=errors,
        error_barrier=error_barrier,
        bn_reestimated=bn,
    )


# --------------------------------------------------------------------------------------------------- linear path
def interpolate(a: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> ParamDict:
    r""":math:`a + t (b - a)` as new tensors: exactly ``a`` at 0, exactly ``b`` at 1 and, for ``a == b``, exactly
    ``a`` everywhere. Non-floating tensors (e.g. ``num_batches_tracked``) are taken from ``a``."""
    if t == 1.0:
        return {k: b[k].clone() if a[k].is_floating_point() else a[k].clone() for k in a}
    return {k: a[k] + t * (b[k] - a[k]) if a[k].is_floating_point() else a[k].clone() for k in a}


class _Line:
    """:math:`a + t (b - a)` written into preallocated tensors (one allocation per path, not per point; the
    evaluation of a point is finished before the next is written). Same exact ends as :func:`interpolate`."""

    def __init__(self, a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> None:
        self.a, self.b = a, b
        self.diff = {k: b[k] - a[k] for k in a}
        self.out = {k: torch.empty_like(v) for k, v in a.items()}

    def __call__(self, t: float) -> ParamDict:
        for k, out in self.out.items():
            if t == 1.0:
                out.copy_(self.b[k])
            else:
                torch.add(self.a[k], self.diff[k], alpha=t, out=out)
        return self.out


def interpolation_barrier(
    closure: LossClosure,
    params_a: Mapping[str, Tensor] | None,
    params_b: Mapping[str, Tensor],
    *,
    num_points: int = 21,
    error_fn: LossFn | None = None,
    reestimate: bool = True,
    bn_batches: Any | None = None,
    buffers_a: Mapping[str, Tensor] | None = None,
    buffers_b: Mapping[str, Tensor] | None = None,
    progress: Progress | None = None,
) -> PathResult:
    r"""Loss barrier on the straight line :math:`\theta_a + t(\theta_b - \theta_a)` (Frankle et al. 2020).

    Args:
        closure: The loss closure (its model's architecture; its weights are :math:`\theta_a` if ``params_a`` is
            ``None``).
        params_a: :math:`\theta_a`, or ``None`` for the closure's model weights.
        params_b: :math:`\theta_b`, with the same names, shapes, dtypes and devices.
        num_points: Evenly spaced :math:`t` from 0 to 1, ends included (>= 3; odd puts a point at 1/2).
        error_fn: Optional ``error_fn(model, batch)`` for the error barrier.
        reestimate: Re-estimate BatchNorm statistics at each point on ``bn_batches`` (recommended); without it
            the buffers are interpolated linearly between ``buffers_a`` and ``buffers_b``.
        bn_batches: Data for the re-estimation; the closure's batches if ``None``.
        buffers_a: Buffers of :math:`\theta_a` when not re-estimating; the model's own if ``None``.
        buffers_b: Buffers of :math:`\theta_b` when not re-estimating; ``buffers_a`` if ``None``.
        progress: Called with 1 after each point.

    Returns:
        A :class:`PathResult`; the barrier of a model with itself is exactly 0.

    Raises:
        ValueError: If the parameter dictionaries differ in names or shapes (naming the first mismatch), or
            ``num_points < 3``.

    Example:
        The double well :math:`(x^2 - 1)^2` between its minima :math:`\pm 1` has barrier 1 at :math:`t = 1/2`:

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> closure = LossClosure(model, lambda m, b: ((m.weight ** 2 - 1) ** 2).sum(),
        ...                       torch.zeros(1, 1, dtype=torch.float64))
        >>> one = torch.ones(1, 1, dtype=torch.float64)
        >>> result = interpolation_barrier(closure, {"weight": -one}, {"weight": one}, num_points=5)
        >>> result.barrier, result.barrier_t
        (1.0, 0.5)
    """
    ts = _path_ts(num_points)
    a = closure.params if params_a is None else params_a
    check_same_structure(closure.params, a, what="params_a")
    check_same_structure(a, params_b, what="params_b")
    buffer_fn = None
    if not reestimate:
        own = {k: v.detach() for k, v in closure.model.named_buffers()}
        ba = own if buffers_a is None else buffers_a
        bb = ba if buffers_b is None else buffers_b
        check_same_structure(ba, bb, what="buffers_b")

        def buffer_fn(t: float) -> ParamDict:
            return interpolate(ba, bb, t)

    return evaluate_path(
        closure,
        _Line(a, params_b),
        ts,
        error_fn=error_fn,
        reestimate=reestimate,
        bn_batches=bn_batches,
        buffers=buffer_fn,
        progress=progress,
    )


# --------------------------------------------------------------------------------------------------- Bezier curve
def bezier_point(a: Mapping[str, Tensor], bend: Mapping[str, Tensor], b: Mapping[str, Tensor], t: float) -> ParamDict:
    r""":math:`(1 - t)^2 a + 2 t (1 - t) \theta_b + t^2 b` (Garipov et al. 2018), differentiable in ``bend``."""
    c0, c1, c2 = (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t**2
    return {k: c0 * a[k] + c1 * bend[k] + c2 * b[k] for k in a}


@dataclass
class BezierCurve:
    """A fitted quadratic Bezier curve between two weight sets.

    Attributes:
        bend: The trained bend :math:`\\theta_b` (detached tensors).
        train_losses: The minibatch loss at the sampled :math:`t` of each step.
        path: Loss (and error) along the curve, with its barrier (see :func:`bezier_barrier`).
    """

    bend: ParamDict
    train_losses: np.ndarray
    path: PathResult | None = None
    ts_sampled: np.ndarray = field(default_factory=lambda: np.zeros(0))


def bezier_barrier(
    closure: LossClosure,
    params_a: Mapping[str, Tensor],
    bend: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    *,
    num_points: int = 21,
    error_fn: LossFn | None = None,
    reestimate: bool = True,
    bn_batches: Any | None = None,
    progress: Progress | None = None,
) -> PathResult:
    r"""Loss (and error) barrier along the quadratic Bezier curve through ``bend``; see :func:`evaluate_path`.

    Raises:
        ValueError: If the dictionaries differ in structure, or ``num_points < 3``.
    """
    ts = _path_ts(num_points)
    check_same_structure(closure.params, params_a, what="params_a")
    check_same_structure(params_a, params_b, what="params_b")
    check_same_structure(params_a, bend, what="bend")
    return evaluate_path(
        closure,
        lambda t: bezier_point(params_a, bend, params_b, t),
        ts,
        error_fn=error_fn,
        reestimate=reestimate,
        bn_batches=bn_batches,
        progress=progress,
    )


def fit_bezier(
    closure: LossClosure,
    params_a: Mapping[str, Tensor] | None,
    params_b: Mapping[str, Tensor],
    *,
    steps: int = 200,
    lr: float = 1e-2,
    optimizer: Literal["adam", "sgd"] = "adam",
    momentum: float = 0.9,
    seed: int = 0,
    init_bend: Mapping[str, Tensor] | None = None,
    num_points: int = 21,
    error_fn: LossFn | None = None,
    reestimate: bool = True,
    bn_batches: Any | None = None,
    eval_closure: LossClosure | None = None,
    progress: Progress | None = None,
) -> BezierCurve:
    r"""Train the bend of a quadratic Bezier curve between two weight sets (Garipov et al. 2018).

    Each step draws :math:`t \sim U(0, 1)` and one of the closure's batches from a private generator seeded with
    ``seed``, and takes an optimizer step on :math:`\ell(\theta(t); B)` with respect to the bend only. The model is
    evaluated through :func:`torch.func.functional_call`; BatchNorm layers, if any, use batch statistics during
    training (on cloned buffers) and re-estimated statistics on the finished curve. The bend starts at the midpoint
    :math:`(\theta_0 + \theta_1)/2`, where the curve is the straight line, unless ``init_bend`` is given.

    Args:
        closure: The loss closure (architecture, loss function and training data for the bend).
        params_a: :math:`\theta_0`, or ``None`` for the closure's model weights.
        params_b: :math:`\theta_1`.
        steps: Optimizer steps (>= 1).
        lr: Learning rate (> 0).
        optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).
        momentum: Momentum for ``"sgd"``.
        seed: Seed of the private generator for :math:`t` and batches.
        init_bend: Starting bend; the midpoint if ``None``.
        num_points: Points on which the finished curve's barrier is measured (>= 3).
        error_fn: Optional error function for the curve's error barrier.
        reestimate: Re-estimate BatchNorm statistics along the finished curve.
        bn_batches: Data for the re-estimation; the closure's batches if ``None`` (the training data, also when
            ``eval_closure`` measures on other data).
        eval_closure: Closure (same model, other data, e.g. a test set) on which the finished curve is measured;
            the training ``closure`` if ``None``.
        progress: Called with 1 after each step and each evaluated point.

    Returns:
        A :class:`BezierCurve` with the bend, the training losses and the path evaluation.

    Raises:
        ValueError: If ``steps < 1``, ``lr <= 0``, ``optimizer`` is unknown, ``num_points < 3``, or the
            dictionaries differ in structure (naming the first mismatch).
    """
    check_positive_int("steps", steps)
    check_positive("lr", lr)
    if optimizer not in ("adam", "sgd"):
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    _path_ts(num_points)
    a = {k: v.detach() for k, v in (closure.params if params_a is None else params_a).items()}
    check_same_structure(closure.params, a, what="params_a")
    check_same_structure(a, params_b, what="params_b")
    b = {k: v.detach() for k, v in params_b.items()}
    if init_bend is None:
        bend = {k: (0.5 * (a[k] + b[k])).clone().requires_grad_(True) for k in a}
    else:
        check_same_structure(a, init_bend, what="init_bend")
        bend = {k: v.detach().clone().requires_grad_(True) for k, v in init_bend.items()}
    leaves = list(bend.values())
    opt = (
        torch.optim.Adam(leaves, lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(leaves, lr=lr, momentum=momentum)
    )
    generator = make_generator(seed)
    model = closure.model
    bns = batchnorm_modules(model)
    own = {k: v.detach() for k, v in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    losses = np.empty(steps)
    sampled = np.empty(steps)
    try:
        for m in bns.values():
            m.training = True  # batch statistics while training the curve (running stats go to clones)
        with torch.enable_grad():
            for step in range(steps):
                t = float(torch.rand((), generator=generator, dtype=torch.float64))
                i = int(torch.randint(len(closure.batches), (), generator=generator))
                params = bezier_point(a, bend, b, t)
                loss = closure.batch_loss(params, closure.batches[i], {k: v.clone() for k, v in own.items()})
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                for leaf, g in zip(leaves, grads):
                    leaf.grad = torch.zeros_like(leaf) if g is None else g
                opt.step()
                losses[step], sampled[step] = float(loss.detach()), t
                if progress is not None:
                    progress(1)
    finally:
        for m, mode in modes.items():
            m.training = mode
    final = {k: v.detach().clone() for k, v in bend.items()}
    path = bezier_barrier(
        closure if eval_closure is None else eval_closure,
        a,
        final,
        b,
        num_points=num_points,
        error_fn=error_fn,
        reestimate=reestimate,
        bn_batches=closure.batches if bn_batches is None and eval_closure is not None else bn_batches,
        progress=progress,
    )
    return BezierCurve(bend=final, train_losses=losses, path=path, ts_sampled=sampled)


# --------------------------------------------------------------------------------------------------- permutations
@dataclass
class PermutationSpec:
    """Which tensor axes each hidden-unit permutation acts on.

    Attributes:
        perms: Permutation name (the layer whose outputs it permutes) to a list of ``(tensor name, axis, block)``:
            the tensor's ``axis`` is permuted, in blocks of ``block`` consecutive entries (``block > 1`` for the
            first Linear after a flattened convolution, whose inputs are channel-major).
        sizes: Permutation name to the number of units.
    """

    perms: dict[str, list[tuple[str, int, int]]]
    sizes: dict[str, int]


_PERMUTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """Build the weight-matching spec of a feed-forward chain: Linear layers, or convolutions then Linear layers.

    The layers are taken in registration order (the order of an ``nn.Sequential``), which must be the order of
    computation, with each layer's output feeding the next one alone (no skip connections, no concatenation).
    BatchNorm layers between two layers are permuted with the units before them. The outputs of the last layer are
    not permuted.

    Raises:
        TypeError: If the model holds parameters in a module other than Linear, Conv and BatchNorm layers.
        ValueError: If there are fewer than two layers, or a layer's inputs do not match the previous layer's
            outputs (naming both layers).
    """
    layers: list[tuple[str, nn.Module]] = []
    norms: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, _PERMUTABLE):
            if getattr(module, "groups", 1) != 1:
                raise TypeError(f"grouped convolution {name!r} is not supported by weight matching")
            layers.append((name, module))
        elif isinstance(module, _BatchNorm):
            if not layers:
                raise ValueError(f"BatchNorm {name!r} comes before any Linear/Conv layer; not a supported chain")
            norms.setdefault(len(layers) - 1, []).append(name)
        elif any(True for _ in module.parameters(recurse=False)):
            raise TypeError(
                f"module {name!r} of type {type(module).__name__} holds parameters; weight matching supports chains "
                "of Linear/Conv layers with BatchNorm"
            )
    if len(layers) < 2:
        raise ValueError(f"weight matching needs at least two Linear/Conv layers, got {len(layers)}")
    perms: dict[str, list[tuple[str, int, int]]] = {}
    sizes: dict[str, int] = {}
    for i, (name, layer) in enumerate(layers[:-1]):
        nxt_name, nxt = layers[i + 1]
        units = layer.weight.shape[0]
        fan_in = nxt.weight.shape[1]
        if isinstance(layer, nn.Linear) and not isinstance(nxt, nn.Linear):
            raise ValueError(f"layer {nxt_name!r} (Conv) cannot follow {name!r} (Linear) in a weight-matching chain")
        flattened = isinstance(nxt, nn.Linear) and not isinstance(layer, nn.Linear)
        if (fan_in % units != 0) if flattened else (fan_in != units):
            raise ValueError(
                f"layer {nxt_name!r} takes {fan_in} inputs, which does not match the {units} outputs of {name!r}"
            )
        block = fan_in // units if flattened else 1
        p = f"P_{name}"
        entries = [(f"{name}.weight", 0, 1)]
        if layer.bias is not None:
            entries.append((f"{name}.bias", 0, 1))
        for bn in norms.get(i, []):
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                entries.append((f"{bn}.{suffix}", 0, 1))
        entries.append((f"{nxt_name}.weight", 1, block))
        perms[p] = entries
        sizes[p] = units
    return PermutationSpec(perms=perms, sizes=sizes)


def _permute_axis(t: Tensor, axis: int, block: int, perm: Tensor) -> Tensor:
    if block == 1:
        return t.index_select(axis, perm)
    shape = t.shape
    split = t.reshape(*shape[:axis], -1, block, *shape[axis + 1 :])
    return split.index_select(axis, perm).reshape(shape)


def apply_permutation(
    state: Mapping[str, Tensor],
    spec: PermutationSpec,
    perms: Mapping[str, Tensor],
    except_axis: tuple[str, int] | None = None,
) -> ParamDict:
    """Permute the hidden units of ``state`` (parameters, buffers or both): ``out[axis] = state[axis][perm]``.

    Keys not named by ``spec`` are passed through unchanged (new dictionary, same tensors). The function of the
    network is unchanged by construction.

    Raises:
        ValueError: If a permutation is missing or has the wrong length.
    """
    for p, n in spec.sizes.items():
        if p not in perms:
            raise ValueError(f"perms is missing {p!r}")
        if perms[p].numel() != n:
            raise ValueError(f"perms[{p!r}] has {perms[p].numel()} entries, expected {n}")
    out = dict(state)
    for p, entries in spec.perms.items():
        for name, axis, block in entries:
            if name in out and (except_axis is None or except_axis != (name, axis)):
                out[name] = _permute_axis(out[name], axis, block, perms[p].to(out[name].device))
    return out


def weight_matching(
    params_a: Mapping[str, Tensor],
    params_b: Mapping[str, Tensor],
    spec: PermutationSpec,
    *,
    max_iter: int = 100,
    seed: int = 0,
) -> dict[str, Tensor]:
    r"""Permutations of ``params_b``'s hidden units that best match ``params_a`` (Ainsworth et al. 2023, Alg. 1).

    Coordinate ascent over the layers' permutations in a random order (private generator), each solved exactly as
    a linear assignment problem with :func:`scipy.optimize.linear_sum_assignment`, until a full sweep changes
    nothing. Apply the result with ``apply_permutation(params_b, spec, perms)``.

    Args:
        params_a: The reference weights.
        params_b: The weights to permute.
        spec: From :func:`permutation_spec`.
        max_iter: Most sweeps.
        seed: Seed for the order of the layers.

    Returns:
        Permutation name to an index tensor ``perm`` with ``aligned[axis] = params_b[axis][perm]``.

    Raises:
        ValueError: If the dictionaries differ in structure (naming the first mismatch).
        ImportError: If scipy is missing (it comes with scikit-learn).
    """
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError as err:  # pragma: no cover - scipy comes with scikit-learn
        raise ImportError("weight matching needs scipy (installed with scikit-learn): pip install scipy") from err
    check_same_structure(params_a, params_b, what="params_b")
    perms = {p: torch.arange(n) for p, n in spec.sizes.items()}
    generator = make_generator(seed)
    names = list(spec.perms)
    for _ in range(max_iter):
        changed = False
        for idx in torch.randperm(len(names), generator=generator).tolist():
            p = names[idx]
            n = spec.sizes[p]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for name, axis, block in spec.perms[p]:
                if name not in params_a:
                    continue
                wa = params_a[name].detach()
                wb = apply_permutation({name: params_b[name].detach()}, spec, perms, except_axis=(name, axis))[name]
                wa = _units_first(wa, axis, block, n)
                wb = _units_first(wb, axis, block, n)
                cost += (wa @ wb.T).to(torch.float64).cpu()
            _, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            old_score = cost[torch.arange(n), perms[p]].sum()
            new_score = cost[torch.arange(n), new].sum()
            if new_score > old_score + 1e-12 * max(1.0, float(old_score.abs())):
                changed = True
                perms[p] = new
        if not changed:
            break
    return perms


def _units_first(t: Tensor, axis: int, block: int, n: int) -> Tensor:
    """Reshape so that the permuted units form the rows: ``(n, everything else)``."""
    if block > 1:
        shape = t.shape
        t = t.reshape(*shape[:axis], n, block, *shape[axis + 1 :])
    return t.movedim(axis, 0).reshape(n, -1)
