"""The shared base: argument checks, cadence, deduplication, skips, budget schedule, state, mode restoration."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_geometry.callbacks import GeometryCallback, TrajectoryMonitor
from lightning_geometry.callbacks._base import ProbeOutput
from tests.helpers.models import DigitsMLP


class Recorder(GeometryCallback):
    """A probe that records when it ran and the module's mode inside the probe context."""

    probe_name = "recorder"
    LOG_COST = 0.0  # count only the scripted cost

    def __init__(self, cost: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        self.cost = cost
        self.calls: list[tuple[int, int]] = []
        self.modes: list[bool] = []
        self.grad_enabled: list[bool] = []

    def measure(self, trainer, pl_module):
        self.calls.append((trainer.current_epoch, trainer.global_step))
        self.modes.append(pl_module.training)
        self.grad_enabled.append(torch.is_grad_enabled() and not torch.is_inference_mode_enabled())
        return ProbeOutput(scalars={"recorder": float(len(self.calls))}, cost=self.cost)

    def estimated_cost(self, trainer, pl_module):
        return self.cost


def fit(callbacks, max_epochs=3, model=None, **kw):
    model = model or DigitsMLP(n=256, batch_size=64)  # 4 steps per epoch
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **kw)
    trainer.fit(model)
    return trainer, model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 1, "every_n_train_steps": 2}, "every_n_epochs.*every_n_train_steps"),
        ({"budget": 0}, "budget"),
        ({"budget": 1.5}, "budget"),
        ({"budget": -0.1}, "budget"),
        ({"every_n_epochs": 0}, "every_n_epochs"),
        ({"every_n_train_steps": -3}, "every_n_train_steps"),
        ({"probe_batches": 0}, "probe_batches"),
        ({"loss_fn": 3}, "loss_fn"),
    ],
)
def test_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Recorder(**kwargs)
    with pytest.raises(MisconfigurationException, match=match):
        Recorder(**kwargs)


def test_budget_one_is_allowed():
    assert Recorder(budget=1.0).budget == 1.0


def test_every_n_epochs_cadence_and_mode_restored():
    rec = Recorder(every_n_epochs=2)
    trainer, model = fit([rec], max_epochs=5)
    assert [e for e, _ in rec.calls] == [1, 3]
    assert rec.modes == [False, False]  # eval inside the probe
    assert all(rec.grad_enabled)
    assert model.training  # restored after (Lightning leaves the module in train mode after fit)


def test_train_mode_option():
    rec = Recorder(every_n_epochs=1, train_mode=True)
    fit([rec], max_epochs=1)
    assert rec.modes == [True]


def test_every_n_train_steps_deduplicated_under_accumulation():
    rec = Recorder(every_n_train_steps=1)
    trainer, _ = fit([rec], max_epochs=2, accumulate_grad_batches=2)
    steps = [s for _, s in rec.calls]
    assert steps == [1, 2, 3, 4]  # 8 batches, 4 optimizer steps, one probe each
    assert trainer.global_step == 4


def test_skipped_in_sanity_check_and_fast_dev_run():
    rec = Recorder(every_n_epochs=1)
    fit([rec], max_epochs=1, fast_dev_run=True)
    assert rec.calls == []


def test_budget_schedule_is_deterministic_and_within_budget():
    runs = []
    for _ in range(2):
        rec = Recorder(cost=30.0, budget=0.05)
        fit([rec], max_epochs=8)
        runs.append(rec.calls)
        # 256 samples per epoch -> 12.8 per epoch of budget, a probe costs 30: every 3rd epoch
        assert rec.cost_fraction <= 0.05 + 1e-12
    assert runs[0] == runs[1]
    assert [e for e, _ in runs[0]] == [2, 4, 7]


def test_logging_is_part_of_the_cost():
    class Logged(Recorder):
        LOG_COST = 30.0

    rec = Logged(cost=10.0, every_n_epochs=1)
    fit([rec], max_epochs=1)
    # 3 scalars: recorder, probe_seconds/recorder, probe_cost_fraction/recorder
    assert rec.cost_fraction == pytest.approx((10.0 + 3 * 30.0) / 256)


def test_no_measurement_under_budget_warns():
    rec = Recorder(cost=1e9, budget=0.01)
    with pytest.warns(UserWarning, match="made no measurement"):
        fit([rec], max_epochs=1)


def test_state_key_and_state_roundtrip():
    a, b = Recorder(every_n_epochs=1), Recorder(every_n_epochs=2)
    assert a.state_key != b.state_key
    assert "every_n_epochs" in a.state_key
    assert TrajectoryMonitor().state_key != Recorder().state_key
    rec = Recorder(every_n_epochs=1)
    fit([rec], max_epochs=2)
    state = rec.state_dict()
    fresh = Recorder(every_n_epochs=1)
    fresh.load_state_dict(state)
    assert fresh.num_probes == 2 and fresh.state_dict() == state
    assert math.isclose(fresh.cost_fraction, 20.0 / 512.0)


def test_logged_under_prefix():
    rec = Recorder(every_n_epochs=1, log_key_prefix="geo/")
    trainer, _ = fit([rec], max_epochs=1)
    assert "geo/recorder" in trainer.callback_metrics
    assert "geo/probe_seconds/recorder" in trainer.callback_metrics
    assert float(trainer.callback_metrics["geo/probe_cost_fraction/recorder"]) == pytest.approx(10 / 256)


def test_budget_schedule_continues_across_resume(tmp_path):
    first = Recorder(cost=30.0, budget=0.05)
    trainer, _ = fit([first], max_epochs=4)
    assert [e for e, _ in first.calls] == [2]
    ckpt = tmp_path / "four.ckpt"
    trainer.save_checkpoint(ckpt)
    second = Recorder(cost=30.0, budget=0.05)
    model = DigitsMLP(n=256, batch_size=64)
    resumed = pl.Trainer(max_epochs=8, callbacks=[second], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    resumed.fit(model, ckpt_path=ckpt)
    assert [e for e, _ in second.calls] == [4, 7]  # the uninterrupted run probes at [2, 4, 7]
    assert second.num_probes == 3
