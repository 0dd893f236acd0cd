"""Small LightningModules on scikit-learn's digits (no download) for the callback tests."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

_DIGITS: tuple[torch.Tensor, torch.Tensor] | None = None


def digits_tensors(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float32 images in [0, 1] (flattened, 64 features) and int64 labels; the first ``n`` samples."""
    global _DIGITS
    if _DIGITS is None:
        x, y = load_digits(return_X_y=True)
        _DIGITS = (torch.tensor(x, dtype=torch.float32) / 16.0, torch.tensor(y, dtype=torch.long))
    x, y = _DIGITS
    return (x, y) if n is None else (x[:n], y[:n])


def digits_loader(
    n: int | None = 512, batch_size: int = 64, shuffle: bool = True, seed: int | None = None
) -> DataLoader:
    x, y = digits_tensors(n)
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=shuffle, generator=gen)


class DigitsMLP(pl.LightningModule):
    """MLP classifier; ``bn_dropout`` adds BatchNorm and Dropout (the observer-effect model)."""

    def __init__(self, hidden: int = 32, lr: float = 0.1, momentum: float = 0.9, bn_dropout: bool = False,
                 n: int | None = 512, batch_size: int = 64, nan_at_step: int | None = None) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, hidden)]
        if bn_dropout:
            layers += [nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.2)]
        else:
            layers += [nn.Tanh()]
        layers += [nn.Linear(hidden, 10)]
        self.net = nn.Sequential(*layers)
        self.lr, self.momentum, self.n, self.batch_size = lr, momentum, n, batch_size
        self.nan_at_step = nan_at_step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.nan_at_step is not None and self.global_step == self.nan_at_step:
            with torch.no_grad():
                self.net[0].weight[0, 0] = float("nan")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)

    def train_dataloader(self):
        return digits_loader(self.n, self.batch_size, shuffle=True)


class DigitsCNN(DigitsMLP):
    """A small CNN on the 8×8 digits."""

    def __init__(self, channels: int = 8, lr: float = 0.05, momentum: float = 0.9, n: int | None = 512,
                 batch_size: int = 64) -> None:
        super().__init__(lr=lr, momentum=momentum, n=n, batch_size=batch_size)
        self.net = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * channels * 16, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(-1, 1, 8, 8))


def ce_loss(module: nn.Module, batch) -> torch.Tensor:
    """Importable loss closure for ``loss_fn="tests.helpers.models:ce_loss"``."""
    x, y = batch
    return F.cross_entropy(module(x), y)
