r"""
Geometry callback base
^^^^^^^^^^^^^^^^^^^^^^

What every live geometry probe shares: *when* to measure (an explicit cadence, or a compute budget), *how* to
measure without disturbing training (the probe context), *where* the numbers go (``pl_module.log`` after a
reduction across ranks), and the state that makes a resumed fit continue where it stopped.

Cadence
    ``every_n_epochs`` (at ``on_train_epoch_end``, logged as epoch values) or ``every_n_train_steps`` (at
    ``on_train_batch_end``, once per optimizer step, so gradient accumulation does not repeat a probe; every
    probe point is written to the loggers at ``trainer.global_step`` whatever ``log_every_n_steps`` is), never
    both. With neither, the probe
    runs at the end of every epoch where its **budget** allows it (below). Probes are skipped in the sanity check,
    under ``fast_dev_run``, and outside ``trainer.fit``.

Budget (the cost model)
    A probe may spend at most a fraction ``budget`` of the training compute. Compute is counted in
    *sample-gradients* (one training sample's share of a training step: forward, backward, optimizer step and
    the Trainer's own per-step work); training adds the batch size at every training batch. A probe adds a cost
    derived from what it did, never from a clock, so the same run gives the same probe epochs:

    .. math::
        c_{\text{probe}} = \sum_{\text{ops}} n_{\text{op}} \big(a_{\text{op}} N + b_{\text{op}}\big)
                           + c_{\log} \, n_{\text{scalars}},

    with :math:`N` probe samples and, per operation (Hessian-vector product, forward pass, gradient), a
    per-sample cost :math:`a` and a per-call cost :math:`b`, plus :math:`c_{\log}` per scalar logged
    (``pl_module.log`` costs about 0.3 ms a call in Lightning 2.6). The constants are class attributes
    (:attr:`GeometryCallback.HVP_COST`, ``HVP_CALL_COST``, ``FORWARD_COST``, ``FORWARD_CALL_COST``,
    ``GRADIENT_COST``, ``GRADIENT_CALL_COST``, ``LOG_COST``), calibrated once with
    ``benchmarks/live_overhead.py --calibrate`` on the digits MLP and CNN (batch 256, CPU) and rounded up, so
    the model over-estimates the measured probe time there (1.5–4×). At the end of an epoch the probe runs iff
    :math:`C_{\text{spent}} + \hat c \le \text{budget} \cdot C_{\text{train}}`, where :math:`\hat c` is the
    last probe's cost (an a-priori estimate before the first); the probe's share never exceeds the budget.
    Explicit cadence arguments override the budget. ``geometry/probe_seconds/<name>`` logs each probe's
    wall-clock time and ``geometry/probe_cost_fraction/<name>`` the running
    :math:`C_{\text{spent}} / C_{\text{train}}`.

Probe context
    :func:`lightning_geometry.functional.closure.measurement`: ``torch.inference_mode(False)``, grad enabled, the
    module in ``eval()`` (unless ``train_mode``) with every submodule's mode restored after, and every global RNG
    stream (torch CPU/CUDA, numpy, python) restored; randomness inside a probe comes from private generators
    seeded by ``seed`` and the probe's index.

Distributed
    Every rank measures (on its own probe batches) and the scalars are averaged with ``trainer.strategy.reduce``
    before logging, so all ranks log the same value; decisions to probe go through
    ``reduce_boolean_decision`` so no rank waits on a collective another rank skips.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_geometry import tensorboard as tb
from lightning_geometry.functional.closure import batch_size as _batch_size
from lightning_geometry.functional.closure import measurement
from lightning_geometry.probe import LossFn, ProbeData, resolve_loss_fn

log = logging.getLogger(__name__)

__all__ = ["GeometryCallback", "GeometryConfigurationError", "ProbeOutput"]


class GeometryConfigurationError(MisconfigurationException, ValueError):
    """A bad callback argument: both a Lightning ``MisconfigurationException`` and a ``ValueError``."""


@dataclass
class ProbeOutput:
    """What one probe measured on this rank.

    Attributes:
        scalars: Values to reduce across ranks and log as ``<prefix><name>``.
        cost: The probe's cost in sample-gradients (see the module docstring).
        extra: Anything the subclass wants back in :meth:`GeometryCallback.after_probe` (not reduced).
    """

    scalars: dict[str, float]
    cost: float
    extra: dict[str, Any] = field(default_factory=dict)


def _check_positive_int(name: str, value: Any) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise GeometryConfigurationError(f"`{name}` must be None or an integer >= 1, got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise :class:`GeometryConfigurationError` naming ``name`` if ``value`` is not one of ``choices``."""
    if value not in choices:
        raise GeometryConfigurationError(f"`{name}` must be one of {choices}, got {value!r}")


def check_unsharded(trainer: pl.Trainer, callback: Callback) -> None:
    """Refuse sharded strategies (FSDP, DeepSpeed): every rank must hold the whole model, as for SWA.

    Raises:
        MisconfigurationException: Naming the callback and the strategy.
    """
    name = type(trainer.strategy).__name__
    if "FSDP" in name or "DeepSpeed" in name:
        raise MisconfigurationException(
            f"{type(callback).__name__} does not support sharded strategies ({name}): every rank must hold the "
            "whole model. Use DDP or a single device."
        )


class GeometryCallback(Callback):
    r"""Base class of the live geometry probes (see the module docstring for cadence, budget and context).

    Subclasses implement :meth:`measure` (and optionally :meth:`estimated_cost`, :meth:`layout`,
    :meth:`after_probe`, :meth:`on_probe_fit_start`, :meth:`extra_state_dict`, :meth:`load_extra_state_dict`).

    Args:
        budget: Fraction of training compute the probe may spend, in (0, 1]. Ignored when a cadence is given.
        every_n_epochs: Probe at the end of every n-th training epoch.
        every_n_train_steps: Probe after every n-th optimizer step.
        seed: Seed of the private generators (probe batches, random vectors).
        train_mode: Measure with the module in train mode (dropout active, batch statistics) instead of eval.
        log_key_prefix: Prefix of the logged scalar names.
        loss_fn: The loss closure (subclasses that measure a loss): a callable ``loss_fn(module, batch)``, an
            import path ``"pkg.module:fn"``, or ``None`` (see :func:`lightning_geometry.probe.resolve_loss_fn`).
        probe_data: ``None`` to draw probe batches from the training data, or a DataLoader / batches / tensors.
        probe_batches: Number of probe batches.
        probe_batch_size: Samples per drawn probe batch (``None``: the training dataloader's batch size).
        probe_per_rank: Under DDP, draw different probe samples on each rank (the seed is offset by the rank);
            by default every rank draws the same samples.

    Raises:
        GeometryConfigurationError: (a ``ValueError`` and a ``MisconfigurationException``) for both cadences,
            a budget outside (0, 1], or a non-positive count.
    """

    HVP_COST: ClassVar[float] = 0.75
    """Per-sample cost of one Hessian-vector product, in sample-gradients (measured 0.07–0.6)."""
    HVP_CALL_COST: ClassVar[float] = 50.0
    """Per-call cost of one Hessian-vector product (measured 40–80 on the digits models)."""
    FORWARD_COST: ClassVar[float] = 0.2
    """Per-sample cost of one forward pass of the loss (measured 0.04–0.15)."""
    FORWARD_CALL_COST: ClassVar[float] = 10.0
    """Per-call cost of one forward pass (measured 10–15)."""
    GRADIENT_COST: ClassVar[float] = 0.75
    """Per-sample cost of one gradient (the graph a probe's Hessian-vector products reuse)."""
    GRADIENT_CALL_COST: ClassVar[float] = 20.0
    """Per-call cost of one gradient."""
    LOG_COST: ClassVar[float] = 40.0
    """Cost of logging one scalar through ``pl_module.log`` (measured 11–31; rounded up)."""
    probe_name: ClassVar[str] = "geometry"
    """Short name used in ``probe_seconds/<name>`` and the TensorBoard section."""
    needs_probe_data: ClassVar[bool] = False
    """Whether the probe evaluates a loss (and so needs ``loss_fn`` and probe batches)."""

    def __init__(
        self,
        *,
        budget: float = 0.05,
        every_n_epochs: int | None = None,
        every_n_train_steps: int | None = None,
        seed: int = 0,
        train_mode: bool = False,
        log_key_prefix: str = "geometry/",
        loss_fn: LossFn | str | None = None,
        probe_data: Any = None,
        probe_batches: int = 1,
        probe_batch_size: int | None = None,
        probe_per_rank: bool = False,
    ) -> None:
        if every_n_epochs is not None and every_n_train_steps is not None:
            raise GeometryConfigurationError(
                f"give at most one of `every_n_epochs` ({every_n_epochs!r}) and `every_n_train_steps` "
                f"({every_n_train_steps!r}); with neither, the `budget` sets the schedule"
            )
        _check_positive_int("every_n_epochs", every_n_epochs)
        _check_positive_int("every_n_train_steps", every_n_train_steps)
        _check_positive_int("probe_batches", probe_batches)
        _check_positive_int("probe_batch_size", probe_batch_size)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise GeometryConfigurationError(f"`budget` must be a fraction in (0, 1], got {budget!r}")
        if not isinstance(log_key_prefix, str):
            raise GeometryConfigurationError(f"`log_key_prefix` must be a string, got {log_key_prefix!r}")
        if loss_fn is not None and not (callable(loss_fn) or isinstance(loss_fn, str)):
            raise GeometryConfigurationError(
                f"`loss_fn` must be a callable, an import path string or None, got {type(loss_fn).__name__}"
            )
        self.budget = float(budget)
        self.every_n_epochs = every_n_epochs
        self.every_n_train_steps = every_n_train_steps
        self.seed = int(seed)
        self.train_mode = bool(train_mode)
        self.log_key_prefix = log_key_prefix
        self.loss_fn = loss_fn
        self.probe_data = probe_data
        self.probe_batches = probe_batches
        self.probe_batch_size = probe_batch_size
        self.probe_per_rank = bool(probe_per_rank)
        self._probe = ProbeData(
            probe_data, num_batches=probe_batches, batch_size=probe_batch_size, seed=seed, per_rank=probe_per_rank
        )
        self._loss_fn: LossFn | None = None
        # schedule / budget state (saved in checkpoints)
        self._spent = 0.0
        self._trained = 0.0
        self._num_probes = 0
        self._last_probe_step = -1
        self._last_probe_epoch = -1
        self._last_cost: float | None = None

    # ------------------------------------------------------------ properties
    @property
    def budget_mode(self) -> bool:
        """``True`` when no explicit cadence is given and the budget sets the schedule."""
        return self.every_n_epochs is None and self.every_n_train_steps is None

    @property
    def num_probes(self) -> int:
        """Number of probes made so far (across resumes)."""
        return self._num_probes

    @property
    def cost_fraction(self) -> float:
        """Probe compute spent over training compute so far (sample-gradients; nan before any training)."""
        return self._spent / self._trained if self._trained > 0 else math.nan

    @property
    def probe_batches_on_device(self) -> list[Any]:
        """The probe batches (drawn at fit start)."""
        return self._probe.batches

    @property
    def resolved_loss_fn(self) -> LossFn:
        """The loss closure resolved at ``setup``.

        Raises:
            RuntimeError: Before ``setup``.
        """
        if self._loss_fn is None:
            raise RuntimeError(f"{type(self).__name__}: the loss closure is resolved at setup")
        return self._loss_fn

    @property
    @override
    def state_key(self) -> str:
        # Lightning formats the state key at every hook call (profiler action names): compute it once.
        key = self.__dict__.get("_state_key_cache")
        if key is None:
            key = self._generate_state_key(**self._state_key_args())
            self.__dict__["_state_key_cache"] = key
        return key

    def _state_key_args(self) -> dict[str, Any]:
        return {
            "every_n_epochs": self.every_n_epochs,
            "every_n_train_steps": self.every_n_train_steps,
            "budget": None if not self.budget_mode else self.budget,
            "log_key_prefix": self.log_key_prefix,
        }

    # ------------------------------------------------------ subclass surface
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeOutput:
        """Measure at the module's current weights (inside the probe context)."""
        raise NotImplementedError

    def estimated_cost(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """A-priori cost of one probe in sample-gradients (logging included), used before the first probe."""
        return 0.0

    def op_cost(self, samples: int, *, hvp: int = 0, forward: int = 0, gradient: int = 0) -> float:
        """Cost in sample-gradients of ``hvp`` products, ``forward`` passes and ``gradient`` s on ``samples``."""
        return (
            hvp * (self.HVP_COST * samples + self.HVP_CALL_COST)
            + forward * (self.FORWARD_COST * samples + self.FORWARD_CALL_COST)
            + gradient * (self.GRADIENT_COST * samples + self.GRADIENT_CALL_COST)
        )

    def layout(self) -> dict[str, list[Any]]:
        """Custom-scalars charts for this probe's TensorBoard section (tags are regexes)."""
        return {}

    def after_probe(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float], output: ProbeOutput
    ) -> None:
        """Called on every rank after the reduced values were logged (histograms, figures, snapshots)."""

    def on_probe_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called at ``on_train_start``, after restoration from a checkpoint and after the probe batches are drawn."""

    def extra_state_dict(self) -> dict[str, Any]:
        """Subclass state to save in checkpoints."""
        return {}

    def load_extra_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore subclass state."""

    # ------------------------------------------------------------- helpers
    def _key(self, name: str) -> str:
        return f"{self.log_key_prefix}{name}"

    def probe_seed(self) -> int:
        """Seed of this probe's private generators: ``seed`` plus the probe index (different draws per probe)."""
        return self.seed + self._num_probes

    @staticmethod
    def _should_skip(trainer: pl.Trainer) -> bool:
        return bool(trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING)

    def _reduce(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float]) -> dict[str, float]:
        keys = sorted(values)
        if trainer.world_size <= 1 or not keys:
            return {k: float(values[k]) for k in keys}
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=pl_module.device)
        t = trainer.strategy.reduce(t, reduce_op="mean")
        return {k: float(v) for k, v in zip(keys, t.tolist())}

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule, values: dict[str, float], on_step: bool) -> None:
        # Epoch cadence: on_epoch values reach every logger at the end of the epoch. Step cadence: Lightning
        # would pass on_step values to the loggers only every `log_every_n_steps`, so the loggers get every probe
        # point directly (their `log_metrics` is rank-zero only) and `self.log` feeds `callback_metrics` alone.
        to_logger = bool(trainer.loggers) and not on_step  # (no "no logger configured" warning per key)
        for name, value in values.items():
            pl_module.log(
                self._key(name), float(value), on_step=on_step, on_epoch=not on_step, sync_dist=False, batch_size=1,
                logger=to_logger,
            )
        if on_step:
            metrics = {self._key(name): float(value) for name, value in values.items()}
            metrics["epoch"] = trainer.current_epoch
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _run_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> dict[str, float]:
        if self.needs_probe_data:
            self._probe.prepare(trainer, pl_module)
        start = time.perf_counter()
        with measurement(pl_module, train_mode=self.train_mode):
            output = self.measure(trainer, pl_module)
        seconds = time.perf_counter() - start
        values = dict(output.scalars)
        values[f"probe_seconds/{self.probe_name}"] = seconds
        values["__cost__"] = float(output.cost)
        reduced = self._reduce(trainer, pl_module, values)
        cost = reduced.pop("__cost__") + self.LOG_COST * (len(reduced) + 1)  # + the cost fraction logged below
        self._spent += cost
        self._last_cost = cost
        self._num_probes += 1
        self._last_probe_step = trainer.global_step
        self._last_probe_epoch = trainer.current_epoch
        reduced[f"probe_cost_fraction/{self.probe_name}"] = self.cost_fraction
        self._log(trainer, pl_module, reduced, on_step)
        self.after_probe(trainer, pl_module, reduced, output)
        return reduced

    @staticmethod
    def _count_samples(batch: Any) -> int:
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor) and batch[0].dim():
            return int(batch[0].shape[0])  # the common (x, y) batch, without walking the structure
        try:
            return _batch_size(batch)
        except (ValueError, TypeError):
            return 1

    def _budget_allows(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        estimate = self._last_cost if self._last_cost is not None else self.estimated_cost(trainer, pl_module)
        decision = self._spent + estimate <= self.budget * self._trained
        return bool(trainer.strategy.reduce_boolean_decision(decision, all=True))

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_unsharded(trainer, self)
        if self.needs_probe_data and not trainer.fast_dev_run:
            self._loss_fn = resolve_loss_fn(pl_module, self.loss_fn)
            self._probe.check(trainer)
        charts = self.layout()
        if charts:
            tb.register_layout(trainer, f"geometry: {self.probe_name}", charts)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer):
            return
        if self.needs_probe_data:
            self._probe.prepare(trainer, pl_module)
        tb.write_layout(trainer)
        self.on_probe_fit_start(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._should_skip(trainer):
            return
        self._trained += self._count_samples(batch)
        n = self.every_n_train_steps
        step = trainer.global_step
        if n is not None and step > 0 and step % n == 0 and step != self._last_probe_step:
            self._run_probe(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer) or self.every_n_train_steps is not None:
            return
        if self._last_probe_epoch == trainer.current_epoch:
            return
        if self.every_n_epochs is not None:
            if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
                self._run_probe(trainer, pl_module, on_step=False)
        elif self._budget_allows(trainer, pl_module):
            self._run_probe(trainer, pl_module, on_step=False)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._should_skip(trainer) or self._num_probes or not self.budget_mode:
            return
        estimate = self._last_cost if self._last_cost is not None else self.estimated_cost(trainer, pl_module)
        rank_zero_warn(
            f"{type(self).__name__} made no measurement: at budget={self.budget} one probe costs about "
            f"{estimate:.0f} sample-gradients and the whole fit trained {self._trained:.0f} (budget "
            f"{self.budget * self._trained:.0f}). Raise `budget`, use smaller probes, or set `every_n_epochs`."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "spent": self._spent,
            "trained": self._trained,
            "num_probes": self._num_probes,
            "last_probe_step": self._last_probe_step,
            "last_probe_epoch": self._last_probe_epoch,
            "last_cost": self._last_cost,
            "extra": self.extra_state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._spent = float(state_dict.get("spent", 0.0))
        self._trained = float(state_dict.get("trained", 0.0))
        self._num_probes = int(state_dict.get("num_probes", 0))
        self._last_probe_step = int(state_dict.get("last_probe_step", -1))
        self._last_probe_epoch = int(state_dict.get("last_probe_epoch", -1))
        self._last_cost = state_dict.get("last_cost")
        self.load_extra_state_dict(state_dict.get("extra", {}))
