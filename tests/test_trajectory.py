"""Trajectory statistics (functional) and the TrajectoryMonitor callback: exact values, memory, resume."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_geometry.callbacks import GeometryConfigurationError, TrajectoryMonitor
from lightning_geometry.functional.trajectory import (
    RandomProjection,
    TrajectoryTracker,
    coefficient_of_variation,
    jl_distortion,
    jl_sketch_dim,
    layer_groups,
    pca_projection,
)
from tests.helpers.models import DigitsMLP


def _points(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"a.weight": torch.randn(3, 4, generator=g, dtype=torch.float64), "a.bias": torch.randn(3, generator=g,
             dtype=torch.float64), "b.weight": torch.randn(2, 3, generator=g, dtype=torch.float64)} for _ in range(n)]


def _flat(p):
    return torch.cat([t.reshape(-1) for t in p.values()])


def test_tracker_matches_brute_force():
    pts = _points(7)
    tracker = TrajectoryTracker(sketch_dim=16, window=3)
    tracker.start(pts[0])
    flat = [_flat(p) for p in pts]
    disps = []
    for t in range(1, len(pts)):
        step = tracker.update(pts[t])
        d = flat[t] - flat[t - 1]
        disps.append(float(d.norm()))
        assert step.displacement == pytest.approx(disps[-1], rel=1e-12)
        assert step.displacement_rel == pytest.approx(disps[-1] / float(flat[t - 1].norm()), rel=1e-12)
        assert step.distance_from_init == pytest.approx(float((flat[t] - flat[0]).norm()), rel=1e-12)
        assert step.distance_from_init_rel == pytest.approx(step.distance_from_init / float(flat[0].norm()))
        assert step.path_length == pytest.approx(sum(disps), rel=1e-12)
        assert step.path_net_ratio == pytest.approx(sum(disps) / step.distance_from_init, rel=1e-12)
        assert step.path_net_ratio >= 1.0
        if t == 1:
            assert math.isnan(step.update_cosine) and math.isnan(step.displacement_cv)
        else:
            prev = flat[t - 1] - flat[t - 2]
            assert step.update_cosine == pytest.approx(float(d @ prev / (d.norm() * prev.norm())), rel=1e-10)
            w = torch.tensor(disps[-3:], dtype=torch.float64)
            assert step.displacement_cv == pytest.approx(float(w.std(unbiased=False) / w.mean()), rel=1e-10)
        # per layer: "a" groups weight and bias
        da = torch.cat([(pts[t][k] - pts[t - 1][k]).reshape(-1) for k in ("a.weight", "a.bias")])
        ra = torch.cat([pts[t - 1][k].reshape(-1) for k in ("a.weight", "a.bias")])
        assert step.layer_displacement["a"] == pytest.approx(float(da.norm()), rel=1e-12)
        assert step.layer_displacement_rel["a"] == pytest.approx(float(da.norm() / ra.norm()), rel=1e-12)
        assert set(step.layer_displacement) == {"a", "b"}


def test_straight_line_has_ratio_one_and_cosine_one():
    tracker = TrajectoryTracker(sketch_dim=4)
    tracker.start({"w": torch.zeros(3, dtype=torch.float64)})
    for s in range(1, 4):
        step = tracker.update({"w": torch.tensor([1.0, 2.0, 2.0], dtype=torch.float64) * s})
    assert step.path_net_ratio == pytest.approx(1.0)
    assert step.update_cosine == pytest.approx(1.0)
    assert step.displacement_cv == pytest.approx(0.0)


def test_memory_is_flat_in_the_number_of_points():
    sizes = {}
    for n in (10, 200):
        tracker = TrajectoryTracker(sketch_dim=32, max_points=64)
        g = torch.Generator().manual_seed(0)
        tracker.start({"w": torch.zeros(500)})
        for _ in range(n):
            tracker.update({"w": torch.randn(500, generator=g)})
        sizes[n] = tracker.nbytes
        sk, idx = tracker.points()
        assert idx[0] == 0 and idx[-1] == n and sk.shape[0] <= 65
        assert bool((idx[1:] > idx[:-1]).all())
    assert sizes[10] == sizes[200]


def test_state_dict_roundtrip_continues_identically():
    pts = _points(8)
    a = TrajectoryTracker(sketch_dim=8, max_points=4)
    a.start(pts[0])
    for p in pts[1:5]:
        a.update(p)
    b = TrajectoryTracker(sketch_dim=8, max_points=4)
    b.load_state_dict(a.state_dict())
    for p in pts[5:]:
        sa, sb = a.update(p), b.update(p)
        assert sa == sb
    assert torch.equal(a.points()[0], b.points()[0])
    with pytest.raises(ValueError, match="sketch_dim"):
        TrajectoryTracker(sketch_dim=9).load_state_dict(a.state_dict())


def test_random_projection_cached_equals_streamed_and_preserves_norms():
    x = torch.randn(70000, generator=torch.Generator().manual_seed(1))
    cached = RandomProjection(70000, 64, seed=3)
    streamed = RandomProjection(70000, 64, seed=3, max_cached_entries=0)
    assert cached.cached and not streamed.cached
    assert torch.allclose(cached(x), streamed(x), rtol=1e-5, atol=1e-4)
    ratio = float(cached(x).norm() ** 2 / x.double().norm() ** 2)
    assert abs(ratio - 1) < jl_distortion(64, 2, delta=0.01)


def test_jl_bounds():
    m = jl_sketch_dim(100, eps=0.5, delta=0.05)
    assert jl_distortion(m, 100, 0.05) <= 0.5 + 1e-9
    assert jl_distortion(m - 1, 100, 0.05) > 0.5 - 1e-3
    assert jl_distortion(4, 1000) == math.inf
    with pytest.raises(ValueError, match="eps"):
        jl_sketch_dim(10, eps=1.5)


def test_pca_projection_recovers_a_line_and_cv():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)[:, None]
    points = t * torch.tensor([[3.0, 4.0, 0.0]], dtype=torch.float64)
    coords, explained = pca_projection(points, k=2)
    assert explained[0] == pytest.approx(1.0)
    assert torch.allclose(coords[:, 1], torch.zeros(11, dtype=torch.float64), atol=1e-10)
    assert float(coords[-1, 0] - coords[0, 0]) == pytest.approx(5.0)
    assert coefficient_of_variation([2.0, 2.0]) == 0.0 and math.isnan(coefficient_of_variation([1.0]))
    assert layer_groups(["x.0.weight", "x.0.bias", "y"]) == {"x.0": ["x.0.weight", "x.0.bias"], "y": ["y"]}


@pytest.mark.parametrize(("kwargs", "match"), [({"sketch_dim": 0}, "sketch_dim"), ({"window": 0}, "window"),
                                               ({"max_points": 1}, "max_points")])
def test_monitor_bad_arguments(kwargs, match):
    with pytest.raises(GeometryConfigurationError, match=match):
        TrajectoryMonitor(**kwargs)


def _fit(callbacks, max_epochs, tmp_path, ckpt_path=None, logger=None):
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger or False,
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=tmp_path)
    pl.seed_everything(0, verbose=False)
    model = DigitsMLP(n=256, batch_size=64)
    trainer.fit(model, ckpt_path=ckpt_path)
    return trainer, model


def test_logged_values_equal_functional_on_snapshots(tmp_path):
    monitor = TrajectoryMonitor(every_n_epochs=1, snapshot_dir=str(tmp_path / "snaps"), log_layers=True)
    trainer, model = _fit([monitor], 3, tmp_path, logger=CSVLogger(tmp_path, name="csv"))
    files = sorted((tmp_path / "snaps").glob("point=*.pt"))
    assert [f.name.split("-")[0] for f in files] == [f"point={i:05d}" for i in range(4)]
    assert not list((tmp_path / "snaps").glob(".tmp-*"))  # atomic writes leave no temporary file
    snaps = [torch.load(f)["params"] for f in files]
    final = {k: v.detach() for k, v in model.named_parameters()}
    assert all(torch.equal(snaps[-1][k], final[k]) for k in final)
    reference = TrajectoryTracker(sketch_dim=monitor.sketch_dim)
    reference.start(snaps[0])
    steps = [reference.update(s) for s in snaps[1:]]
    metrics = pd.read_csv(Path(trainer.logger.log_dir) / "metrics.csv").dropna(subset=["geometry/displacement"])
    for name in ("displacement", "distance_from_init", "path_length", "update_cosine", "path_net_ratio"):
        logged = metrics[f"geometry/{name}"].tolist()
        expected = [getattr(s, name) for s in steps]
        assert logged == pytest.approx(expected, rel=1e-6, nan_ok=True), name
    layer = metrics["geometry/layer_displacement_rel/net.0"].dropna().tolist()
    assert layer == pytest.approx([s.layer_displacement_rel["net.0"] for s in steps], rel=1e-6)
    assert monitor.result is not None and monitor.result.coords.shape == (4, 2)
    assert monitor.result.path_length == pytest.approx(steps[-1].path_length)


def test_resume_continues_distance_path_and_schedule(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    first = TrajectoryMonitor(every_n_epochs=1)
    trainer, _ = _fit([first], 3, tmp_path, logger=logger)
    ckpt = tmp_path / "three.ckpt"
    trainer.save_checkpoint(ckpt)
    init = first.tracker.init.clone()
    path3 = first.tracker.path_length

    second = TrajectoryMonitor(every_n_epochs=1)
    logger2 = CSVLogger(tmp_path, name="run", version=1)
    trainer2, _ = _fit([second], 6, tmp_path, ckpt_path=str(ckpt), logger=logger2)
    assert torch.equal(second.tracker.init, init)  # not reset
    assert second.num_probes == 6 and second.tracker.index == 6
    assert second.tracker.path_length > path3
    metrics = pd.concat([pd.read_csv(Path(lg.log_dir) / "metrics.csv") for lg in (logger, logger2)])
    rows = metrics.dropna(subset=["geometry/path_length"])
    assert rows["epoch"].tolist() == [0, 1, 2, 3, 4, 5]  # no duplicate, no gap
    path = rows["geometry/path_length"].tolist()
    disp = rows["geometry/displacement"].tolist()
    assert all(b > a for a, b in zip(path, path[1:]))
    assert path[3] == pytest.approx(path[2] + disp[3], rel=1e-6)  # the sum continues across the resume
    final_distance = float((second.tracker.prev.double() - init.double()).norm())
    assert rows["geometry/distance_from_init"].iloc[-1] == pytest.approx(final_distance, rel=1e-6)
    assert rows["geometry/distance_from_init"].iloc[3] > disp[3]  # measured from the first fit's start
