"""Sharpness early stopping on real data: scikit-learn's digits, an MLP, Adam against SGD with momentum.

Run: ``python examples/sharpness_early_stopping.py`` (about two to three minutes on 2 CPU cores; ``--epochs`` to
change the length). Each fit attaches a :class:`~lightning_geometry.callbacks.CurvatureProbe` measuring the top
Hessian eigenvalue λ_max at the end of every epoch (on a fixed probe batch of 256 training images) and a
:class:`~lightning_geometry.callbacks.SharpnessEarlyStopping`, and prints where and why it stopped:

1. Adam, lr 0.02, batch 64, the stopper's defaults (the edge criterion is switched off for Adam, with a warning).
2. SGD, lr 0.003, momentum 0.9, batch 256, the stopper's defaults.
3. The same SGD fit with ``wait_for_plateau=False``: the trend criterion then fires during the early rise of
   sharpness (progressive sharpening), which is why the default waits for a plateau first.
4. SGD, lr 0.5, momentum 0.9, batch 256, defaults: sharpness rises to the edge of stability (2 + 2β)/lr = 7.6.
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_geometry.callbacks import CurvatureProbe
from lightning_geometry.callbacks.early_stopping import SharpnessEarlyStopping

N_TRAIN = 1437


def digits_split() -> tuple[TensorDataset, TensorDataset]:
    """Standardised digits, shuffled once with a private generator: 1,437 training and 360 validation images."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return TensorDataset(x[:N_TRAIN], y[:N_TRAIN]), TensorDataset(x[N_TRAIN:], y[N_TRAIN:])


class DigitsMLP(L.LightningModule):
    """A 64-256-256-10 ReLU network; ``optimizer`` is ``"adam"`` or ``"sgd"`` (with heavy-ball momentum)."""

    def __init__(self, optimizer: str, lr: float, momentum: float = 0.0, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        self.train_set, self.val_set = digits_split()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)

    def train_dataloader(self) -> DataLoader:
        gen = torch.Generator().manual_seed(1)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=gen)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=360)


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The probe's loss closure."""
    x, y = batch
    return F.cross_entropy(model(x), y)


class History(Callback):
    """Records λ_max, the training loss and the validation accuracy at every epoch end."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, float, float]] = []

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = trainer.callback_metrics
        get = lambda k: float(m[k]) if k in m else math.nan  # noqa: E731
        self.rows.append((trainer.current_epoch, get("geometry/lambda_max"), get("train_loss"), get("val_acc")))


def run(name: str, model_args: dict[str, Any], stopper_args: dict[str, Any], epochs: int) -> dict[str, Any]:
    """One fit; returns what the README reports."""
    L.seed_everything(0, verbose=False)
    model = DigitsMLP(**model_args)
    probe = CurvatureProbe(
        every_n_epochs=1, loss_fn=cross_entropy, probe_batch_size=256, probe_batches=1, max_iter=20,
        trace_samples=0, num_directions=0, sharpness_samples=0,
    )
    stopper = SharpnessEarlyStopping(**stopper_args)
    history = History()
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[probe, stopper, history], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    start = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - start
    lam = [r[1] for r in history.rows]
    peak = max(range(len(lam)), key=lambda i: lam[i] if math.isfinite(lam[i]) else -math.inf)
    last = history.rows[-1]
    result = {
        "name": name,
        "epochs_run": trainer.current_epoch,
        "stopped_epoch": stopper.stopped_epoch if stopper.sharpness_reason.value else None,
        "reason": stopper.sharpness_reason.name,
        "message": stopper.stopping_reason_message,
        "lambda_first": lam[0],
        "lambda_peak": (peak, lam[peak]),
        "lambda_last": lam[-1],
        "train_loss_last": last[2],
        "val_acc_last": last[3],
        "flattest": (stopper.best_epoch, float(stopper.best_score)),
        "seconds": seconds,
        "lambda": lam,
    }
    print(f"\n== {name} ({seconds:.0f} s)")
    print(f"   stopped: {result['stopped_epoch']} ({result['reason']}) after {result['epochs_run']} epochs")
    if result["message"]:
        print(f"   message: {result['message']}")
    print(f"   lambda_max: first {lam[0]:.3g}, peak {lam[peak]:.3g} at epoch {peak}, last {lam[-1]:.3g}; "
          f"flattest {result['flattest'][1]:.3g} at epoch {result['flattest'][0]}")
    print(f"   last train loss {last[2]:.3g}, val acc {last[3]:.3f}")
    print("   lambda_max by epoch: " + " ".join(f"{v:.3g}" for v in lam))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=60)
    args = parser.parse_args()
    adam = {"optimizer": "adam", "lr": 0.02, "batch_size": 64}
    sgd = {"optimizer": "sgd", "lr": 0.003, "momentum": 0.9, "batch_size": 256}
    sgd_large = {"optimizer": "sgd", "lr": 0.5, "momentum": 0.9, "batch_size": 256}
    results = [
        run("Adam lr 0.02, batch 64, defaults", adam, {}, args.epochs),
        run("SGD lr 0.003 momentum 0.9, batch 256, defaults", sgd, {}, args.epochs),
        run("SGD lr 0.003 momentum 0.9, batch 256, wait_for_plateau=False", sgd, {"wait_for_plateau": False},
            args.epochs),
        run("SGD lr 0.5 momentum 0.9, batch 256, defaults", sgd_large, {}, args.epochs),
    ]
    print("\n| run | stopped at epoch | reason | λ_max first / peak (epoch) / last | val acc |")
    print("|---|---|---|---|---|")
    for r in results:
        stop = "—" if r["stopped_epoch"] is None else str(r["stopped_epoch"])
        pe, pv = r["lambda_peak"]
        print(f"| {r['name']} | {stop} | {r['reason']} | {r['lambda_first']:.3g} / {pv:.3g} ({pe}) / "
              f"{r['lambda_last']:.3g} | {r['val_acc_last']:.3f} |")


if __name__ == "__main__":
    main()
