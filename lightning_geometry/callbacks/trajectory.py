r"""
Trajectory monitor
^^^^^^^^^^^^^^^^^^

Follows the weights through training: how far each probe interval moved them, how far they are from where they
started, how straight the path is, whether successive updates point the same way, and which layers move. The
statistics are computed by :class:`lightning_geometry.functional.trajectory.TrajectoryTracker`; this callback
decides when, logs, and draws the PCA picture of the path at the end of the fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from typing_extensions import override

from lightning_geometry import io as gio
from lightning_geometry import tensorboard as tb
from lightning_geometry.callbacks._base import GeometryCallback, GeometryConfigurationError, ProbeOutput
from lightning_geometry.functional.params import trainable_parameters
from lightning_geometry.functional.trajectory import TrajectoryStep, TrajectoryTracker, jl_distortion, pca_projection

log = logging.getLogger(__name__)

__all__ = ["TrajectoryMonitor", "TrajectoryResult"]


@dataclass
class TrajectoryResult:
    """The PCA projection of the trajectory computed at the end of the fit.

    Attributes:
        coords: ``n × 2`` coordinates of the kept points on the first two principal axes of the sketch.
        explained_variance: Explained-variance ratio of the two axes (of the sketched points).
        point_index: The probe index of each row (0 is the initial weights).
        distortion: The Johnson–Lindenstrauss :math:`\\varepsilon` the sketch guarantees for these points with
            probability 0.95 (on squared distances).
        path_length: Total path length at the end of the fit.
        distance_from_init: Distance of the final weights from the initial weights.
    """

    coords: Tensor
    explained_variance: Tensor
    point_index: Tensor
    distortion: float
    path_length: float
    distance_from_init: float


class TrajectoryMonitor(GeometryCallback):
    r"""Log displacement statistics of the weights at every probe point, and a PCA picture of the path at the end.

    At each probe point :math:`t` (end of an epoch by default, within the compute ``budget``) it logs, under
    ``geometry/``: ``displacement`` :math:`\lVert\theta_t-\theta_{t-1}\rVert` and ``displacement_rel`` (over
    :math:`\lVert\theta_{t-1}\rVert`), ``distance_from_init`` :math:`\lVert\theta_t-\theta_0\rVert` (the net
    displacement) and ``distance_from_init_rel``, ``path_length`` :math:`\sum_s \lVert\theta_s-\theta_{s-1}\rVert`,
    ``path_net_ratio`` (path length over net displacement, 1 for a straight path), ``update_cosine`` between
    successive displacements, ``displacement_cv`` (coefficient of variation of the last ``window``
    displacements) and, with ``log_layers``, ``layer_displacement_rel/<layer>`` for each module. :math:`\theta_0`
    is the trainable parameters at the start of the fit (kept across resumes). The definitions and the
    Johnson–Lindenstrauss bound of the sketch are in :mod:`lightning_geometry.functional.trajectory`.

    Memory is flat in the number of epochs: three full parameter vectors on the CPU (initial, previous, previous
    displacement) and a fixed ``max_points × sketch_dim`` buffer; they are also what a checkpoint stores. With
    ``snapshot_dir`` the full weights of every probe point are written there too (rank zero; each file is
    written to a temporary name and renamed, so a crash never leaves a half-written snapshot).

    At the end of the fit the sketched points are projected on their first two principal components; the
    result is kept as :attr:`result` and, with a TensorBoardLogger, drawn as ``geometry/trajectory_pca``.

    Args:
        sketch_dim: Size of the random projection of each point.
        window: Number of recent displacements in ``displacement_cv``.
        max_points: Points kept for the PCA picture (thinned by 2 when full).
        log_layers: Also log the relative displacement of every layer as scalars (off by default: one scalar per
            layer per probe costs logging time; a histogram of them goes to TensorBoard in any case, and
            :attr:`last_step` holds them).
        snapshot_dir: Directory for full snapshots of every probe point, or ``None``.
        budget, every_n_epochs, every_n_train_steps, seed, log_key_prefix: See
            :class:`~lightning_geometry.callbacks._base.GeometryCallback`.

    Attributes:
        tracker: The :class:`~lightning_geometry.functional.trajectory.TrajectoryTracker` (its state is what a
            checkpoint stores).
        last_step: The :class:`~lightning_geometry.functional.trajectory.TrajectoryStep` of the latest point
            (per-layer displacements included).
        result: The :class:`TrajectoryResult` of the end of the fit (``None`` before).

    Raises:
        GeometryConfigurationError: (``ValueError``) for a non-positive ``sketch_dim``, ``window`` or a
            ``max_points`` below 2, and the base class's errors.

    Example::

        trainer = Trainer(callbacks=[TrajectoryMonitor(every_n_epochs=1)])

    .. note::
        The monitor measures no loss: its cost is one projection of the weights (:math:`\approx (m + 8)/6`
        sample-gradients with :math:`m` = ``sketch_dim``), a fixed part, and mostly the logging of its ~10
        scalars. Under the default budget it runs every few epochs on a tiny model (digits: an epoch is 1,797
        sample-gradients) and at every epoch on realistic data sizes.
    """

    probe_name = "trajectory"
    needs_probe_data = False

    def __init__(
        self,
        *,
        sketch_dim: int = 128,
        window: int = 10,
        max_points: int = 256,
        log_layers: bool = False,
        snapshot_dir: str | None = None,
        budget: float = 0.05,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        seed: int = 0,
        log_key_prefix: str = "geometry/",
    ) -> None:
        super().__init__(
            budget=budget,
            every_n_epochs=every_n_epochs,
            every_n_train_steps=every_n_train_steps,
            seed=seed,
            log_key_prefix=log_key_prefix,
        )
        try:
            self.tracker = TrajectoryTracker(sketch_dim=sketch_dim, window=window, max_points=max_points, seed=seed)
        except ValueError as err:
            raise GeometryConfigurationError(f"TrajectoryMonitor: {err}") from err
        self.sketch_dim = sketch_dim
        self.window = window
        self.max_points = max_points
        self.log_layers = bool(log_layers)
        self.snapshot_dir = snapshot_dir
        self.result: TrajectoryResult | None = None
        self.last_step: TrajectoryStep | None = None

    @override
    def _state_key_args(self) -> dict[str, Any]:
        return {**super()._state_key_args(), "sketch_dim": self.sketch_dim, "seed": self.seed}

    @override
    def layout(self) -> dict[str, list[Any]]:
        k = self._key
        charts: dict[str, list[Any]] = {
            "displacement": ["Multiline", [k("displacement$"), k("displacement_rel$")]],
            "distance and path": ["Multiline", [k("distance_from_init$"), k("path_length$")]],
            "path / net": ["Multiline", [k("path_net_ratio$")]],
            "update cosine and CV": ["Multiline", [k("update_cosine$"), k("displacement_cv$")]],
        }
        if self.log_layers:
            charts["layer displacement (relative)"] = ["Multiline", [k("layer_displacement_rel/.*")]]
        return charts

    CALL_COST = 80.0
    """Per-point fixed cost (copies, per-layer norms) in sample-gradients (measured ~65 on the digits MLP)."""

    def compute_cost(self) -> float:
        """Cost of one point without logging: the fixed part plus one projection (m multiply-adds per weight)
        against ~6 flops per weight for one sample-gradient of a dense network."""
        return self.CALL_COST + (self.sketch_dim + 8) / 6.0

    @override
    def estimated_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        return self.compute_cost() + self.LOG_COST * 10

    def _params(self, pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {k: v.detach() for k, v in trainable_parameters(pl_module).items()}

    @override
    def on_probe_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.tracker.started:
            return  # resumed: the initial weights are the ones of the first fit
        self.tracker.start(self._params(pl_module))
        self._spent += self.compute_cost()
        self._save_snapshot(trainer, 0)

    @override
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeOutput:
        step = self.tracker.update(self._params(pl_module))
        self.last_step = step
        scalars = step.scalars()
        if self.log_layers:
            scalars.update({f"layer_displacement_rel/{n}": v for n, v in step.layer_displacement_rel.items()})
        return ProbeOutput(scalars=scalars, cost=self.compute_cost(), extra={"step": step})

    @override
    def after_probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float], output: ProbeOutput
    ) -> None:
        step = output.extra["step"]
        if step.layer_displacement_rel:
            tb.log_histogram(
                trainer, self._key("layer_displacement_rel"), torch.tensor(list(step.layer_displacement_rel.values()))
            )
        self._save_snapshot(trainer, step.index)

    def _save_snapshot(self, trainer: pl.Trainer, index: int) -> None:
        if self.snapshot_dir is None or not trainer.is_global_zero:
            return
        name = f"point={index:05d}-epoch={trainer.current_epoch}-step={trainer.global_step}.pt"
        target = Path(self.snapshot_dir) / name
        payload = {"index": index, "epoch": trainer.current_epoch, "global_step": trainer.global_step,
                   "params": {k: v.clone() for k, v in self.tracker.current_params().items()}}
        with gio.atomic_open(target, "wb") as fh:
            torch.save(payload, fh)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip_fit_end(trainer) or not self.tracker.started:
            return
        points, index = self.tracker.points()
        finite = torch.isfinite(points).all(dim=1)  # a diverged run has nan points: picture the finite part
        points, index = points[finite], index[finite]
        if points.shape[0] < 2:
            return
        coords, explained = pca_projection(points, k=2)
        self.result = TrajectoryResult(
            coords=coords,
            explained_variance=explained,
            point_index=index,
            distortion=jl_distortion(self.sketch_dim, points.shape[0]),
            path_length=self.tracker.path_length,
            distance_from_init=float((self.tracker.prev.double() - self.tracker.init.double()).norm()),
        )
        if tb.has_tensorboard(trainer):
            tb.log_figure(trainer, self._key("trajectory_pca"), self._figure(self.result))

    @staticmethod
    def _should_skip_fit_end(trainer: pl.Trainer) -> bool:
        return bool(trainer.fast_dev_run)

    @staticmethod
    def _figure(result: TrajectoryResult) -> Any:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        xy = result.coords.numpy()
        ax.plot(xy[:, 0], xy[:, 1], "-", color="0.7", lw=1)
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=result.point_index.numpy(), cmap="viridis", s=18, zorder=3)
        ax.scatter(xy[:1, 0], xy[:1, 1], marker="*", s=120, color="k", zorder=4, label="init")
        fig.colorbar(sc, ax=ax, label="probe point")
        ev = result.explained_variance.tolist()
        ax.set_xlabel(f"PC1 ({100 * ev[0]:.1f}%)")
        ax.set_ylabel(f"PC2 ({100 * ev[1]:.1f}%)")
        ax.set_title(f"weight trajectory (JL sketch, eps<={result.distortion:.2f})")
        ax.legend(loc="best")
        fig.tight_layout()
        return fig

    @override
    def extra_state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict() if self.tracker.started else None}

    @override
    def load_extra_state_dict(self, state: Any) -> None:
        tracker_state = state.get("tracker") if state else None
        if tracker_state is not None:
            self.tracker.load_state_dict(tracker_state)
