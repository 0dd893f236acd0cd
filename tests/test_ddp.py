"""DDP on CPU (gloo, 2 processes): both ranks log the same values and nothing hangs, with different probe batches."""

from __future__ import annotations

import json
import math
import sys

import lightning.pytorch as pl
import pytest
import torch

from lightning_geometry.callbacks import CurvatureProbe
from tests.helpers.models import DigitsMLP
from tests.helpers.recorder import CheapTrajectoryMonitor, RankRecorder


@pytest.mark.skipif(sys.platform == "win32" or not torch.distributed.is_available(), reason="needs gloo")
def test_ddp_ranks_log_identical_values(tmp_path):
    callbacks = [
        # different probe samples on each rank: each rank's Lanczos may take a different number of products
        CurvatureProbe(every_n_epochs=1, probe_per_rank=True, probe_batch_size=32, max_iter=8, trace_samples=3,
                       num_directions=3, sharpness_samples=2),
        CheapTrajectoryMonitor(budget=0.5),  # budget mode: the decision to probe is reduced across ranks
        RankRecorder(str(tmp_path)),
    ]
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn", callbacks=callbacks,
                         logger=False, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    pl.seed_everything(0, verbose=False)
    trainer.fit(DigitsMLP(n=256, batch_size=32))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    v0, v1 = ranks[0]["values"], ranks[1]["values"]
    assert len(v0) == len(v1) == 2
    for epoch0, epoch1 in zip(v0, v1):
        assert set(epoch0) == set(epoch1)
        assert "geometry/lambda_max" in epoch0 and "geometry/displacement" in epoch0
        # the ranks measured different probe batches, and logged the same (averaged) value
        assert epoch0.pop("local/lambda_max") != epoch1.pop("local/lambda_max")
        for key in epoch0:
            a, b = epoch0[key], epoch1[key]
            assert a == b or (math.isnan(a) and math.isnan(b)), key
