"""Pure matplotlib figure builders: arrays in, :class:`matplotlib.figure.Figure` out.

Figures are built with the object-oriented API on a fresh ``Figure`` with an Agg canvas, never through ``pyplot``
state, so they work headless and do not leak between calls. Non-finite values are *shown* as missing (grey cells in
a contour plot, gaps in a line), never replaced by a number.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["contour_figure", "lines_figure", "paths_figure"]

NAN_COLOR = "0.82"


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def contour_figure(
    alphas: Sequence[float] | np.ndarray,
    betas: Sequence[float] | np.ndarray,
    losses: np.ndarray,
    *,
    threshold: float | None = None,
    ray_crossings: Sequence[tuple[float, float]] | None = None,
    mean_width: float | None = None,
    title: str = "loss around the final weights",
    xlabel: str = r"$\alpha$ (direction 1)",
    ylabel: str = r"$\beta$ (direction 2)",
) -> Any:
    """Filled loss map over a plane, the contour at ``threshold``, and the contour width marked.

    Args:
        alphas: Coordinates of the first axis (``losses`` rows).
        betas: Coordinates of the second axis (``losses`` columns).
        losses: ``(len(alphas), len(betas))`` values; nan cells are drawn grey.
        threshold: The contour level to draw (solid black line).
        ray_crossings: In-plane points where rays crossed the level (marked with x).
        mean_width: Mean contour width, drawn as a dashed circle around the origin.
        title: Axes title.
        xlabel: Label of the first axis.
        ylabel: Label of the second axis.

    Returns:
        The figure.
    """
    from matplotlib import colors

    xs, ys = np.asarray(alphas, dtype=float), np.asarray(betas, dtype=float)
    values = np.ma.masked_invalid(np.asarray(losses, dtype=float))
    fig, ax = _figure(5.6, 4.6)
    finite = values.compressed()
    norm = None
    if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
        norm = colors.LogNorm(vmin=finite.min(), vmax=finite.max())
    import matplotlib

    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=NAN_COLOR)
    # losses[i, j] is at (alphas[i], betas[j]): transpose so x runs along alphas
    mesh = ax.pcolormesh(xs, ys, values.T, shading="nearest", cmap=cmap, norm=norm)
    fig.colorbar(mesh, ax=ax, label="loss")
    if threshold is not None and finite.size and finite.min() <= threshold <= finite.max():
        ax.contour(xs, ys, values.T, levels=[threshold], colors="k", linewidths=1.5)
    if mean_width is not None and math.isfinite(mean_width):
        phi = np.linspace(0, 2 * np.pi, 200)
        ax.plot(mean_width * np.cos(phi), mean_width * np.sin(phi), "--", color="w", lw=1.2,
                label=f"mean width {mean_width:.3g}")
    if ray_crossings:
        pts = np.asarray(ray_crossings, dtype=float)
        ax.plot(pts[:, 0], pts[:, 1], "x", color="r", ms=8, mew=2, label="ray crossings")
    ax.plot([0], [0], "*", color="w", ms=12, mec="k", label="weights")
    if np.ma.count_masked(values):
        ax.plot([], [], "s", color=NAN_COLOR, label="nan")
    ax.set_xlim(xs.min(), xs.max())
    ax.set_ylim(ys.min(), ys.max())
    ax.set_aspect("equal", adjustable="box")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    title_text = title if threshold is None else f"{title}\ncontour at loss {threshold:.4g}"
    ax.set_title(title_text, fontsize=10)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.6)
    fig.tight_layout()
    return fig


def lines_figure(
    curves: Mapping[str, tuple[Sequence[float] | np.ndarray, Sequence[float] | np.ndarray]],
    *,
    threshold: float | None = None,
    xlabel: str = r"$\alpha$",
    ylabel: str = "loss",
    title: str = "loss along directions",
) -> Any:
    """Loss along lines: one curve per entry ``name -> (xs, ys)``; nan points leave gaps.

    Returns:
        The figure.
    """
    fig, ax = _figure(5.2, 3.8)
    for name, (xs, ys) in curves.items():
        ax.plot(np.asarray(xs, dtype=float), np.asarray(ys, dtype=float), "-", lw=1.5, label=name)
    if threshold is not None and math.isfinite(threshold):
        ax.axhline(threshold, color="k", ls="--", lw=1, label="contour level")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def paths_figure(
    paths: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    *,
    title: str = "loss along paths between the two weight sets",
) -> Any:
    """Loss (left) and, where given, error (right) along each path ``name -> (ts, losses, errors | None)``.

    Returns:
        The figure.
    """
    has_err = any(e is not None for _, _, e in paths.values())
    fig, axes = _figure(9.0 if has_err else 5.2, 3.8, ncols=2 if has_err else 1)
    axes = np.atleast_1d(axes)
    for name, (ts, losses, errors) in paths.items():
        (line,) = axes[0].plot(ts, losses, "-o", ms=3, lw=1.5, label=name)
        if has_err and errors is not None:
            axes[1].plot(ts, errors, "-o", ms=3, lw=1.5, color=line.get_color(), label=name)
    axes[0].set_xlabel("t")
    axes[0].set_ylabel("loss")
    axes[0].legend(fontsize=8)
    if has_err:
        axes[1].set_xlabel("t")
        axes[1].set_ylabel("error")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
