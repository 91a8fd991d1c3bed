"""Model inputs for measurements and BatchNorm re-estimation, taken from what the Trainer already has."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn


def batch_inputs(batch: Any) -> Any:
    """The model input of a batch: the first element of a tuple/list, a tensor as is, a dict as is."""
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    return batch


def head(inputs: Any, n: int) -> Any:
    """The first ``n`` samples of an input tensor (or of each tensor in a dict), detached."""
    if isinstance(inputs, torch.Tensor):
        return inputs[:n].detach().clone()
    if isinstance(inputs, dict):
        return {k: head(v, n) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(head(v, n) for v in inputs)
    return inputs


def repeat_to_batch(inputs: Any, batch_size: int) -> Any:
    """An input with ``batch_size`` samples made by repeating the given ones (for latency)."""
    if isinstance(inputs, torch.Tensor):
        reps = -(-batch_size // inputs.shape[0])
        return inputs.repeat(reps, *([1] * (inputs.dim() - 1)))[:batch_size].contiguous()
    if isinstance(inputs, dict):
        return {k: repeat_to_batch(v, batch_size) for k, v in inputs.items()}
    return inputs


def call_model(model: nn.Module, inputs: Any) -> Any:
    """``model(inputs)``, or ``model(**inputs)`` for a dict input."""
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(inputs)


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Restore the CPU (and CUDA) torch RNG afterwards, so extra data passes do not shift training."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def train_batches(trainer: Any, limit: int) -> Iterator[Any]:
    """Up to ``limit`` batches from the training dataloader, moved to the module's device.

    Iterates a fresh iterator of ``trainer.train_dataloader`` (under DDP each rank sees its shard).
    Callers wrap the loop in :func:`isolated_rng`.
    """
    loader = trainer.train_dataloader
    if loader is None:
        return
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()))
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        yield trainer.strategy.batch_to_device(batch)


def example_inputs(trainer: Any, module: nn.Module, cached: Any = None, n: int = 2) -> Any:
    """A small input for tracing and measuring: ``example_input_array``, a cached batch, or one drawn.

    Returns ``None`` when no input can be found (no example array and no training data).
    """
    device = getattr(module, "device", None)
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return _to(example, device)
    if cached is not None:
        return _to(cached, device)
    if trainer is None:
        return None
    with isolated_rng():
        for batch in train_batches(trainer, 1):
            return head(batch_inputs(batch), n)
    return None


def _to(inputs: Any, device: Any) -> Any:
    if device is None:
        return inputs
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device)
    if isinstance(inputs, dict):
        return {k: _to(v, device) for k, v in inputs.items()}
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_to(v, device) for v in inputs)
    return inputs
