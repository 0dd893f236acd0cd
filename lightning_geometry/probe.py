r"""The bridge between a Lightning fit and the functional core: the loss closure and the probe batches.

Every measurement in :mod:`lightning_geometry.functional` needs ``loss_fn(module, batch) -> Tensor`` and a fixed
set of batches. This module provides both for the callbacks:

* :func:`resolve_loss_fn` finds the loss, in this order: the callback's ``loss_fn`` argument (a callable or an
  import path such as ``"my_pkg.losses:mse_loss"``, so that it can be written in a LightningCLI YAML); else a
  ``geometry_loss(batch)`` method on the LightningModule; else the module's own ``training_step(batch, 0)``
  with ``self.log`` / ``self.log_dict`` muted, taking its loss (a Tensor, or ``out["loss"]``). Modules with manual
  optimisation cannot use the last route (their ``training_step`` steps the optimizer) and get a clear error.
* :class:`ProbeData` draws a fixed set of training batches once, at fit start, so that numbers are comparable
  across epochs. It indexes the training *dataset* with a private :class:`torch.Generator` and collates with the
  dataloader's own ``collate_fn``: the training dataloader is never iterated, so its shuffling order and every
  global RNG stream (torch, numpy, python) are left exactly as they were. A user may pass their own dataloader,
  tensors or batches instead. The batches go through the strategy's batch transfer (the module's
  ``transfer_batch_to_device`` hooks) and the precision plugin's input conversion, so they land on the module's
  device in its dtype.
"""

from __future__ import annotations

import importlib
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

import lightning_geometry.functional.closure as _closure

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(module, batch) -> scalar Tensor``: the batch's mean loss."""

__all__ = ["LossFn", "ProbeData", "import_from_path", "resolve_loss_fn", "training_step_loss"]


def import_from_path(path: str) -> Any:
    """Import an object from ``"package.module:attr"`` or ``"package.module.attr"``.

    Raises:
        ValueError: If the path is malformed or the object cannot be imported.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"loss_fn import path must be a non-empty string, got {path!r}")
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        raise ValueError(f"loss_fn import path must look like 'package.module:function', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"loss_fn={path!r} could not be imported: {err}") from err
    return obj


def _noop_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def _muted_logging(module: nn.Module) -> Iterator[None]:
    """Replace ``module.log`` and ``module.log_dict`` by no-ops for the duration of the block."""
    saved = {name: module.__dict__[name] for name in ("log", "log_dict") if name in module.__dict__}
    object.__setattr__(module, "log", _noop_log)
    object.__setattr__(module, "log_dict", _noop_log)
    try:
        yield
    finally:
        for name in ("log", "log_dict"):
            if name in saved:
                object.__setattr__(module, name, saved[name])
            else:
                module.__dict__.pop(name, None)


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The loss of ``module.training_step(batch, 0)``, with ``self.log`` and ``self.log_dict`` muted.

    Raises:
        MisconfigurationException: If ``training_step`` returns neither a Tensor nor a mapping with a ``"loss"``
            Tensor.
    """
    with _muted_logging(module):
        out = module.training_step(batch, 0)  # type: ignore[operator]
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise MisconfigurationException(
            f"{type(module).__name__}.training_step returned {type(out).__name__}, not a loss Tensor or a dict with "
            "a 'loss' Tensor; pass `loss_fn=` to the geometry callback or define `geometry_loss(self, batch)`"
        )
    return out


def _geometry_loss(module: nn.Module, batch: Any) -> Tensor:
    return module.geometry_loss(batch)  # type: ignore[operator]


def resolve_loss_fn(pl_module: nn.Module, loss_fn: LossFn | str | None = None) -> LossFn:
    """Find the loss closure ``loss_fn(module, batch) -> Tensor`` a geometry callback measures.

    Resolution order (DESIGN.md, "Loss closure"): the callback's ``loss_fn`` (a callable or an import path
    string); else ``pl_module.geometry_loss(batch)``; else ``pl_module.training_step(batch, 0)`` with logging
    muted. The returned function takes the module as an argument (it may be called on the module with other
    parameters swapped in by :func:`torch.func.functional_call`).

    Args:
        pl_module: The LightningModule (or any ``nn.Module``).
        loss_fn: A callable ``loss_fn(module, batch)``, an import path ``"pkg.mod:fn"``, or ``None``.

    Returns:
        The loss closure.

    Raises:
        ValueError: If ``loss_fn`` is a string that cannot be imported or does not name a callable.
        TypeError: If ``loss_fn`` is neither ``None``, a string nor a callable.
        MisconfigurationException: If no ``loss_fn`` and no ``geometry_loss`` are given and the module uses
            manual optimisation or has no ``training_step``.
    """
    if isinstance(loss_fn, str):
        obj = import_from_path(loss_fn)
        if not callable(obj):
            raise ValueError(f"loss_fn={loss_fn!r} names a {type(obj).__name__}, not a callable loss_fn(module, batch)")
        return obj
    if loss_fn is not None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable, an import path string or None, got {type(loss_fn).__name__}")
        return loss_fn
    if callable(getattr(pl_module, "geometry_loss", None)):
        return _geometry_loss
    if not getattr(pl_module, "automatic_optimization", True):
        raise MisconfigurationException(
            f"{type(pl_module).__name__} uses manual optimization, so its training_step cannot serve as the "
            "geometry loss (it would step the optimizer). Pass `loss_fn=` to the geometry callback (a callable "
            "loss_fn(module, batch) or an import path 'pkg.module:fn'), or define `geometry_loss(self, batch)`."
        )
    if not callable(getattr(pl_module, "training_step", None)):
        raise MisconfigurationException(
            f"{type(pl_module).__name__} has no training_step: pass `loss_fn=` to the geometry callback or define "
            "`geometry_loss(self, batch)` on the module"
        )
    return training_step_loss


@contextmanager
def _global_rng_preserved() -> Iterator[None]:
    np_state = np.random.get_state()
    py_state = random.getstate()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _first_dataloader(loaders: Any) -> DataLoader | None:
    """The first DataLoader in whatever ``trainer.train_dataloader`` holds (a loader, a list or a dict of them)."""
    if isinstance(loaders, DataLoader):
        return loaders
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    if isinstance(loaders, Sequence) and not isinstance(loaders, (str, bytes)):
        for item in loaders:
            found = _first_dataloader(item)
            if found is not None:
                return found
    return None


class ProbeData:
    r"""A fixed set of probe batches, drawn once at fit start and reused for every measurement.

    By default (``data=None``) ``num_batches`` batches of ``batch_size`` samples (the training dataloader's batch
    size unless given) are drawn without replacement from the training dataset: indices come from a private
    ``torch.Generator`` seeded with ``seed`` (identical on every rank, so under DDP every rank probes the same
    samples unless ``per_rank=True``, which offsets the seed by the global rank) and are collated with the
    training dataloader's ``collate_fn``. The training dataloader is never iterated, so its order and all global
    RNG streams are untouched. A dataset without ``__getitem__``/``__len__`` (an ``IterableDataset``) is read
    from a fresh iterator instead, with every global RNG stream saved and restored around the read.

    Args:
        data: ``None`` (draw from the training data), a ``DataLoader`` or any iterable of batches (the first
            ``num_batches`` are taken), or a single batch (a Tensor, a tuple/list of Tensors, or a mapping).
        num_batches: Number of probe batches (>= 1).
        batch_size: Samples per drawn batch; ``None`` takes the training dataloader's ``batch_size``. Only used
            when drawing from the training data.
        seed: Seed of the private generator.
        per_rank: Under DDP, draw different samples on each rank (seed offset by the global rank).

    Raises:
        ValueError: If ``num_batches`` or ``batch_size`` is not a positive integer.
    """

    def __init__(
        self,
        data: Any = None,
        *,
        num_batches: int = 1,
        batch_size: int | None = None,
        seed: int = 0,
        per_rank: bool = False,
    ) -> None:
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
            raise ValueError(f"num_batches must be an integer >= 1, got {num_batches!r}")
        bad_size = not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1
        if batch_size is not None and bad_size:
            raise ValueError(f"batch_size must be None or an integer >= 1, got {batch_size!r}")
        self.data = data
        self.num_batches = num_batches
        self.batch_size = batch_size
        self.seed = int(seed)
        self.per_rank = per_rank
        self._batches: list[Any] | None = None

    # ------------------------------------------------------------------ checks
    def check(self, trainer: Any) -> None:
        """Raise at ``setup`` if there is neither user probe data nor a training dataloader to draw from.

        Raises:
            MisconfigurationException: With what to pass.
        """
        if self.data is not None:
            return
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        has_train = source is not None and source.instance is not None and source.is_defined()
        if not has_train and getattr(trainer, "train_dataloader", None) is None:
            raise MisconfigurationException(
                "The geometry callback needs probe batches, but there is no training dataloader to draw them from and "
                "no probe data was given. Pass `probe_data=` (a DataLoader, a batch of tensors or a list of batches) "
                "to the callback, or give the Trainer a train dataloader (trainer.fit(model, train_dataloaders=...) or "
                "a datamodule)."
            )

    # ---------------------------------------------------------------- drawing
    @property
    def batches(self) -> list[Any]:
        """The probe batches, on the module's device.

        Raises:
            RuntimeError: If :meth:`prepare` has not run yet.
        """
        if self._batches is None:
            raise RuntimeError("probe batches are drawn at fit start; call ProbeData.prepare(trainer, pl_module) first")
        return self._batches

    @property
    def is_prepared(self) -> bool:
        """``True`` once the batches are drawn."""
        return self._batches is not None

    @property
    def num_samples(self) -> int:
        """Total number of samples in the probe batches."""
        return sum(_closure.batch_size(b) for b in self.batches)

    def prepare(self, trainer: Any, pl_module: nn.Module) -> list[Any]:
        """Draw the probe batches once (later calls return the same batches) and move them to the module's device.

        Raises:
            MisconfigurationException: If there is nothing to draw from.
        """
        if self._batches is not None:
            return self._batches
        with _global_rng_preserved(), torch.inference_mode(False), torch.no_grad():
            if self.data is None:
                raw = self._draw_from_training(trainer)
            else:
                raw = self._take_user_batches(self.data)
            self._batches = [self._to_module(trainer, pl_module, b) for b in raw]
        return self._batches

    def _rank_seed(self, trainer: Any) -> int:
        return self.seed + (int(getattr(trainer, "global_rank", 0)) if self.per_rank else 0)

    def _take_user_batches(self, data: Any) -> list[Any]:
        if isinstance(data, Tensor) or _closure._is_single_batch(data):
            return [data]
        out: list[Any] = []
        for batch in data:
            out.append(batch)
            if len(out) >= self.num_batches:
                break
        if not out:
            raise MisconfigurationException("probe_data yielded no batch: pass at least one batch")
        return out

    def _draw_from_training(self, trainer: Any) -> list[Any]:
        loader = _first_dataloader(getattr(trainer, "train_dataloader", None))
        if loader is None:
            self.check(trainer)
            raise MisconfigurationException(
                "The training dataloader is not a torch DataLoader, so probe batches cannot be drawn from it: pass "
                "`probe_data=` to the geometry callback."
            )
        dataset = loader.dataset
        size = self.batch_size or loader.batch_size or 32
        generator = torch.Generator().manual_seed(self._rank_seed(trainer))
        if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            it = iter(loader)
            return [next(it) for _ in range(self.num_batches)]
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise MisconfigurationException(
                "the training dataset is empty: pass `probe_data=` to the geometry callback"
            )
        perm = torch.randperm(n, generator=generator).tolist()
        collate = loader.collate_fn
        batches = []
        for b in range(self.num_batches):
            idx = perm[b * size : (b + 1) * size]
            if not idx:
                break
            batches.append(collate([dataset[i] for i in idx]))
        return batches

    @staticmethod
    def _to_module(trainer: Any, pl_module: nn.Module, batch: Any) -> Any:
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None and getattr(strategy, "lightning_module", None) is not None:
            batch = strategy.batch_to_device(batch, dataloader_idx=0)
            plugin = getattr(strategy, "precision_plugin", None)
            if plugin is not None:
                batch = plugin.convert_input(batch)
            return batch
        from lightning.fabric.utilities.apply_func import move_data_to_device

        device = next(pl_module.parameters()).device
        return move_data_to_device(batch, device)
