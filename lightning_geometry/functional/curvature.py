r"""Curvature of the loss at the model's weights: top eigenvalues, trace, directional second differences.

All three measure the Hessian :math:`H` of the size-weighted empirical risk :math:`L(\theta)` (see
:mod:`.closure`) through Hessian-vector products (:mod:`.hessian`), and leave the model exactly as it was:
parameters, buffers, ``.grad``, train/eval flags and every global RNG stream. Random vectors come from a private
generator seeded by ``seed``, so a measurement repeated on the same weights gives the same number.

A non-finite loss is not an error: the result carries ``finite=False`` and nan values, so a training run that
diverges is recorded as such.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_geometry.functional._checks import check_positive, check_positive_int
from lightning_geometry.functional.closure import LossClosure, LossFn, is_finite, measurement
from lightning_geometry.functional.hessian import HessianOperator, HvpRoute, hessian_operator
from lightning_geometry.functional.params import (
    DirectionIgnore,
    DirectionNorm,
    ParamDict,
    check_same_structure,
    filter_normalized_direction,
    flatten_params,
    make_generator,
    param_axpy,
    param_dot,
    random_direction,
    unflatten_params,
)

TraceMethod = Literal["hutchinson", "hutch++"]
_TRACE_METHODS = ("hutchinson", "hutch++")


@dataclass
class EigenResult:
    """Top Hessian eigenpairs from :func:`top_hessian_eigenvalues`.

    Attributes:
        eigenvalues: The ``k`` largest eigenvalues, descending (float64).
        eigenvectors: Unit-norm eigenvectors as parameter dictionaries, in the same order.
        residuals: :math:`\\lVert Hv - \\lambda v \\rVert` for each pair (the Lanczos estimate
            :math:`\\beta_m |s_{m,i}|`).
        num_products: Hessian-vector products used.
        converged: Whether every residual met the tolerance.
        min_eigenvalue: The most negative (smallest) eigenvalue, when asked for with ``negative=True``.
        min_eigenvector: Its eigenvector, when asked for.
        loss: :math:`L(\\theta)` at the measured point.
        finite: ``False`` when the loss was nan or inf; the eigenvalues are then nan.
    """

    eigenvalues: Tensor
    eigenvectors: list[ParamDict]
    residuals: Tensor
    num_products: int
    converged: bool
    min_eigenvalue: float | None
    min_eigenvector: ParamDict | None
    loss: float
    finite: bool


@dataclass
class TraceResult:
    """Stochastic trace estimate from :func:`hessian_trace`.

    Attributes:
        trace: The estimate of :math:`\\operatorname{tr} H`.
        std_error: Its standard error (sample standard deviation of the stochastic part over
            :math:`\\sqrt{m}`); 0 when the estimate is exact (Hutch++ with a sketch spanning the space).
        num_products: Hessian-vector products used.
        method: ``"hutchinson"`` or ``"hutch++"``.
        loss: :math:`L(\\theta)`.
        finite: ``False`` when the loss was nan or inf.
    """

    trace: float
    std_error: float
    num_products: int
    method: str
    loss: float
    finite: bool


@dataclass
class DirectionalCurvatureResult:
    """Second differences of the loss along random filter-normalized directions.

    Attributes:
        values: :math:`(L(\\theta + h d) - 2L(\\theta) + L(\\theta - h d)) / h^2` per direction.
        exact: :math:`d^\\top H d` per direction, when asked for with ``exact=True``.
        direction_norms: :math:`\\lVert d \\rVert` per direction; ``values / direction_norms**2`` is the
            curvature per unit length.
        h: The step used.
        loss: :math:`L(\\theta)`.
        finite: ``False`` when any evaluated loss was nan or inf.
    """

    values: Tensor
    exact: Tensor | None
    direction_norms: Tensor
    h: float
    loss: float
    finite: bool


def lanczos(
    operator: HessianOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: ParamDict | None = None,
    negative: bool = False,
    generator: torch.Generator | None = None,
) -> EigenResult:
    r"""Extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    The Krylov basis :math:`V_m = [v_1, \dots, v_m]` satisfies :math:`H V_m = V_m T_m + \beta_m v_{m+1} e_m^\top`
    with :math:`T_m` tridiagonal. Each Ritz pair :math:`(\lambda_i, V_m s_i)` of :math:`T_m` has residual
    :math:`\lVert H V_m s_i - \lambda_i V_m s_i \rVert = \beta_m |e_m^\top s_i|`, which is the stopping test:
    iteration ends when the residuals of the wanted pairs are at most ``tol`` times the largest Ritz value's
    magnitude. Every new vector is orthogonalised twice against the whole basis ("twice is enough",
    Parlett 1998, *The Symmetric Eigenvalue Problem*), which removes the ghost eigenvalues of plain Lanczos
    and makes the residual estimate trustworthy. Lanczos converges to extreme eigenvalues much faster than the
    power iteration PyHessian uses (rate set by :math:`\sqrt{\text{gap}}` rather than the gap; Golub & Van Loan,
    *Matrix Computations*, §10.1).

    Args:
        operator: The Hessian operator (from :func:`~.hessian.hessian_operator`).
        k: Number of largest (algebraic) eigenvalues wanted.
        tol: Relative residual tolerance.
        max_iter: Most products to spend (capped at the dimension).
        init: Start vector (e.g. the previous probe's eigenvector, a warm start); random if ``None``.
        negative: Also return the smallest eigenvalue (most negative curvature), from the same Krylov space.
        generator: Private generator for the random start vector.

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: If ``k``, ``tol`` or ``max_iter`` are out of range, or ``init`` has another structure.
    """
    check_positive_int("k", k)
    check_positive_int("max_iter", max_iter)
    check_positive("tol", tol)
    params = operator.params
    if not operator.finite:
        return _non_finite_eigen(k, operator.loss, negative)
    n = operator.dim
    if k > n:
        raise ValueError(f"k must be at most the number of parameters ({n}), got {k}")
    steps = min(max_iter, n)
    if steps < k:
        raise ValueError(f"max_iter must be at least k={k}, got {max_iter}")
    if init is not None:
        check_same_structure(params, init, "init")
        v = flatten_params(init).detach().clone()
        if not torch.isfinite(v).all() or v.norm() == 0:
            v = flatten_params(random_direction(params, generator or make_generator(0)))
    else:
        v = flatten_params(random_direction(params, generator or make_generator(0)))
    v = v / v.norm()
    # The basis grows by doubling: a run that converges in a few products never reserves max_iter vectors.
    basis = torch.empty(min(steps, 8), n, dtype=v.dtype, device=v.device)
    alphas: list[float] = []
    betas: list[float] = []
    products_start = operator.num_products
    converged = False
    ritz_vals = torch.empty(0, dtype=torch.float64)
    ritz_vecs = torch.empty(0, 0, dtype=torch.float64)
    residuals = torch.empty(0, dtype=torch.float64)
    wanted: list[int] = []
    for j in range(steps):
        if j == basis.shape[0]:
            basis = torch.cat([basis, torch.empty(min(j, steps - j), n, dtype=v.dtype, device=v.device)])
        basis[j] = v
        w = operator.matvec_flat(v)
        if not torch.isfinite(w).all():
            return _non_finite_eigen(k, operator.loss, negative, operator.num_products - products_start)
        alpha = float(torch.dot(w, v))
        alphas.append(alpha)
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = float(w.norm())
        tri = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tri = tri + torch.diag(off, 1) + torch.diag(off, -1)
        ritz_vals, ritz_vecs = torch.linalg.eigh(tri)
        residuals = beta * ritz_vecs[-1].abs()
        wanted = list(range(len(alphas) - 1, max(len(alphas) - 1 - k, -1), -1))
        if negative:
            wanted.append(0)
        scale = float(ritz_vals.abs().max())
        invariant = beta <= 1e-7 * scale or beta == 0.0  # the Krylov space is invariant: Ritz pairs are exact
        if len(alphas) >= k and (invariant or bool((residuals[wanted] <= tol * scale).all())):
            converged = True
            break
        if j + 1 == steps:
            break
        betas.append(beta)
        v = w / beta
    m = len(alphas)
    top = list(range(m - 1, m - 1 - k, -1))
    wanted_columns = top + ([0] if negative else [])
    vectors = basis[:m].T @ ritz_vecs[:, wanted_columns].to(basis.dtype)  # only the Ritz vectors returned
    eigenvectors = [_unit_param_dict(vectors[:, c], params) for c in range(k)]
    return EigenResult(
        eigenvalues=ritz_vals[top].clone(),
        eigenvectors=eigenvectors,
        residuals=residuals[top].clone(),
        num_products=operator.num_products - products_start,
        converged=converged,
        min_eigenvalue=float(ritz_vals[0]) if negative else None,
        min_eigenvector=_unit_param_dict(vectors[:, k], params) if negative else None,
        loss=operator.loss,
        finite=True,
    )


def _unit_param_dict(vector: Tensor, like: ParamDict) -> ParamDict:
    return {k: t.clone() for k, t in unflatten_params(vector / vector.norm(), like).items()}


def _non_finite_eigen(k: int, loss: float, negative: bool, products: int = 0) -> EigenResult:
    nan = float("nan")
    return EigenResult(
        eigenvalues=torch.full((k,), nan, dtype=torch.float64),
        eigenvectors=[],
        residuals=torch.full((k,), nan, dtype=torch.float64),
        num_products=products,
        converged=False,
        min_eigenvalue=nan if negative else None,
        min_eigenvector=None,
        loss=loss,
        finite=False,
    )


def top_hessian_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    init: ParamDict | None = None,
    negative: bool = False,
    seed: int = 0,
    route: HvpRoute = "graph",
    train_mode: bool = False,
) -> EigenResult:
    r"""The ``k`` largest Hessian eigenvalues of the loss, by Lanczos (see :func:`lanczos`).

    :math:`\lambda_{\max}` is the sharpness of Keskar et al. 2017 and Cohen et al. 2021; compare it across
    learning rates through :func:`~.sharpness.stability_ratio`, since raw eigenvalues change under
    reparametrisations that leave the function unchanged (Dinh et al. 2017, "Sharp Minima Can Generalize").

    Args:
        model: The module, measured at its current weights and left untouched.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: One batch or an iterable of batches; the loss is their size-weighted mean.
        k: Number of eigenvalues.
        tol: Relative residual tolerance :math:`\lVert Hv-\lambda v\rVert \le \text{tol}\,|\lambda_1|`. The
            eigenvalue error is at most the residual and, for a separated eigenvalue, about residual²/gap, so
            the default 1e-3 bounds :math:`\lambda_{\max}`'s relative error by 1e-3 and gives 1e-6 to 5e-6 in
            practice in float32, about the float32 floor (``benchmarks/RESULTS.md``); 5e-3 still gives 1e-4.
        max_iter: Most Hessian-vector products.
        init: Warm-start vector (a previous eigenvector).
        negative: Also return the most negative eigenvalue.
        seed: Seed of the private generator for the start vector.
        route: Hessian-vector product route, ``"graph"`` or ``"func"``.
        train_mode: Measure in train mode instead of eval mode.

    Returns:
        An :class:`EigenResult`.

    Raises:
        ValueError: On ``k < 1``, ``tol <= 0``, ``max_iter < 1``, empty batches, a model without trainable
            parameters, or a batch on another device or dtype.
        TypeError: If ``loss_fn`` does not return a Tensor.

    Example:
        >>> import torch
        >>> class Quadratic(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
        >>> A = torch.diag(torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64))
        >>> loss = lambda m, batch: 0.5 * m.w @ A @ m.w
        >>> res = top_hessian_eigenvalues(Quadratic(), loss, torch.zeros(1, 1, dtype=torch.float64), k=2)
        >>> [round(float(x), 6) for x in res.eigenvalues]
        [3.0, 1.0]
    """
    check_positive_int("k", k)
    check_positive_int("max_iter", max_iter)
    check_positive("tol", tol)
    with hessian_operator(model, loss_fn, batches, route=route, train_mode=train_mode) as operator:
        return lanczos(
            operator, k, tol=tol, max_iter=max_iter, init=init, negative=negative, generator=make_generator(seed)
        )


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    *,
    num_samples: int = 30,
    method: TraceMethod = "hutch++",
    seed: int = 0,
    route: HvpRoute = "graph",
    train_mode: bool = False,
) -> TraceResult:
    r"""Stochastic estimate of :math:`\operatorname{tr} H` with its standard error.

    Hutchinson (Hutchinson 1989; Girard 1989): with Rademacher vectors :math:`z_i`,
    :math:`\mathbb{E}[z^\top H z] = \operatorname{tr} H`, so
    :math:`\hat t = \frac{1}{m}\sum_i z_i^\top H z_i` with standard error :math:`s/\sqrt{m}`.

    Hutch++ (Meyer, Musco, Musco & Woodruff 2021, "Hutch++: Optimal Stochastic Trace Estimation"): spend a third
    of the products on a sketch :math:`Q = \operatorname{orth}(H S)`, take the trace of :math:`Q^\top H Q`
    exactly, and run Hutchinson on the deflated remainder :math:`(I-QQ^\top)H(I-QQ^\top)`:

    .. math::
        \hat t = \operatorname{tr}(Q^\top H Q) + \frac{1}{m_3}\sum_i g_i^\top (I-QQ^\top) H (I-QQ^\top) g_i .

    The error falls as :math:`1/m` instead of :math:`1/\sqrt{m}` when the spectrum is dominated by a few
    eigenvalues, as Hessians of trained networks are. The reported standard error is that of the Hutchinson
    part; when the sketch spans the whole space the estimate is exact and the error 0.

    Args:
        model: The module, measured at its current weights and left untouched.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: One batch or an iterable of batches.
        num_samples: Hessian-vector products to spend (Hutch++ needs at least 3).
        method: ``"hutchinson"`` or ``"hutch++"``.
        seed: Seed of the private generator.
        route: Hessian-vector product route.
        train_mode: Measure in train mode instead of eval mode.

    Returns:
        A :class:`TraceResult`.

    Raises:
        ValueError: On an unknown ``method`` or too few ``num_samples``.
    """
    check_positive_int("num_samples", num_samples)
    if method not in _TRACE_METHODS:
        raise ValueError(f"method must be one of {_TRACE_METHODS}, got {method!r}")
    if method == "hutch++" and num_samples < 3:
        raise ValueError(f"num_samples must be at least 3 for hutch++, got {num_samples}")
    generator = make_generator(seed)
    with hessian_operator(model, loss_fn, batches, route=route, train_mode=train_mode) as operator:
        if not operator.finite:
            nan = float("nan")
            return TraceResult(nan, nan, 0, method, operator.loss, False)
        params = operator.params
        if method == "hutchinson":
            samples = _hutchinson_samples(operator, params, num_samples, generator, deflate=None)
            exact_part = 0.0
        else:
            sketch_size = num_samples // 3
            residual_size = num_samples - 2 * sketch_size
            sketch = torch.stack(
                [flatten_params(operator.matvec(random_direction(params, generator, "rademacher")))
                 for _ in range(sketch_size)],
                dim=1,
            )
            basis, _ = torch.linalg.qr(sketch.to(torch.float64))
            basis = basis[:, _numerical_rank(sketch)].to(sketch.dtype)
            exact_part = sum(float(torch.dot(q, operator.matvec_flat(q))) for q in basis.T)
            samples = _hutchinson_samples(operator, params, residual_size, generator, deflate=basis)
        estimate = exact_part + float(samples.mean())
        std_error = float(samples.std(unbiased=True) / math.sqrt(len(samples))) if len(samples) > 1 else float("nan")
        finite = math.isfinite(estimate)
        return TraceResult(estimate, std_error, operator.num_products, method, operator.loss, finite)


def _numerical_rank(matrix: Tensor) -> Tensor:
    """Indices of the leading orthonormal columns that carry signal (drops columns of a rank-deficient sketch)."""
    singular = torch.linalg.svdvals(matrix.to(torch.float64))
    if singular.numel() == 0 or singular[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    rank = int((singular > singular[0] * 1e-10 * max(matrix.shape)).sum())
    return torch.arange(rank)


def _hutchinson_samples(
    operator: HessianOperator, params: ParamDict, count: int, generator: torch.Generator, deflate: Tensor | None
) -> Tensor:
    values = []
    for _ in range(count):
        z = flatten_params(random_direction(params, generator, "rademacher"))
        if deflate is not None and deflate.numel():
            z = z - deflate @ (deflate.T @ z)
        values.append(float(torch.dot(z, operator.matvec_flat(z))))
    return torch.tensor(values, dtype=torch.float64)


def directional_curvature(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Any,
    *,
    num_directions: int = 10,
    h: float = 0.1,
    norm: DirectionNorm = "filter",
    ignore: DirectionIgnore = "biasbn",
    seed: int = 0,
    exact: bool = False,
    route: HvpRoute = "graph",
    train_mode: bool = False,
) -> DirectionalCurvatureResult:
    r"""Second differences of the loss along random filter-normalized directions (Li et al. 2018).

    .. math::
        c(d) = \frac{L(\theta + h d) - 2 L(\theta) + L(\theta - h d)}{h^2}
             = d^\top H d + \frac{h^2}{12} \partial_d^4 L + O(h^4),

    so on a quadratic it equals :math:`d^\top H d` exactly. The directions are filter-normalized
    (:func:`~.params.filter_normalized_direction`), which makes :math:`c(d)` comparable between networks of
    different weight scales; ``h`` is the step in those units (the :math:`\alpha` axis of Li et al.'s plots).

    On ReLU networks the two differ at finite ``h``: :math:`d^\top H d` sees only the curvature of the
    piecewise-linear pieces' softmax/cross-entropy head, while the second difference also sees activation
    patterns that flip within :math:`\pm h d`. A second difference well above :math:`d^\top H d` says the
    landscape is rougher at scale ``h`` than the Hessian at one point tells; that gap is information, not error.

    Args:
        model: The module, measured at its current weights and left untouched.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: One batch or an iterable of batches.
        num_directions: Number of random directions.
        h: Step along each direction (> 0). Round-off bounds how small it can be: the loss is known to about
            :math:`\epsilon L` (:math:`\epsilon` the dtype's epsilon), so the second difference carries an
            error of about :math:`4\epsilon L/h^2` — :math:`2\cdot 10^{-5} L` in float32 at the default 0.1,
            but :math:`2\cdot 10^{-3} L` at 0.01. Use float64 to resolve smaller scales.
        norm: Direction normalization, ``"filter"``, ``"layer"`` or ``"none"``.
        ignore: ``"biasbn"`` (zero on 1-D tensors) or ``"none"``.
        seed: Seed of the private generator.
        exact: Also compute :math:`d^\top H d` by a Hessian-vector product per direction.
        route: Hessian-vector product route for ``exact``.
        train_mode: Measure in train mode instead of eval mode.

    Returns:
        A :class:`DirectionalCurvatureResult`.

    Raises:
        ValueError: On ``h <= 0``, ``num_directions < 1``, or an unknown ``norm``/``ignore``.
    """
    check_positive_int("num_directions", num_directions)
    check_positive("h", h)
    generator = make_generator(seed)
    closure = LossClosure(model, loss_fn, batches)
    params = closure.params
    directions = [filter_normalized_direction(params, generator, norm, ignore) for _ in range(num_directions)]
    with measurement(model, train_mode):
        center = closure()
        values = torch.tensor(
            [
                float((closure(param_axpy(h, d, params)) - 2 * center + closure(param_axpy(-h, d, params))) / h**2)
                for d in directions
            ],
            dtype=torch.float64,
        )
        exact_values = None
        if exact:
            operator = HessianOperator(closure, route)
            exact_values = torch.tensor(
                [float(param_dot(d, operator.matvec(d))) for d in directions], dtype=torch.float64
            )
    norms = torch.tensor([float(torch.sqrt(param_dot(d, d))) for d in directions], dtype=torch.float64)
    finite = is_finite(center) and bool(torch.isfinite(values).all())
    return DirectionalCurvatureResult(values, exact_values, norms, float(h), float(center), finite)
