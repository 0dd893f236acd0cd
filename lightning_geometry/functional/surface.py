r"""Loss along lines and over planes through the weights, and the width of the basin's contour.

A loss surface is the loss closure :math:`L` (see :class:`~lightning_geometry.functional.closure.LossClosure`)
restricted to an affine subspace through the weights :math:`\theta`:

.. math::
    f(\alpha) = L(\theta + \alpha d), \qquad
    F(\alpha, \beta) = L(\theta + \alpha d_1 + \beta d_2),

with directions :math:`d` that are filter-normalized random draws (Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets", NeurIPS) or given ones (top Hessian eigenvectors, principal components of a
trajectory). Every point is evaluated through :func:`torch.func.functional_call` on new tensors, so the model's
parameters, buffers and ``.grad`` are never touched (loss-landscapes' ``random_plane`` moves the weights in place,
and was measured here leaving them displaced by 70 % of :math:`\lVert\theta\rVert`).

Contour width. Along a ray :math:`t \mapsto \theta + t d` the width is the first radius where the loss reaches a
threshold :math:`L_0 + \Delta` (or :math:`L_0 (1 + r)`), with :math:`L_0 = L(\theta)`:

.. math::
    w(d) = \inf \{ t > 0 : L(\theta + t d) \ge L_0 + \Delta \}.

It is found by bracketing (steps guided by a quadratic model :math:`L(\theta + t d) - L_0 \approx c t^2`, which is
exact at a minimum of a quadratic bowl) and Brent's method inside the bracket, rather than by a dense grid. For the
bowl :math:`L = \tfrac12 (\theta - \theta^*)^\top A (\theta - \theta^*)` and a unit eigenvector :math:`q_i` of
:math:`A` with eigenvalue :math:`\lambda_i`, :math:`w(q_i) = \sqrt{2\Delta/\lambda_i}`. Rays that never reach the
threshold within the search radius are *censored*: they are kept (at the search radius, a lower bound) and
flagged, never dropped.

The 2-D counterpart is the fraction of a plane's square that lies under the threshold, integrated exactly for the
piecewise-linear interpolant of the grid (two triangles per cell), so the error is second order in the spacing.

The functions here take a :class:`~lightning_geometry.functional.closure.LossClosure` and evaluate the model in
the mode it is in. Call them inside :func:`~lightning_geometry.functional.closure.measurement` (eval mode, global
RNG streams restored), as the callbacks do, unless you mean to measure with dropout active.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from lightning_geometry.functional._checks import check_positive
from lightning_geometry.functional.closure import LossClosure
from lightning_geometry.functional.params import (
    DirectionIgnore,
    DirectionNorm,
    ParamDict,
    check_same_structure,
    filter_normalized_direction,
    make_generator,
    param_norm,
)

Progress = Callable[[int], object]
"""``progress(n)`` is called after every ``n`` new loss evaluations (``tqdm.update`` fits)."""

__all__ = [
    "AreaFraction",
    "ContourWidth",
    "LossSurface",
    "area_fraction",
    "contour_threshold",
    "contour_width",
    "loss_along_line",
    "loss_plane",
    "random_directions",
    "symmetric_grid",
]


# --------------------------------------------------------------------------------------------------- validation
def check_threshold_args(delta: float | None, rel: float | None) -> None:
    """Check that exactly one of ``delta`` (absolute) and ``rel`` (relative) is given and that it is > 0.

    Raises:
        ValueError: If both or neither are given, or the given one is not a finite number > 0.
    """
    if (delta is None) == (rel is None):
        raise ValueError(f"give exactly one of delta and rel, got delta={delta!r}, rel={rel!r}")
    if delta is not None:
        check_positive("delta", delta)
    if rel is not None:
        check_positive("rel", rel)


def check_grid_args(radius: float, num_points: int) -> None:
    """Check a symmetric grid's radius (> 0) and number of points (an int >= 3).

    Raises:
        ValueError: If ``radius <= 0`` or ``num_points < 3``.
        TypeError: If ``num_points`` is not an int.
    """
    check_positive("radius", radius)
    if isinstance(num_points, bool) or not isinstance(num_points, int):
        raise TypeError(f"num_points must be an int, got {type(num_points).__name__}")
    if num_points < 3:
        raise ValueError(f"num_points must be >= 3, got {num_points}")


def symmetric_grid(radius: float, num_points: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """``num_points`` evenly spaced coordinates from ``-radius`` to ``radius`` (0 included when odd).

    Raises:
        ValueError: If ``radius <= 0`` or ``num_points < 3``.
    """
    check_grid_args(radius, num_points)
    half = (num_points - 1) / 2
    # built from integer offsets so that the grid is exactly symmetric and holds an exact 0 when num_points is odd
    return torch.arange(num_points, dtype=torch.float64).sub(half).div(half).mul(float(radius)).to(dtype)


def contour_threshold(loss0: float, delta: float | None = None, rel: float | None = None) -> float:
    r"""The contour level: :math:`L_0 + \Delta` when ``delta`` is given, :math:`L_0 (1 + r)` when ``rel`` is.

    Raises:
        ValueError: If not exactly one of ``delta``, ``rel`` is given, or it is not > 0.
    """
    check_threshold_args(delta, rel)
    return float(loss0) + float(delta) if delta is not None else float(loss0) * (1.0 + float(rel))


def _as_coords(values: Sequence[float] | Tensor | np.ndarray, name: str) -> list[float]:
    coords = [float(v) for v in (values.tolist() if isinstance(values, (Tensor, np.ndarray)) else values)]
    if not coords:
        raise ValueError(f"{name} must hold at least one coordinate, got none")
    if not all(math.isfinite(c) for c in coords):
        raise ValueError(f"{name} must be finite, got {coords}")
    return coords


def random_directions(
    params: Mapping[str, Tensor],
    num: int,
    seed: int = 0,
    norm: DirectionNorm = "filter",
    ignore: DirectionIgnore = "biasbn",
) -> list[ParamDict]:
    """Draw ``num`` filter-normalized Gaussian directions (Li et al. 2018) from a private generator.

    The global RNG streams are not touched; the same ``seed`` gives the same directions.

    Raises:
        ValueError: If ``num < 1``.
    """
    if isinstance(num, bool) or not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an int >= 1, got {num!r}")
    generator = make_generator(seed)
    return [filter_normalized_direction(params, generator, norm=norm, ignore=ignore) for _ in range(num)]


# --------------------------------------------------------------------------------------------------- surfaces
@dataclass
class LossSurface:
    """Loss values on a line (``betas`` is ``None``, ``losses`` 1-D) or a plane (``losses[i, j]`` at ``alphas[i]``,
    ``betas[j]``). Non-finite losses are kept as they came (nan stays nan)."""

    alphas: np.ndarray
    losses: np.ndarray
    betas: np.ndarray | None = None
    loss0: float = math.nan


def _params_and_dirs(closure: LossClosure, params: Mapping[str, Tensor] | None, *dirs: Mapping[str, Tensor]):
    base = closure.params if params is None else params
    if params is not None:
        check_same_structure(closure.params, params, what="params")
    for i, d in enumerate(dirs):
        check_same_structure(base, d, what=f"direction {i}" if len(dirs) > 1 else "direction")
    return base


def _evaluate(closure: LossClosure, point: Mapping[str, Tensor]) -> float:
    return float(closure(point))


class _Point:
    r"""Preallocated tensors for :math:`\theta + \sum_i c_i d_i`, refilled in place for every evaluation.

    Reusing the storage avoids a fresh allocation of every parameter-sized tensor per point (large tensors are
    ``mmap``-ed and page-faulted anew by the allocator each time), which measured 4-8 % of a forward pass on the
    digits MLP. The closure finishes with a point before the next one is written.
    """

    def __init__(self, base: Mapping[str, Tensor]) -> None:
        self.base = base
        self.tensors = {k: torch.empty_like(v) for k, v in base.items()}

    def at(self, terms: Sequence[tuple[float, Mapping[str, Tensor]]], base: Mapping[str, Tensor] | None = None):
        base = self.base if base is None else base
        for k, out in self.tensors.items():
            if not terms:
                out.copy_(base[k])
                continue
            (c0, d0), rest = terms[0], terms[1:]
            torch.add(base[k], d0[k], alpha=c0, out=out)
            for c, d in rest:
                out.add_(d[k], alpha=c)
        return self.tensors


def loss_along_line(
    closure: LossClosure,
    direction: Mapping[str, Tensor],
    alphas: Sequence[float] | Tensor | np.ndarray,
    *,
    params: Mapping[str, Tensor] | None = None,
    progress: Progress | None = None,
) -> LossSurface:
    r"""Loss :math:`L(\theta + \alpha d)` at each ``alpha``, one forward pass per point.

    Args:
        closure: The loss closure (model, loss function, fixed batches).
        direction: :math:`d`, same names and shapes as the parameters.
        alphas: The coordinates along the line.
        params: :math:`\theta`; the closure's model weights if ``None``.
        progress: Called with 1 after each evaluation.

    Returns:
        A :class:`LossSurface` with 1-D ``losses``; a non-finite loss is recorded as it is.

    Raises:
        ValueError: If ``direction`` (or ``params``) differs in names, shapes, dtype or device from the model's
            parameters (naming the first mismatch), or ``alphas`` is empty or not finite.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(0.0)
        >>> dummy = torch.zeros(1, 1, dtype=torch.float64)
        >>> closure = LossClosure(model, lambda m, b: 0.5 * (m.weight ** 2).sum() * 4.0, dummy)
        >>> loss_along_line(closure, {"weight": torch.ones(1, 1, dtype=torch.float64)}, [0.0, 1.0]).losses
        array([0., 2.])
    """
    base = _params_and_dirs(closure, params, direction)
    coords = _as_coords(alphas, "alphas")
    losses = np.empty(len(coords), dtype=np.float64)
    with torch.no_grad():
        point = _Point(base)
        for i, a in enumerate(coords):
            losses[i] = _evaluate(closure, point.at([(a, direction)]))
            if progress is not None:
                progress(1)
    loss0 = losses[coords.index(0.0)] if 0.0 in coords else math.nan
    return LossSurface(alphas=np.asarray(coords), losses=losses, loss0=float(loss0))


def loss_plane(
    closure: LossClosure,
    direction_x: Mapping[str, Tensor],
    direction_y: Mapping[str, Tensor],
    alphas: Sequence[float] | Tensor | np.ndarray,
    betas: Sequence[float] | Tensor | np.ndarray | None = None,
    *,
    params: Mapping[str, Tensor] | None = None,
    progress: Progress | None = None,
) -> LossSurface:
    r"""Loss :math:`L(\theta + \alpha d_x + \beta d_y)` on the grid ``alphas`` × ``betas``.

    One forward pass per point and nothing else: the point is built as new tensors and evaluated through the
    closure, with no model copy and no gradient tracking (the floor that a plain loop of forward passes sets).

    Args:
        closure: The loss closure.
        direction_x: :math:`d_x`, indexed by ``alphas`` (first axis of ``losses``).
        direction_y: :math:`d_y`, indexed by ``betas`` (second axis).
        alphas: Coordinates along :math:`d_x`.
        betas: Coordinates along :math:`d_y`; ``alphas`` if ``None``.
        params: :math:`\theta`; the closure's model weights if ``None``.
        progress: Called with 1 after each evaluation.

    Returns:
        A :class:`LossSurface` with ``losses`` of shape ``(len(alphas), len(betas))``; non-finite values are kept.

    Raises:
        ValueError: If a direction differs in structure from the parameters (naming the first mismatch), or a
            coordinate list is empty or not finite.
    """
    base = _params_and_dirs(closure, params, direction_x, direction_y)
    xs = _as_coords(alphas, "alphas")
    ys = xs if betas is None else _as_coords(betas, "betas")
    losses = np.empty((len(xs), len(ys)), dtype=np.float64)
    with torch.no_grad():
        row, point = _Point(base), _Point(base)
        for i, a in enumerate(xs):
            row_tensors = row.at([(a, direction_x)])
            for j, b in enumerate(ys):
                losses[i, j] = _evaluate(closure, point.at([(b, direction_y)], base=row_tensors))
                if progress is not None:
                    progress(1)
    loss0 = math.nan
    if 0.0 in xs and 0.0 in ys:
        loss0 = float(losses[xs.index(0.0), ys.index(0.0)])
    return LossSurface(alphas=np.asarray(xs), betas=np.asarray(ys), losses=losses, loss0=loss0)


# --------------------------------------------------------------------------------------------------- contour width
@dataclass
class ContourWidth:
    r"""Contour width along rays :math:`\theta + t d_k`, :math:`t \in [0, t_{\max}]`.

    Attributes:
        radii: Per ray, the first :math:`t` where the loss reaches ``threshold`` (in units of the direction's
            length); ``max_radius`` for a censored ray (a lower bound); nan where a non-finite loss was met first.
        censored: Per ray, ``True`` if the loss stayed under the threshold up to ``max_radius``.
        distances: ``radii`` times each direction's Euclidean norm (parameter-space distance).
        loss0: :math:`L_0 = L(\theta)`.
        threshold: The contour level.
        max_radius: The search radius.
        mean: Mean of ``radii`` over the finite rays, censored ones counted at ``max_radius`` (so a lower bound
            whenever ``num_censored > 0``).
        std: Standard deviation (ddof 0) of the same values.
        mean_uncensored: Mean over the rays that crossed (nan if none did).
        num_censored: Number of censored rays.
        num_nan: Number of rays that met a non-finite loss before crossing.
        num_evaluations: Loss evaluations used, :math:`L_0` included.
        evaluations_per_ray: Evaluations spent on each ray.
    """

    radii: np.ndarray
    censored: np.ndarray
    distances: np.ndarray
    loss0: float
    threshold: float
    max_radius: float
    mean: float
    std: float
    mean_uncensored: float
    num_censored: int
    num_nan: int
    num_evaluations: int
    evaluations_per_ray: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))


def _brent_root(
    f: Callable[[float], float],
    a: float,
    b: float,
    fa: float,
    fb: float,
    tolerance: Callable[[float], float],
    max_iter: int,
) -> float:
    """Brent's method (Brent 1973, ch. 4; the ``zbrent`` form) on a bracket with ``fa < 0 <= fb`` already known.

    Stops when the bracket is narrower than ``tolerance(b)``. Returns the root estimate, or nan if a nan value is
    met inside the bracket.
    """
    if fb == 0.0:
        return b
    c, fc = a, fa
    d = e = b - a
    for _ in range(max_iter):
        if (fb > 0) == (fc > 0):
            c, fc = a, fa
            d = e = b - a
        if abs(fc) < abs(fb):
            a, b, c = b, c, b
            fa, fb, fc = fb, fc, fb
        tol = 0.5 * max(tolerance(b), 4 * np.finfo(float).eps * abs(b))
        m = 0.5 * (c - b)
        if abs(m) <= tol or fb == 0.0:
            return b
        if abs(e) >= tol and abs(fa) > abs(fb):
            s = fb / fa
            if a == c:  # secant
                p, q = 2.0 * m * s, 1.0 - s
            else:  # inverse quadratic interpolation
                q, r = fa / fc, fb / fc
                p = s * (2.0 * m * q * (q - r) - (b - a) * (r - 1.0))
                q = (q - 1.0) * (r - 1.0) * (s - 1.0)
            if p > 0:
                q = -q
            p = abs(p)
            if 2.0 * p < min(3.0 * m * q - abs(tol * q), abs(e * q)):
                e, d = d, p / q
            else:
                d = e = m
        else:
            d = e = m
        a, fa = b, fb
        b = b + (d if abs(d) > tol else math.copysign(tol, m))
        fb = f(b)
        if math.isnan(fb):
            return math.nan
        if math.isinf(fb):  # an infinite loss is above (or below) any level: keep its sign, bisection takes over
            fb = math.copysign(1.0, fb)
    return b


def contour_width(
    closure: LossClosure,
    directions: Sequence[Mapping[str, Tensor]],
    *,
    delta: float | None = None,
    rel: float | None = None,
    max_radius: float = 1.0,
    params: Mapping[str, Tensor] | None = None,
    initial_step: float | None = None,
    rtol: float = 1e-3,
    xtol: float = 0.0,
    max_iter: int = 100,
    loss0: float | None = None,
    progress: Progress | None = None,
) -> ContourWidth:
    r"""Contour width: along each ray :math:`\theta + t d_k`, the first :math:`t` where the loss reaches a level.

    The level is :math:`L_0 + \Delta` (``delta``) or :math:`L_0(1 + r)` (``rel``). Along each ray the bracket is
    grown from :math:`t = 0` with steps proposed by the quadratic model :math:`L(\theta + t d) - L_0 \approx c t^2`
    fitted to the last point (the proposal is inflated by 10 % and kept within 1.5× to 4× the last step; the first
    step of a ray is the mean radius of the rays already done, or ``initial_step``), up to ``max_radius``. Inside
    the bracket Brent's method (inverse quadratic interpolation safeguarded by bisection) runs in :math:`s = t^2`,
    where a quadratic bowl is linear so that its first secant step is exact, and stops when the bracket is narrower
    than ``max(xtol, rtol * t)`` in :math:`t`. The root found is the first crossing among the probed points; a loss
    that dips back under the level between two probes is not seen (as with any grid).

    Args:
        closure: The loss closure.
        directions: The rays' directions :math:`d_k` (use both :math:`d` and :math:`-d` for two-sided widths).
        delta: Absolute level increase :math:`\Delta > 0`.
        rel: Relative level increase :math:`r > 0` (level :math:`L_0(1 + r)`); give ``delta`` or ``rel``.
        max_radius: Search radius :math:`t_{\max} > 0` in units of each direction's length.
        params: :math:`\theta`; the closure's model weights if ``None``.
        initial_step: First probe on the first ray; ``max_radius / 8`` if ``None``.
        rtol: Relative tolerance on each radius.
        xtol: Absolute tolerance on each radius.
        max_iter: Most Brent iterations per ray.
        loss0: :math:`L_0` if already known (saves one evaluation).
        progress: Called with the number of new evaluations as they happen.

    Returns:
        A :class:`ContourWidth`.

    Raises:
        ValueError: If ``delta``/``rel``/``max_radius``/``initial_step`` are not > 0, both or neither of ``delta``
            and ``rel`` are given, ``directions`` is empty, or a direction's structure differs from the parameters.

    Example:
        A quadratic bowl :math:`L = \tfrac12 \lambda t^2` along a unit direction has width
        :math:`\sqrt{2\Delta/\lambda}`:

        >>> import torch
        >>> from torch import nn
        >>> model = nn.Linear(1, 1, bias=False).double()
        >>> with torch.no_grad():
        ...     _ = model.weight.fill_(0.0)
        >>> dummy = torch.zeros(1, 1, dtype=torch.float64)
        >>> closure = LossClosure(model, lambda m, b: 0.5 * 4.0 * (m.weight ** 2).sum(), dummy)
        >>> d = {"weight": torch.ones(1, 1, dtype=torch.float64)}
        >>> result = contour_width(closure, [d], delta=0.5, xtol=1e-12, rtol=0.0)
        >>> round(result.mean, 9)
        0.5
    """
    check_threshold_args(delta, rel)
    check_positive("max_radius", max_radius)
    max_radius = float(max_radius)
    if initial_step is not None:
        check_positive("initial_step", initial_step)
    if rtol < 0 or xtol < 0 or rtol == xtol == 0:
        raise ValueError(f"rtol and xtol must be >= 0 and not both 0, got rtol={rtol!r}, xtol={xtol!r}")
    directions = list(directions)
    if not directions:
        raise ValueError("directions must hold at least one direction, got none")
    base = _params_and_dirs(closure, params, *directions)

    evals = 0
    point = _Point(base)

    def s_tolerance(s: float) -> float:  # |dt| <= tol  <=>  |ds| <= 2 t tol
        t = math.sqrt(max(s, 0.0))
        return 2.0 * t * max(xtol, rtol * t)

    def at(d: Mapping[str, Tensor], t: float) -> float:
        nonlocal evals
        evals += 1
        value = _evaluate(closure, point.at([(t, d)]))
        if progress is not None:
            progress(1)
        return value

    with torch.no_grad():
        if loss0 is None:
            evals += 1
            loss0 = _evaluate(closure, base)
            if progress is not None:
                progress(1)
        loss0 = float(loss0)
        threshold = contour_threshold(loss0, delta, rel) if math.isfinite(loss0) else math.nan
        radii = np.full(len(directions), math.nan)
        censored = np.zeros(len(directions), dtype=bool)
        per_ray = np.zeros(len(directions), dtype=np.int64)
        first_step = max_radius / 8 if initial_step is None else min(initial_step, max_radius)
        if math.isfinite(threshold) and threshold > loss0:
            for k, d in enumerate(directions):
                start = evals
                f0 = loss0 - threshold

                def f(t: float, d: Mapping[str, Tensor] = d) -> float:
                    return at(d, t) - threshold

                def f_sq(s: float, d: Mapping[str, Tensor] = d) -> float:
                    return at(d, math.sqrt(max(s, 0.0))) - threshold

                done = radii[: k][np.isfinite(radii[:k]) & ~censored[:k]]
                t = float(np.mean(done)) if done.size else first_step
                t = min(t, max_radius)
                t_lo, f_lo = 0.0, f0
                while True:
                    ft = f(t)
                    if math.isnan(ft):
                        break
                    if ft >= 0:  # bracketed (an infinite loss counts as above the level)
                        # Brent in s = t^2, where a bowl is linear and the first secant step is exact
                        s_root = _brent_root(
                            f_sq, t_lo**2, t**2, f_lo, 1.0 if math.isinf(ft) else ft, s_tolerance, max_iter
                        )
                        radii[k] = math.sqrt(s_root) if math.isfinite(s_root) else math.nan
                        break
                    if t >= max_radius:
                        radii[k], censored[k] = max_radius, True
                        break
                    rise = ft - f0
                    step_lo, step_hi = 1.5 * t, 4.0 * t
                    proposal = 1.1 * t * math.sqrt(-f0 / rise) if rise > 0 else step_hi
                    t_lo, f_lo = t, ft
                    t = min(max(proposal, step_lo), step_hi, max_radius)
                per_ray[k] = evals - start

    norms = np.array([float(param_norm(d)) for d in directions])
    finite = np.isfinite(radii)
    crossed = finite & ~censored
    return ContourWidth(
        radii=radii,
        censored=censored,
        distances=radii * norms,
        loss0=loss0,
        threshold=threshold,
        max_radius=max_radius,
        mean=float(np.mean(radii[finite])) if finite.any() else math.nan,
        std=float(np.std(radii[finite])) if finite.any() else math.nan,
        mean_uncensored=float(np.mean(radii[crossed])) if crossed.any() else math.nan,
        num_censored=int(censored.sum()),
        num_nan=int((~finite).sum()),
        num_evaluations=evals,
        evaluations_per_ray=per_ray,
    )


# --------------------------------------------------------------------------------------------------- area fraction
@dataclass
class AreaFraction:
    """Fraction of a plane's rectangle under a level.

    Attributes:
        fraction: Area under the level divided by the area of the cells whose four corners are finite.
        nan_fraction: Area of the cells with a non-finite corner divided by the whole rectangle's area.
    """

    fraction: float
    nan_fraction: float


def _triangle_fraction(ga: np.ndarray, gb: np.ndarray, gc: np.ndarray) -> np.ndarray:
    """Area fraction where the linear interpolant of corner values ``g`` is <= 0, per triangle (vectorized)."""
    g = np.stack([ga, gb, gc])  # (3, ...)
    neg = g <= 0
    count = neg.sum(axis=0)
    out = np.where(count == 3, 1.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        for i in range(3):
            j, k = (i + 1) % 3, (i + 2) % 3
            gi, gj, gk = g[i], g[j], g[k]
            corner = (gi / (gi - gj)) * (gi / (gi - gk))  # triangle cut off at the odd vertex i
            one_neg = (count == 1) & neg[i]
            one_pos = (count == 2) & ~neg[i]
            out = np.where(one_neg, corner, out)
            out = np.where(one_pos, 1.0 - corner, out)
    return out


def area_fraction(
    alphas: Sequence[float] | np.ndarray,
    betas: Sequence[float] | np.ndarray,
    losses: np.ndarray,
    threshold: float,
) -> AreaFraction:
    r"""Fraction of the rectangle spanned by ``alphas`` × ``betas`` where the loss is under ``threshold``.

    The grid values are interpolated linearly on two triangles per cell, and the area where the interpolant is
    :math:`\le` ``threshold`` is integrated exactly, so a smooth level set is measured with an error second order
    in the spacing (counting grid points is first order). For the bowl
    :math:`\tfrac12(\lambda_1\alpha^2 + \lambda_2\beta^2)` on :math:`[-R, R]^2` the exact fraction is
    :math:`\pi a b / (4R^2)` with semi-axes :math:`a = \sqrt{2\Delta/\lambda_1}`, :math:`b = \sqrt{2\Delta/\lambda_2}`.

    Cells with a non-finite corner are left out of the fraction and their share of the area is reported as
    ``nan_fraction`` (the nan values themselves are never replaced).

    Raises:
        ValueError: If the shapes disagree, there are fewer than 2 coordinates on an axis, or coordinates are not
            strictly increasing.
    """
    xs = np.asarray(alphas, dtype=np.float64)
    ys = np.asarray(betas, dtype=np.float64)
    values = np.asarray(losses, dtype=np.float64)
    if values.shape != (xs.size, ys.size):
        raise ValueError(f"losses must have shape {(xs.size, ys.size)}, got {values.shape}")
    if xs.size < 2 or ys.size < 2:
        raise ValueError(f"need at least 2 coordinates per axis, got {xs.size} x {ys.size}")
    if np.any(np.diff(xs) <= 0) or np.any(np.diff(ys) <= 0):
        raise ValueError("alphas and betas must be strictly increasing")
    g = values - float(threshold)
    g00, g10, g01, g11 = g[:-1, :-1], g[1:, :-1], g[:-1, 1:], g[1:, 1:]
    cell = np.outer(np.diff(xs), np.diff(ys))
    finite = np.isfinite(g00) & np.isfinite(g10) & np.isfinite(g01) & np.isfinite(g11)
    frac = 0.5 * (_triangle_fraction(g00, g10, g11) + _triangle_fraction(g00, g11, g01))
    total = float(cell.sum())
    finite_area = float(cell[finite].sum())
    under = float((frac * cell)[finite].sum())
    return AreaFraction(
        fraction=under / finite_area if finite_area > 0 else math.nan,
        nan_fraction=(total - finite_area) / total,
    )
