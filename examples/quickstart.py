"""Quick start: train a small MLP on scikit-learn's digits with a Lightning Trainer, then measure its curvature.

Run: ``python examples/quickstart.py`` (about half a minute on 2 CPU cores). It prints the top Hessian
eigenvalues (Lanczos), the Hessian trace (Hutch++, with its standard error), the second differences of the loss
along filter-normalized random directions, and the edge-of-stability ratio λ_max·lr/2, with the time each took.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_geometry.functional import (
    directional_curvature,
    hessian_trace,
    stability_ratio,
    top_hessian_eigenvalues,
)


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 digits as standardised float32 features and integer labels (bundled with scikit-learn)."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return x, torch.tensor(data.target, dtype=torch.long)


class DigitsMLP(L.LightningModule):
    """A 64-256-256-10 ReLU network trained with SGD and momentum."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


def cross_entropy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The loss closure every measurement uses: ``loss_fn(model, batch) -> scalar``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


def timed(label: str, fn):  # noqa: ANN001, ANN201 - a two-line helper for the printout
    start = time.perf_counter()
    result = fn()
    print(f"{label:<34} {time.perf_counter() - start:6.2f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    L.seed_everything(args.seed, verbose=False)
    x, y = digits_tensors()
    loader = DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)
    model = DigitsMLP()
    trainer = L.Trainer(
        max_epochs=args.epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )
    timed(f"training ({args.epochs} epochs)", lambda: trainer.fit(model, loader))

    probe = (x, y)  # all 1,797 samples as one batch
    eig = timed("top-3 eigenvalues (Lanczos)", lambda: top_hessian_eigenvalues(model, cross_entropy, probe, k=3))
    trace = timed("trace (Hutch++, 60 products)", lambda: hessian_trace(model, cross_entropy, probe, num_samples=60))
    curv = timed("directional curvature (10 dirs)", lambda: directional_curvature(model, cross_entropy, probe))

    lam = float(eig.eigenvalues[0])
    print()
    print(f"training loss                {eig.loss:.4f}")
    print(f"top eigenvalues              {', '.join(f'{v:.4f}' for v in eig.eigenvalues.tolist())}"
          f"   ({eig.num_products} Hessian-vector products, converged={eig.converged})")
    print(f"trace                        {trace.trace:.3f} ± {trace.std_error:.3f}")
    print(f"directional curvature        mean {curv.values.mean():.3f}, max {curv.values.max():.3f}"
          f" (filter-normalized, h={curv.h})")
    print(f"lambda_max * lr / 2          {stability_ratio(lam, model.hparams.lr):.3f}"
          f"   (heavy-ball edge: lambda_max / ((2 + 2*momentum)/lr) = "
          f"{stability_ratio(lam, model.hparams.lr, model.hparams.momentum):.3f})")


if __name__ == "__main__":
    main()
