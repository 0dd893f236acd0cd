"""EnergyContour and ModeConnectivity: on_fit_end, on-demand compute, files, logs, references, no side effects."""

from __future__ import annotations

import copy
import json
import math
import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geometry.callbacks.connectivity import ModeConnectivity, classification_error
from lightning_geometry.callbacks.contour import EnergyContour
from lightning_geometry.functional.connectivity import apply_permutation, permutation_spec
from tests.helpers.models import DigitsMLP, digits_tensors


SMALL_CONTOUR = {"radius": 0.5, "num_points": 5, "line_points": 5, "num_directions": 2}
SMALL_CONN = {"num_points": 5, "bezier_steps": 5}


def trainer(tmp_path, callbacks, logger="tb", max_epochs=2, **kw):
    if logger == "tb":
        logger = TensorBoardLogger(tmp_path, name="run")
    elif logger == "csv":
        logger = CSVLogger(tmp_path, name="run")
    return pl.Trainer(
        max_epochs=max_epochs, callbacks=callbacks, logger=logger, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path, **kw,
    )


def rng_state():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


# ----------------------------------------------------------------------------------------------- construction
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": 0.0}, r"`delta` must be a finite number > 0, got 0"),
        ({"delta": -1.0}, r"`delta` must be a finite number > 0, got -1"),
        ({"rel": -0.1}, r"`rel` must be a finite number > 0, got -0.1"),
        ({"delta": 0.1, "rel": 0.1}, "at most one of `delta`"),
        ({"radius": 0.0}, r"`radius` must be a finite number > 0, got 0"),
        ({"radius": -2}, r"`radius` must be a finite number > 0, got -2"),
        ({"num_points": 2}, r"`num_points` must be 0 \(no plane\) or >= 3, got 2"),
        ({"line_points": 1}, r"`line_points` must be 0 \(no curves\) or >= 3, got 1"),
        ({"num_directions": 0}, r"`num_directions` must be >= 1, got 0"),
        ({"max_radius": 0}, r"`max_radius` must be a finite number > 0, got 0"),
        ({"norm": "unit"}, r"`norm` must be one of"),
        ({"probe_batches": 0}, r"`probe_batches` must be >= 1, got 0"),
    ],
)
def test_energy_contour_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EnergyContour(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_points": 2}, ValueError, r"`num_points` must be >= 3, got 2"),
        ({"bezier_steps": -1}, ValueError, r"`bezier_steps` must be >= 0, got -1"),
        ({"bezier_lr": 0.0}, ValueError, r"`bezier_lr` must be a finite number > 0, got 0"),
        ({"bezier_optimizer": "lbfgs"}, ValueError, r"`bezier_optimizer` must be 'adam' or 'sgd', got 'lbfgs'"),
        ({"reference": -1}, ValueError, r"`reference` epoch must be >= 0, got -1"),
        ({"reference": 1.5}, TypeError, r"`reference` must be 'init', an epoch index.*got float"),
        ({"error_fn": 3}, TypeError, r"`error_fn` must be a callable"),
    ],
)
def test_mode_connectivity_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ModeConnectivity(**kwargs)


# ----------------------------------------------------------------------------------------------- fit end
def test_callbacks_at_fit_end_log_save_and_leave_training_bit_identical(tmp_path):
    torch.manual_seed(0)
    plain = DigitsMLP(n=256, hidden=16, bn_dropout=True)
    model = copy.deepcopy(plain)
    t0 = trainer(tmp_path / "plain", [], logger=False)
    t0.fit(plain)
    plain_rng = rng_state()

    torch.manual_seed(0)  # same seed as above: identical fit unless a callback interferes
    model = DigitsMLP(n=256, hidden=16, bn_dropout=True)
    contour = EnergyContour(**SMALL_CONTOUR, probe_batches=2)
    conn = ModeConnectivity(reference="init", **SMALL_CONN, probe_batches=2)
    t1 = trainer(tmp_path, [contour, conn])
    t1.fit(model)
    # zero observer effect: same weights, buffers, RNG streams and mode as the fit without callbacks
    for (k, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), k
    after = rng_state()
    assert torch.equal(after[0], plain_rng[0]) and np.array_equal(after[1], plain_rng[1]) and after[2] == plain_rng[2]
    assert model.training == plain.training

    res = contour.result
    assert res.plane.shape == (5, 5) and set(res.lines) == {"direction 1", "direction 2"}
    assert res.width.radii.shape == (4,) and res.num_evaluations > 25
    assert np.isfinite(res.loss0) and res.threshold == pytest.approx(res.loss0 + 0.1)
    cres = conn.result
    assert cres.reference == "initial weights"
    assert cres.linear.bn_reestimated and cres.aligned is not None and cres.curve is not None
    assert cres.linear.errors is not None  # "auto" error function on (x, y) classification batches
    assert np.isfinite(cres.linear.losses).all() and cres.linear.losses.shape == (5,)

    # files: atomic, under <log_dir>/geometry
    geo = tmp_path / "run" / "version_0" / "geometry"
    summary = json.loads((geo / "energy_contour.json").read_text())
    assert summary["scalars"]["contour_width"] == pytest.approx(res.width.mean)
    with np.load(geo / "energy_contour.npz") as arrays:
        np.testing.assert_array_equal(arrays["plane"], res.plane)
    csum = json.loads((geo / "connectivity.json").read_text())
    assert csum["scalars"]["barrier"] == pytest.approx(cres.linear.barrier)
    assert not [p for p in geo.iterdir() if p.name.startswith(".")]  # no temporary file left

    # scalars and figures in TensorBoard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"geometry/contour_width", "geometry/contour_area_fraction", "geometry/barrier",
            "geometry/barrier_aligned", "geometry/barrier_curve", "geometry/error_barrier"} <= tags
    assert events.Scalars("geometry/barrier")[-1].value == pytest.approx(cres.linear.barrier, rel=1e-6)
    assert {"geometry/energy_contour", "geometry/energy_lines", "geometry/connectivity"} <= set(events.Tags()["images"])


def test_csv_logger_gets_the_scalars_and_progress_bar_flag(tmp_path, capsys):
    model = DigitsMLP(n=128, hidden=8)
    contour = EnergyContour(**{**SMALL_CONTOUR, "num_points": 0}, probe_batches=1)
    t = trainer(tmp_path, [contour], logger="csv", max_epochs=1)
    t.fit(model)
    metrics = (tmp_path / "run" / "version_0" / "metrics.csv").read_text()
    assert "geometry/contour_width" in metrics and "geometry/contour_area_fraction" not in metrics
    assert contour.result.plane is None
    assert "EnergyContour" not in capsys.readouterr().err  # enable_progress_bar=False


def test_epoch_reference_and_resume_state(tmp_path):
    model = DigitsMLP(n=128, hidden=8)
    conn = ModeConnectivity(reference=0, **SMALL_CONN, align=False, probe_batches=1, save=False)
    t = trainer(tmp_path, [conn], logger=False, max_epochs=2)
    t.fit(model)
    assert conn.result.reference == "epoch 0" and conn.result.aligned is None
    state = conn.state_dict()
    other = ModeConnectivity(reference=0)
    other.load_state_dict(state)
    assert all(torch.equal(other._snapshot[k], v) for k, v in conn._snapshot.items())
    assert other.state_key == "ModeConnectivity{'reference': 0, 'log_key_prefix': 'geometry/'}"
    assert ModeConnectivity(reference="init").state_key != other.state_key  # two instances can coexist
    late = ModeConnectivity(reference=5, **SMALL_CONN, probe_batches=1, save=False)
    with pytest.raises(RuntimeError, match="no snapshot of the end of epoch 5"):
        trainer(tmp_path, [late], logger=False, max_epochs=1).fit(DigitsMLP(n=128, hidden=8))


# ----------------------------------------------------------------------------------------------- on demand
def _net(seed=0, width=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))


def _ce(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def _loader(n=96):
    x, y = digits_tensors(n)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def test_compute_on_demand_for_a_plain_module(tmp_path, capsys):
    net, reference = _net(), _net(1)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = rng_state()
    contour = EnergyContour(**SMALL_CONTOUR, loss_fn=_ce)
    res = contour.compute(net, _loader(), save_dir=tmp_path, progress=True)
    assert "EnergyContour" in capsys.readouterr().err
    assert contour.result is res and (tmp_path / "energy_contour.npz").exists()
    conn = ModeConnectivity(reference=reference, loss_fn=_ce, **SMALL_CONN)
    cres = conn.compute(net, _loader())
    assert cres.linear.barrier >= 0 and cres.aligned.barrier >= 0 and math.isfinite(cres.curve.barrier)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    after = rng_state()
    assert torch.equal(after[0], rng[0]) and np.array_equal(after[1], rng[1]) and after[2] == rng[2]


def test_contour_width_through_the_callback_matches_a_bowl():
    class Bowl(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))

    lam = torch.tensor([[1.0, 4.0], [2.0, 0.5], [3.0, 8.0]], dtype=torch.float64)
    loss = lambda m, b: 0.5 * (lam * m.w**2).sum()  # noqa: E731  eigenvectors: the unit coordinate tensors
    e1 = torch.zeros(3, 2, dtype=torch.float64)
    e1[0, 1] = 1.0
    e2 = torch.zeros(3, 2, dtype=torch.float64)
    e2[2, 0] = 1.0
    contour = EnergyContour(radius=2.0, num_points=81, line_points=0, delta=0.5, num_directions=2, rtol=1e-6,
                            directions=[{"w": e1}, {"w": e2}], loss_fn=loss)
    res = contour.compute(Bowl(), torch.zeros(1, 1, dtype=torch.float64))
    np.testing.assert_allclose(res.width.radii, [0.5, 0.5, 1 / math.sqrt(3)] * 1 + [1 / math.sqrt(3)], rtol=1e-5)
    exact = math.pi * 0.5 * (1 / math.sqrt(3)) / 16
    assert res.area.fraction == pytest.approx(exact, rel=5e-3)


def test_nan_on_part_of_the_grid_is_kept_in_arrays_and_figure(tmp_path):
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([[1.0, 1.0]], dtype=torch.float64))

    loss = lambda m, b: m.w[0, 0].sqrt() + m.w[0, 1] ** 2  # noqa: E731  nan where w00 < 0
    d1 = {"w": torch.tensor([[1.0, 0.0]], dtype=torch.float64)}
    d2 = {"w": torch.tensor([[0.0, 1.0]], dtype=torch.float64)}
    contour = EnergyContour(radius=2.0, num_points=5, line_points=5, delta=0.5, num_directions=2,
                            directions=[d1, d2], loss_fn=loss)
    res = contour.compute(Root(), torch.zeros(1, 1, dtype=torch.float64), save_dir=tmp_path)
    assert np.isnan(res.plane[0]).all() and np.isfinite(res.plane[1:]).all()
    assert np.isnan(res.lines["direction 1"][0])
    assert res.area.nan_fraction == pytest.approx(0.25)
    with np.load(tmp_path / "energy_contour.npz") as arrays:
        assert np.isnan(arrays["plane"][0]).all()
    figs = contour._figures(res)
    mesh = figs["energy_contour"].axes[0].collections[0]
    assert np.ma.count_masked(mesh.get_array()) == 5  # drawn as missing, not replaced
    summary = json.loads((tmp_path / "energy_contour.json").read_text())
    assert summary["scalars"]["contour_nan_fraction"] == pytest.approx(0.25)


def test_mode_connectivity_references_and_mismatch_errors(tmp_path):
    net = _net()
    # a permuted copy: aligned barrier 0, the permutation recovered
    spec = permutation_spec(net)
    gen = torch.Generator().manual_seed(0)
    pi = {p: torch.randperm(n, generator=gen) for p, n in spec.sizes.items()}
    permuted = apply_permutation(dict(net.state_dict()), spec, pi)
    res = ModeConnectivity(reference=permuted, loss_fn=_ce, num_points=5, bezier_steps=0).compute(net, _loader())
    assert res.aligned.barrier == 0.0 and res.distance_rel_aligned == 0.0 and res.distance_rel > 0.1
    assert res.permuted_fraction > 0.5 and res.curve is None
    # itself, as a module: every barrier 0
    res = ModeConnectivity(reference=copy.deepcopy(net), loss_fn=_ce, num_points=5, bezier_steps=0).compute(
        net, _loader())
    assert res.linear.barrier == 0.0 and res.linear.error_barrier == 0.0
    # a checkpoint path: a saved state dict, and a Lightning-style {"state_dict": ...}
    torch.save(permuted, tmp_path / "ref.pt")
    torch.save({"state_dict": permuted, "epoch": 3}, tmp_path / "ref.ckpt")
    for path in ("ref.pt", "ref.ckpt"):
        res = ModeConnectivity(reference=str(tmp_path / path), loss_fn=_ce, num_points=5, bezier_steps=0,
                               error_fn=None).compute(net, _loader())
        assert res.aligned.barrier == 0.0 and res.linear.errors is None
    # different names or shapes: an error naming the first mismatch
    renamed = {("layer." + k): v for k, v in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"different parameter names: missing \['0.weight', '0.bias', '2.weight'\]"):
        ModeConnectivity(reference=renamed, loss_fn=_ce, **SMALL_CONN).compute(net, _loader())
    shape = r"reference \(module Sequential\)\['0.weight'\] has shape \(13, 64\), expected \(12, 64\)"
    with pytest.raises(ValueError, match=shape):
        ModeConnectivity(reference=_net(width=13), loss_fn=_ce, **SMALL_CONN).compute(net, _loader())
    with pytest.raises(ValueError, match="does not exist"):
        ModeConnectivity(reference=str(tmp_path / "missing.ckpt"), loss_fn=_ce).compute(net, _loader())


def test_classification_error():
    net = _net()
    x, y = digits_tensors(40)
    expected = (net(x).argmax(1) != y).float().mean()
    assert classification_error(net, (x, y)) == expected
    with pytest.raises(ValueError, match="integer class labels"):
        classification_error(net, (x, y.float()))


# ----------------------------------------------------------------------------------------------- atomic files
def test_atomic_writes_replace_whole_files_and_clean_up_on_failure(tmp_path):
    from lightning_geometry import io as gio

    target = tmp_path / "sub" / "summary.json"
    gio.save_json(target, {"a": 1.5, "nan": float("nan"), "inf": np.inf, "arr": np.array([1.0, np.nan]),
                           "n": np.int64(3), "flag": np.bool_(True)})
    assert json.loads(target.read_text()) == {"a": 1.5, "nan": None, "inf": None, "arr": [1.0, None], "n": 3,
                                              "flag": True}
    with pytest.raises(RuntimeError, match="boom"), gio.atomic_open(target, "w") as fh:
        fh.write("partial")
        raise RuntimeError("boom")
    assert json.loads(target.read_text())["a"] == 1.5  # the old file is intact
    assert [p.name for p in target.parent.iterdir()] == ["summary.json"]  # no temporary file left
    with pytest.raises(TypeError, match="cannot write an object of type object"):
        gio.save_json(target, {"x": object()})
    assert json.loads(target.read_text())["a"] == 1.5
    path = gio.save_npz(tmp_path / "arrays.npz", plane=np.array([[1.0, np.nan]]), skipped=None)
    with np.load(path) as arrays:
        assert list(arrays) == ["plane"] and np.isnan(arrays["plane"][0, 1])
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w', got 'a'"), gio.atomic_open(target, "a"):
        pass


def test_alignment_dropped_when_registration_order_is_not_the_computation_order():
    class Swapped(nn.Module):
        """Layers registered in another order than they run: a permutation spec from the registry is wrong."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.out = nn.Linear(12, 12)
            self.inp = nn.Linear(64, 12)
            self.head = nn.Linear(12, 10)

        def forward(self, x):
            return self.head(torch.relu(self.out(torch.relu(self.inp(x)))))

    net = Swapped()
    torch.manual_seed(1)
    ref = Swapped()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.5 * torch.randn_like(p))
    conn = ModeConnectivity(reference=ref, loss_fn=_ce, num_points=3, bezier_steps=0)
    with pytest.raises(ValueError, match="takes 64 inputs"):
        permutation_spec(net)  # here the registry order is caught by the shapes already
    res = conn.compute(net, _loader())
    assert res.aligned is None and math.isfinite(res.linear.barrier)


def test_alignment_dropped_when_a_permutation_would_change_the_function():
    class Reordered(nn.Module):
        """Shapes chain in registration order, but ``b`` runs before ``a``: the spec's permutations are wrong."""

        def __init__(self):
            super().__init__()
            self.inp, self.a = nn.Linear(64, 12), nn.Linear(12, 12)
            self.b, self.head = nn.Linear(12, 12), nn.Linear(12, 10)

        def forward(self, x):
            return self.head(torch.relu(self.a(torch.relu(self.b(torch.relu(self.inp(x)))))))

    torch.manual_seed(0)
    net, ref = Reordered(), Reordered()
    conn = ModeConnectivity(reference=ref, loss_fn=_ce, num_points=3, bezier_steps=0)
    with pytest.warns(UserWarning, match="not a plain Linear/Conv chain in registration order"):
        res = conn.compute(net, _loader())
    assert res.aligned is None and res.permutations is None and math.isfinite(res.linear.barrier)


def test_eval_data_measures_the_paths_on_other_data(tmp_path):
    from lightning_geometry.functional.closure import LossClosure

    net, ref = _net(0), _net(1)
    train_data, test_data = _loader(64), list(_loader(96))[2:]
    res = ModeConnectivity(reference=ref, loss_fn=_ce, num_points=3, bezier_steps=3).compute(
        net, train_data, eval_data=test_data)
    assert res.linear.losses[0] == pytest.approx(float(LossClosure(net, _ce, test_data)()), rel=1e-6)
    assert res.linear.losses[-1] == pytest.approx(float(LossClosure(ref, _ce, test_data)()), rel=1e-6)
    assert res.curve.losses[0] == pytest.approx(res.linear.losses[0], rel=1e-6)
    # in a fit: eval_data drawn at fit start, moved to the module's device, RNG untouched
    model = DigitsMLP(n=128, hidden=8)
    conn = ModeConnectivity(reference="init", num_points=3, bezier_steps=2, probe_batches=1, save=False,
                            eval_data=_loader(64), eval_batches=1)
    trainer(tmp_path, [conn], logger=False, max_epochs=1).fit(model)
    assert conn.result.linear.errors is not None and len(conn._eval_batches()) == 1


def test_lightning_cli_yaml_instantiates_both(tmp_path, monkeypatch):
    from pathlib import Path

    import yaml

    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.syspath_prepend(str(examples))
    import cli  # examples/cli.py

    config = {
        "trainer": {"max_epochs": 1, "logger": False, "callbacks": [
            {"class_path": "lightning_geometry.callbacks.contour.EnergyContour",
             "init_args": {"radius": 0.5, "num_points": 5, "rel": 0.5, "loss_fn": "tests.helpers.models:ce_loss"}},
            {"class_path": "lightning_geometry.callbacks.connectivity.ModeConnectivity",
             "init_args": {"reference": 3, "bezier_optimizer": "sgd", "error_fn": None}},
        ]},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    parsed = cli.main(["--config", str(path), "--trainer.callbacks.num_points=7"], run=False)
    contour, conn = parsed.trainer.callbacks[:2]
    assert isinstance(contour, EnergyContour) and contour.rel == 0.5 and contour.loss_fn == "tests.helpers.models:ce_loss"
    assert isinstance(conn, ModeConnectivity) and conn.reference == 3 and conn.num_points == 7
    assert conn.error_fn is None and conn.bezier_optimizer == "sgd"
