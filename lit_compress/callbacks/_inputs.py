"""Model inputs for measurements and BatchNorm re-estimation, taken from what the Trainer already has,
and the torch RNG states that keep such extra data passes from shifting training.

The convention for what an input is (tensor, positional tuple/list, keyword dict) lives in
:mod:`lit_compress.inputs`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import (
    DataLoader,
    DistributedSampler,
    IterableDataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
)

from lit_compress.inputs import batch_inputs, first_samples, inputs_to
from lit_compress.surgery.modules import module_device_dtype


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


def separate_loader(loader: DataLoader, seed: int = 0) -> DataLoader:
    """A DataLoader over ``loader``'s dataset that shares no iterator (and no worker) with it.

    Same dataset, batch size, ``collate_fn`` and ``drop_last``; the sampler is rebuilt in kind
    (sequential, random with its own generator seeded with ``seed``, or distributed with the same
    shard) so that iterating it neither draws from the global RNG nor touches ``loader``'s
    iterator. ``num_workers=0``: iterating ``loader`` itself would reset the iterator that the
    training loop is consuming when ``persistent_workers=True`` (the epoch would end early).
    A custom ``batch_sampler`` is reused as is (iterating it starts a new pass of its own).
    """
    dataset = loader.dataset
    common: dict[str, Any] = {
        "collate_fn": loader.collate_fn,
        "num_workers": 0,
        "pin_memory": False,
        "generator": torch.Generator().manual_seed(seed),  # the iterator's base seed, else drawn globally
    }
    if isinstance(dataset, IterableDataset):
        return DataLoader(dataset, batch_size=loader.batch_size, drop_last=loader.drop_last, **common)
    if loader.batch_size is None:  # a custom batch sampler decides the batches
        return DataLoader(dataset, batch_sampler=loader.batch_sampler, **common)
    sampler = loader.sampler
    new_sampler: Sampler[Any] | Iterable[Any]
    if isinstance(sampler, DistributedSampler):
        new_sampler = DistributedSampler(
            dataset,
            num_replicas=sampler.num_replicas,
            rank=sampler.rank,
            shuffle=sampler.shuffle,
            seed=sampler.seed,
            drop_last=sampler.drop_last,
        )
        new_sampler.set_epoch(sampler.epoch)
    elif isinstance(sampler, RandomSampler):
        new_sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    elif isinstance(sampler, SequentialSampler):
        new_sampler = SequentialSampler(dataset)  # type: ignore[arg-type]
    else:  # another sampler: a new pass over it (it keeps its own state)
        new_sampler = sampler
    return DataLoader(dataset, batch_size=loader.batch_size, sampler=new_sampler, drop_last=loader.drop_last, **common)


def train_batches(trainer: pl.Trainer, limit: int) -> Iterator[Any]:
    """Up to ``limit`` batches from the training data, moved to the module's device and converted by the
    precision plugin as the training loop does (floating tensors become bfloat16 under ``bf16-true``).

    Drawn from a :func:`separate_loader` over ``trainer.train_dataloader``'s dataset (under DDP
    each rank sees its shard), never from the training loop's own iterator. Callers wrap the
    loop in :func:`isolated_rng`.
    """
    loader = trainer.train_dataloader
    if loader is None:
        return
    if isinstance(loader, (list, tuple)):
        loader = loader[0]
    elif isinstance(loader, dict):
        loader = next(iter(loader.values()))
    if isinstance(loader, DataLoader):
        loader = separate_loader(loader)
    for i, batch in enumerate(loader):
        if i >= limit:
            break
        yield trainer.precision_plugin.convert_input(trainer.strategy.batch_to_device(batch))


def example_inputs(trainer: pl.Trainer | None, module: nn.Module, cached: Any = None, n: int = 2) -> Any:
    """A small input for tracing and measuring: ``example_input_array``, a cached batch, or one drawn.

    Tensors are moved to the module's device, and floating ones cast to its parameters' floating
    dtype (under ``*-true`` precision the module is bfloat16/float16 while inputs start float32).
    Returns ``None`` when no input can be found (no example array and no training data).
    """
    device, dtype = module_device_dtype(module)
    example = getattr(module, "example_input_array", None)
    if example is not None:
        return inputs_to(example, device, dtype)
    if cached is not None:
        return inputs_to(cached, device, dtype)
    if trainer is None:
        return None
    with isolated_rng():
        for batch in train_batches(trainer, 1):
            return inputs_to(first_samples(batch_inputs(batch), n), device, dtype)
    return None
