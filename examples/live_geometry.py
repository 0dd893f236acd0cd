"""Live loss-landscape geometry on scikit-learn's digits: CurvatureProbe and TrajectoryMonitor on a Trainer.

Run::

    python examples/live_geometry.py            # 30 epochs, a few seconds on a laptop CPU
    tensorboard --logdir lightning_logs         # geometry/ scalars, the "CUSTOM SCALARS" tab, histograms,
                                                # and the trajectory PCA figure under IMAGES

The module needs no glue: the probes evaluate its own ``training_step`` (with ``self.log`` muted). Pass
``loss_fn=`` to a callback, or define ``geometry_loss(self, batch)``, to measure another loss.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_geometry.callbacks import CurvatureProbe, TrajectoryMonitor


def cross_entropy_loss(module: nn.Module, batch) -> torch.Tensor:
    """An explicit loss closure (``loss_fn="live_geometry:cross_entropy_loss"`` in YAML)."""
    x, y = batch
    return F.cross_entropy(module(x), y)


class DigitsDataModule(pl.LightningDataModule):
    """The 1,797 8×8 digits of scikit-learn (no download): 1,500 to train, the rest to validate."""

    def __init__(self, batch_size: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.seed = seed

    def setup(self, stage: str) -> None:
        x, y = load_digits(return_X_y=True)
        x = torch.tensor(x, dtype=torch.float32) / 16.0
        y = torch.tensor(y, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        x, y = x[perm], y[perm]
        self.train_set = TensorDataset(x[:1500], y[:1500])
        self.val_set = TensorDataset(x[1500:], y[1500:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=512)


class DigitsClassifier(pl.LightningModule):
    """An MLP (or a small CNN with ``cnn=True``) trained with SGD and heavy-ball momentum."""

    def __init__(self, hidden: int = 64, lr: float = 0.1, momentum: float = 0.9, cnn: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        if cnn:
            self.net = nn.Sequential(
                nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 10),
            )
        else:
            self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def main(argv: list[str] | None = None) -> pl.Trainer:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cnn", action="store_true")
    parser.add_argument("--root", default="lightning_logs")
    args = parser.parse_args(argv)

    pl.seed_everything(0)
    callbacks = [
        # Every 5 epochs (an explicit cadence overrides the budget): top-2 eigenvalues, λ_max·lr/2 and the
        # heavy-ball threshold, trace ± standard error, directional curvature, adaptive sharpness.
        CurvatureProbe(every_n_epochs=5, k=2, probe_batches=2),
        # Within 5 % of the training compute (the default budget): displacement, distance from init, path
        # length, update cosine, ...; the PCA picture of the path at the end of the fit.
        TrajectoryMonitor(log_layers=True),
    ]
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        callbacks=callbacks,
        logger=[TensorBoardLogger(args.root, name="live_geometry"), CSVLogger(args.root, name="live_geometry_csv")],
        enable_progress_bar=False,
    )
    trainer.fit(DigitsClassifier(cnn=args.cnn), datamodule=DigitsDataModule())
    metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items() if k.startswith("geometry/")}
    for name, value in sorted(metrics.items()):
        print(f"{name:45s} {value}")
    pca = callbacks[1].result
    if pca is not None:
        print(f"trajectory PCA: {pca.coords.shape[0]} points, explained variance {pca.explained_variance.tolist()}")
    return trainer


if __name__ == "__main__":
    main()
