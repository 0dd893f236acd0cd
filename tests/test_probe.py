"""The bridge: loss closure resolution and probe batches drawn without touching any RNG or the loader order."""

from __future__ import annotations

import random

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_geometry.probe import ProbeData, import_from_path, resolve_loss_fn, training_step_loss
from tests.helpers.models import DigitsMLP, ce_loss, digits_loader, digits_tensors


def _batch(n=16):
    x, y = digits_tensors(n)
    return x, y


def test_callable_loss_fn_is_used_as_is():
    model = DigitsMLP()
    assert resolve_loss_fn(model, ce_loss) is ce_loss


@pytest.mark.parametrize("path", ["tests.helpers.models:ce_loss", "tests.helpers.models.ce_loss"])
def test_import_path_loss_fn(path):
    model = DigitsMLP()
    fn = resolve_loss_fn(model, path)
    assert fn is ce_loss


@pytest.mark.parametrize("path", ["nonexistent.module:fn", "tests.helpers.models:nope", "nodots", ""])
def test_bad_import_path_names_the_value(path):
    with pytest.raises(ValueError, match="loss_fn"):
        resolve_loss_fn(DigitsMLP(), path)


def test_import_path_to_non_callable():
    with pytest.raises(ValueError, match="not a callable"):
        resolve_loss_fn(DigitsMLP(), "tests.helpers.models:_DIGITS")
    assert import_from_path("math:pi") == pytest.approx(3.14159, abs=1e-5)


def test_non_callable_loss_fn_is_a_type_error():
    with pytest.raises(TypeError, match="loss_fn"):
        resolve_loss_fn(DigitsMLP(), 3)  # type: ignore[arg-type]


class _WithGeometryLoss(DigitsMLP):
    def geometry_loss(self, batch):
        x, y = batch
        return 2.0 * F.cross_entropy(self(x), y)


def test_geometry_loss_method_wins_over_training_step():
    model = _WithGeometryLoss()
    fn = resolve_loss_fn(model)
    batch = _batch()
    assert torch.allclose(fn(model, batch), 2.0 * ce_loss(model, batch))


def test_training_step_route_mutes_self_log():
    model = DigitsMLP()
    fn = resolve_loss_fn(model)
    assert fn is training_step_loss
    batch = _batch()
    # self.log outside a Trainer loop would raise; muted, it is a no-op and the instance is left clean.
    assert torch.allclose(fn(model, batch), ce_loss(model, batch))
    assert "log" not in model.__dict__ and "log_dict" not in model.__dict__


class _DictStep(DigitsMLP):
    def training_step(self, batch, batch_idx):
        self.log_dict({"a": 1.0})
        return {"loss": ce_loss(self, batch), "other": 1}


class _NoneStep(DigitsMLP):
    def training_step(self, batch, batch_idx):
        return None


def test_training_step_dict_and_bad_returns():
    batch = _batch()
    model = _DictStep()
    assert torch.allclose(resolve_loss_fn(model)(model, batch), ce_loss(model, batch))
    bad = _NoneStep()
    with pytest.raises(MisconfigurationException, match="not a loss Tensor"):
        resolve_loss_fn(bad)(bad, batch)


class _Manual(DigitsMLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


def test_manual_optimization_asks_for_loss_fn():
    with pytest.raises(MisconfigurationException, match="manual optimization.*loss_fn"):
        resolve_loss_fn(_Manual())
    assert resolve_loss_fn(_Manual(), ce_loss) is ce_loss


def _rng_states():
    return torch.get_rng_state().clone(), np.random.get_state()[1].copy(), random.getstate()


def _fitted_trainer(model, **kw):
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, limit_train_batches=1, **kw)
    trainer.fit(model)
    return trainer


def test_probe_batches_drawn_without_touching_rng_or_loader_order():
    model = DigitsMLP(n=256, batch_size=32)
    trainer = _fitted_trainer(model)
    loader = trainer.train_dataloader
    before = _rng_states()
    probe = ProbeData(num_batches=3, seed=7)
    batches = probe.prepare(trainer, model)
    after = _rng_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert len(batches) == 3 and all(b[0].shape == (32, 64) for b in batches)
    assert probe.num_samples == 96
    # distinct samples, drawn from the training set, reproducible by seed
    x_all = loader.dataset.tensors[0]
    rows = torch.cat([b[0] for b in batches])
    assert all(any(torch.equal(r, x) for x in x_all) for r in rows[:5])
    again = ProbeData(num_batches=3, seed=7).prepare(trainer, model)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    other = ProbeData(num_batches=3, seed=8).prepare(trainer, model)
    assert not torch.equal(batches[0][0], other[0][0])
    assert probe.prepare(trainer, model) is batches  # drawn once


def test_probe_batch_size_and_user_data():
    model = DigitsMLP(n=256, batch_size=32)
    trainer = _fitted_trainer(model)
    assert ProbeData(num_batches=1, batch_size=100).prepare(trainer, model)[0][0].shape[0] == 100
    single = _batch(10)
    assert ProbeData(single).prepare(trainer, model)[0][0].shape[0] == 10
    loader = digits_loader(64, batch_size=16, shuffle=False)
    taken = ProbeData(loader, num_batches=2).prepare(trainer, model)
    assert len(taken) == 2 and torch.equal(taken[1][0], digits_tensors(32)[0][16:])


def test_probe_data_bad_arguments():
    with pytest.raises(ValueError, match="num_batches"):
        ProbeData(num_batches=0)
    with pytest.raises(ValueError, match="batch_size"):
        ProbeData(batch_size=-2)


def test_no_train_dataloader_and_no_probe_data_is_a_clear_setup_error():
    from lightning_geometry.callbacks._base import GeometryCallback

    class _Needs(GeometryCallback):
        needs_probe_data = True

    class _NoData(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):
            return self.lin(batch).sum()

    trainer = pl.Trainer(logger=False, enable_progress_bar=False)
    with pytest.raises(MisconfigurationException, match="probe_data="):
        _Needs().setup(trainer, _NoData(), "fit")
    _Needs(probe_data=torch.zeros(4, 2)).setup(trainer, _NoData(), "fit")  # user data: fine
