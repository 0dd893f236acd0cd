"""CurvatureProbe: logged values equal the functional core's on the same weights and probe batch; arguments."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from lightning_geometry.callbacks import CurvatureProbe, GeometryConfigurationError
from lightning_geometry.functional import curvature as F
from lightning_geometry.functional import sharpness as S
from lightning_geometry.probe import training_step_loss
from tests.helpers.models import DigitsMLP, ce_loss, digits_tensors

SMALL = {"max_iter": 10, "trace_samples": 6, "num_directions": 4, "sharpness_samples": 3}


def _fit(callbacks, max_epochs=1, model=None, logger=False, **kw):
    pl.seed_everything(0, verbose=False)
    model = model or DigitsMLP(n=256, batch_size=64)
    trainer = pl.Trainer(max_epochs=max_epochs, callbacks=callbacks, logger=logger, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False, **kw)
    trainer.fit(model)
    return trainer, model


def test_logged_values_equal_functional_core():
    probe = CurvatureProbe(every_n_epochs=1, k=2, probe_batches=2, probe_batch_size=32, seed=5, **SMALL)
    trainer, model = _fit([probe])
    assert probe.resolved_loss_fn is training_step_loss
    batches = probe.probe_batches_on_device
    assert len(batches) == 2 and batches[0][0].shape == (32, 64)
    m = trainer.callback_metrics
    eig = F.top_hessian_eigenvalues(model, training_step_loss, batches, k=2, tol=1e-3, max_iter=10, seed=5)
    assert float(m["geometry/lambda_max"]) == pytest.approx(float(eig.eigenvalues[0]), rel=1e-6)
    assert float(m["geometry/lambda_2"]) == pytest.approx(float(eig.eigenvalues[1]), rel=1e-6)
    assert float(m["geometry/lanczos_products"]) == eig.num_products
    lr, beta = 0.1, 0.9
    assert float(m["geometry/lambda_max_lr"]) == pytest.approx(float(eig.eigenvalues[0]) * lr / 2, rel=1e-6)
    assert float(m["geometry/stability_threshold"]) == pytest.approx(S.stability_threshold(lr, beta))
    ratio = S.stability_ratio(float(eig.eigenvalues[0]), lr, beta)
    assert float(m["geometry/stability_ratio"]) == pytest.approx(ratio, rel=1e-6)
    tr = F.hessian_trace(model, training_step_loss, batches, num_samples=6, seed=5)
    assert float(m["geometry/trace"]) == pytest.approx(tr.trace, rel=1e-6)
    assert float(m["geometry/trace_std_error"]) == pytest.approx(tr.std_error, rel=1e-5)
    dc = F.directional_curvature(model, training_step_loss, batches, num_directions=4, seed=5)
    assert float(m["geometry/directional_curvature/mean"]) == pytest.approx(float(dc.values.mean()), rel=1e-5)
    assert float(m["geometry/directional_curvature/max"]) == pytest.approx(float(dc.values.max()), rel=1e-5)
    median = float(torch.quantile(dc.values.double(), 0.5))
    assert float(m["geometry/directional_curvature/q50"]) == pytest.approx(median, rel=1e-5)
    sh = S.average_adaptive_sharpness(model, training_step_loss, batches, num_samples=3, seed=5)
    assert float(m["geometry/adaptive_sharpness"]) == pytest.approx(sh.value, rel=1e-5, abs=1e-7)


def test_warm_start_uses_previous_eigenvector_and_user_loss_and_data():
    x, y = digits_tensors(48)
    probe = CurvatureProbe(every_n_epochs=1, loss_fn="tests.helpers.models:ce_loss", probe_data=(x, y),
                           tol=1e-4, max_iter=40, trace_samples=0, num_directions=0, sharpness_samples=0)
    trainer, model = _fit([probe], max_epochs=3)
    assert probe.resolved_loss_fn is ce_loss
    assert probe.num_probes == 3 and probe._eigenvector is not None
    cold = F.top_hessian_eigenvalues(model, ce_loss, [(x, y)], tol=1e-4, max_iter=40, seed=2)
    assert float(trainer.callback_metrics["geometry/lambda_max"]) == pytest.approx(float(cold.eigenvalues[0]),
                                                                                   rel=1e-3)
    warm = probe.last_results["eigen"]
    assert warm.num_products <= cold.num_products
    assert "geometry/trace" not in trainer.callback_metrics  # turned off


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, "`k`"),
        ({"tol": 0.0}, "`tol`"),
        ({"max_iter": 0}, "`max_iter`"),
        ({"h": -1.0}, "`h`"),
        ({"trace_method": "hutchpp"}, "trace_method"),
        ({"direction_norm": "filters"}, "direction_norm"),
        ({"route": "fast"}, "route"),
        ({"trace_samples": 2}, "trace_samples"),
        ({"sharpness_rho": 0}, "sharpness_rho"),
        ({"budget": 2.0}, "budget"),
        ({"every_n_epochs": 1, "every_n_train_steps": 1}, "every_n_epochs"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(GeometryConfigurationError, match=match):
        CurvatureProbe(**kwargs)
    with pytest.raises(ValueError, match=match):
        CurvatureProbe(**kwargs)


class _Manual(DigitsMLP):
    def __init__(self):
        super().__init__(n=128)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        loss = ce_loss(self, batch)
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization_error_at_setup():
    with pytest.raises(MisconfigurationException, match="loss_fn"):
        _fit([CurvatureProbe(every_n_epochs=1)], model=_Manual())


def test_step_cadence_logs_every_probe_point(tmp_path):
    probe = CurvatureProbe(every_n_train_steps=2, **SMALL)
    logger = CSVLogger(tmp_path, name="steps")
    trainer, _ = _fit([probe], max_epochs=2, logger=logger)  # log_every_n_steps=50 > 8 steps
    assert probe.num_probes == 4  # 8 steps
    assert math.isfinite(float(trainer.callback_metrics["geometry/lambda_max"]))
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv").dropna(subset=["geometry/lambda_max"])
    assert metrics["step"].tolist() == [2, 4, 6, 8]
