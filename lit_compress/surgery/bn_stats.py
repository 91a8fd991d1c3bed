"""Re-estimate BatchNorm running statistics after surgery, from data.

Structural changes (merging, decomposition, collapse) change the activations that each BatchNorm
sees, so its running mean and variance go stale. :func:`reestimate_batchnorm_` resets them and
recomputes them as a cumulative average over a number of batches, with only the BatchNorms in
train mode (dropout stays off) and gradients disabled.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from lit_compress.errors import ConfigError
from lit_compress.inputs import batch_inputs, module_call
from lit_compress.surgery.modules import preserve_mode

Forward = Callable[[nn.Module, Any], Any]


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` contains any BatchNorm (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, lazy variants)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def batchnorm_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(name, running_mean, running_var, num_batches_tracked)`` of every BatchNorm that tracks statistics.

    The tensors are the live buffers (shapes ``(C,)``, ``(C,)``, ``()``), so an in-place
    ``all_reduce`` of mean and variance under DDP updates the model directly.
    """
    found = []
    for name, m in model.named_modules():
        if not isinstance(m, _BatchNorm):
            continue
        mean, var, count = m.running_mean, m.running_var, m.num_batches_tracked
        if mean is not None and var is not None and count is not None:  # all three, or none, exist
            found.append((name, mean, var, count))
    return found


def default_forward(model: nn.Module, batch: Any) -> Any:
    """The model called on a batch's input (:func:`lit_compress.inputs.batch_inputs`: ``batch[0]`` of a
    tuple/list), under :mod:`lit_compress.inputs`' convention, tensors moved to the model's device."""
    return module_call(model, batch_inputs(batch))


def reestimate_batchnorm_(
    model: nn.Module,
    batches: Iterable[Any],
    forward: Forward | None = None,
    num_batches: int = 50,
) -> int:
    """Recompute every BatchNorm's running statistics from ``batches``, in place.

    Running stats are reset and BN ``momentum`` is set to ``None`` (cumulative average) while up to
    ``num_batches`` batches run forward under ``torch.no_grad()``, with only the BatchNorms in train
    mode. Every module's train/eval flag and every BN's momentum are restored afterwards. If the
    forward raises or ``batches`` is empty (a warning), the old statistics are put back.

    Args:
        model: The model.
        batches: An iterable of batches, e.g. a ``DataLoader``.
        forward: ``forward(model, batch)``; defaults to :func:`default_forward`.
        num_batches: Most batches to use; must be >= 1.

    Returns:
        The number of batches used (``0`` if the model has no BatchNorm tracking statistics).

    Raises:
        ConfigError: If ``num_batches`` is not a positive int.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ConfigError(f"`num_batches`={num_batches!r} is not allowed: expected an int >= 1.")
    run = forward if forward is not None else default_forward
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.running_mean is not None]
    if not bns:
        return 0
    saved = [(m.momentum, {k: b.clone() for k, b in m._buffers.items() if b is not None}) for m in bns]
    used = 0
    try:
        with preserve_mode(model), torch.no_grad():
            model.eval()
            for m in bns:
                m.reset_running_stats()
                m.momentum = None
                m.train()
            for batch in itertools.islice(batches, num_batches):
                run(model, batch)
                used += 1
    except BaseException:
        _restore(bns, saved, buffers=True)
        raise
    _restore(bns, saved, buffers=used == 0)
    if used == 0:
        warnings.warn("`batches` yielded no batch: BatchNorm statistics were left unchanged.", stacklevel=2)
    return used


def _restore(bns: list[_BatchNorm], saved: list[tuple[float | None, dict[str, torch.Tensor]]], buffers: bool) -> None:
    for m, (momentum, old) in zip(bns, saved):
        m.momentum = momentum
        if buffers:
            for k, b in old.items():
                live = m._buffers[k]
                if live is not None:  # only buffers that existed were saved
                    live.copy_(b)
