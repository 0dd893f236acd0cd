r"""TensorBoard artefacts: figures, histograms and one merged custom-scalars layout.

Scalars never go through here: callbacks log them with ``pl_module.log("geometry/...")`` so every logger (CSV,
TensorBoard, W&B, ...) and every monitoring callback sees them. This module writes what only TensorBoard can
show, and only when a :class:`~lightning.pytorch.loggers.TensorBoardLogger` is among ``trainer.loggers``; all
writes happen on global rank zero (other ranks would write to a no-op experiment anyway, but would still build the
figure).

``SummaryWriter.add_custom_scalars`` may be called only once per writer, so the geometry callbacks do not call it
themselves: each one calls :func:`register_layout` with its panels (at ``setup``), and the merged layout of all of
them is written once per run (per writer) by :func:`write_layout`, at the first training-side hook that gets to it.
A panel is ``{chart_title: ["Multiline", [tag, ...]]}`` (or ``["Margin", [value, lower, upper]]``) and tags are
regular expressions matched against scalar tags, as TensorBoard reads them.

Example::

    register_layout(trainer, "geometry: curvature", {"lambda_max": ["Multiline", ["geometry/lambda_max"]]})
    write_layout(trainer)            # once; later calls are no-ops for the same writer
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

log = logging.getLogger(__name__)

__all__ = [
    "log_figure",
    "log_histogram",
    "register_layout",
    "registered_layout",
    "tensorboard_loggers",
    "write_layout",
]

Layout = dict[str, dict[str, list[Any]]]

# Per-trainer registries; weak keys so that finished trainers are forgotten.
_LAYOUTS: weakref.WeakKeyDictionary[Any, Layout] = weakref.WeakKeyDictionary()
# Attribute set on a SummaryWriter once it holds the layout (add_custom_scalars may be called once per writer).
_WRITTEN_FLAG = "_lightning_geometry_layout_written"


def tensorboard_loggers(trainer: Any) -> list[TensorBoardLogger]:
    """The TensorBoard loggers among ``trainer.loggers``, or ``[]`` on ranks other than global zero."""
    if not getattr(trainer, "is_global_zero", True):
        return []
    return [lg for lg in getattr(trainer, "loggers", []) if isinstance(lg, TensorBoardLogger)]


def has_tensorboard(trainer: Any) -> bool:
    """``True`` if this rank would write TensorBoard artefacts (rank zero with a TensorBoardLogger)."""
    return bool(tensorboard_loggers(trainer))


def log_figure(trainer: Any, tag: str, figure: Any, step: int | None = None, close: bool = True) -> bool:
    """Write a matplotlib figure to every TensorBoard logger (rank zero only).

    Args:
        trainer: The Trainer.
        tag: The image tag, e.g. ``"geometry/trajectory_pca"``.
        figure: A ``matplotlib.figure.Figure``.
        step: The global step (defaults to ``trainer.global_step``).
        close: Close the figure after writing it (always closed, also when nothing is written).

    Returns:
        ``True`` if at least one logger received the figure.
    """
    loggers = tensorboard_loggers(trainer)
    step = int(trainer.global_step if step is None else step)
    for lg in loggers:
        lg.experiment.add_figure(tag, figure, global_step=step, close=False)
    if close:
        import matplotlib.pyplot as plt

        plt.close(figure)
    return bool(loggers)


def log_histogram(
    trainer: Any, tag: str, values: Tensor | Any, step: int | None = None, bins: str = "tensorflow"
) -> bool:
    """Write a histogram of ``values`` to every TensorBoard logger (rank zero only); non-finite values are dropped.

    Returns:
        ``True`` if at least one logger received the histogram.
    """
    loggers = tensorboard_loggers(trainer)
    if not loggers:
        return False
    values = torch.as_tensor(values).detach().reshape(-1).double().cpu()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return False
    step = int(trainer.global_step if step is None else step)
    for lg in loggers:
        lg.experiment.add_histogram(tag, values, global_step=step, bins=bins)
    return True


def register_layout(trainer: Any, section: str, charts: dict[str, list[Any]]) -> None:
    """Add ``charts`` to the ``section`` of this trainer's merged custom-scalars layout.

    Call it before :func:`write_layout` (e.g. from ``setup``). Charts with the same title in the same section
    are replaced, so registering twice is harmless.

    Raises:
        ValueError: If a chart is not ``[kind, tags]`` with kind ``"Multiline"`` or ``"Margin"``.
    """
    for title, chart in charts.items():
        if not (isinstance(chart, (list, tuple)) and len(chart) == 2 and chart[0] in ("Multiline", "Margin")):
            raise ValueError(f"chart {title!r} must be ['Multiline' | 'Margin', [tags]], got {chart!r}")
        if chart[0] == "Margin" and len(chart[1]) != 3:
            raise ValueError(f"Margin chart {title!r} needs exactly 3 tags (value, lower, upper), got {chart[1]!r}")
    layout = _LAYOUTS.setdefault(trainer, {})
    layout.setdefault(section, {}).update({k: [v[0], list(v[1])] for k, v in charts.items()})


def registered_layout(trainer: Any) -> Layout:
    """A copy of the layout registered so far for ``trainer``."""
    return {s: dict(c) for s, c in _LAYOUTS.get(trainer, {}).items()}


def write_layout(trainer: Any) -> bool:
    """Write the merged custom-scalars layout once per TensorBoard writer (rank zero only).

    Safe to call from every callback and every hook: only the first call per writer writes. Layout registered
    after that first write is not shown (TensorBoard keeps the first layout), so register in ``setup``.

    Returns:
        ``True`` if this call wrote the layout to at least one writer.
    """
    layout = _LAYOUTS.get(trainer)
    if not layout:
        return False
    wrote = False
    for lg in tensorboard_loggers(trainer):
        writer = lg.experiment
        if getattr(writer, _WRITTEN_FLAG, False):
            continue
        writer.add_custom_scalars(layout)
        writer.flush()
        setattr(writer, _WRITTEN_FLAG, True)
        wrote = True
    return wrote
