r"""Sharpness in units people can compare: stability ratios, ε-sharpness and adaptive sharpness.

Raw :math:`\lambda_{\max}` and trace change under reparametrisations that leave the network's function
unchanged (Dinh et al. 2017, "Sharp Minima Can Generalize For Deep Nets"), and sharpness tracks the learning
rate more than generalisation (Andriushchenko et al. 2023, "A Modern Look at the Relationship between Sharpness
and Generalization"). So besides raw values we report:

* the **stability ratio** :math:`\lambda_{\max} / (2/\eta)` — gradient descent on a quadratic with step
  :math:`\eta` diverges once :math:`\lambda_{\max} > 2/\eta`, and training sits at that edge of stability
  (Cohen et al. 2021); with heavy-ball momentum :math:`\beta` the threshold is :math:`(2 + 2\beta)/\eta`.
* **ε-sharpness** (Keskar et al. 2017, "On Large-Batch Training for Deep Learning"): the relative rise of the
  loss at the worst point of the box :math:`|\delta_i| \le \epsilon(|\theta_i| + 1)`.
* **adaptive sharpness** (Kwon et al. 2021, "ASAM"; Andriushchenko et al. 2023): perturbations scaled
  elementwise by :math:`|\theta|`, which makes the measure invariant to the rescalings of Dinh et al. —
  worst case :math:`\max_{\lVert \delta \oslash |\theta| \rVert_p \le \rho} L(\theta + \delta) - L(\theta)`
  and average case :math:`\mathbb{E}_{\delta \sim \mathcal{N}(0, \rho^2 \operatorname{diag}|\theta|^2)}
  L(\theta+\delta) - L(\theta)`.

Worst cases are found by projected gradient ascent from a random start in the scaled space: the result is a
lower bound on the true maximum (the problem is non-convex), tight on quadratics.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_geometry.functional._checks import check_positive, check_positive_int
from lightning_geometry.functional.closure import LossClosure, LossFn, is_finite, measurement
from lightning_geometry.functional.params import ParamDict, make_generator, random_direction

_NORM_P = (2, "inf")


@dataclass
class SharpnessResult:
    """A sharpness value with its uncertainty.

    Attributes:
        value: The sharpness (a loss difference; for ε-sharpness, Keskar's relative percentage).
        std_error: Standard error of a Monte-Carlo estimate; 0 for a worst case.
        loss: :math:`L(\\theta)`.
        finite: ``False`` when a loss evaluated was nan or inf.
    """

    value: float
    std_error: float
    loss: float
    finite: bool


def stability_threshold(lr: float, momentum: float = 0.0) -> float:
    r"""The largest stable curvature :math:`(2 + 2\beta)/\eta` of (heavy-ball) gradient descent.

    Raises:
        ValueError: If ``lr <= 0`` or ``momentum`` is outside [0, 1).
    """
    check_positive("lr", lr)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    return (2.0 + 2.0 * momentum) / lr


def stability_ratio(lambda_max: float, lr: float, momentum: float = 0.0) -> float:
    r""":math:`\lambda_{\max}` over the stability threshold; 1 is the edge of stability.

    Without momentum this is :math:`\lambda_{\max}\,\eta/2`. It does not apply to adaptive optimizers (Adam),
    whose stability is set by the preconditioned Hessian (Cohen et al. 2022).
    """
    return float(lambda_max) / stability_threshold(lr, momentum)


def sgd_stability_threshold(
    lr: float, momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False
) -> float:
    r"""The largest curvature on which ``torch.optim.SGD`` with these hyper-parameters is stable.

    On a quadratic with curvature :math:`\lambda` the iteration is linear, and it is stable iff
    :math:`\lambda` is below (Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the
    Edge of Stability", Sec. 2 and App. for momentum):

    * plain gradient descent: :math:`2/\eta`;
    * heavy-ball momentum :math:`\beta` (``v \leftarrow \beta v + (1-\tau) g``, ``\theta \leftarrow \theta - \eta
      v``): :math:`(2 + 2\beta)/(\eta(1-\tau))` — dampening :math:`\tau` only rescales the step;
    * Nesterov (``nesterov=True``, which PyTorch allows only with :math:`\tau = 0`):
      :math:`(2 + 2\beta)/(\eta(1 + 2\beta))`. The characteristic polynomial of the iteration on
      :math:`\lambda` is :math:`z^2 - (1+\beta)(1-\eta\lambda)z + \beta(1-\eta\lambda)`; its root crosses
      :math:`z=-1` at :math:`\eta\lambda(1+2\beta) = 2+2\beta`.

    Momentum is ignored when it is 0 (PyTorch keeps no buffer then). ``tests/test_early_stopping.py`` checks each
    case by running ``torch.optim.SGD`` on a one-dimensional quadratic just below and just above the threshold.

    Args:
        lr: Learning rate :math:`\eta > 0`.
        momentum: :math:`\beta \in [0, 1)`.
        dampening: :math:`\tau \in [0, 1]`; ``1`` makes the threshold infinite.
        nesterov: Nesterov momentum.

    Returns:
        The threshold (``inf`` when the effective step is 0).

    Raises:
        ValueError: On ``lr <= 0``, ``momentum`` outside [0, 1) or ``dampening`` outside [0, 1].
    """
    if not 0.0 <= dampening <= 1.0:
        raise ValueError(f"dampening must be in [0, 1], got {dampening!r}")
    base = stability_threshold(lr, momentum)  # validates lr and momentum
    if momentum == 0.0:
        return base
    if nesterov:
        return base / (1.0 + 2.0 * momentum)
    if dampening >= 1.0:
        return math.inf
    return base / (1.0 - dampening)


def _scale(params: Mapping[str, Tensor], adaptive: bool, offset: float) -> ParamDict:
    return {k: (p.abs() if adaptive else torch.zeros_like(p)) + offset for k, p in params.items()}


def average_adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    *,
    rho: float = 0.05,
    num_samples: int = 10,
    adaptive: bool = True,
    seed: int = 0,
    train_mode: bool = False,
) -> SharpnessResult:
    r"""Average-case sharpness :math:`\mathbb{E}_\gamma L(\theta + \rho\,c \odot \gamma) - L(\theta)`.

    :math:`\gamma \sim \mathcal{N}(0, I)` and :math:`c = |\theta|` (adaptive) or :math:`c = 1`. On a quadratic
    at its minimum this is :math:`\tfrac{\rho^2}{2}\operatorname{tr}(C H C)`, :math:`C = \operatorname{diag} c`.

    Args:
        model: The module, measured at its current weights and left untouched.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: One batch or an iterable of batches.
        rho: Perturbation radius (> 0), relative to :math:`|\theta|` when adaptive.
        num_samples: Monte-Carlo samples.
        adaptive: Scale by :math:`|\theta|` (Kwon et al. 2021) or not.
        seed: Seed of the private generator.
        train_mode: Measure in train mode instead of eval mode.

    Returns:
        A :class:`SharpnessResult` with the Monte-Carlo standard error.

    Raises:
        ValueError: On ``rho <= 0`` or ``num_samples < 1``.
    """
    check_positive("rho", rho)
    check_positive_int("num_samples", num_samples)
    closure = LossClosure(model, loss_fn, batches)
    params = closure.params
    scale = _scale(params, adaptive, 0.0)
    generator = make_generator(seed)
    with measurement(model, train_mode):
        center = float(closure())
        rises = torch.tensor(
            [
                float(closure({k: p + rho * scale[k] * g[k] for k, p in params.items()})) - center
                for g in (random_direction(params, generator) for _ in range(num_samples))
            ],
            dtype=torch.float64,
        )
    std_error = float(rises.std(unbiased=True) / math.sqrt(num_samples)) if num_samples > 1 else float("nan")
    value = float(rises.mean())
    return SharpnessResult(value, std_error, center, is_finite(center) and math.isfinite(value))


def worst_case_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    *,
    rho: float = 0.05,
    p: Literal[2, "inf"] = 2,
    adaptive: bool = True,
    offset: float = 0.0,
    steps: int = 20,
    step_size: float | None = None,
    seed: int = 0,
    train_mode: bool = False,
) -> SharpnessResult:
    r"""Worst-case sharpness :math:`\max_{\lVert\gamma\rVert_p \le \rho} L(\theta + c \odot \gamma) - L(\theta)`.

    :math:`c = |\theta| + \text{offset}` (adaptive) or :math:`c = \text{offset}` (with offset 1 when not
    adaptive gives the plain :math:`\ell_p` ball). The maximum is approached by projected gradient ascent on
    :math:`\gamma` from a random point of the ball: normalized-gradient steps for :math:`p = 2`, sign steps for
    :math:`p = \infty` (as in Andriushchenko et al. 2023), keeping the best point seen. On a quadratic at its
    minimum with :math:`p = 2` the value is :math:`\tfrac{\rho^2}{2}\lambda_{\max}(C H C)`.

    Args:
        model: The module, measured at its current weights and left untouched.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: One batch or an iterable of batches.
        rho: Radius of the ball (> 0).
        p: ``2`` or ``"inf"``.
        adaptive: Scale by :math:`|\theta|`.
        offset: Added to the scale (Keskar's box uses 1).
        steps: Ascent steps.
        step_size: Step in :math:`\gamma` units; default :math:`\max(2\rho/\text{steps}, \rho/4)`.
        seed: Seed of the private generator for the start point.
        train_mode: Measure in train mode instead of eval mode.

    Returns:
        A :class:`SharpnessResult` (``std_error`` 0).

    Raises:
        ValueError: On ``rho <= 0``, ``steps < 1``, an unknown ``p``, or a scale that is zero everywhere.
    """
    check_positive("rho", rho)
    check_positive_int("steps", steps)
    if p not in _NORM_P:
        raise ValueError(f"p must be 2 or 'inf', got {p!r}")
    if step_size is not None:
        check_positive("step_size", step_size)
    if not adaptive and offset <= 0:
        raise ValueError(f"offset must be positive when adaptive=False (the scale would be zero), got {offset!r}")
    eta = step_size if step_size is not None else max(2.0 * rho / steps, rho / 4.0)
    closure = LossClosure(model, loss_fn, batches)
    params = closure.params
    scale = _scale(params, adaptive, offset)
    generator = make_generator(seed)

    def project(gamma: ParamDict) -> ParamDict:
        if p == "inf":
            return {k: g.clamp(-rho, rho) for k, g in gamma.items()}
        norm = math.sqrt(sum(float((g * g).sum()) for g in gamma.values()))
        return {k: g * (rho / norm) for k, g in gamma.items()} if norm > rho else gamma

    def rise(gamma: ParamDict) -> Tensor:
        return sum(w * closure.batch_loss({k: params[k] + scale[k] * gamma[k] for k in params}, b)
                   for w, b in zip(closure.weights, closure.batches))

    with measurement(model, train_mode):
        center = float(closure())
        start = random_direction(params, generator, "gaussian" if p == 2 else "rademacher")
        if p == 2:
            norm = math.sqrt(sum(float((g * g).sum()) for g in start.values()))
            start = {k: g * (rho / norm) for k, g in start.items()}
        else:
            start = {k: g * rho for k, g in start.items()}
        gamma = start
        best = -math.inf
        for _ in range(steps + 1):
            leaves = {k: g.detach().requires_grad_(True) for k, g in gamma.items()}
            value = rise(leaves)
            current = float(value.detach())
            if not math.isfinite(current):
                best = current
                break
            best = max(best, current)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True, materialize_grads=True)
            grads = dict(zip(leaves, grads))
            if p == 2:
                gnorm = math.sqrt(sum(float((g * g).sum()) for g in grads.values())) or 1.0
                step = {k: g * (eta / gnorm) for k, g in grads.items()}
            else:
                step = {k: g.sign() * eta for k, g in grads.items()}
            gamma = project({k: gamma[k] + step[k] for k in gamma})
    value = best - center
    return SharpnessResult(value, 0.0, center, is_finite(center) and math.isfinite(value))


def epsilon_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    *,
    epsilon: float = 1e-3,
    steps: int = 20,
    seed: int = 0,
    train_mode: bool = False,
) -> SharpnessResult:
    r"""Keskar et al. 2017's ε-sharpness, in percent of :math:`1 + L(\theta)`.

    .. math::
        \phi_\epsilon = \frac{\max_{|\delta_i| \le \epsilon(|\theta_i| + 1)} L(\theta + \delta) - L(\theta)}
                             {1 + L(\theta)} \times 100 .

    Keskar et al. maximise with L-BFGS-B over the full space; we use sign-gradient ascent in the box
    (:func:`worst_case_sharpness` with :math:`p=\infty`, offset 1), a lower bound of the same quantity.

    Raises:
        ValueError: On ``epsilon <= 0`` or ``steps < 1``.
    """
    check_positive("epsilon", epsilon)
    worst = worst_case_sharpness(
        model, loss_fn, batches, rho=epsilon, p="inf", adaptive=True, offset=1.0, steps=steps, seed=seed,
        train_mode=train_mode,
    )
    return SharpnessResult(100.0 * worst.value / (1.0 + worst.loss), 0.0, worst.loss, worst.finite)
