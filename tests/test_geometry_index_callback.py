"""GeometryIndex gathers the other callbacks' results, logs the index and its parts, and never scores silently
with missing inputs."""

from __future__ import annotations

import csv
import math

import lightning.pytorch as pl
import pytest
from helpers.models import DigitsMLP
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_geometry.callbacks import (
    CurvatureProbe,
    EnergyContour,
    GeometryIndex,
    ModeConnectivity,
    TrajectoryMonitor,
)
from lightning_geometry.functional.index import GeometryDescriptors, geometry_index


def _fit(callbacks: list, tmp_path, epochs: int = 3) -> pl.Trainer:
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=CSVLogger(tmp_path), callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.fit(DigitsMLP(n=256))
    return trainer


def _all_callbacks() -> list:
    return [
        CurvatureProbe(every_n_epochs=1, trace_samples=0, num_directions=0, sharpness_samples=4, max_iter=10),
        TrajectoryMonitor(every_n_epochs=1),
        EnergyContour(num_points=0, line_points=0, num_directions=2, max_radius=2.0, save=False),
        ModeConnectivity(reference="init", num_points=5, align=False, bezier_steps=0, save=False),
        GeometryIndex(),
    ]


def test_index_from_the_callbacks_results_is_logged_with_its_parts(tmp_path) -> None:
    callbacks = _all_callbacks()
    trainer = _fit(callbacks, tmp_path)
    probe, monitor, contour, connectivity, index = callbacks
    expected = GeometryDescriptors(
        adaptive_sharpness=float(trainer.callback_metrics["geometry/adaptive_sharpness"]),
        stability_ratio=float(trainer.callback_metrics["geometry/stability_ratio"]),
        displacement_cv=monitor.tracker.displacement_cv,
        turning_cosine=monitor.tracker.mean_update_cosine,
        contour_width=float(contour.result.width.mean),
        barrier=float(connectivity.result.linear.barrier),
    )
    assert index.descriptors == expected
    reference = geometry_index(expected)
    assert index.result.value == pytest.approx(reference.value, rel=1e-12)
    assert 0 < index.result.value < 1
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("geometry/index")]
    assert len(rows) == 1
    assert float(rows[0]["geometry/index"]) == pytest.approx(reference.value, rel=1e-6)
    for part in ("curvature", "continuity", "width", "connectivity"):
        assert float(rows[0][f"geometry/index/{part}"]) == pytest.approx(reference.parts[part], rel=1e-6)


def test_mean_turning_cosine_averages_every_step(tmp_path) -> None:
    monitor = TrajectoryMonitor(every_n_epochs=1)
    trainer = _fit([monitor], tmp_path, epochs=4)
    with open(trainer.logger.log_dir + "/metrics.csv") as handle:
        cosines = [float(r["geometry/update_cosine"]) for r in csv.DictReader(handle)
                   if r.get("geometry/update_cosine") not in (None, "")]
    finite = [c for c in cosines if math.isfinite(c)]
    assert len(finite) == 3
    assert monitor.tracker.mean_update_cosine == pytest.approx(sum(finite) / 3, rel=1e-6)


def test_missing_inputs_give_no_index_and_name_what_is_missing(tmp_path) -> None:
    index = GeometryIndex()
    probe = CurvatureProbe(every_n_epochs=1, trace_samples=0, num_directions=0, sharpness_samples=4, max_iter=10)
    with pytest.warns(UserWarning, match=r"no index, inputs missing .*continuity .*width .*connectivity"):
        trainer = _fit([probe, index], tmp_path, epochs=2)
    assert index.result.value is None
    assert "width (contour_width)" in index.result.missing
    assert "geometry/index" not in trainer.callback_metrics
    partial = GeometryIndex(allow_partial=True)
    _fit([CurvatureProbe(every_n_epochs=1, trace_samples=0, num_directions=0, sharpness_samples=4, max_iter=10),
          partial], tmp_path, epochs=2)
    assert partial.result.value == pytest.approx(partial.result.parts["curvature"])


def test_order_and_argument_errors(tmp_path) -> None:
    with pytest.raises(MisconfigurationException, match="GeometryIndex must come after EnergyContour"):
        _fit([GeometryIndex(), EnergyContour(num_points=0, line_points=0, save=False)], tmp_path, epochs=1)
    with pytest.raises(ValueError, match=r"weights must sum to a positive number"):
        GeometryIndex(weights={"curvature": 0.0})
    with pytest.raises(ValueError, match=r"weights has unknown parts \['flatness'\]"):
        GeometryIndex(weights={"flatness": 1.0})
    with pytest.raises(ValueError, match=r"scales\['barrier'\] must be a positive number, got -1"):
        GeometryIndex(scales={"barrier": -1})
