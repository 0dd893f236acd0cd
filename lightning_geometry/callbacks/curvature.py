r"""
Curvature probe
^^^^^^^^^^^^^^^

Measures the curvature of the training loss on a fixed probe batch while the model trains: the top Hessian
eigenvalues (Lanczos, warm-started from the previous probe), the edge-of-stability ratio with the optimizer's
current learning rate, the Hessian trace with its standard error, the distribution of directional curvatures
along filter-normalized random directions, and average adaptive sharpness. The mathematics is in
:mod:`lightning_geometry.functional.curvature` and :mod:`lightning_geometry.functional.sharpness`; this module
only schedules, logs and keeps the warm-start vector.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lightning_geometry import tensorboard as tb
from lightning_geometry.callbacks._base import GeometryCallback, GeometryConfigurationError, ProbeOutput, check_choice
from lightning_geometry.functional import curvature as F
from lightning_geometry.functional import sharpness as S
from lightning_geometry.functional.closure import batch_size
from lightning_geometry.probe import LossFn

log = logging.getLogger(__name__)

__all__ = ["CurvatureProbe"]

_QUANTILES = (0.1, 0.5, 0.9)


def _check_number(name: str, value: Any, *, low: float, integer: bool, allow_zero: bool = False) -> None:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not (value > low or (allow_zero and value == 0)):
        kind = "an integer" if integer else "a number"
        bound = f">= {low + 1}" if integer else f"> {low}"
        zero = " (or 0 to turn it off)" if allow_zero else ""
        raise GeometryConfigurationError(f"`{name}` must be {kind} {bound}{zero}, got {value!r}")


class CurvatureProbe(GeometryCallback):
    r"""Log Hessian eigenvalues, trace, directional curvature and adaptive sharpness of the training loss.

    At each probe point (by default the end of every epoch that the compute ``budget`` allows; see
    :mod:`lightning_geometry.callbacks._base` for the cost model) the probe evaluates the loss
    :math:`L(\theta)` on a fixed probe batch (drawn once at fit start) and logs, under ``geometry/``:

    * ``lambda_max`` (and ``lambda_2`` … ``lambda_k`` for ``k > 1``): the top Hessian eigenvalues by Lanczos with
      full reorthogonalisation, warm-started from the previous probe's top eigenvector; ``lanczos_products``.
    * ``lambda_max_lr`` :math:`= \lambda_{\max}\eta/2` with the first optimizer's current learning rate
      :math:`\eta` (1 is the edge of stability of plain gradient descent, Cohen et al. 2021) and, for SGD,
      ``stability_threshold`` — :math:`2/\eta`, :math:`(2+2\beta)/\eta` under heavy-ball momentum
      :math:`\beta`, with dampening and Nesterov as in
      :func:`~lightning_geometry.functional.sharpness.sgd_stability_threshold` — and ``stability_ratio``
      :math:`\lambda_{\max}` over it. These ratios do not apply to adaptive optimizers (Adam), whose stability
      is set by the preconditioned Hessian.
    * ``trace`` and ``trace_std_error``: Hutch++ (or Hutchinson) estimate of :math:`\operatorname{tr} H`.
    * ``directional_curvature/{mean,max,q10,q50,q90}``: second differences
      :math:`(L(\theta+hd) - 2L(\theta) + L(\theta-hd))/h^2` along filter-normalized directions (Li et al.
      2018), and a histogram of them to TensorBoard.
    * ``adaptive_sharpness`` and its ``_std_error``: :math:`\mathbb{E}_\gamma L(\theta+\rho|\theta|\odot\gamma)
      - L(\theta)` (Kwon et al. 2021; Andriushchenko et al. 2023).

    Raw :math:`\lambda_{\max}` and trace change under reparametrisations that leave the function unchanged
    (Dinh et al. 2017); compare runs through ``lambda_max_lr`` / ``stability_ratio`` and adaptive sharpness.
    A non-finite loss logs ``nan`` for the measurement and training goes on.

    Args:
        k: Number of top eigenvalues (>= 1).
        tol: Lanczos relative residual tolerance.
        max_iter: Most Hessian-vector products for the eigenvalues.
        warm_start: Start Lanczos from the previous probe's top eigenvector.
        trace_samples: Hessian-vector products for the trace (0 turns the trace off; Hutch++ needs >= 3).
        trace_method: ``"hutch++"`` or ``"hutchinson"``.
        num_directions: Random directions for the directional curvature (0 turns it off).
        h: Step of the second differences, in filter-normalized units.
        direction_norm: ``"filter"``, ``"layer"`` or ``"none"``.
        sharpness_rho: Radius of the adaptive sharpness perturbation, relative to :math:`|\theta|`.
        sharpness_samples: Monte-Carlo samples of adaptive sharpness (0 turns it off).
        route: Hessian-vector product route, ``"graph"`` or ``"func"``.
        loss_fn, probe_data, probe_batches, probe_batch_size, probe_per_rank, budget, every_n_epochs,
            every_n_train_steps, seed, train_mode, log_key_prefix: See
            :class:`~lightning_geometry.callbacks._base.GeometryCallback`.

    Attributes:
        last_results: The functional results of the latest probe on this rank (``"eigen"``: ``EigenResult``,
            ``"trace"``, ``"directional"``, ``"sharpness"``), before the average across ranks.

    Raises:
        GeometryConfigurationError: (a ``ValueError`` and a ``MisconfigurationException``) naming the argument
            for ``k < 1``, a non-positive ``tol``/``h``/``sharpness_rho``, an unknown option string, too few
            trace samples, and the base class's errors.
        MisconfigurationException: At ``setup``, when no loss can be found or there is nothing to draw probe
            batches from.

    Example::

        trainer = Trainer(callbacks=[CurvatureProbe(every_n_epochs=5), TrajectoryMonitor()])
        # or let the budget decide: CurvatureProbe(budget=0.05)

    .. note::
        Cost: about ``max_iter + trace_samples`` Hessian-vector products (each ~2 gradients) plus
        ``2 * num_directions + sharpness_samples + 2`` forward passes on the probe batch. Under DDP each rank
        measures its own probe batch and the values are averaged, so every rank logs the same number.
    """

    probe_name = "curvature"
    needs_probe_data = True

    def __init__(
        self,
        *,
        k: int = 1,
        tol: float = 1e-3,
        max_iter: int = 30,
        warm_start: bool = True,
        trace_samples: int = 12,
        trace_method: Literal["hutch++", "hutchinson"] = "hutch++",
        num_directions: int = 10,
        h: float = 0.1,
        direction_norm: Literal["filter", "layer", "none"] = "filter",
        sharpness_rho: float = 0.05,
        sharpness_samples: int = 10,
        route: Literal["graph", "func"] = "graph",
        loss_fn: LossFn | str | None = None,
        probe_data: Any = None,
        probe_batches: int = 1,
        probe_batch_size: int | None = None,
        probe_per_rank: bool = False,
        budget: float = 0.05,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        seed: int = 0,
        train_mode: bool = False,
        log_key_prefix: str = "geometry/",
    ) -> None:
        super().__init__(
            budget=budget,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            seed=seed,
            train_mode=train_mode,
            log_key_prefix=log_key_prefix,
            loss_fn=loss_fn,
            probe_data=probe_data,
            probe_batches=probe_batches,
            probe_batch_size=probe_batch_size,
            probe_per_rank=probe_per_rank,
        )
        _check_number("k", k, low=0, integer=True)
        _check_number("max_iter", max_iter, low=0, integer=True)
        _check_number("tol", tol, low=0.0, integer=False)
        _check_number("h", h, low=0.0, integer=False)
        _check_number("sharpness_rho", sharpness_rho, low=0.0, integer=False)
        _check_number("trace_samples", trace_samples, low=0, integer=True, allow_zero=True)
        _check_number("num_directions", num_directions, low=0, integer=True, allow_zero=True)
        _check_number("sharpness_samples", sharpness_samples, low=0, integer=True, allow_zero=True)
        check_choice("trace_method", trace_method, ("hutch++", "hutchinson"))
        check_choice("direction_norm", direction_norm, ("filter", "layer", "none"))
        check_choice("route", route, ("graph", "func"))
        if trace_method == "hutch++" and 0 < trace_samples < 3:
            raise GeometryConfigurationError(
                f"`trace_samples` must be 0 or >= 3 with trace_method='hutch++', got {trace_samples!r}"
            )
        self.k = k
        self.tol = float(tol)
        self.max_iter = max_iter
        self.warm_start = bool(warm_start)
        self.trace_samples = trace_samples
        self.trace_method = trace_method
        self.num_directions = num_directions
        self.h = float(h)
        self.direction_norm = direction_norm
        self.sharpness_rho = float(sharpness_rho)
        self.sharpness_samples = sharpness_samples
        self.route = route
        self._eigenvector: dict[str, torch.Tensor] | None = None
        self.last_results: dict[str, Any] = {}

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "k": self.k, "seed": self.seed}

    @override
    def layout(self) -> dict[str, list[Any]]:
        k = self._key
        return {
            "lambda_max": ["Multiline", [k("lambda_max$"), k(r"lambda_\d+$")]],
            "edge of stability": ["Multiline", [k("lambda_max_lr$"), k("stability_ratio$")]],
            "trace": ["Multiline", [k("trace$"), k("trace_std_error$")]],
            "directional curvature": ["Multiline", [k("directional_curvature/.*")]],
            "adaptive sharpness": ["Multiline", [k("adaptive_sharpness$")]],
            "probe cost": ["Multiline", [k("probe_seconds/.*"), k("probe_cost_fraction/.*")]],
        }

    def _probe_samples(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self._probe.is_prepared:
            return self._probe.num_samples
        loader = getattr(trainer, "train_dataloader", None)
        size = self.probe_batch_size or getattr(loader, "batch_size", None) or 32
        return size * self.probe_batches


    def _forwards(self) -> int:
        directions = 2 * self.num_directions + 1 if self.num_directions else 0
        sharp = self.sharpness_samples + 1 if self.sharpness_samples else 0
        return directions + sharp

    @override
    def estimated_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        products = min(self.max_iter, 15 * self.k) + self.trace_samples
        graphs = 1 + (1 if self.trace_samples else 0)
        scalars = self.k + 6 + 2 * bool(self.trace_samples) + 5 * bool(self.num_directions) + 2 * bool(
            self.sharpness_samples
        )
        samples = self._probe_samples(trainer, pl_module)
        compute = self.op_cost(samples, hvp=products, forward=self._forwards(), gradient=graphs)
        return compute + self.LOG_COST * scalars

    @staticmethod
    def _optimizer_lr(trainer: pl.Trainer) -> tuple[float | None, float | None]:
        """The first optimizer's learning rate, and its SGD stability threshold (``None`` for other optimizers)."""
        optimizers = getattr(trainer, "optimizers", None) or []
        if not optimizers:
            return None, None
        opt = optimizers[0]
        group = opt.param_groups[0]
        lr = float(group["lr"]) if "lr" in group else None
        if lr is None or lr <= 0 or not isinstance(opt, torch.optim.SGD):
            return lr, None
        momentum = float(group.get("momentum", 0.0) or 0.0)
        threshold = S.sgd_stability_threshold(
            lr, momentum, float(group.get("dampening", 0.0) or 0.0), bool(group.get("nesterov", False))
        )
        return lr, threshold

    def _init_vector(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor] | None:
        if not self.warm_start or self._eigenvector is None:
            return None
        params = dict(pl_module.named_parameters())
        if set(self._eigenvector) != {k for k, p in params.items() if p.requires_grad}:
            return None
        return {k: v.to(device=params[k].device, dtype=params[k].dtype) for k, v in self._eigenvector.items()}

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeOutput:
        loss_fn = self.resolved_loss_fn
        batches = self._probe.batches
        samples = sum(batch_size(b) for b in batches)
        seed = self.probe_seed()
        scalars: dict[str, float] = {}
        extra: dict[str, Any] = {}

        eig = F.top_hessian_eigenvalues(
            pl_module, loss_fn, batches, k=self.k, tol=self.tol, max_iter=self.max_iter,
            init=self._init_vector(pl_module), seed=seed, route=self.route, train_mode=self.train_mode,
        )
        values = [float(v) for v in eig.eigenvalues] if eig.finite else [math.nan] * self.k
        values = (values + [math.nan] * self.k)[: self.k]
        lam = values[0]
        scalars["lambda_max"] = lam
        for i, v in enumerate(values[1:], start=2):
            scalars[f"lambda_{i}"] = v
        scalars["lanczos_products"] = float(eig.num_products)
        if eig.finite and eig.eigenvectors:
            self._eigenvector = {name: t.detach().to("cpu", copy=True) for name, t in eig.eigenvectors[0].items()}
        extra["eigen"] = eig
        hvp_products, graphs = eig.num_products, 1

        lr, threshold = self._optimizer_lr(trainer)
        if lr is not None and lr > 0:
            scalars["lambda_max_lr"] = lam * lr / 2.0
        if threshold is not None:
            scalars["stability_threshold"] = threshold
            scalars["stability_ratio"] = lam / threshold

        if self.trace_samples:
            tr = F.hessian_trace(
                pl_module, loss_fn, batches, num_samples=self.trace_samples, method=self.trace_method, seed=seed,
                route=self.route, train_mode=self.train_mode,
            )
            scalars["trace"] = tr.trace if tr.finite else math.nan
            scalars["trace_std_error"] = tr.std_error if tr.finite else math.nan
            hvp_products += tr.num_products
            graphs += 1
            extra["trace"] = tr

        if self.num_directions:
            dc = F.directional_curvature(
                pl_module, loss_fn, batches, num_directions=self.num_directions, h=self.h, norm=self.direction_norm,
                seed=seed, train_mode=self.train_mode,
            )
            vals = dc.values.double()
            if not dc.finite:
                vals = torch.full_like(vals, math.nan)
            qs = torch.quantile(vals, torch.tensor(_QUANTILES, dtype=torch.float64)) if dc.finite else [math.nan] * 3
            scalars["directional_curvature/mean"] = float(vals.mean())
            scalars["directional_curvature/max"] = float(vals.max())
            for q, v in zip(_QUANTILES, qs):
                scalars[f"directional_curvature/q{int(round(q * 100))}"] = float(v)
            extra["directional"] = dc

        if self.sharpness_samples:
            sh = S.average_adaptive_sharpness(
                pl_module, loss_fn, batches, rho=self.sharpness_rho, num_samples=self.sharpness_samples, seed=seed,
                train_mode=self.train_mode,
            )
            scalars["adaptive_sharpness"] = sh.value if sh.finite else math.nan
            scalars["adaptive_sharpness_std_error"] = sh.std_error if sh.finite else math.nan
            extra["sharpness"] = sh

        cost = self.op_cost(samples, hvp=hvp_products, forward=self._forwards(), gradient=graphs)
        self.last_results = extra
        return ProbeOutput(scalars=scalars, cost=cost, extra=extra)

    @override
    def after_probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float], output: ProbeOutput
    ) -> None:
        dc = output.extra.get("directional")
        if dc is not None and dc.finite:
            tb.log_histogram(trainer, self._key("directional_curvature"), dc.values)

    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {"eigenvector": self._eigenvector}

    @override
    def load_extra_state_dict(self, state: Any) -> None:
        if state:
            self._eigenvector = state.get("eigenvector")
