"""Shared pieces of the benchmarks: real data (sklearn digits), small models, brief training, timing, header.

Everything here is generic and small on purpose; each benchmark script composes it. Nothing is downloaded:
``load_digits`` ships with scikit-learn.
"""

from __future__ import annotations

import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


def digits_tensors(images: bool = False, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """All 1,797 sklearn digits as one batch ``(x, y)``: features standardised (zero-variance pixels left at 0).

    Args:
        images: Return ``x`` as ``N x 1 x 8 x 8`` images instead of ``N x 64`` vectors.
        dtype: Floating dtype of ``x``; ``y`` is ``int64`` class labels.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64)
    std = x.std(dim=0, unbiased=False)
    x = (x - x.mean(dim=0)) / torch.where(std > 0, std, torch.ones_like(std))
    x = x.to(dtype)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    return x, torch.tensor(data.target, dtype=torch.long)


def mlp(in_features: int = 64, hidden: tuple[int, ...] = (256, 256), classes: int = 10, seed: int = 0) -> nn.Module:
    """A ReLU MLP ``in -> hidden... -> classes``, initialised from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, classes))
        return nn.Sequential(*layers)


def cnn(channels: tuple[int, int] = (16, 32), classes: int = 10, seed: int = 0) -> nn.Module:
    """A small CNN for ``1 x 8 x 8`` images: two unpadded 3x3 convs with ReLU, flatten, linear.

    With the default channels it has 9,930 parameters (8x8 -> 6x6 -> 4x4 maps).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        c1, c2 = channels
        return nn.Sequential(
            nn.Conv2d(1, c1, 3), nn.ReLU(), nn.Conv2d(c1, c2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(c2 * 16, classes)
        )


def cross_entropy_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """``loss_fn(model, batch)`` in the library's convention: mean cross-entropy of ``model(x)`` against ``y``."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def describe(model: nn.Module) -> str:
    """A one-line architecture string, e.g. ``Linear(64→256), ReLU, Linear(256→10)``."""
    parts = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            parts.append(f"Linear({m.in_features}→{m.out_features})")
        elif isinstance(m, nn.Conv2d):
            k = "x".join(str(v) for v in m.kernel_size)
            parts.append(f"Conv2d({m.in_channels}→{m.out_channels}, {k})")
        elif not list(m.children()):
            parts.append(type(m).__name__)
    return ", ".join(parts)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def train(
    model: nn.Module,
    batch: tuple[Tensor, Tensor],
    steps: int = 300,
    lr: float = 1e-3,
    seed: int = 0,
    loss_fn: Callable[[nn.Module, Any], Tensor] = cross_entropy_loss,
) -> float:
    """Full-batch Adam for ``steps`` steps, deterministic for a given ``seed``; returns the final loss.

    Leaves ``.grad`` as ``None`` so that later measurements start clean.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model, batch)
            loss.backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        model.eval()
        with torch.no_grad():
            return float(loss_fn(model, batch))


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> tuple[float, float, Any]:
    """Run ``fn`` ``warmup`` times, then ``repeat`` times under ``time.perf_counter``.

    Returns ``(best, median, last_result)`` with times in seconds. On a shared machine the best (min) is the
    least noisy estimate of the cost; the median says how noisy it was.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def compare_times(
    fns: dict[str, Callable[[], Any]], repeat: int = 5, warmup: int = 1
) -> dict[str, tuple[float, float]]:
    """Time several functions in interleaved rounds (the order rotates each round), so that a burst of load
    from other processes hits all of them alike; returns ``{name: (best, median)}`` in seconds."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(1, repeat)):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {name: (min(t), statistics.median(t)) for name, t in times.items()}


def header(title: str) -> str:
    """Markdown lines naming the exact command, versions and thread count, for the top of a report."""
    cmd = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    return "\n".join(
        [
            f"# {title}",
            "",
            f"- command: `{cmd}`",
            f"- torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}, "
            f"torch threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            "",
        ]
    )


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; floats are printed as given (format them before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
