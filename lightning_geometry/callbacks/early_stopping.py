r"""
Sharpness early stopping
^^^^^^^^^^^^^^^^^^^^^^^^

Stop training on the *geometry* of the loss rather than on a validation metric: when the sharpness
:math:`\lambda_{\max}` measured by a :class:`~lightning_geometry.callbacks.CurvatureProbe` keeps rising, when it
reaches the edge of stability of the optimizer in use, or when it (or the training loss) stops being finite.

:class:`SharpnessEarlyStopping` subclasses Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping`, for
three reasons (STYLE.md C4): only "monitoring" callbacks (``EarlyStopping`` and ``Checkpoint`` subclasses) run
*after* the LightningModule and the non-monitoring probes in ``on_train_epoch_end``, so it reads the value the
probe logged in the same hook; it inherits the DDP vote (``reduce_boolean_decision(..., all=False)``), the
reasons, ``stopped_epoch`` and the checkpoint state; and its ``state_key`` does not collide with a user's plain
``EarlyStopping``.

The pitfall it solves: a probe run within a compute budget does not measure every epoch, and
``trainer.callback_metrics`` keeps the last logged value, so a plain ``EarlyStopping(monitor="geometry/lambda_max")``
counts a stale value as a new observation on every epoch without a probe (and, when its check falls in
``on_validation_end``, reads last epoch's value). Here a value counts only when the probe's ``num_probes``
counter changed since the previous check, and the check always runs in ``on_train_epoch_end``.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Iterable, Sequence
from enum import Enum
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_geometry.callbacks._base import GeometryConfigurationError
from lightning_geometry.functional.sharpness import sgd_stability_threshold
from lightning_geometry.functional.trend import TheilSenResult, relative_slope, theil_sen

log = logging.getLogger(__name__)

__all__ = ["SharpnessEarlyStopping", "SharpnessStoppingReason"]

CRITERIA: tuple[str, ...] = ("trend", "edge", "non_finite")
"""The criteria :class:`SharpnessEarlyStopping` can stop on."""


class SharpnessStoppingReason(Enum):
    """Which criterion of :class:`SharpnessEarlyStopping` stopped the fit (stored in checkpoints by value)."""

    NOT_STOPPED = 0
    RISING_TREND = 1
    EDGE_OF_STABILITY = 2
    NON_FINITE_SHARPNESS = 3
    NON_FINITE_LOSS = 4
    DIVERGENCE_THRESHOLD = 5
    STOPPING_THRESHOLD = 6


_LIGHTNING_REASON = {
    SharpnessStoppingReason.NOT_STOPPED: EarlyStoppingReason.NOT_STOPPED,
    SharpnessStoppingReason.RISING_TREND: EarlyStoppingReason.PATIENCE_EXHAUSTED,
    SharpnessStoppingReason.EDGE_OF_STABILITY: EarlyStoppingReason.DIVERGENCE_THRESHOLD,
    SharpnessStoppingReason.NON_FINITE_SHARPNESS: EarlyStoppingReason.NON_FINITE_METRIC,
    SharpnessStoppingReason.NON_FINITE_LOSS: EarlyStoppingReason.NON_FINITE_METRIC,
    SharpnessStoppingReason.DIVERGENCE_THRESHOLD: EarlyStoppingReason.DIVERGENCE_THRESHOLD,
    SharpnessStoppingReason.STOPPING_THRESHOLD: EarlyStoppingReason.STOPPING_THRESHOLD,
}


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class SharpnessEarlyStopping(EarlyStopping):
    r"""Stop training when the sharpness logged by a curvature probe rises, reaches the edge of stability, or is
    not finite.

    The monitored value (default ``geometry/lambda_max``, the top Hessian eigenvalue) must be logged by a probe
    attached to the same Trainer (see *Probe* below). At the end of every training epoch the callback looks for a
    **fresh** value — one measured since its previous check — and evaluates, in this order, the criteria chosen
    by ``criteria``:

    ``"non_finite"``
        The training loss (``outputs["loss"]`` of any training batch since the previous check) or the fresh
        sharpness is ``nan``/``inf``. Checked at every epoch end, fresh value or not.

    ``"edge"``
        The edge of stability (Cohen et al. 2021): gradient descent with step :math:`\eta` cannot stay where
        :math:`\lambda_{\max} > 2/\eta`, and with heavy-ball momentum :math:`\beta` where
        :math:`\lambda_{\max} > (2+2\beta)/\eta`. It stops when

        .. math:: \lambda_{\max} + w \;\ge\; \text{ratio}\cdot T(\eta, \beta, \tau, \text{nesterov}),

        with :math:`T` from :func:`~lightning_geometry.functional.sharpness.sgd_stability_threshold` and :math:`w` the optimizer's (coupled, L2)
        ``weight_decay``, which adds :math:`w` to every eigenvalue of the Hessian the optimizer sees. ``lr``,
        ``momentum``, ``dampening``, ``nesterov`` and ``weight_decay`` are read from
        ``trainer.optimizers[0].param_groups[0]`` at every check (so learning-rate schedules are followed).
        Nesterov uses :math:`T = (2+2\beta)/(\eta(1+2\beta))`. The criterion applies to
        ``torch.optim.SGD`` only: for Adam-type optimizers the threshold concerns the *preconditioned* Hessian
        (Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability"), not the raw
        :math:`\lambda_{\max}` the probe measures, so the callback refuses to compare: asking for ``"edge"``
        explicitly raises at fit start; with the default ``criteria=None`` it is switched off with a warning. It
        is refused likewise for several optimizers or parameter groups with different hyper-parameters, and
        when ``monitor`` does not end in ``lambda_max`` (the threshold bounds the top eigenvalue only).

    ``"trend"``
        A sustained rise. Over the last ``window`` fresh values :math:`(e_i, \lambda_i)` (:math:`e_i` the epoch of
        the probe) the Theil–Sen slope (:func:`lightning_geometry.functional.trend.theil_sen`; robust to a spike)
        relative to the window's median level,

        .. math:: r = \frac{\operatorname{median}_{i<j} \frac{\lambda_j-\lambda_i}{e_j-e_i}}
                  {|\operatorname{median}_i \lambda_i|} \quad\text{(fractional rise per epoch)},

        must exceed ``min_rise`` **and** the rise must be significant — the lower end of Sen's confidence
        interval of the slope at level ``confidence`` above 0 (with ``window=5`` and ``confidence=0.9``: at
        least 9 of the 10 pairwise slopes positive) — at ``patience`` consecutive fresh checks. The second
        condition keeps a noisy window (a large slope driven by one or two high values) from counting.
        Sharpness normally rises early in training — *progressive sharpening* (Cohen et al. 2021;
        Jastrzębski et al. 2020) — so the first ``warmup`` probes are ignored and, with ``wait_for_plateau=True``
        (the default), the criterion is armed only once a full window after the warmup has stopped rising
        (:math:`r \le 0`): it stops on a *renewed* rise, not on the sharpening phase itself. On scikit-learn's
        digits (``examples/sharpness_early_stopping.py``, SGD lr 0.003, momentum 0.9) :math:`\lambda_{\max}` rises
        from 0.99 to 5.7 between epochs 3 and 41, at up to 9 % per epoch, then falls: with
        ``wait_for_plateau=False`` the trend stops that healthy fit at epoch 11 (validation accuracy 0.81); with
        the defaults it runs its 60 epochs (0.94).

    Lightning's ``divergence_threshold`` (stop once :math:`\lambda_{\max}` exceeds an absolute value) and
    ``stopping_threshold`` (stop once it falls below one) keep their meaning and are checked after ``"edge"``.

    Probe
        At ``setup`` the callback looks among the Trainer's callbacks for the probe that logs ``monitor``,
        by duck typing: an object with an integer ``num_probes`` counter and a string ``log_key_prefix`` that
        starts ``monitor``, and either a ``logged_keys`` collection containing ``monitor`` or
        ``probe_name == "curvature"`` (a :class:`~lightning_geometry.callbacks.CurvatureProbe`). Pass ``probe``
        to choose one explicitly. No such probe (or two of them) raises a ``MisconfigurationException``. A probe
        scheduled by steps (``every_n_train_steps``) is accepted; only the last probe of each epoch is seen.

    Restoring the flattest point
        With ``restore_flattest=True`` the callback keeps a CPU copy of ``pl_module.state_dict()`` at the fresh
        probe with the lowest finite monitored value (:attr:`best_score`, epoch :attr:`best_epoch`), saves it in
        its checkpoint state (one model's worth of extra checkpoint size), and loads it into the module at
        ``on_train_end`` when this callback stopped the fit. Checkpoint files written during the fit are not
        changed. With a step-scheduled probe the copy is taken at the end of the probe's epoch.

    Args:
        monitor: The logged geometry key.
        criteria: Names among ``"trend"``, ``"edge"``, ``"non_finite"``, or a single name; ``None`` means all
            three, with ``"edge"`` switched off (with a warning) for optimizers it does not apply to.
        window: Number of fresh values in the trend window (>= 3).
        min_rise: Relative rise per epoch above which a window counts as rising (>= 0).
        confidence: Level of Sen's confidence interval whose lower end must be above 0, in (0, 1).
        patience: Consecutive rising checks that stop the fit (>= 1).
        warmup: Fresh values ignored by the trend at the start of the fit (>= 0).
        wait_for_plateau: Arm the trend only after a window after the warmup that is not rising.
        ratio: Fraction of the stability threshold that stops the fit (> 0; 1 is the edge itself).
        restore_flattest: Restore the weights of the flattest probe point when this callback stops the fit.
        stopping_threshold: Stop once the monitored value falls below this (Lightning's meaning in ``"min"`` mode).
        divergence_threshold: Stop once the monitored value exceeds this absolute value.
        strict: Raise when a fresh probe did not log ``monitor`` (else warn and skip).
        verbose: Log the status of each check.
        log_rank_zero_only: Log the status on rank zero only.
        probe: The probe callback to follow (``None``: found among the Trainer's callbacks at ``setup``).

    Attributes:
        stopped_epoch: Epoch at which the fit was stopped (0 if it was not).
        stopping_reason: Lightning's :class:`~lightning.pytorch.callbacks.early_stopping.EarlyStoppingReason`
            (trend: ``PATIENCE_EXHAUSTED``; edge and ``divergence_threshold``: ``DIVERGENCE_THRESHOLD``;
            non-finite: ``NON_FINITE_METRIC``).
        sharpness_reason: The finer :class:`SharpnessStoppingReason`.
        stopping_reason_message: Which criterion fired, with its numbers.
        best_score: The lowest finite fresh value (the flattest point); ``best_epoch`` its epoch.
        last_trend: The last :class:`~lightning_geometry.functional.trend.TheilSenResult` (``None`` before a full
            window).
        history: The fresh ``(epoch, value)`` pairs kept for the trend (at most ``window``).

    Raises:
        GeometryConfigurationError: (a ``ValueError`` and a ``MisconfigurationException``) at construction, naming
            the argument and value, for ``window < 3``, ``patience < 1``, ``ratio <= 0``, ``min_rise < 0``,
            ``warmup < 0``, ``confidence`` outside (0, 1), an unknown criterion or an empty ``criteria``.
        MisconfigurationException: At ``setup`` when no probe (or more than one) logs ``monitor``; at fit start
            when ``"edge"`` was asked for explicitly and the optimizer is not ``torch.optim.SGD`` (or has
            several parameter groups with different hyper-parameters).
        RuntimeError: At the first check after a probe ran without logging ``monitor`` (with ``strict``), naming
            the keys that were logged.

    Example::

        from lightning_geometry.callbacks import CurvatureProbe, SharpnessEarlyStopping

        stopper = SharpnessEarlyStopping()  # trend + edge of stability + non-finite, default thresholds
        trainer = Trainer(callbacks=[CurvatureProbe(every_n_epochs=1), stopper])
        trainer.fit(model)
        print(stopper.sharpness_reason, stopper.stopping_reason_message)

    .. note::
        Patience counts fresh probes, not epochs: with ``CurvatureProbe(every_n_epochs=5)`` and ``warmup=5,
        window=5, patience=3`` the trend cannot fire before about 60 epochs (a warning says so at ``setup`` when
        ``max_epochs`` is smaller). Under DDP every rank evaluates its own view and any rank's vote stops all of
        them (inherited); a :class:`~lightning_geometry.callbacks.CurvatureProbe` logs the same reduced value on
        every rank. On ranks that did not vote, :attr:`sharpness_reason` is the (largest) reason code voted
        elsewhere and the message says so.
    """

    def __init__(
        self,
        monitor: str = "geometry/lambda_max",
        criteria: str | Sequence[str] | None = None,
        window: int = 5,
        min_rise: float = 0.05,
        confidence: float = 0.9,
        patience: int = 3,
        warmup: int = 5,
        wait_for_plateau: bool = True,
        ratio: float = 1.0,
        restore_flattest: bool = False,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        strict: bool = True,
        verbose: bool = False,
        log_rank_zero_only: bool = False,
        probe: Any | None = None,
    ) -> None:
        if not isinstance(monitor, str) or not monitor:
            raise GeometryConfigurationError(f"`monitor` must be a non-empty string, got {monitor!r}")
        self._auto_edge = criteria is None
        names = self._parse_criteria(criteria)
        if isinstance(window, bool) or not isinstance(window, int) or window < 3:
            raise GeometryConfigurationError(f"`window` must be an integer >= 3, got {window!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise GeometryConfigurationError(f"`patience` must be an integer >= 1, got {patience!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise GeometryConfigurationError(f"`warmup` must be an integer >= 0, got {warmup!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 0:
            raise GeometryConfigurationError(f"`ratio` must be a finite number > 0, got {ratio!r}")
        if (
            isinstance(min_rise, bool)
            or not isinstance(min_rise, (int, float))
            or not math.isfinite(min_rise)
            or min_rise < 0
        ):
            raise GeometryConfigurationError(f"`min_rise` must be a finite number >= 0, got {min_rise!r}")
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
            raise GeometryConfigurationError(f"`confidence` must be a number in (0, 1), got {confidence!r}")
        super().__init__(
            monitor=monitor,
            min_delta=0.0,
            patience=patience,
            verbose=verbose,
            mode="min",
            strict=strict,
            check_finite="non_finite" in names,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=True,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.criteria: tuple[str, ...] = names
        self.window = window
        self.min_rise = float(min_rise)
        self.confidence = float(confidence)
        self.warmup = warmup
        self.wait_for_plateau = bool(wait_for_plateau)
        self.ratio = float(ratio)
        self.restore_flattest = bool(restore_flattest)
        self.probe = probe
        self.sharpness_reason = SharpnessStoppingReason.NOT_STOPPED
        self.best_epoch = -1
        self.last_trend: TheilSenResult | None = None
        self.history: list[tuple[float, float]] = []
        self._probe_ref: Any | None = probe
        self._edge_active = "edge" in names
        self._last_probe_count: int | None = None
        self._num_fresh = 0
        self._armed = not self.wait_for_plateau
        self._nonfinite_loss: tuple[int, float] | None = None
        self._loss_watch: torch.Tensor | None = None
        self._flattest_state: dict[str, torch.Tensor] | None = None
        self._stopped = False

    # ------------------------------------------------------------ arguments
    @staticmethod
    def _parse_criteria(criteria: str | Sequence[str] | None) -> tuple[str, ...]:
        if criteria is None:
            return CRITERIA
        items: Iterable[Any] = [criteria] if isinstance(criteria, str) else criteria
        try:
            names = tuple(items)
        except TypeError:
            raise GeometryConfigurationError(
                f"`criteria` must be a name or a sequence of names among {CRITERIA}, got {criteria!r}"
            ) from None
        if not names:
            raise GeometryConfigurationError(f"`criteria` must name at least one of {CRITERIA}, got {criteria!r}")
        for name in names:
            if name not in CRITERIA:
                raise GeometryConfigurationError(
                    f"`criteria` has an unknown criterion {name!r}: choose among {CRITERIA}, got {criteria!r}"
                )
        return tuple(dict.fromkeys(names))

    @property
    def armed(self) -> bool:
        """Whether the trend criterion is armed (past the warmup and, with ``wait_for_plateau``, a plateau)."""
        return self._armed and self._num_fresh > self.warmup

    @property
    def edge_active(self) -> bool:
        """Whether the edge-of-stability criterion is in force (it may be switched off at fit start)."""
        return self._edge_active

    # ---------------------------------------------------------------- probe
    @staticmethod
    def _logs_monitor(candidate: Any, monitor: str) -> bool:
        count = getattr(candidate, "num_probes", None)
        prefix = getattr(candidate, "log_key_prefix", None)
        if isinstance(count, bool) or not isinstance(count, int) or not isinstance(prefix, str):
            return False
        if not monitor.startswith(prefix):
            return False
        keys = getattr(candidate, "logged_keys", None)
        if keys is not None:
            return monitor in set(keys)
        return getattr(candidate, "probe_name", None) == "curvature"

    def _find_probe(self, trainer: pl.Trainer) -> Any:
        if self.probe is not None:
            if not self._logs_monitor(self.probe, self.monitor):
                raise MisconfigurationException(
                    f"{type(self).__name__}(monitor={self.monitor!r}): the given `probe` "
                    f"({type(self.probe).__name__}) does not log {self.monitor!r} (it needs an integer `num_probes`, "
                    "a `log_key_prefix` that starts the key, and `logged_keys` containing it or "
                    "`probe_name == 'curvature'`)"
                )
            if self.probe not in trainer.callbacks:
                raise MisconfigurationException(
                    f"{type(self).__name__}: the given `probe` ({type(self.probe).__name__}) is not among the "
                    "Trainer's callbacks; add it to `Trainer(callbacks=[...])`"
                )
            return self.probe
        found = [cb for cb in trainer.callbacks if cb is not self and self._logs_monitor(cb, self.monitor)]
        if not found:
            raise MisconfigurationException(
                f"{type(self).__name__} monitors {self.monitor!r}, but no callback attached to the Trainer logs it. "
                f"Attach a CurvatureProbe (e.g. `CurvatureProbe(every_n_epochs=1)`) whose `log_key_prefix` starts "
                f"{self.monitor!r}, or pass `probe=`. A plain `EarlyStopping` reading a value that is not measured "
                "every epoch would count stale values as new ones."
            )
        if len(found) > 1:
            names = ", ".join(type(cb).__name__ for cb in found)
            raise MisconfigurationException(
                f"{type(self).__name__}: several callbacks may log {self.monitor!r} ({names}); pass `probe=` to "
                "choose the one to follow"
            )
        return found[0]

    def _probe_count(self) -> int:
        return int(self._probe_ref.num_probes) if self._probe_ref is not None else 0

    def _check_cadence(self, trainer: pl.Trainer, probe: Any) -> None:
        if getattr(probe, "every_n_train_steps", None) is not None:
            rank_zero_warn(
                f"{type(self).__name__}: the probe runs every {probe.every_n_train_steps} training steps but the "
                "check runs at the end of each epoch, so only the last value of each epoch is used (the trend's "
                "abscissa is the epoch)."
            )
        every = getattr(probe, "every_n_epochs", None)
        max_epochs = trainer.max_epochs
        if "trend" in self.criteria and isinstance(every, int) and max_epochs is not None and max_epochs > 0:
            needed = (self.warmup + self.window + self.patience - 1) * every
            if needed > max_epochs:
                rank_zero_warn(
                    f"{type(self).__name__}: with the probe every {every} epoch(s), warmup={self.warmup}, "
                    f"window={self.window} and patience={self.patience}, the trend criterion needs at least "
                    f"{needed} epochs but max_epochs={max_epochs}: it cannot stop this fit."
                )

    # ---------------------------------------------------------------- hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._check_on_train_epoch_end = True
        if stage != "fit":
            return
        self._probe_ref = self._find_probe(trainer)
        self._check_cadence(trainer, self._probe_ref)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "edge" not in self.criteria:
            return
        problem = self._edge_problem(trainer, self.monitor)
        if problem is None:
            self._edge_active = True
            return
        self._edge_active = False
        if not self._auto_edge:
            raise MisconfigurationException(
                f"{type(self).__name__}(criteria={self.criteria!r}): the edge-of-stability criterion does not apply: "
                f"{problem} Remove 'edge' from `criteria`, or use `divergence_threshold` for an absolute cap."
            )
        rank_zero_warn(f"{type(self).__name__}: the edge-of-stability criterion is switched off: {problem}")

    @staticmethod
    def _edge_problem(trainer: pl.Trainer, monitor: str) -> str | None:
        if not monitor.endswith("lambda_max"):
            return (
                f"the monitored key {monitor!r} is not a top Hessian eigenvalue (`...lambda_max`), and the "
                "threshold bounds lambda_max only."
            )
        optimizers = list(getattr(trainer, "optimizers", None) or [])
        if len(optimizers) != 1:
            return f"it needs exactly one optimizer, the Trainer has {len(optimizers)}."
        opt = optimizers[0]
        if not isinstance(opt, torch.optim.SGD):
            return (
                f"the optimizer is {type(opt).__name__}, and 2/lr (or (2 + 2*momentum)/lr) is the stability "
                "threshold of SGD and heavy-ball momentum only; for adaptive optimizers such as Adam it concerns "
                "the preconditioned Hessian (Cohen et al. 2022), not the raw lambda_max the probe measures."
            )
        keys = ("lr", "momentum", "dampening", "nesterov", "weight_decay")
        first = {k: opt.param_groups[0].get(k) for k in keys}
        for i, group in enumerate(opt.param_groups[1:], start=1):
            if any(group.get(k) != first[k] for k in keys):
                return (
                    f"parameter group {i} of the SGD optimizer has different hyper-parameters from group 0 "
                    f"({ {k: group.get(k) for k in keys} } vs {first}); one threshold cannot describe them."
                )
        return None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if "non_finite" not in self.criteria or self._nonfinite_loss is not None or self._should_skip_check(trainer):
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            return
        # no host sync per batch: keep the first non-finite (step, loss) on the loss's device, read at epoch end
        loss = loss.detach().reshape(()).to(torch.float64)
        watch = self._loss_watch
        if watch is None or watch.device != loss.device:
            watch = torch.tensor([-1.0, 0.0], dtype=torch.float64, device=loss.device)
        step = torch.tensor(float(trainer.global_step), dtype=torch.float64).to(loss.device, non_blocking=True)
        first = ~torch.isfinite(loss) & (watch[0] < 0)
        self._loss_watch = torch.where(first, torch.stack([step, loss]), watch)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not (self.restore_flattest and self._stopped and self._flattest_state is not None):
            return
        pl_module.load_state_dict(self._flattest_state)
        self._log_info(
            trainer,
            f"Restored the weights of the flattest probe point: {self.monitor} = {_fmt(float(self.best_score))} "
            f"at epoch {self.best_epoch}.",
            self.log_rank_zero_only,
        )

    # ---------------------------------------------------------------- check
    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        if trainer.fast_dev_run:
            return
        should_stop, reason, code = self._evaluate(trainer)
        # every rank reaches this collective once per check, whatever it saw (no rank waits on another)
        should_stop = bool(trainer.strategy.reduce_boolean_decision(should_stop, all=False))
        trainer.should_stop = trainer.should_stop or should_stop
        if should_stop:
            if code is SharpnessStoppingReason.NOT_STOPPED:
                voted = torch.tensor(0, device=trainer.strategy.root_device)
                voted = trainer.strategy.reduce(voted, reduce_op="max")
                code = SharpnessStoppingReason(int(voted))
                reason = (
                    f"Another rank voted to stop ({code.name}); on this rank {self.monitor} = "
                    f"{_fmt(self.history[-1][1]) if self.history else 'n/a'}. Signaling Trainer to stop."
                )
            else:
                voted = torch.tensor(code.value, device=trainer.strategy.root_device)
                trainer.strategy.reduce(voted, reduce_op="max")
            self._stopped = True
            self.sharpness_reason = code
            self.stopping_reason = _LIGHTNING_REASON[code]
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)

    def _evaluate(self, trainer: pl.Trainer) -> tuple[bool, str | None, SharpnessStoppingReason]:
        epoch = trainer.current_epoch
        if self._nonfinite_loss is None and self._loss_watch is not None:
            step, value = self._loss_watch.tolist()
            if step >= 0:
                self._nonfinite_loss = (int(step), value)
        if "non_finite" in self.criteria and self._nonfinite_loss is not None:
            step, value = self._nonfinite_loss
            return (
                True,
                f"The training loss is not finite: loss = {value} at global step {step} (epoch {epoch}). "
                f"Flattest {self.monitor} was {_fmt(float(self.best_score))}. Signaling Trainer to stop.",
                SharpnessStoppingReason.NON_FINITE_LOSS,
            )
        count = self._probe_count()
        if count == self._last_probe_count or count == 0:
            return False, None, SharpnessStoppingReason.NOT_STOPPED  # no new probe since the previous check
        self._last_probe_count = count
        logs = trainer.callback_metrics
        if self.monitor not in logs:
            message = (
                f"{type(self).__name__} monitors {self.monitor!r}, which the probe ({type(self._probe_ref).__name__}, "
                f"{count} probe(s) so far) did not log. Logged keys: "
                f"{', '.join(repr(k) for k in sorted(logs)) or 'none'}."
            )
            if self.strict:
                raise RuntimeError(message)
            rank_zero_warn(message, category=RuntimeWarning)
            return False, None, SharpnessStoppingReason.NOT_STOPPED
        value = float(logs[self.monitor].detach().float().mean())
        self._num_fresh += 1
        if not math.isfinite(value):
            if "non_finite" in self.criteria:
                return (
                    True,
                    f"Monitored sharpness {self.monitor} = {value} is not finite (epoch {epoch}, probe {count}). "
                    f"Flattest value was {_fmt(float(self.best_score))}. Signaling Trainer to stop.",
                    SharpnessStoppingReason.NON_FINITE_SHARPNESS,
                )
            return False, None, SharpnessStoppingReason.NOT_STOPPED
        self._record(trainer, epoch, value)
        if self._edge_active:
            result = self._check_edge(trainer, value)
            if result is not None:
                return True, result, SharpnessStoppingReason.EDGE_OF_STABILITY
        if self.divergence_threshold is not None and value > self.divergence_threshold:
            return (
                True,
                f"Divergence threshold reached: {self.monitor} = {_fmt(value)} > {self.divergence_threshold}. "
                "Signaling Trainer to stop.",
                SharpnessStoppingReason.DIVERGENCE_THRESHOLD,
            )
        if self.stopping_threshold is not None and value < self.stopping_threshold:
            return (
                True,
                f"Stopping threshold reached: {self.monitor} = {_fmt(value)} < {self.stopping_threshold}. "
                "Signaling Trainer to stop.",
                SharpnessStoppingReason.STOPPING_THRESHOLD,
            )
        if "trend" in self.criteria:
            return self._check_trend(epoch)
        return False, None, SharpnessStoppingReason.NOT_STOPPED

    def _record(self, trainer: pl.Trainer, epoch: int, value: float) -> None:
        if value < float(self.best_score):
            self.best_score = torch.tensor(value)
            self.best_epoch = epoch
            if self.restore_flattest:
                module = trainer.lightning_module
                self._flattest_state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
        if self._num_fresh > self.warmup:
            self.history.append((float(epoch), value))
            del self.history[: -self.window]

    def _check_edge(self, trainer: pl.Trainer, value: float) -> str | None:
        group = trainer.optimizers[0].param_groups[0]
        lr = float(group["lr"])
        momentum = float(group.get("momentum", 0.0) or 0.0)
        dampening = float(group.get("dampening", 0.0) or 0.0)
        nesterov = bool(group.get("nesterov", False))
        decay = float(group.get("weight_decay", 0.0) or 0.0)
        if lr <= 0:
            return None
        threshold = sgd_stability_threshold(lr, momentum, dampening, nesterov)
        if value + decay < self.ratio * threshold:
            return None
        if momentum == 0.0:
            formula = f"2/lr = 2/{_fmt(lr)} (SGD)"
        elif nesterov:
            formula = f"(2 + 2*{_fmt(momentum)})/({_fmt(lr)}*(1 + 2*{_fmt(momentum)})) (SGD, Nesterov momentum)"
        else:
            damp = f"*(1 - {_fmt(dampening)})" if dampening else ""
            formula = f"(2 + 2*{_fmt(momentum)})/({_fmt(lr)}{damp}) (SGD, heavy-ball momentum)"
        decay_text = f" + weight_decay {_fmt(decay)}" if decay else ""
        return (
            f"Edge of stability reached: {self.monitor} = {_fmt(value)}{decay_text} >= ratio {_fmt(self.ratio)} x "
            f"threshold {_fmt(threshold)} = {formula}; lambda_max*lr/2 = {_fmt(value * lr / 2)}. "
            "Signaling Trainer to stop."
        )

    def _check_trend(self, epoch: int) -> tuple[bool, str | None, SharpnessStoppingReason]:
        not_stopped = False, None, SharpnessStoppingReason.NOT_STOPPED
        if len(self.history) < self.window:
            return not_stopped
        xs = [x for x, _ in self.history]
        if len(set(xs)) < 2:
            return not_stopped
        trend = theil_sen(xs, [y for _, y in self.history], confidence=self.confidence)
        self.last_trend = trend
        rise = trend.relative_slope
        if not self._armed:
            if rise <= 0.0:
                self._armed = True
            return not_stopped
        low = relative_slope(trend.low_slope, trend.level)
        if math.isfinite(rise) and rise > self.min_rise and low > 0:
            self.wait_count += 1
        else:
            self.wait_count = 0
            return not_stopped
        if self.wait_count < self.patience:
            return not_stopped
        high = relative_slope(trend.high_slope, trend.level)
        return (
            True,
            f"Sharpness {self.monitor} is rising: Theil-Sen slope {100 * rise:+.1f}%/epoch of its level "
            f"{_fmt(trend.level)} ({100 * self.confidence:.0f}% CI [{100 * low:+.1f}%, {100 * high:+.1f}%]) over the "
            f"last {self.window} probes (epochs {int(xs[0])}-{int(xs[-1])}), above "
            f"min_rise={100 * self.min_rise:.1f}%/epoch for {self.wait_count} consecutive checks. "
            "Signaling Trainer to stop.",
            SharpnessStoppingReason.RISING_TREND,
        )

    # ---------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            {
                "sharpness_reason": self.sharpness_reason.value,
                "best_epoch": self.best_epoch,
                "history": [list(p) for p in self.history],
                "last_probe_count": self._last_probe_count,
                "num_fresh": self._num_fresh,
                "armed": self._armed,
                "nonfinite_loss": list(self._nonfinite_loss) if self._nonfinite_loss is not None else None,
                "stopped": self._stopped,
                "flattest_state": self._flattest_state if self.restore_flattest else None,
            }
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.sharpness_reason = SharpnessStoppingReason(
            state_dict.get("sharpness_reason", SharpnessStoppingReason.NOT_STOPPED.value)
        )
        self.best_epoch = int(state_dict.get("best_epoch", -1))
        self.history = [(float(x), float(y)) for x, y in state_dict.get("history", [])][-self.window :]
        self._last_probe_count = state_dict.get("last_probe_count")
        self._num_fresh = int(state_dict.get("num_fresh", 0))
        self._armed = bool(state_dict.get("armed", not self.wait_for_plateau))
        loss = state_dict.get("nonfinite_loss")
        self._nonfinite_loss = (int(loss[0]), float(loss[1])) if loss is not None else None
        self._stopped = bool(state_dict.get("stopped", False))
        flat = state_dict.get("flattest_state")
        self._flattest_state = copy.copy(flat) if flat is not None else None

