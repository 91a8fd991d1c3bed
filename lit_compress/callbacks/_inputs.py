"""Model inputs for measurements and BatchNorm re-estimation, taken from what the Trainer already has,
and the torch RNG states that keep such extra data passes from shifting training.

The convention for what an input is (tensor, positional tuple/list, keyword dict) lives in
:mod:`lit_compress.inputs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lit_compress.inputs import batch_inputs, first_samples, inputs_to


@contextlib.contextmanager
def isolated_rng() -> Iterator[None]:
    """Restore the CPU (and CUDA) torch RNG afterwards, so extra data passes do not shift training."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def rng_states() -> dict[str, Any]:
    """torch's CPU (and, once initialised, CUDA) generator states, as tensors (``weights_only``-loadable)."""
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def train_batches(trainer: pl.Trainer, limit: int) -> Iterator[Any]:
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


def example_inputs(trainer: pl.Trainer | None, module: nn.Module, cached: Any = None, n: int = 2) -> Any:
    """A small input for tracing and measuring: ``example_input_array``, a cached batch, or one drawn.

    Returns ``None`` when no input can be found (no example array and no training data).
    """
    device = getattr(module, "device", None)
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return inputs_to(example, device)
    if cached is not None:
        return inputs_to(cached, device)
    if trainer is None:
        return None
    with isolated_rng():
        for batch in train_batches(trainer, 1):
            return first_samples(batch_inputs(batch), n)
    return None
