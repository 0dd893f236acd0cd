"""A callback that records the geometry values each rank sees, for the DDP test."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl


class RankRecorder(pl.Callback):
    """After the geometry callbacks, store ``trainer.callback_metrics["geometry/..."]`` per epoch, one file per rank."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.values: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer, pl_module):
        metrics = trainer.callback_metrics  # read on every rank (no rank-zero guard)
        values = {k: float(v) for k, v in metrics.items() if k.startswith("geometry/")}
        for cb in trainer.callbacks:  # the rank-local (not yet reduced) top eigenvalue
            eigen = getattr(cb, "last_results", {}).get("eigen")
            if eigen is not None:
                values["local/lambda_max"] = float(eigen.eigenvalues[0])
        self.values.append(values)

    def on_train_end(self, trainer, pl_module):
        path = Path(self.out_dir) / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps({"values": self.values, "world_size": trainer.world_size}))


from lightning_geometry.callbacks import TrajectoryMonitor  # noqa: E402


class CheapTrajectoryMonitor(TrajectoryMonitor):
    """A TrajectoryMonitor whose cost model ignores logging, so that a tiny DDP run affords a point per epoch."""

    LOG_COST = 0.0
    CALL_COST = 0.0
