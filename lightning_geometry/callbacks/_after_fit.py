"""The base of the post-fit callbacks (:class:`~lightning_geometry.callbacks.contour.EnergyContour`,
:class:`~lightning_geometry.callbacks.connectivity.ModeConnectivity`): probe data drawn at fit start, one
measurement at ``on_fit_end`` on rank zero, an on-demand ``compute(module, data)``, and where results go.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import nn
from typing_extensions import override

from lightning_geometry import io as gio
from lightning_geometry import tensorboard as tb
from lightning_geometry.callbacks._base import GeometryConfigurationError, check_unsharded
from lightning_geometry.functional.closure import as_batch_list, measurement
from lightning_geometry.probe import LossFn, ProbeData, resolve_loss_fn

__all__ = ["AfterFitCallback"]


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < minimum:
        raise GeometryConfigurationError(f"`{name}` must be >= {minimum}, got {value}")
    return value


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise GeometryConfigurationError(f"`{name}` must be a finite number > 0, got {value!r}")
    return float(value)


class _Progress:
    """A tqdm bar (stderr) when enabled, a no-op otherwise; ``update(n)`` is the functional ``progress`` hook."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="eval", leave=False, dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class AfterFitCallback(Callback):
    """Base of the post-fit geometry callbacks: probe data drawn at fit start, compute at ``on_fit_end`` on rank 0.

    ``self.log`` is not allowed in ``on_fit_end``, so scalars go to every logger through ``log_metrics`` (at
    ``trainer.global_step``), figures to TensorBoard through :mod:`lightning_geometry.tensorboard`, and arrays plus
    a JSON summary are written atomically under ``save_dir`` (default: ``<trainer.log_dir>/geometry``). The
    measurement runs inside :func:`~lightning_geometry.functional.closure.measurement` (grad on, eval mode unless
    ``train_mode``, every global RNG stream restored), so the module and the random streams are left exactly as
    they were. Under DDP only global rank zero measures (every rank holds the same weights), and other ranks keep
    ``result = None``.

    Subclasses implement ``_compute(module, batches, loss_fn, progress) -> result`` and ``_publish``.
    """

    probe_name: ClassVar[str] = "after_fit"

    def __init__(
        self,
        *,
        loss_fn: LossFn | str | None = None,
        probe_data: Any = None,
        probe_batches: int = 4,
        probe_batch_size: int | None = None,
        seed: int = 0,
        train_mode: bool = False,
        log_key_prefix: str = "geometry/",
        save_dir: str | None = None,
        save: bool = True,
        progress: bool | None = None,
    ) -> None:
        if loss_fn is not None and not (callable(loss_fn) or isinstance(loss_fn, str)):
            raise TypeError(
                f"`loss_fn` must be a callable, an import path string or None, got {type(loss_fn).__name__}"
            )
        _check_int("probe_batches", probe_batches, 1)
        if probe_batch_size is not None:
            _check_int("probe_batch_size", probe_batch_size, 1)
        if not isinstance(log_key_prefix, str):
            raise TypeError(f"`log_key_prefix` must be a string, got {type(log_key_prefix).__name__}")
        self.loss_fn = loss_fn
        self.probe_data = probe_data
        self.probe_batches = probe_batches
        self.probe_batch_size = probe_batch_size
        self.seed = int(seed)
        self.train_mode = bool(train_mode)
        self.log_key_prefix = log_key_prefix
        self.save_dir = save_dir
        self.save = bool(save)
        self.progress = progress
        self._probe = ProbeData(probe_data, num_batches=probe_batches, batch_size=probe_batch_size, seed=seed)
        self._loss_fn: LossFn | None = None
        self.result: Any = None

    def _key(self, name: str) -> str:
        return f"{self.log_key_prefix}{name}"

    # --------------------------------------------------------------------------------- on demand
    def compute(
        self, module: nn.Module, data: Any, *, save_dir: str | os.PathLike[str] | None = None, progress: bool = False
    ) -> Any:
        """Measure ``module`` (trained anywhere) on ``data``: a DataLoader (all its batches), a list of batches or one
        batch. The result is returned and kept as ``self.result``; files are written only if ``save_dir`` is given.
        The module's tensors and mode and every global RNG stream (also the draw a DataLoader makes when iterated)
        are left as they were.

        Raises:
            ValueError: If ``data`` holds no batch, or the loss cannot be resolved (see
                :func:`lightning_geometry.probe.resolve_loss_fn`).
        """
        loss_fn = resolve_loss_fn(module, self.loss_fn)
        device = next(module.parameters()).device
        from lightning.fabric.utilities.apply_func import move_data_to_device

        with measurement(module, train_mode=self.train_mode):  # iterating a DataLoader draws from the global RNG
            batches = [move_data_to_device(b, device) for b in as_batch_list(data)]
        result = self._run(module, batches, loss_fn, progress)
        if save_dir is not None:
            self._save(Path(save_dir), result)
        self.result = result
        return result

    def _run(self, module: nn.Module, batches: list[Any], loss_fn: LossFn, progress: bool) -> Any:
        start = time.perf_counter()
        with measurement(module, train_mode=self.train_mode):
            result = self._compute(module, batches, loss_fn, progress)
        result.seconds = time.perf_counter() - start
        return result

    # --------------------------------------------------------------------------------- subclass surface
    def _compute(self, module: nn.Module, batches: list[Any], loss_fn: LossFn, progress: bool) -> Any:
        raise NotImplementedError

    def _scalars(self, result: Any) -> dict[str, float]:
        raise NotImplementedError

    def _figures(self, result: Any) -> dict[str, Any]:
        return {}

    def _arrays(self, result: Any) -> dict[str, Any]:
        return {}

    def _summary(self, result: Any) -> dict[str, Any]:
        return {"scalars": self._scalars(result)}

    def _save(self, directory: Path, result: Any) -> dict[str, str]:
        files = {}
        arrays = self._arrays(result)
        if arrays:
            files["npz"] = str(gio.save_npz(directory / f"{self.probe_name}.npz", **arrays))
        summary = self._summary(result)
        summary["files"] = dict(files)
        files["json"] = str(directory / f"{self.probe_name}.json")
        gio.save_json(files["json"], summary)
        result.files = files
        return files

    # --------------------------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_unsharded(trainer, self)
        if not trainer.fast_dev_run:
            self._loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
            self._probe.check(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        self._probe.prepare(trainer, pl_module)

    def _ready(self, trainer: pl.Trainer) -> bool:
        return not trainer.fast_dev_run and self._probe.is_prepared and self._loss_fn is not None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._ready(trainer):
            return
        # trainer.log_dir broadcasts: every rank must ask
        directory = Path(self.save_dir) if self.save_dir is not None else Path(trainer.log_dir or ".") / "geometry"
        if not trainer.is_global_zero:
            return
        show = trainer.progress_bar_callback is not None if self.progress is None else self.progress
        result = self._run(pl_module, self._probe.batches, self._loss_fn, bool(show))
        self.result = result
        self._publish(trainer, result, directory)

    def _publish(self, trainer: pl.Trainer, result: Any, directory: Path) -> None:
        scalars = {self._key(k): float(v) for k, v in self._scalars(result).items()}
        step = trainer.global_step
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=step)
            lg.save()
        if tb.has_tensorboard(trainer):
            for tag, fig in self._figures(result).items():
                tb.log_figure(trainer, self._key(tag), fig, step=step)
        if self.save:
            self._save(directory, result)
