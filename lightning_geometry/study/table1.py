"""The Table 1 study: fit the paper's five configurations (and a learning-rate sweep) on digits, with seeds,
measure their geometry, check the paper's claims, and validate the landscape geometry index.

What is reported (``report.md`` and ``results.json`` under the output directory, written atomically):

* per configuration, mean ± standard deviation over seeds of test accuracy, λ_max, the stability ratio
  (SGD only), average adaptive sharpness, contour width, trajectory continuity, and the interpolation barrier
  between seeds (linear and after weight matching) — with the paper's claim beside them;
* whether the claims hold on these data: "flat" compares each group's median curvature and contour width with
  group B's, "connected" its median barriers between seeds;
* the geometry index of each run, and the Spearman rank correlation of the index and of each part with test
  accuracy over all runs, and with the seed-to-seed standard deviation of test accuracy over configurations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lightning_geometry import io as gio
from lightning_geometry.functional.index import PARTS, geometry_index
from lightning_geometry.study.configs import LR_SWEEP, TABLE1, RunConfig
from lightning_geometry.study.runner import RunRecord, connect, fit_run, load_digits_split

COLUMNS = (
    ("test_accuracy", "test acc", "{:.3f}"),
    ("lambda_max", "λ_max", "{:.3g}"),
    ("stability_ratio", "λ/threshold", "{:.3g}"),
    ("adaptive_sharpness", "adaptive sharpness", "{:.3g}"),
    ("contour_width", "contour width", "{:.3g}"),
    ("displacement_cv", "displacement CV", "{:.3g}"),
    ("turning_cosine", "turning cos", "{:.3g}"),
    ("barrier", "barrier", "{:.3g}"),
    ("barrier_aligned", "barrier (aligned)", "{:.3g}"),
    ("index", "index", "{:.3f}"),
)


@dataclass
class StudyResult:
    """All runs of the study and the derived tables."""

    records: list[RunRecord]
    indices: list[dict[str, Any]]
    correlations: dict[str, dict[str, float]]
    claims: list[dict[str, Any]]
    seconds: float
    markdown: str = ""


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation over the pairs where both values are finite (nan if fewer than 3)."""
    from scipy.stats import spearmanr

    pairs = [(x, y) for x, y in zip(a, b) if math.isfinite(x) and math.isfinite(y)]
    if len(pairs) < 3:
        return math.nan
    return float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)


def run_study(
    configs: Sequence[RunConfig] = TABLE1 + LR_SWEEP,
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 60,
    out_dir: str | Path = "results/table1",
    progress: Callable[[str], None] = print,
) -> StudyResult:
    """Fit every configuration with every seed, measure, connect the seeds, and write the report.

    Args:
        configs: Configurations to run (default: Table 1 and the learning-rate sweep).
        seeds: Training seeds per configuration (at least 2 for barriers between seeds).
        epochs: Training epochs per run.
        out_dir: Output directory (logs per run, ``results.json``, ``report.md``).
        progress: Called with one line per finished step.

    Returns:
        The :class:`StudyResult`; its ``markdown`` is what ``report.md`` holds.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    data = load_digits_split()
    records: list[RunRecord] = []
    total = len(configs) * len(seeds)
    for config in configs:
        group_records, group_modules = [], []
        for seed in seeds:
            t0 = time.perf_counter()
            module, record = fit_run(config, seed, data, epochs=epochs, out_dir=out)
            group_records.append(record)
            group_modules.append(module)
            progress(f"[{len(records) + len(group_records)}/{total}] {config.name} seed {seed}: "
                     f"test acc {record.test_accuracy:.3f}, λ_max {record.lambda_max:.3g} "
                     f"({time.perf_counter() - t0:.1f} s)")
        connect(group_records, group_modules, data)
        records.extend(group_records)
    result = analyse(records, time.perf_counter() - start)
    gio.save_json(out / "results.json", {
        "runs": [r.as_dict() for r in records], "index": result.indices, "correlations": result.correlations,
        "claims": result.claims, "seconds": result.seconds,
    })
    gio.atomic_write_text(out / "report.md", result.markdown)
    progress(f"report: {out / 'report.md'}")
    return result


def analyse(records: list[RunRecord], seconds: float) -> StudyResult:
    """Index per run, correlations with test accuracy and with seed variance, claims per group, Markdown."""
    indices = []
    for r in records:
        idx = geometry_index(r.descriptors())
        indices.append({"name": r.config.name, "seed": r.seed, "index": idx.value, "parts": idx.parts,
                        "missing": idx.missing})
    correlations = _correlations(records, indices)
    claims = _claims(records)
    result = StudyResult(records, indices, correlations, claims, seconds)
    result.markdown = _markdown(result)
    return result


def _value(record: RunRecord, index: dict[str, Any], key: str) -> float:
    if key == "index":
        return math.nan if index["index"] is None else float(index["index"])
    return float(getattr(record, key))


def _correlations(records: list[RunRecord], indices: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    accuracy = [r.test_accuracy for r in records]
    scores = {"index": [_value(r, i, "index") for r, i in zip(records, indices)]}
    for part in PARTS:
        scores[part] = [float(i["parts"].get(part, math.nan)) for i in indices]
    for key in ("lambda_max", "stability_ratio", "adaptive_sharpness", "contour_width", "barrier"):
        scores[key] = [float(getattr(r, key)) for r in records]
    by_config: dict[str, list[int]] = {}
    for k, r in enumerate(records):
        by_config.setdefault(r.config.name, []).append(k)
    seed_std = {name: float(np.std([accuracy[k] for k in ks], ddof=1)) if len(ks) > 1 else math.nan
                for name, ks in by_config.items()}
    out: dict[str, dict[str, float]] = {}
    for name, values in scores.items():
        config_means = [float(np.nanmean([values[k] for k in ks])) if any(math.isfinite(values[k]) for k in ks)
                        else math.nan for ks in by_config.values()]
        out[name] = {
            "test_accuracy": spearman(values, accuracy),
            "seed_std_of_accuracy": spearman(config_means, list(seed_std.values())),
        }
    return out


def _claims(records: list[RunRecord]) -> list[dict[str, Any]]:
    groups: dict[str, list[RunRecord]] = {}
    for r in records:
        if r.config.group in ("A", "B", "C"):
            groups.setdefault(r.config.group, []).append(r)
    if "B" not in groups:
        return []
    claims = []
    b = groups["B"]
    for g in ("A", "C"):
        if g not in groups:
            continue
        for key, flatter in (("adaptive_sharpness", "lower"), ("lambda_max", "lower"), ("contour_width", "higher"),
                             ("barrier", "lower"), ("barrier_aligned", "lower")):
            mine = float(np.nanmedian([getattr(r, key) for r in groups[g]]))  # medians: one diverging seed
            theirs = float(np.nanmedian([getattr(r, key) for r in b]))  # must not decide a group's claim
            holds = mine < theirs if flatter == "lower" else mine > theirs
            claims.append({"claim": f"{g} {'flatter' if 'barrier' not in key else 'more connected'} than B by {key}",
                           g: mine, "B": theirs, "holds": bool(holds)})
    return claims


def _fmt(values: list[float], fmt: str) -> str:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "—"
    if len(finite) == 1:
        return fmt.format(finite[0])
    return f"{fmt.format(float(np.mean(finite)))} ± {fmt.format(float(np.std(finite, ddof=1)))}"


def _markdown(result: StudyResult) -> str:
    lines = ["# Table 1 on digits", "",
             f"{len(result.records)} runs, {result.seconds / 60:.1f} min. Mean ± std over seeds.", ""]
    header = "| config | claim | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines += [header, "|" + "---|" * (len(COLUMNS) + 2)]
    by_config: dict[str, list[int]] = {}
    for k, r in enumerate(result.records):
        by_config.setdefault(r.config.name, []).append(k)
    for name, ks in by_config.items():
        config = result.records[ks[0]].config
        cells = [_fmt([_value(result.records[k], result.indices[k], key) for k in ks], fmt) for key, _, fmt in COLUMNS]
        lines.append(f"| {name} | {config.claim or config.group} | " + " | ".join(cells) + " |")
    if result.claims:
        lines += ["", "## The paper's claims on these data (group medians)", "", "| claim | group | B | holds |",
                  "|---|---|---|---|"]
        for c in result.claims:
            group = next(k for k in c if k in ("A", "C"))
            lines.append(f"| {c['claim']} | {c[group]:.3g} | {c['B']:.3g} | {'yes' if c['holds'] else 'no'} |")
    lines += ["", "## Does the index track generalisation?", "",
              "Spearman rank correlation over all runs with test accuracy, and over configurations of the "
              "config-mean with the seed-to-seed standard deviation of test accuracy.", "",
              "| score | ρ with test accuracy | ρ with seed std of accuracy |", "|---|---|---|"]
    for name, corr in result.correlations.items():
        lines.append(f"| {name} | {corr['test_accuracy']:.2f} | {corr['seed_std_of_accuracy']:.2f} |")
    return "\n".join(lines) + "\n"
