r"""
Landscape geometry index
^^^^^^^^^^^^^^^^^^^^^^^^

At the end of the fit, combine what the other geometry callbacks measured into the landscape geometry index of
:mod:`lightning_geometry.functional.index` (transforms, weights and their validation are documented there and in
the README), and log it with its breakdown. This callback measures nothing itself.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_geometry.callbacks._after_fit import AfterFitCallback
from lightning_geometry.callbacks.connectivity import ModeConnectivity
from lightning_geometry.callbacks.contour import EnergyContour
from lightning_geometry.callbacks.curvature import CurvatureProbe
from lightning_geometry.callbacks.trajectory import TrajectoryMonitor
from lightning_geometry.functional.index import (
    GeometryDescriptors,
    GeometryIndexResult,
    check_scales,
    check_weights,
    geometry_index,
)

log = logging.getLogger(__name__)

__all__ = ["GeometryIndex"]


class GeometryIndex(Callback):
    r"""Log the landscape geometry index at the end of the fit, from the descriptors the other callbacks measured.

    Inputs, each taken from the first callback of its kind in ``trainer.callbacks``:

    * curvature — ``adaptive_sharpness`` (else ``stability_ratio``) last logged by a
      :class:`~lightning_geometry.callbacks.CurvatureProbe`;
    * continuity — the displacement CV over the window and the mean turning cosine over the whole run, from a
      :class:`~lightning_geometry.callbacks.TrajectoryMonitor`;
    * width — the mean contour width from an :class:`~lightning_geometry.callbacks.EnergyContour`;
    * connectivity — the linear barrier from a :class:`~lightning_geometry.callbacks.ModeConnectivity`.

    Logged through every logger's ``log_metrics`` (``self.log`` is not allowed in ``on_fit_end``):
    ``geometry/index`` and ``geometry/index/<part>`` for each part. When a weighted input is missing no index is
    logged (never a silent partial score): a warning names what is missing, and ``result.missing`` lists it;
    ``allow_partial=True`` scores the parts that exist instead. Under DDP the after-fit callbacks measure on rank
    zero, so the index is computed there.

    Args:
        weights: Weight per part (``curvature``, ``continuity``, ``width``, ``connectivity``); ``None`` for the
            validated defaults.
        scales: Overrides of the reference scales (see :data:`~lightning_geometry.functional.index.DEFAULT_SCALES`).
        allow_partial: Score over the available parts when some are missing.
        log_key_prefix: Prefix of the logged names.

    Attributes:
        descriptors: The :class:`~lightning_geometry.functional.index.GeometryDescriptors` gathered at fit end.
        result: The :class:`~lightning_geometry.functional.index.GeometryIndexResult`.

    Raises:
        ValueError: At construction, for weights that are negative, unknown or do not sum to a positive number,
            and for unknown or non-positive scales.
        MisconfigurationException: At setup, if an ``EnergyContour`` or ``ModeConnectivity`` comes after this
            callback in ``trainer.callbacks`` (their results would not exist yet at ``on_fit_end``).

    Example::

        trainer = Trainer(callbacks=[CurvatureProbe(every_n_epochs=5), TrajectoryMonitor(),
                                     EnergyContour(), ModeConnectivity(reference="init"), GeometryIndex()])
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        scales: Mapping[str, float] | None = None,
        allow_partial: bool = False,
        log_key_prefix: str = "geometry/",
    ) -> None:
        if weights is not None:
            check_weights(weights)
        check_scales(scales)
        self.weights = dict(weights) if weights is not None else None
        self.scales = dict(scales) if scales is not None else None
        self.allow_partial = bool(allow_partial)
        self.log_key_prefix = log_key_prefix
        self.descriptors: GeometryDescriptors | None = None
        self.result: GeometryIndexResult | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        mine = trainer.callbacks.index(self)
        late = [type(cb).__name__ for cb in trainer.callbacks[mine + 1 :] if isinstance(cb, AfterFitCallback)]
        if late:
            raise MisconfigurationException(
                f"GeometryIndex must come after {', '.join(late)} in the callbacks list: their results are made in "
                "on_fit_end, which runs in list order"
            )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run or not trainer.is_global_zero:
            return
        self.descriptors = self.gather(trainer)
        self.result = geometry_index(self.descriptors, self.weights, self.scales, self.allow_partial)
        if self.result.value is None:
            rank_zero_warn(
                f"GeometryIndex: no index, inputs missing or not finite: {self.result.missing or self.result.parts}. "
                "Attach the callbacks that measure them, or pass allow_partial=True."
            )
            return
        metrics = {f"{self.log_key_prefix}index": self.result.value}
        metrics.update({f"{self.log_key_prefix}index/{part}": value for part, value in self.result.parts.items()})
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
            logger.save()

    @staticmethod
    def gather(trainer: pl.Trainer) -> GeometryDescriptors:
        """The descriptors the trainer's geometry callbacks measured (``None`` where none did)."""
        descriptors = GeometryDescriptors()
        probe = next((cb for cb in trainer.callbacks if isinstance(cb, CurvatureProbe)), None)
        if probe is not None and probe.num_probes > 0:
            metrics = trainer.callback_metrics
            for name in ("adaptive_sharpness", "stability_ratio"):
                value = metrics.get(f"{probe.log_key_prefix}{name}")
                if value is not None:
                    setattr(descriptors, name, float(value))
        monitor = next((cb for cb in trainer.callbacks if isinstance(cb, TrajectoryMonitor)), None)
        if monitor is not None and monitor.tracker.cosine_count > 0:
            descriptors.displacement_cv = monitor.tracker.displacement_cv
            descriptors.turning_cosine = monitor.tracker.mean_update_cosine
        contour = next((cb for cb in trainer.callbacks if isinstance(cb, EnergyContour)), None)
        if contour is not None and contour.result is not None:
            descriptors.contour_width = float(contour.result.width.mean)
        connectivity = next((cb for cb in trainer.callbacks if isinstance(cb, ModeConnectivity)), None)
        if connectivity is not None and connectivity.result is not None:
            descriptors.barrier = float(connectivity.result.linear.barrier)
        return descriptors
