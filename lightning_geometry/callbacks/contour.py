r"""
Energy contour
^^^^^^^^^^^^^^

The shape of the basin around the final weights, measured once at the end of the fit (or on demand for a model
trained elsewhere): 1-D loss curves and a 2-D loss map along filter-normalized random directions (Li et al. 2018)
or given ones, the *contour width* along rays (the radius where the loss first reaches :math:`L_0 + \Delta`,
found by root finding; censored rays reported, not dropped) and the area fraction of the plane under that level.
The math is in :mod:`lightning_geometry.functional.surface`; this module decides when, on what data, and where
the numbers, the figure and the files go.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from torch import Tensor, nn

from lightning_geometry import plotting
from lightning_geometry.callbacks._after_fit import AfterFitCallback, _check_int, _check_positive, _Progress
from lightning_geometry.callbacks._base import GeometryConfigurationError
from lightning_geometry.functional.closure import LossClosure
from lightning_geometry.functional.params import check_same_structure, param_norm
from lightning_geometry.functional.surface import (
    AreaFraction,
    ContourWidth,
    area_fraction,
    contour_threshold,
    contour_width,
    loss_along_line,
    loss_plane,
    random_directions,
    symmetric_grid,
)
from lightning_geometry.probe import LossFn

log = logging.getLogger(__name__)

__all__ = ["EnergyContour", "EnergyContourResult"]


# ============================================================================================ EnergyContour
@dataclass
class EnergyContourResult:
    r"""What :class:`EnergyContour` measured around the weights :math:`\theta`.

    Attributes:
        loss0: :math:`L_0 = L(\theta)` on the probe data.
        threshold: The contour level (:math:`L_0 + \Delta` or :math:`L_0 (1 + r)`).
        param_norm: :math:`\lVert\theta\rVert`.
        alphas: Grid coordinates of the plane (both axes) and of the 1-D curves' range.
        plane: ``(n, n)`` loss map over ``alphas`` × ``alphas`` along directions 1 and 2 (``None`` if disabled);
            nan kept.
        line_alphas: Coordinates of the 1-D curves.
        lines: Loss along each of directions 1 and 2 (``{"direction 1": ..., "direction 2": ...}``).
        width: The contour width along the rays :math:`\pm d_k` (see
            :class:`~lightning_geometry.functional.surface.ContourWidth`); rays are ordered
            :math:`+d_1, -d_1, +d_2, -d_2, \dots`.
        area: Area fraction of the plane under the level (``None`` without a plane).
        num_evaluations: Loss evaluations in all (each one forward pass over the probe data).
        seconds: Wall-clock time.
        files: Paths written (``"npz"``, ``"json"``), if any.
    """

    loss0: float
    threshold: float
    param_norm: float
    alphas: np.ndarray
    plane: np.ndarray | None
    line_alphas: np.ndarray | None
    lines: dict[str, np.ndarray]
    width: ContourWidth
    area: AreaFraction | None
    num_evaluations: int
    seconds: float = math.nan
    files: dict[str, str] = field(default_factory=dict)

    @property
    def width_rel(self) -> float:
        """Mean ray distance (parameter space) over :math:`\\lVert\\theta\\rVert` (censored rays at the search
        radius)."""
        finite = np.isfinite(self.width.distances)
        if not finite.any() or not self.param_norm:
            return math.nan
        return float(np.mean(self.width.distances[finite]) / self.param_norm)


class EnergyContour(AfterFitCallback):
    r"""Measure the loss basin around the final weights at the end of the fit: curves, a contour map and widths.

    At ``on_fit_end`` (rank zero), on probe batches drawn at fit start:

    * 1-D loss curves :math:`L(\theta + \alpha d_i)`, :math:`\alpha \in [-R, R]` (``line_points`` points) and the
      2-D map :math:`L(\theta + \alpha d_1 + \beta d_2)` on a ``num_points`` × ``num_points`` grid, with
      :math:`d_1, d_2` filter-normalized Gaussian directions (Li et al. 2018) from a private generator, or the
      given ``directions`` (e.g. top Hessian eigenvectors, trajectory principal components);
    * the contour width along the rays :math:`\pm d_k`, :math:`k = 1..` ``num_directions`` (the plane's two
      directions first): the radius where the loss first reaches :math:`L_0 + \Delta` (``delta``) or
      :math:`L_0 (1 + r)` (``rel``), by bracketing and Brent's method, up to ``max_radius``; rays that never
      cross are censored and counted;
    * the area fraction of the plane under that level.

    Logged through every logger's ``log_metrics`` (``self.log`` is not allowed in ``on_fit_end``):
    ``geometry/contour_width`` (mean over rays, censored ones at ``max_radius``, so a lower bound when
    ``contour_width_censored > 0``), ``contour_width_std``, ``contour_width_censored``, ``contour_width_rel``
    (mean parameter-space distance over :math:`\lVert\theta\rVert`), ``contour_area_fraction``, ``contour_loss0``,
    ``contour_threshold``. The figure ``geometry/energy_contour`` (map, level line, crossings and mean width) goes
    to TensorBoard; ``energy_contour.npz`` (all arrays, nan kept) and ``energy_contour.json`` (summary) are written
    atomically under ``save_dir`` (default ``<trainer.log_dir>/geometry``). The result stays on ``self.result``.

    Radii are in units of the direction: with filter normalization, :math:`\alpha = 1` moves every filter by its
    own norm.

    Args:
        radius: Half-width :math:`R` of the plane and of the curves (> 0).
        num_points: Grid points per axis of the plane (>= 3; odd puts the weights on the grid); 0 disables the
            plane.
        line_points: Points of each 1-D curve (>= 3), 0 disables the curves.
        delta: Absolute level increase :math:`\Delta > 0`. If neither ``delta`` nor ``rel`` is given,
            ``delta=0.1``.
        rel: Relative level increase :math:`r > 0` (level :math:`L_0(1 + r)`).
        num_directions: Directions for the contour width (>= 1; each gives two rays); the first two are the
            plane's.
        max_radius: Search radius of the rays (> 0); ``radius`` if ``None``.
        directions: Two (or more) given directions (parameter dictionaries); random ones fill up to
            ``num_directions``.
        norm: Normalization of random directions: ``"filter"``, ``"layer"`` or ``"none"``.
        ignore: ``"biasbn"`` zeroes random directions on 1-D tensors (biases, norm layers); ``"none"`` keeps them.
        rtol: Relative tolerance of each ray's radius.
        loss_fn: ``loss_fn(module, batch)``, an import path, or ``None`` (see
            :func:`lightning_geometry.probe.resolve_loss_fn`).
        probe_data: Data to measure on; ``None`` draws ``probe_batches`` training batches at fit start.
        probe_batches: Number of probe batches (>= 1).
        probe_batch_size: Samples per drawn batch (``None``: the training batch size).
        seed: Seed of the private generators (directions, probe batches).
        train_mode: Measure in train mode instead of eval.
        log_key_prefix: Prefix of the logged names.
        save_dir: Directory for the files; ``<trainer.log_dir>/geometry`` if ``None``.
        save: Write the files at the end of the fit.
        progress: Show a progress bar; ``None`` shows one when the Trainer has a progress bar
            (``enable_progress_bar=True``).

    Attributes:
        result: The last :class:`EnergyContourResult` (``None`` before a measurement, and on ranks other than 0).

    Raises:
        GeometryConfigurationError: (a ``ValueError``) at construction for ``radius <= 0``, ``delta <= 0``,
            ``rel <= 0``, both ``delta`` and ``rel``, fewer than 3 grid or line points, ``num_directions < 1``, or
            an unknown ``norm``/``ignore``.
        TypeError: For arguments of the wrong type.

    Example::

        trainer = Trainer(max_epochs=20, callbacks=[EnergyContour(radius=1.0, num_points=25, delta=0.1)])
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].result.width.mean)
        # or, for a model trained elsewhere:
        result = EnergyContour().compute(model, val_loader)

    .. note:: Cost: ``num_points² + 2·line_points`` forward passes over the probe data for the surfaces, plus
        about 3–6 per ray for the widths.
    """

    probe_name: ClassVar[str] = "energy_contour"

    def __init__(
        self,
        radius: float = 1.0,
        num_points: int = 25,
        line_points: int = 51,
        delta: float | None = None,
        rel: float | None = None,
        num_directions: int = 4,
        max_radius: float | None = None,
        directions: Sequence[Mapping[str, Tensor]] | None = None,
        norm: str = "filter",
        ignore: str = "biasbn",
        rtol: float = 1e-3,
        *,
        loss_fn: LossFn | str | None = None,
        probe_data: Any = None,
        probe_batches: int = 4,
        probe_batch_size: int | None = None,
        seed: int = 0,
        train_mode: bool = False,
        log_key_prefix: str = "geometry/",
        save_dir: str | None = None,
        save: bool = True,
        progress: bool | None = None,
    ) -> None:
        super().__init__(
            loss_fn=loss_fn,
            probe_data=probe_data,
            probe_batches=probe_batches,
            probe_batch_size=probe_batch_size,
            seed=seed,
            train_mode=train_mode,
            log_key_prefix=log_key_prefix,
            save_dir=save_dir,
            save=save,
            progress=progress,
        )
        self.radius = _check_positive("radius", radius)
        _check_int("num_points", num_points, 0)
        if num_points in (1, 2):
            raise GeometryConfigurationError(f"`num_points` must be 0 (no plane) or >= 3, got {num_points}")
        _check_int("line_points", line_points, 0)
        if line_points in (1, 2):
            raise GeometryConfigurationError(f"`line_points` must be 0 (no curves) or >= 3, got {line_points}")
        if delta is not None and rel is not None:
            raise GeometryConfigurationError(f"give at most one of `delta` ({delta!r}) and `rel` ({rel!r})")
        if delta is None and rel is None:
            delta = 0.1
        self.delta = _check_positive("delta", delta) if delta is not None else None
        self.rel = _check_positive("rel", rel) if rel is not None else None
        self.num_points = num_points
        self.line_points = line_points
        self.num_directions = _check_int("num_directions", num_directions, 1)
        self.max_radius = self.radius if max_radius is None else _check_positive("max_radius", max_radius)
        if norm not in ("filter", "layer", "none"):
            raise GeometryConfigurationError(f"`norm` must be one of ('filter', 'layer', 'none'), got {norm!r}")
        if ignore not in ("biasbn", "none"):
            raise GeometryConfigurationError(f"`ignore` must be one of ('biasbn', 'none'), got {ignore!r}")
        self.norm = norm
        self.ignore = ignore
        self.rtol = _check_positive("rtol", rtol)
        if directions is not None:
            directions = list(directions)
            if len(directions) < 1 or not all(isinstance(d, Mapping) for d in directions):
                raise TypeError("`directions` must be a sequence of parameter dictionaries (name -> Tensor)")
        self.directions = directions

    # ------------------------------------------------------------------------------------------ measurement
    def _directions(self, params: Mapping[str, Tensor]) -> list[dict[str, Tensor]]:
        count = max(self.num_directions, 2 if self.num_points or self.line_points else 1)
        given = []
        for i, d in enumerate(self.directions or []):
            d = {k: v.to(device=params[k].device, dtype=params[k].dtype) if k in params else v for k, v in d.items()}
            check_same_structure(params, d, what=f"directions[{i}]")
            given.append(d)
        if len(given) >= count:
            return given
        return given + random_directions(params, count - len(given), seed=self.seed, norm=self.norm, ignore=self.ignore)

    def _compute(self, module: nn.Module, batches: list[Any], loss_fn: LossFn, progress: bool) -> EnergyContourResult:
        closure = LossClosure(module, loss_fn, batches)
        params = closure.params
        dirs = self._directions(params)
        plane_n = self.num_points**2
        n_rays = 2 * self.num_directions
        bar = _Progress(progress, 1 + plane_n + 2 * self.line_points + 5 * n_rays, f"{type(self).__name__}")
        try:
            evals = 1
            loss0 = float(closure())
            bar.update(1)
            threshold = contour_threshold(loss0, self.delta, self.rel) if math.isfinite(loss0) else math.nan
            lines: dict[str, np.ndarray] = {}
            line_alphas = None
            if self.line_points:
                line_alphas = symmetric_grid(self.radius, self.line_points).numpy()
                for i in range(2):
                    curve = loss_along_line(closure, dirs[i], line_alphas, progress=bar.update)
                    lines[f"direction {i + 1}"] = curve.losses
                    evals += self.line_points
            alphas = symmetric_grid(self.radius, max(self.num_points, 3)).numpy()
            plane = area = None
            if self.num_points:
                surface = loss_plane(closure, dirs[0], dirs[1], alphas, progress=bar.update)
                plane = surface.losses
                evals += plane_n
                if math.isfinite(threshold):
                    area = area_fraction(alphas, alphas, plane, threshold)
            rays = [{k: s * v for k, v in d.items()} for d in dirs[: self.num_directions] for s in (1.0, -1.0)]
            width = contour_width(
                closure,
                rays,
                delta=self.delta,
                rel=self.rel,
                max_radius=self.max_radius,
                rtol=self.rtol,
                loss0=loss0,
                progress=bar.update,
            )
            evals += width.num_evaluations
        finally:
            bar.close()
        return EnergyContourResult(
            loss0=loss0,
            threshold=threshold,
            param_norm=float(param_norm(params)),
            alphas=alphas,
            plane=plane,
            line_alphas=line_alphas,
            lines=lines,
            width=width,
            area=area,
            num_evaluations=evals,
        )

    # ------------------------------------------------------------------------------------------ outputs
    def _scalars(self, result: EnergyContourResult) -> dict[str, float]:
        out = {
            "contour_width": result.width.mean,
            "contour_width_std": result.width.std,
            "contour_width_censored": float(result.width.num_censored),
            "contour_width_rel": result.width_rel,
            "contour_loss0": result.loss0,
            "contour_threshold": result.threshold,
        }
        if result.area is not None:
            out["contour_area_fraction"] = result.area.fraction
            if result.area.nan_fraction > 0:
                out["contour_nan_fraction"] = result.area.nan_fraction
        return out

    def _figures(self, result: EnergyContourResult) -> dict[str, Any]:
        figs = {}
        w = result.width
        crossings = []
        for k, (dx, dy) in enumerate([(1, 0), (-1, 0), (0, 1), (0, -1)][: len(w.radii)]):
            if math.isfinite(w.radii[k]) and not w.censored[k]:
                crossings.append((dx * w.radii[k], dy * w.radii[k]))
        if result.plane is not None:
            figs["energy_contour"] = plotting.contour_figure(
                result.alphas,
                result.alphas,
                result.plane,
                threshold=result.threshold,
                ray_crossings=crossings,
                mean_width=w.mean,
                title=f"loss around the final weights (width {w.mean:.3g} ± {w.std:.2g}, {w.num_censored} censored)",
            )
        if result.lines:
            figs["energy_lines"] = plotting.lines_figure(
                {name: (result.line_alphas, ys) for name, ys in result.lines.items()}, threshold=result.threshold
            )
        return figs

    def _arrays(self, result: EnergyContourResult) -> dict[str, Any]:
        arrays: dict[str, Any] = {
            "alphas": result.alphas,
            "plane": result.plane,
            "line_alphas": result.line_alphas,
            "ray_radii": result.width.radii,
            "ray_censored": result.width.censored,
            "ray_distances": result.width.distances,
            "ray_evaluations": result.width.evaluations_per_ray,
        }
        for i, (name, ys) in enumerate(result.lines.items()):
            arrays[f"line_{i + 1}"] = ys
        return arrays

    def _summary(self, result: EnergyContourResult) -> dict[str, Any]:
        return {
            "scalars": self._scalars(result),
            "settings": {
                "radius": self.radius,
                "num_points": self.num_points,
                "line_points": self.line_points,
                "delta": self.delta,
                "rel": self.rel,
                "num_directions": self.num_directions,
                "max_radius": self.max_radius,
                "norm": self.norm,
                "ignore": self.ignore,
                "seed": self.seed,
                "given_directions": len(self.directions or []),
            },
            "width": {
                "mean": result.width.mean,
                "std": result.width.std,
                "mean_uncensored": result.width.mean_uncensored,
                "num_censored": result.width.num_censored,
                "num_nan": result.width.num_nan,
                "radii": result.width.radii,
                "censored": result.width.censored,
            },
            "area": None if result.area is None else {"fraction": result.area.fraction,
                                                       "nan_fraction": result.area.nan_fraction},
            "num_evaluations": result.num_evaluations,
            "seconds": result.seconds,
        }
