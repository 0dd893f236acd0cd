"""LightningCLI YAML instantiates both callbacks; TensorBoard files hold geometry/ tags, the layout, histograms
and the trajectory figure (read back with tbparse and TensorBoard's event reader)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tbparse import SummaryReader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from lightning_geometry.callbacks import CurvatureProbe, TrajectoryMonitor

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def cli_main(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import cli  # examples/cli.py

    return cli.main


def _config(tmp_path):
    config = yaml.safe_load((EXAMPLES / "live_geometry.yaml").read_text())
    config["trainer"]["logger"][0]["init_args"]["save_dir"] = str(tmp_path)
    config["trainer"]["max_epochs"] = 2
    config["trainer"]["default_root_dir"] = str(tmp_path)
    config["trainer"]["enable_checkpointing"] = False
    config["trainer"]["enable_model_summary"] = False
    probe = config["trainer"]["callbacks"][0]["init_args"]
    probe.update(every_n_epochs=1, probe_batches=1, trace_samples=3, max_iter=5)
    config["trainer"]["callbacks"][1]["init_args"]["budget"] = 1.0
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_yaml_instantiates_both_callbacks(cli_main, tmp_path):
    cli = cli_main(["--config", str(_config(tmp_path))], run=False)
    callbacks = cli.trainer.callbacks
    probe = next(c for c in callbacks if isinstance(c, CurvatureProbe))
    monitor = next(c for c in callbacks if isinstance(c, TrajectoryMonitor))
    assert probe.k == 2 and probe.every_n_epochs == 1
    assert probe.loss_fn == "live_geometry:cross_entropy_loss"
    assert monitor.budget == 1.0 and monitor.sketch_dim == 128


def test_tensorboard_event_files(cli_main, tmp_path):
    cli = cli_main(["fit", "--config", str(_config(tmp_path))])
    log_dir = Path(cli.trainer.logger.log_dir)
    reader = SummaryReader(str(log_dir))
    tags = set(reader.scalars["tag"])
    for tag in ("geometry/lambda_max", "geometry/lambda_2", "geometry/trace", "geometry/lambda_max_lr",
                "geometry/directional_curvature/q50", "geometry/adaptive_sharpness", "geometry/displacement",
                "geometry/path_length", "geometry/probe_seconds/curvature"):
        assert tag in tags, tag
    lam = reader.scalars[reader.scalars["tag"] == "geometry/lambda_max"]
    assert len(lam) == 2  # one point per epoch, no duplicates
    hist_tags = set(reader.histograms["tag"]) if len(reader.histograms) else set()
    assert "geometry/directional_curvature" in hist_tags

    files = sorted(log_dir.glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0})
    acc.Reload()
    assert "geometry/trajectory_pca" in acc.Tags()["images"]
    layouts = acc.Tensors("custom_scalars__config__")
    assert len(layouts) == 1 and len(files) >= 1  # written once per run
    layout = layout_pb2.Layout.FromString(layouts[0].tensor_proto.string_val[0])
    titles = {c.title for c in layout.category}
    assert {"geometry: curvature", "geometry: trajectory"} <= titles
    charts = {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}
    assert "geometry/lambda_max$" in charts["lambda_max"]
