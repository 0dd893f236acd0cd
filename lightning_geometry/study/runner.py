"""Fit a configuration on real data with the geometry callbacks attached, and collect its descriptors.

The study layer only composes: a Lightning fit with :class:`~lightning_geometry.callbacks.CurvatureProbe` and
:class:`~lightning_geometry.callbacks.TrajectoryMonitor` attached (curves in TensorBoard and a CSV log), then
:class:`~lightning_geometry.callbacks.EnergyContour` and :class:`~lightning_geometry.callbacks.ModeConnectivity`
on demand at the final weights, and the functional core for the final curvature. Data: scikit-learn's bundled
digits (1,797 8×8 images, 10 classes), split 70/30 with a fixed seed and standardised on the training part.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import StochasticWeightAveraging
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_geometry.callbacks import CurvatureProbe, EnergyContour, ModeConnectivity, TrajectoryMonitor
from lightning_geometry.functional import average_adaptive_sharpness, stability_ratio, top_hessian_eigenvalues
from lightning_geometry.functional.index import GeometryDescriptors
from lightning_geometry.study.configs import RunConfig


@dataclass
class DigitsData:
    """Train/test tensors of the digits split, and the fixed probe set the final measurements use."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def probe(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole training set, one batch: the loss the optimizer minimised."""
        return self.x_train, self.y_train


def load_digits_split(seed: int = 0, test_fraction: float = 0.3) -> DigitsData:
    """Digits, stratified 70/30 split with ``seed``, standardised with the training mean and deviation."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=test_fraction, random_state=seed, stratify=data.target
    )
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    as_y = lambda a: torch.tensor(a, dtype=torch.long)  # noqa: E731
    return DigitsData(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


class DigitsMLP(L.LightningModule):
    """MLP 64-256-256-10 with ReLU, trained with the configuration's optimizer."""

    def __init__(self, config: RunConfig) -> None:
        super().__init__()
        self.config = config
        self.save_hyperparameters(config.as_dict())
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def geometry_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The loss every geometry callback measures (the training loss, without logging)."""
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.geometry_loss(batch)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.config.build_optimizer(self.parameters())


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``loss_fn(model, batch)`` for the functional core."""
    x, y = batch
    return F.cross_entropy(model(x), y)


@dataclass
class RunRecord:
    """What one fit of one configuration and seed produced.

    Attributes:
        config: The configuration.
        seed: The training seed.
        train_loss: Final loss on the whole training set.
        test_loss: Loss on the held-out 30 %.
        test_accuracy: Accuracy on the held-out 30 %.
        lambda_max: Top Hessian eigenvalue of the training loss at the final weights.
        stability_ratio: ``lambda_max`` over the SGD stability threshold (nan for adaptive optimizers).
        adaptive_sharpness: Average adaptive sharpness (rho 0.05) at the final weights.
        displacement_cv: Coefficient of variation of the per-epoch displacements over the monitor's window.
        turning_cosine: Mean cosine between successive per-epoch displacements.
        path_net_ratio: Path length over net displacement.
        contour_width: Mean contour width (Δ = 0.1) along 4 filter-normalized directions.
        contour_censored: Rays that did not cross the level within the search radius.
        barrier: Mean linear interpolation barrier to the other seeds of the configuration (nan if alone).
        barrier_aligned: The same after weight matching.
        log_dir: Where the run's TensorBoard and CSV logs are.
    """

    config: RunConfig
    seed: int
    train_loss: float = math.nan
    test_loss: float = math.nan
    test_accuracy: float = math.nan
    lambda_max: float = math.nan
    stability_ratio: float = math.nan
    adaptive_sharpness: float = math.nan
    displacement_cv: float = math.nan
    turning_cosine: float = math.nan
    path_net_ratio: float = math.nan
    contour_width: float = math.nan
    contour_censored: int = 0
    barrier: float = math.nan
    barrier_aligned: float = math.nan
    log_dir: str = ""
    barriers: dict[str, float] = field(default_factory=dict)
    barriers_aligned: dict[str, float] = field(default_factory=dict)

    def descriptors(self) -> GeometryDescriptors:
        """The inputs of the geometry index; the stability ratio only where it applies (SGD)."""
        ratio = self.stability_ratio if math.isfinite(self.stability_ratio) else None
        return GeometryDescriptors(
            stability_ratio=ratio,
            adaptive_sharpness=self.adaptive_sharpness,
            displacement_cv=self.displacement_cv,
            turning_cosine=self.turning_cosine,
            contour_width=self.contour_width,
            barrier=None if math.isnan(self.barrier) else self.barrier,
        )

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["config"] = self.config.as_dict()
        return out


def fit_run(
    config: RunConfig, seed: int, data: DigitsData, *, epochs: int, out_dir: Path, probe_every: int = 5
) -> tuple[DigitsMLP, RunRecord]:
    """Train one configuration with the live probes attached and measure its final geometry (not connectivity).

    Args:
        config: The configuration.
        seed: Seed of initialisation and shuffling.
        data: The digits split.
        epochs: Training epochs.
        out_dir: Root of the logs; this run writes under ``out_dir/<name>/seed<seed>``.
        probe_every: CurvatureProbe cadence in epochs (the trajectory is recorded every epoch).

    Returns:
        The trained module (on CPU, eval mode) and its record.
    """
    L.seed_everything(seed, verbose=False)
    module = DigitsMLP(config)
    loader = DataLoader(TensorDataset(data.x_train, data.y_train), batch_size=config.batch_size, shuffle=True)
    monitor = TrajectoryMonitor(every_n_epochs=1, window=max(3, epochs // 4))
    callbacks: list[L.Callback] = [
        CurvatureProbe(every_n_epochs=probe_every, trace_samples=0, num_directions=0, sharpness_samples=0,
                       probe_batch_size=512),
        monitor,
    ]
    if config.swa:
        callbacks.append(StochasticWeightAveraging(swa_lrs=config.lr, swa_epoch_start=0.75))
    run_dir = out_dir / config.name
    loggers = [
        TensorBoardLogger(str(run_dir), name="", version=f"seed{seed}"),
        CSVLogger(str(run_dir), name="", version=f"seed{seed}_csv"),
    ]
    trainer = L.Trainer(
        max_epochs=epochs, accelerator="cpu", devices=1, logger=loggers, callbacks=callbacks,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, deterministic=True,
    )
    trainer.fit(module, loader)
    module.eval()
    record = RunRecord(config, seed, log_dir=str(run_dir / f"seed{seed}"))
    record.turning_cosine = monitor.tracker.mean_update_cosine
    record.displacement_cv = monitor.tracker.displacement_cv
    record.path_net_ratio = monitor.result.path_length / monitor.result.distance_from_init
    _measure_final(module, record, data)
    return module, record


def _measure_final(module: DigitsMLP, record: RunRecord, data: DigitsData) -> None:
    config = record.config
    with torch.no_grad():
        record.train_loss = float(cross_entropy(module, data.probe))
        logits = module(data.x_test)
        record.test_loss = float(F.cross_entropy(logits, data.y_test))
        record.test_accuracy = float((logits.argmax(1) == data.y_test).float().mean())
    eig = top_hessian_eigenvalues(module, cross_entropy, data.probe, tol=1e-4)
    record.lambda_max = float(eig.eigenvalues[0])
    if config.optimizer == "sgd":
        record.stability_ratio = stability_ratio(record.lambda_max, config.lr, config.momentum)
    record.adaptive_sharpness = average_adaptive_sharpness(
        module, cross_entropy, data.probe, rho=0.05, num_samples=20
    ).value
    contour = EnergyContour(num_points=0, line_points=0, delta=0.1, num_directions=4, max_radius=2.0,
                            loss_fn=cross_entropy, save=False).compute(module, data.probe)
    record.contour_width = float(contour.width.mean)
    record.contour_censored = int(contour.width.num_censored)


def connect(records: list[RunRecord], modules: list[DigitsMLP], data: DigitsData) -> None:
    """Fill each record's barriers to the other seeds of its configuration (linear and weight-matched).

    The linear path between two runs is the same both ways, so each pair is measured once; weight matching
    aligns the second run's units to the first's.
    """
    for i, (record, module) in enumerate(zip(records, modules)):
        for other, reference in zip(records[i + 1 :], modules[i + 1 :]):
            result = ModeConnectivity(reference=reference, num_points=11, align=True, bezier_steps=0,
                                      loss_fn=cross_entropy, error_fn=None, save=False).compute(module, data.probe)
            for a, b in ((record, other), (other, record)):
                a.barriers[f"seed{b.seed}"] = float(result.linear.barrier)
                if result.aligned is not None:
                    a.barriers_aligned[f"seed{b.seed}"] = float(result.aligned.barrier)
    for record in records:
        if record.barriers:
            record.barrier = float(np.mean(list(record.barriers.values())))
        if record.barriers_aligned:
            record.barrier_aligned = float(np.mean(list(record.barriers_aligned.values())))
