"""Example inputs: one convention for every measurement, trace and re-estimation (pure torch, ground floor).

Lightning's convention for ``LightningModule.example_input_array`` is used everywhere:

- a tensor is one positional argument: ``model(x)``;
- a tuple or list holds the positional arguments: ``model(*inputs)``;
- a dict holds keyword arguments: ``model(**inputs)``.

Nested containers inside those are walked with ``torch.utils._pytree`` (tensors anywhere inside
are moved, sliced or repeated); non-tensor leaves are passed through unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from lit_compress.errors import allowed

__all__ = [
    "ExampleInputs",
    "batch_inputs",
    "batch_size_of",
    "call_with",
    "describe_inputs",
    "first_samples",
    "inputs_to",
    "map_tensors",
    "module_call",
    "rebatch",
    "split_inputs",
    "tensors_of",
]

#: A tensor, a tuple/list of positional arguments, or a dict of keyword arguments.
ExampleInputs = Any


def split_inputs(inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``inputs`` as ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    Raises:
        ConfigError: If ``inputs`` is ``None``.
    """
    if inputs is None:
        raise allowed("example_inputs", None, "a tensor, a tuple/list of positional arguments or a dict of kwargs")
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def call_with(model: Callable[..., Any], inputs: ExampleInputs) -> Any:
    """``model(*args, **kwargs)`` for ``inputs`` under the convention above."""
    args, kwargs = split_inputs(inputs)
    return model(*args, **kwargs)


def map_tensors(inputs: ExampleInputs, fn: Callable[[torch.Tensor], Any]) -> ExampleInputs:
    """``inputs`` with ``fn`` applied to every tensor inside (containers rebuilt, other leaves kept)."""
    return pytree.tree_map_only(torch.Tensor, fn, inputs)


def tensors_of(inputs: ExampleInputs) -> list[torch.Tensor]:
    """Every tensor inside ``inputs``, in pytree order."""
    return [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]


def inputs_to(inputs: ExampleInputs, device: torch.device | str | None, dtype: torch.dtype | None = None) -> Any:
    """``inputs`` with every tensor on ``device``; floating tensors also cast to ``dtype`` if given."""

    def move(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device) if device is not None else t

    return map_tensors(inputs, move)


def batch_size_of(inputs: ExampleInputs) -> int:
    """The batch: the first dimension of the first tensor with at least one dimension (1 if none)."""
    for t in tensors_of(inputs):
        if t.dim() > 0:
            return int(t.shape[0])
    return 1


def rebatch(inputs: ExampleInputs, batch_size: int) -> ExampleInputs:
    """Slice or repeat every batched tensor to ``batch_size`` along dim 0.

    Tensors whose first dimension is not the batch (masks, tables) are left alone.
    """
    current = batch_size_of(inputs)

    def fit(t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 0 or t.shape[0] != current or current == batch_size:
            return t
        if batch_size < current:
            return t[:batch_size]
        reps = math.ceil(batch_size / current)
        return t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].contiguous()

    return map_tensors(inputs, fit)


def first_samples(inputs: ExampleInputs, n: int) -> ExampleInputs:
    """The first ``n`` samples of every batched tensor, detached and copied (for a cached example)."""
    current = batch_size_of(inputs)

    def take(t: torch.Tensor) -> torch.Tensor:
        if t.dim() > 0 and t.shape[0] == current:
            t = t[:n]
        return t.detach().clone()

    return map_tensors(inputs, take)


def describe_inputs(inputs: ExampleInputs) -> str:
    """A short description for error messages, e.g. ``"Tensor[4, 16] float32"``."""
    if isinstance(inputs, torch.Tensor):
        return f"Tensor{list(inputs.shape)} {str(inputs.dtype).replace('torch.', '')}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {describe_inputs(v)}" for k, v in inputs.items()) + "}"
    if isinstance(inputs, (tuple, list)):
        return "(" + ", ".join(describe_inputs(v) for v in inputs) + ")"
    return type(inputs).__name__


def module_call(model: nn.Module, inputs: ExampleInputs) -> Any:
    """``call_with`` on a module, inputs moved to its device first (CPU for a module without tensors)."""
    tensor: torch.Tensor | None = next(iter(model.parameters()), None)
    if tensor is None:
        tensor = next(iter(model.buffers()), None)
    device = tensor.device if tensor is not None else None
    return call_with(model, inputs_to(inputs, device) if device is not None else inputs)


def batch_inputs(batch: Any) -> ExampleInputs:
    """The model input of a training batch: the first element of a tuple/list; a tensor or dict as is."""
    if isinstance(batch, (list, tuple)) and batch:
        return batch[0]
    return batch
