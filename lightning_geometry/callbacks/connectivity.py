r"""
Mode connectivity
^^^^^^^^^^^^^^^^^

Whether the final weights and a reference lie in one basin: the loss (and error) barrier on the straight line
between them, on the line after aligning the reference's hidden units to the final weights (weight matching,
Ainsworth et al. 2023), and on a trained quadratic Bezier curve (Garipov et al. 2018). BatchNorm statistics are
re-estimated at every point of every path. A low aligned barrier with a high linear one says "same basin up to a
permutation of units"; a high barrier after alignment and along the curve says "different basins" (or that the
curve needs more training). The math is in :mod:`lightning_geometry.functional.connectivity`.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_geometry import plotting
from lightning_geometry.callbacks._base import GeometryConfigurationError
from lightning_geometry.callbacks._after_fit import AfterFitCallback, _check_int, _check_positive, _Progress
from lightning_geometry.functional.closure import LossClosure, LossFn, as_batch_list, measurement
from lightning_geometry.functional.connectivity import (
    BezierCurve,
    PathResult,
    apply_permutation,
    fit_bezier,
    interpolation_barrier,
    permutation_spec,
    weight_matching,
)
from lightning_geometry.functional.params import check_same_structure, param_norm, param_sub
from lightning_geometry.probe import ProbeData, import_from_path

log = logging.getLogger(__name__)

__all__ = ["ModeConnectivity", "ModeConnectivityResult", "classification_error"]

Reference = int | str | Mapping[str, Tensor] | nn.Module


def classification_error(module: nn.Module, batch: Any) -> Tensor:
    """Misclassification rate of ``module(x)`` (logits ``N × C``) against integer labels ``y`` for ``batch = (x, y)``.

    Raises:
        ValueError: If the batch is not ``(x, y, ...)`` with integer labels and 2-D logits of matching length.
    """
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise ValueError(f"classification_error needs a batch (x, y), got {type(batch).__name__}")
    x, y = batch[0], batch[1]
    if not isinstance(y, Tensor) or y.is_floating_point():
        raise ValueError("classification_error needs integer class labels y")
    logits = module(x)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != y.shape[0]:
        raise ValueError("classification_error needs 2-D logits (N x C) from module(x)")
    return (logits.argmax(dim=1) != y).to(torch.float64 if logits.dtype == torch.float64 else torch.float32).mean()


def _same_loss(a: float, b: float) -> bool:
    """Equal up to float rounding (a permutation of units reorders sums), or both non-finite."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return not math.isfinite(a) and not math.isfinite(b)
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6)


@dataclass
class ModeConnectivityResult:
    """What :class:`ModeConnectivity` measured between the final weights (t = 0) and the reference (t = 1).

    Attributes:
        linear: Loss (and error) on the straight line.
        aligned: The same after weight matching the reference to the final weights (``None`` if the architecture
            is not a supported Linear/Conv chain, or alignment is off).
        curve: Loss (and error) on the trained Bezier curve (``None`` if ``bezier_steps == 0``).
        bezier: The fitted curve (bend and training losses).
        permutations: The hidden-unit permutations found (``None`` without alignment).
        permuted_fraction: Fraction of hidden units that the alignment moved.
        distance_rel: :math:`\\lVert\\theta - \\theta_{ref}\\rVert / \\lVert\\theta\\rVert`.
        distance_rel_aligned: The same after alignment.
        reference: A description of the reference.
        seconds: Wall-clock time.
        files: Paths written, if any.
    """

    linear: PathResult
    aligned: PathResult | None
    curve: PathResult | None
    bezier: BezierCurve | None
    permutations: dict[str, Tensor] | None
    permuted_fraction: float
    distance_rel: float
    distance_rel_aligned: float
    reference: str
    seconds: float = math.nan
    files: dict[str, str] = field(default_factory=dict)


class ModeConnectivity(AfterFitCallback):
    r"""At the end of the fit, measure loss barriers between the final weights and a reference.

    Paths from the final weights :math:`\theta` (t = 0) to the reference :math:`\theta_{ref}` (t = 1):

    * ``linear``: :math:`\theta + t(\theta_{ref} - \theta)`;
    * ``aligned``: the same after permuting the reference's hidden units to match :math:`\theta` (weight matching,
      Ainsworth et al. 2023) — only for chains of Linear layers, or Conv layers then Linear layers (BatchNorm
      allowed); other architectures skip it with a warning;
    * ``curve``: a quadratic Bezier curve with one bend trained for ``bezier_steps`` steps on the probe data
      (Garipov et al. 2018), in functional form (no model rewrite).

    BatchNorm statistics are re-estimated at each point on the probe data (``reestimate_bn``). Logged through
    every logger's ``log_metrics``: ``geometry/barrier`` (linear), ``barrier_aligned``, ``barrier_curve``, the
    ``error_barrier*`` counterparts when an error function is available, ``connectivity_distance_rel`` and
    ``connectivity_permuted_fraction``; the figure ``geometry/connectivity`` (loss and error along each path) goes
    to TensorBoard; ``connectivity.npz`` and ``connectivity.json`` are written atomically under ``save_dir``.

    Args:
        reference: ``"init"`` (the weights at the start of the fit), an int ``k`` (the weights at the end of
            epoch ``k``, 0-based), a checkpoint path (a Lightning checkpoint or a saved state dict), a state dict,
            or a module with the same parameter names and shapes. A string of digits (as a command line gives it)
            is an epoch index.
        num_points: Points per path, ends included (>= 3).
        align: Also measure the aligned barrier.
        bezier_steps: Training steps of the Bezier bend (0: no curve).
        bezier_lr: Learning rate of the bend (> 0).
        bezier_optimizer: ``"adam"`` or ``"sgd"``.
        error_fn: ``error_fn(module, batch) -> Tensor`` for the error barrier, an import path, ``"auto"``
            (:func:`classification_error` if it works on the first probe batch, else none), or ``None``.
        reestimate_bn: Re-estimate BatchNorm statistics at each point (else interpolate the stored ones).
        eval_data: Data on which the loss and error along the paths are measured (e.g. a validation loader, for
            a test-error barrier); ``None`` measures on the probe data. BatchNorm statistics are re-estimated and
            the Bezier bend is trained on the probe (training) data either way.
        eval_batches: Use only the first ``eval_batches`` batches of ``eval_data`` (``None``: all).
        loss_fn: ``loss_fn(module, batch)``, an import path, or ``None`` (see
            :func:`lightning_geometry.probe.resolve_loss_fn`).
        probe_data: Data to measure on (and to re-estimate BatchNorm and train the bend on); ``None`` draws
            ``probe_batches`` training batches at fit start.
        probe_batches: Number of probe batches (>= 1).
        probe_batch_size: Samples per drawn batch.
        seed: Seed of the private generators (probe batches, Bezier sampling, alignment order).
        train_mode: Measure in train mode instead of eval.
        log_key_prefix: Prefix of the logged names.
        save_dir: Directory for the files; ``<trainer.log_dir>/geometry`` if ``None``.
        save: Write the files at the end of the fit.
        progress: Show a progress bar; ``None`` shows one when the Trainer has a progress bar.

    Attributes:
        result: The last :class:`ModeConnectivityResult`.

    Raises:
        GeometryConfigurationError: (a ``ValueError``) at construction for ``num_points < 3``, a negative
            ``bezier_steps``, ``bezier_lr <= 0``, a negative epoch, an unknown optimizer.
        TypeError: For a reference of another type.
        ValueError: At measurement, if the reference's parameter names or shapes differ (naming the first).

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[ModeConnectivity(reference="other_run.ckpt")])
        trainer.fit(model, datamodule)
        res = trainer.callbacks[0].result
        print(res.linear.barrier, res.aligned.barrier, res.curve.barrier)

    .. note:: The ``"init"`` and epoch references keep a CPU copy of the weights (one model's size), also in
        the callback's checkpoint state.
    """

    probe_name: ClassVar[str] = "connectivity"

    def __init__(
        self,
        reference: Reference = "init",
        num_points: int = 21,
        align: bool = True,
        bezier_steps: int = 200,
        bezier_lr: float = 1e-2,
        bezier_optimizer: Literal["adam", "sgd"] = "adam",
        error_fn: LossFn | str | None = "auto",
        reestimate_bn: bool = True,
        eval_data: Any = None,
        eval_batches: int | None = None,
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
        super().__init__(
            loss_fn=loss_fn,
            probe_data=probe_data,
            probe_batches=probe_batches,
            probe_batch_size=probe_batch_size,
            seed=seed,
            train_mode=train_mode,
            log_key_prefix=log_key_prefix,
            save_dir=save_dir,
            save=save,
            progress=progress,
        )
        if isinstance(reference, bool) or not isinstance(reference, (str, int, Mapping, nn.Module, os.PathLike)):
            raise TypeError(
                "`reference` must be 'init', an epoch index, a checkpoint path, a state dict or a module, got "
                f"{type(reference).__name__}"
            )
        if isinstance(reference, str) and reference.strip().lstrip("-").isdigit():
            reference = int(reference)  # "3" from a command line means epoch 3, not a file named "3"
        if isinstance(reference, int) and reference < 0:
            raise GeometryConfigurationError(f"`reference` epoch must be >= 0, got {reference}")
        if isinstance(reference, (str, os.PathLike)) and not str(reference):
            raise GeometryConfigurationError("`reference` path is empty")
        self.reference = reference
        self.num_points = _check_int("num_points", num_points, 3)
        self.align = bool(align)
        self.bezier_steps = _check_int("bezier_steps", bezier_steps, 0)
        self.bezier_lr = _check_positive("bezier_lr", bezier_lr)
        if bezier_optimizer not in ("adam", "sgd"):
            raise GeometryConfigurationError(f"`bezier_optimizer` must be 'adam' or 'sgd', got {bezier_optimizer!r}")
        self.bezier_optimizer = bezier_optimizer
        if error_fn is not None and not (callable(error_fn) or isinstance(error_fn, str)):
            raise TypeError(
                f"`error_fn` must be a callable, an import path, 'auto' or None, got {type(error_fn).__name__}"
            )
        self.error_fn = error_fn
        self.reestimate_bn = bool(reestimate_bn)
        if eval_batches is not None:
            _check_int("eval_batches", eval_batches, 1)
        self.eval_data = eval_data
        self.eval_batches = eval_batches
        self._eval_probe = (
            ProbeData(eval_data, num_batches=eval_batches or sys.maxsize, seed=seed) if eval_data is not None else None
        )
        self._eval_override: list[Any] | None = None
        self._snapshot: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------------------------------ reference
    def _uses_snapshot(self) -> bool:
        return self.reference == "init" or isinstance(self.reference, int)

    @staticmethod
    def _state_of(module: nn.Module) -> dict[str, Tensor]:
        state = module.state_dict(keep_vars=True)
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items() if isinstance(v, Tensor)}

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self._eval_probe is not None and not trainer.fast_dev_run:
            self._eval_probe.prepare(trainer, pl_module)
        if self.reference == "init" and self._snapshot is None:  # a resumed fit keeps the restored snapshot
            self._snapshot = self._state_of(pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if isinstance(self.reference, int) and not isinstance(self.reference, bool):
            if trainer.current_epoch == self.reference and not trainer.sanity_checking:
                self._snapshot = self._state_of(pl_module)

    @property
    @override
    def state_key(self) -> str:
        ref = self.reference
        described = ref if isinstance(ref, (str, int)) else os.fspath(ref) if isinstance(ref, os.PathLike) else (
            f"{type(ref).__name__}@{id(ref):x}"
        )
        return self._generate_state_key(reference=described, log_key_prefix=self.log_key_prefix)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": self._snapshot} if self._snapshot is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshot = state_dict.get("snapshot")

    def _reference_state(self) -> tuple[dict[str, Tensor], str]:
        ref = self.reference
        if isinstance(ref, nn.Module):
            return self._state_of(ref), f"module {type(ref).__name__}"
        if isinstance(ref, Mapping):
            state = ref.get("state_dict", ref) if isinstance(ref.get("state_dict"), Mapping) else ref
            return dict(state), "state dict"
        if self._uses_snapshot():
            if self._snapshot is None:
                what = "the start of the fit" if ref == "init" else f"the end of epoch {ref}"
                raise RuntimeError(f"ModeConnectivity: no snapshot of {what} was taken (the fit did not reach it)")
            return self._snapshot, "initial weights" if ref == "init" else f"epoch {ref}"
        path = os.fspath(ref)
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise ValueError(f"reference checkpoint {path!r} does not exist") from err
        except Exception as err:  # noqa: BLE001 - unpickling errors come in many types
            raise ValueError(
                f"reference checkpoint {path!r} could not be loaded with weights_only=True ({err}); load it yourself "
                "and pass the state dict"
            ) from err
        if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise ValueError(f"reference checkpoint {path!r} holds a {type(obj).__name__}, not a state dict")
        return dict(obj), f"checkpoint {path}"

    def compute(
        self,
        module: nn.Module,
        data: Any,
        *,
        eval_data: Any = None,
        save_dir: str | os.PathLike[str] | None = None,
        progress: bool = False,
    ) -> ModeConnectivityResult:
        """Measure ``module`` against the reference on demand (see :meth:`AfterFitCallback.compute`).

        ``data`` is used for BatchNorm re-estimation, the Bezier bend and (without ``eval_data``) the paths;
        ``eval_data`` (a DataLoader, batches or one batch), if given, for the loss and error along the paths.
        """
        if eval_data is not None:
            from lightning.fabric.utilities.apply_func import move_data_to_device

            device = next(module.parameters()).device
            with measurement(module, train_mode=self.train_mode):
                self._eval_override = [move_data_to_device(b, device) for b in as_batch_list(eval_data)]
        try:
            return super().compute(module, data, save_dir=save_dir, progress=progress)
        finally:
            self._eval_override = None

    def _eval_batches(self) -> list[Any] | None:
        if self._eval_override is not None:
            return self._eval_override
        if self._eval_probe is not None and self._eval_probe.is_prepared:
            return self._eval_probe.batches
        return None

    def _resolve_error_fn(self, module: nn.Module, batch: Any) -> LossFn | None:
        fn = self.error_fn
        if fn is None:
            return None
        if fn == "auto":
            try:
                with torch.no_grad():
                    classification_error(module, batch)
            except Exception:  # noqa: BLE001 - "auto" means: use it if it works
                return None
            return classification_error
        if isinstance(fn, str):
            fn = import_from_path(fn)
            if not callable(fn):
                raise ValueError(f"error_fn={self.error_fn!r} does not name a callable")
        return fn

    # ------------------------------------------------------------------------------------------ measurement
    def _compute(
        self, module: nn.Module, batches: list[Any], loss_fn: LossFn, progress: bool
    ) -> ModeConnectivityResult:
        closure = LossClosure(module, loss_fn, batches)
        eval_batches = self._eval_batches()
        measure = closure if eval_batches is None else LossClosure(module, loss_fn, eval_batches)
        theta = closure.params
        state, description = self._reference_state()
        missing = [k for k in theta if k not in state]
        if missing:
            extra = [k for k in state if k not in dict(module.named_parameters())]
            raise ValueError(
                f"reference ({description}) has different parameter names: missing {missing[:3]}, unexpected "
                f"{extra[:3]}"
            )
        ref = {k: state[k].to(device=theta[k].device, dtype=theta[k].dtype) for k in theta}
        check_same_structure(theta, ref, what=f"reference ({description})")
        own_buffers = {k: b.detach() for k, b in module.named_buffers()}
        ref_buffers = {
            k: (state[k].to(device=b.device, dtype=b.dtype) if k in state and state[k].shape == b.shape else b)
            for k, b in own_buffers.items()
        }
        error_fn = self._resolve_error_fn(module, measure.batches[0])
        n = self.num_points
        total = n * (3 if self.align else 2) + self.bezier_steps
        bar = _Progress(progress, total, type(self).__name__)
        common = {
            "num_points": n,
            "error_fn": error_fn,
            "reestimate": self.reestimate_bn,
            "bn_batches": batches,
            "progress": bar.update,
        }
        try:
            linear = interpolation_barrier(measure, None, ref, buffers_b=ref_buffers, **common)
            aligned = perms = None
            permuted_fraction = math.nan
            ref_aligned = ref
            if self.align:
                try:
                    spec = permutation_spec(module)
                except (TypeError, ValueError) as err:
                    rank_zero_warn(f"ModeConnectivity: no alignment for this architecture ({err})")
                else:
                    perms = weight_matching(theta, ref, spec, seed=self.seed)
                    moved = apply_permutation({**ref, **ref_buffers}, spec, perms)
                    ref_aligned = {k: moved[k] for k in ref}
                    aligned = interpolation_barrier(
                        measure, None, ref_aligned, buffers_b={k: moved[k] for k in ref_buffers}, **common
                    )
                    if not _same_loss(linear.losses[-1], aligned.losses[-1]):
                        # a permutation must not change the function: the module is not the plain chain its
                        # registration order suggests (skip connections, reordered layers); drop the alignment
                        rank_zero_warn(
                            "ModeConnectivity: the aligned reference's loss "
                            f"({aligned.losses[-1]:.6g}) differs from the reference's ({linear.losses[-1]:.6g}), "
                            "so the module is not a plain Linear/Conv chain in registration order; no aligned barrier"
                        )
                        aligned = perms = None
                        ref_aligned = ref
                units = sum(spec.sizes.values()) if perms is not None else 0
                if perms is not None:
                    changed = sum(int((p != torch.arange(p.numel())).sum()) for p in perms.values())
                    permuted_fraction = changed / units if units else 0.0
            bezier = None
            if self.bezier_steps:
                bezier = fit_bezier(
                    closure,
                    None,
                    ref,
                    steps=self.bezier_steps,
                    lr=self.bezier_lr,
                    optimizer=self.bezier_optimizer,
                    seed=self.seed,
                    eval_closure=measure,
                    **common,
                )
        finally:
            bar.close()
        norm = float(param_norm(theta))
        return ModeConnectivityResult(
            linear=linear,
            aligned=aligned,
            curve=None if bezier is None else bezier.path,
            bezier=bezier,
            permutations=perms,
            permuted_fraction=permuted_fraction,
            distance_rel=float(param_norm(param_sub(ref, theta))) / norm if norm else math.nan,
            distance_rel_aligned=float(param_norm(param_sub(ref_aligned, theta))) / norm if norm else math.nan,
            reference=description,
        )

    # ------------------------------------------------------------------------------------------ outputs
    def _paths(self, result: ModeConnectivityResult) -> dict[str, PathResult]:
        paths = {"linear": result.linear}
        if result.aligned is not None:
            paths["aligned"] = result.aligned
        if result.curve is not None:
            paths["curve"] = result.curve
        return paths

    def _scalars(self, result: ModeConnectivityResult) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, path in self._paths(result).items():
            suffix = "" if name == "linear" else f"_{name}"
            out[f"barrier{suffix}"] = path.barrier
            if path.error_barrier is not None:
                out[f"error_barrier{suffix}"] = path.error_barrier
        out["connectivity_distance_rel"] = result.distance_rel
        if result.aligned is not None:
            out["connectivity_permuted_fraction"] = result.permuted_fraction
        return out

    def _figures(self, result: ModeConnectivityResult) -> dict[str, Any]:
        paths = {
            f"{name} (barrier {p.barrier:.3g})": (p.ts, p.losses, p.errors) for name, p in self._paths(result).items()
        }
        return {"connectivity": plotting.paths_figure(paths, title=f"final weights (t=0) to {result.reference} (t=1)")}

    def _arrays(self, result: ModeConnectivityResult) -> dict[str, Any]:
        arrays: dict[str, Any] = {}
        for name, p in self._paths(result).items():
            arrays[f"{name}_ts"] = p.ts
            arrays[f"{name}_losses"] = p.losses
            arrays[f"{name}_errors"] = p.errors
        if result.bezier is not None:
            arrays["bezier_train_losses"] = result.bezier.train_losses
        return arrays

    def _summary(self, result: ModeConnectivityResult) -> dict[str, Any]:
        return {
            "scalars": self._scalars(result),
            "reference": result.reference,
            "paths": {
                name: {"barrier": p.barrier, "barrier_t": p.barrier_t, "error_barrier": p.error_barrier,
                       "bn_reestimated": p.bn_reestimated, "losses": p.losses}
                for name, p in self._paths(result).items()
            },
            "settings": {
                "num_points": self.num_points,
                "align": self.align,
                "bezier_steps": self.bezier_steps,
                "bezier_lr": self.bezier_lr,
                "bezier_optimizer": self.bezier_optimizer,
                "reestimate_bn": self.reestimate_bn,
                "seed": self.seed,
            },
            "seconds": result.seconds,
        }

