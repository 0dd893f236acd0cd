r"""The loss closure: a model's loss over fixed batches, at its own weights or at any other point.

Every measurement in :mod:`lightning_geometry.functional` sees the empirical risk

.. math::
    L(\theta) = \frac{1}{N} \sum_b n_b \, \ell(\theta; B_b), \qquad N = \sum_b n_b,

the size-weighted mean of ``loss_fn(model, batch)`` over the batches, so that a measurement over a dataloader
equals one over the concatenated data when ``loss_fn`` is a mean over its batch (the normalization curvlinops
uses in ``_get_normalization_factor``).

Points other than the model's own weights are evaluated through :func:`torch.func.functional_call` on new
tensors: the model's parameters are never written, its buffers are replaced by clones for the call (so BatchNorm
running statistics stay as they are even in train mode), and ``.grad`` is never touched because derivatives are
taken with :func:`torch.autograd.grad` with respect to detached leaves.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_geometry.functional.params import trainable_parameters

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar Tensor``: the batch's mean loss of ``model``."""


class _LossModule(nn.Module):
    """Wraps ``model`` and ``loss_fn`` so that ``functional_call`` can swap the model's tensors for the loss."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


def _is_single_batch(batches: Any) -> bool:
    if isinstance(batches, (Tensor, Mapping)):
        return True
    return isinstance(batches, (tuple, list)) and len(batches) > 0 and isinstance(batches[0], Tensor)


def as_batch_list(batches: Any) -> list[Any]:
    """Normalize ``batches`` to a list of batches.

    A single batch is a Tensor, a mapping, or a tuple/list whose first element is a Tensor (``(x, y)``). Anything
    else is taken as an iterable of batches (a list of such tuples, a ``DataLoader``).

    Raises:
        ValueError: If there is no batch, or a batch holds no tensor.
        TypeError: If ``batches`` is neither a batch nor an iterable of batches.
    """
    if _is_single_batch(batches):
        out = [batches]
    elif isinstance(batches, Iterable):
        out = list(batches)
    else:
        raise TypeError(f"batches must be a batch or an iterable of batches, got {type(batches).__name__}")
    if not out:
        raise ValueError("batches is empty: pass at least one batch")
    for batch in out:
        batch_size(batch)
    return out


def _tensors(batch: Any) -> Iterator[Tensor]:
    if isinstance(batch, Tensor):
        yield batch
    elif isinstance(batch, Mapping):
        for v in batch.values():
            yield from _tensors(v)
    elif isinstance(batch, (tuple, list)):
        for v in batch:
            yield from _tensors(v)


def batch_size(batch: Any) -> int:
    """Number of samples in a batch: the leading dimension of its first tensor.

    Raises:
        ValueError: If the batch holds no tensor with a leading dimension, or that dimension is 0.
    """
    first = next((t for t in _tensors(batch) if t.dim() > 0), None)
    if first is None:
        raise ValueError(f"a batch must hold at least one tensor with a batch dimension, got {type(batch).__name__}")
    if first.shape[0] == 0:
        raise ValueError("a batch has 0 samples")
    return int(first.shape[0])


def check_batches_device(batches: list[Any], params: Mapping[str, Tensor]) -> None:
    """Raise a ``ValueError`` if a floating batch tensor lives on another device or dtype than the parameters."""
    ref = next(iter(params.values()))
    for batch in batches:
        for t in _tensors(batch):
            if t.device != ref.device:
                raise ValueError(f"batch tensor is on device {t.device}, but the model is on {ref.device}")
            if t.is_floating_point() and t.dtype != ref.dtype:
                raise ValueError(f"batch tensor has dtype {t.dtype}, but the model's parameters are {ref.dtype}")


def check_loss(loss: Any) -> Tensor:
    """Check that ``loss_fn`` returned a scalar tensor; a non-finite value is allowed (callers flag it).

    Raises:
        TypeError: If the loss is not a Tensor.
        ValueError: If the loss is not a scalar.
    """
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a Tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar loss, got shape {tuple(loss.shape)}")
    return loss.reshape(())


class LossClosure:
    r"""The size-weighted mean loss :math:`L(\theta)` of a model over fixed batches, as a function of ``params``.

    Args:
        model: The module whose loss is measured. Its tensors are never modified.
        loss_fn: ``loss_fn(model, batch) -> scalar Tensor``.
        batches: One batch or an iterable of batches (see :func:`as_batch_list`).

    Attributes:
        loss_fn: The loss function.
        params: The trainable parameters, detached (they share the model's storage; nothing writes to them).
        weights: ``n_b / N`` for each batch.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, batches: Any) -> None:
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        self.model = model
        self.batches = as_batch_list(batches)
        self.params = {k: p.detach() for k, p in trainable_parameters(model).items()}
        check_batches_device(self.batches, self.params)
        sizes = [batch_size(b) for b in self.batches]
        total = sum(sizes)
        self.weights = [n / total for n in sizes]
        self.num_samples = total
        self.loss_fn = loss_fn
        self._wrapper = _LossModule(model, loss_fn)

    def batch_loss(
        self, params: Mapping[str, Tensor], batch: Any, buffers: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """Loss of one batch at ``params``.

        Args:
            params: The point (trainable parameters by name).
            batch: One batch.
            buffers: Buffers to use as they are (e.g. re-estimated BatchNorm statistics); ``None`` uses clones
                of the model's own, so that they are never updated.
        """
        tensors: dict[str, Tensor] = {f"model.{k}": v for k, v in params.items()}
        if buffers is None:
            buffers = {name: buf.clone() for name, buf in self.model.named_buffers()}
        tensors.update({f"model.{name}": buf for name, buf in buffers.items()})
        return check_loss(torch.func.functional_call(self._wrapper, tensors, (batch,)))

    def with_loss_fn(self, loss_fn: LossFn) -> LossClosure:
        """The same model and batches with another function of them (e.g. an error rate)."""
        return LossClosure(self.model, loss_fn, self.batches)

    def __call__(self, params: Mapping[str, Tensor] | None = None) -> Tensor:
        """:math:`L(\\theta)` at ``params`` (the model's own weights if ``None``), without building a graph."""
        params = self.params if params is None else params
        with torch.no_grad():
            return sum(w * self.batch_loss(params, b) for w, b in zip(self.weights, self.batches))


@contextlib.contextmanager
def measurement(model: nn.Module, train_mode: bool = False) -> Iterator[None]:
    """Context for one measurement: grad on, eval mode (unless ``train_mode``), every global RNG stream restored.

    On exit each submodule's ``training`` flag is restored, and so are the torch (CPU and CUDA), numpy and python
    RNG states, so that a measurement never shifts the random stream a training run consumes.
    """
    modes = {m: m.training for m in model.modules()}
    np_state = np.random.get_state()
    py_state = random.getstate()
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
        try:
            model.train(train_mode)
            yield
        finally:
            for m, mode in modes.items():
                m.training = mode
            np.random.set_state(np_state)
            random.setstate(py_state)


def is_finite(value: float | Tensor) -> bool:
    """``True`` if ``value`` is neither nan nor infinite."""
    return math.isfinite(float(value))
