"""The Table 1 study end to end on a tiny budget, its analysis against scipy, and the command line."""

from __future__ import annotations

import json
import math

import pytest
from scipy.stats import spearmanr

from lightning_geometry.cli import main
from lightning_geometry.functional.index import geometry_index
from lightning_geometry.study.configs import LR_SWEEP, TABLE1, RunConfig
from lightning_geometry.study.table1 import run_study


def test_table1_configs_are_the_papers() -> None:
    table = {c.name: (c.lr, c.batch_size, c.optimizer, c.momentum, c.swa) for c in TABLE1}
    assert table == {
        "A1": (0.003, 256, "sgd", 0.9, False),
        "A2": (0.001, 128, "adamw", 0.0, False),
        "B1": (0.01, 32, "sgd", 0.0, False),
        "B2": (0.02, 64, "adam", 0.0, False),
        "C1": (0.005, 256, "sgd", 0.9, True),
    }
    assert [c.lr for c in LR_SWEEP] == [0.001, 0.003, 0.01, 0.03, 0.1]
    with pytest.raises(ValueError, match="optimizer must be one of .*got 'rmsprop'"):
        RunConfig("X", 0.1, 32, "rmsprop")  # type: ignore[arg-type]


def test_study_runs_measures_connects_and_reports(tmp_path) -> None:
    configs = [TABLE1[0], TABLE1[3], LR_SWEEP[2]]
    result = run_study(configs, seeds=(0, 1), epochs=2, out_dir=tmp_path, progress=lambda line: None)
    assert len(result.records) == 6
    for record in result.records:
        for name in ("test_accuracy", "lambda_max", "adaptive_sharpness", "contour_width", "barrier",
                     "barrier_aligned", "turning_cosine", "displacement_cv"):
            assert math.isfinite(getattr(record, name)), (record.config.name, name)
        assert math.isfinite(record.stability_ratio) == (record.config.optimizer == "sgd")
        other = 1 - record.seed
        assert record.barriers == {f"seed{other}": pytest.approx(record.barrier)}
    a, b = result.records[0], result.records[1]
    assert a.barriers["seed1"] == b.barriers["seed0"]  # the linear path is the same both ways
    for record, entry in zip(result.records, result.indices):
        assert entry["index"] == pytest.approx(geometry_index(record.descriptors()).value)
    accuracy = [r.test_accuracy for r in result.records]
    index = [e["index"] for e in result.indices]
    assert result.correlations["index"]["test_accuracy"] == pytest.approx(spearmanr(index, accuracy).statistic)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 6 and saved["claims"]
    report = (tmp_path / "report.md").read_text()
    assert "| A1 | flat, connected |" in report and "| B2 | sharp, fragmented |" in report
    assert (tmp_path / "A1" / "seed0").is_dir()  # TensorBoard logs per run


def test_cli_rejects_bad_arguments(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["table1", "--configs", "Z9"])
    assert "invalid choice: 'Z9'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--seeds and --epochs must be at least 1, got 0 and 60"):
        main(["table1", "--seeds", "0"])
