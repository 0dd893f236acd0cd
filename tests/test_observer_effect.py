"""Zero observer effect: a fit with both callbacks ends bit-identical to a fit without them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lightning_geometry.callbacks import (
    CurvatureProbe,
    EnergyContour,
    GeometryIndex,
    ModeConnectivity,
    SharpnessEarlyStopping,
    TrajectoryMonitor,
)
from tests.helpers.models import DigitsMLP


def _fit(callbacks, seed=123, **model_kw):
    pl.seed_everything(seed, verbose=False)
    model = DigitsMLP(bn_dropout=True, n=256, batch_size=64, **model_kw)  # BatchNorm + Dropout, SGD momentum
    trainer = pl.Trainer(max_epochs=3, callbacks=callbacks, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, deterministic=True)
    trainer.fit(model)  # the train dataloader shuffles (global RNG)
    return trainer, model


def _assert_identical(a, b):
    ta, ma = a
    tb, mb = b
    for (na, pa), (nb, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert na == nb
        assert torch.equal(pa, pb) or (pa.isnan().any() and torch.allclose(pa, pb, equal_nan=True, rtol=0, atol=0)), na
    sa, sb = ta.optimizers[0].state_dict(), tb.optimizers[0].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for key in sa["state"]:
        for name, va in sa["state"][key].items():
            vb = sb["state"][key][name]
            if isinstance(va, torch.Tensor):
                assert torch.equal(va, vb) or torch.allclose(va, vb, equal_nan=True, rtol=0, atol=0), (key, name)
            else:
                assert va == vb


def _callbacks(every=True, suite=False):
    if not every:
        return [CurvatureProbe(), TrajectoryMonitor()]
    live = [  # make every probe run (the budget would skip most of them on this tiny run)
        CurvatureProbe(every_n_epochs=1, max_iter=8, trace_samples=6, num_directions=3, sharpness_samples=3),
        TrajectoryMonitor(every_n_epochs=1),
    ]
    if not suite:
        return live
    return live + [  # every callback of the package: the stopper watches, the after-fit ones measure at the end
        SharpnessEarlyStopping(),
        EnergyContour(num_points=5, line_points=5, num_directions=2, save=False),
        ModeConnectivity(reference="init", num_points=5, bezier_steps=3, save=False),
        GeometryIndex(),
    ]


@pytest.mark.parametrize(("every", "suite"), [(True, False), (False, False), (True, True)],
                         ids=["every_epoch", "default_budget", "all_callbacks"])
def test_bit_identical_params_buffers_and_optimizer_state(every, suite):
    plain = _fit([])
    rng_plain = torch.get_rng_state()
    cbs = _callbacks(every, suite)
    probed = _fit(cbs)
    rng_probed = torch.get_rng_state()
    if every:
        assert cbs[0].num_probes == 3 and cbs[1].num_probes == 3
    if suite:
        assert cbs[-1].result.value is not None  # the after-fit callbacks and the index really ran
    _assert_identical(plain, probed)
    assert torch.equal(rng_plain, rng_probed)  # the global stream after the fit is the same too
    assert probed[1].training


def test_nan_loss_probes_record_nan_and_training_is_unchanged():
    """The loss becomes nan after step 5: the probes log nan, the fit runs to the end exactly as without them."""
    plain = _fit([], nan_at_step=5)
    cbs = _callbacks(True)
    probed = _fit(cbs, nan_at_step=5)
    _assert_identical(plain, probed)
    metrics = probed[0].callback_metrics
    for key in ("geometry/lambda_max", "geometry/trace", "geometry/adaptive_sharpness",
                "geometry/directional_curvature/mean", "geometry/displacement"):
        assert torch.isnan(metrics[key]), key
    assert probed[0].current_epoch == 3
