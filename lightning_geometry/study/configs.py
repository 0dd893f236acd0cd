"""The configurations of the paper's Table 1 and of the learning-rate sweep, and the optimizers they build.

Table 1 of the paper on hyperparameter landscape geometry lists five training configurations and its claim about
each: A1 and A2 ("A"), and C1 reach flat minima that connect to one another; B1 and B2 reach sharp, fragmented
ones. C1 is "SGD + SWA" without a momentum value; we use momentum 0.9, the SGD of Izmailov et al. 2018's SWA
recipe, and average over the last quarter of training with Lightning's ``StochasticWeightAveraging``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

Optimizer = Literal["sgd", "adam", "adamw"]
_OPTIMIZERS = ("sgd", "adam", "adamw")


@dataclass(frozen=True)
class RunConfig:
    """One training configuration.

    Attributes:
        name: Short label (``"A1"``).
        lr: Learning rate.
        batch_size: Training batch size.
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        momentum: Heavy-ball momentum (SGD only).
        weight_decay: Weight decay (decoupled for AdamW, L2 otherwise).
        swa: Average the weights over the last quarter of training (Izmailov et al. 2018).
        group: The paper's group, ``"A"``, ``"B"`` or ``"C"``; ``"sweep"`` for the learning-rate sweep.
        claim: What the paper claims for this configuration.
    """

    name: str
    lr: float
    batch_size: int
    optimizer: Optimizer
    momentum: float = 0.0
    weight_decay: float = 0.0
    swa: bool = False
    group: str = ""
    claim: str = ""

    def __post_init__(self) -> None:
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size!r}")

    def as_dict(self) -> dict[str, Any]:
        """Plain dictionary, for JSON reports and hparams."""
        return asdict(self)

    def build_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """The optimizer this configuration trains with."""
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self.optimizer == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay or 0.01)


TABLE1: tuple[RunConfig, ...] = (
    RunConfig("A1", 0.003, 256, "sgd", momentum=0.9, group="A", claim="flat, connected"),
    RunConfig("A2", 0.001, 128, "adamw", group="A", claim="flat, connected"),
    RunConfig("B1", 0.01, 32, "sgd", group="B", claim="sharp, fragmented"),
    RunConfig("B2", 0.02, 64, "adam", group="B", claim="sharp, fragmented"),
    RunConfig("C1", 0.005, 256, "sgd", momentum=0.9, swa=True, group="C", claim="flat, connected"),
)
"""The five configurations of the paper's Table 1."""

LR_SWEEP: tuple[RunConfig, ...] = tuple(
    RunConfig(f"sgd_lr{lr:g}", lr, 128, "sgd", momentum=0.9, group="sweep") for lr in (0.001, 0.003, 0.01, 0.03, 0.1)
)
"""SGD with momentum 0.9, batch 128, learning rate from 0.001 to 0.1: sharpness against learning rate alone."""
