"""FLOPs of one forward pass, counted by ``torch.utils.flop_counter`` (no estimates by hand).

Also the helpers that every measurement uses to read ``example_inputs``: a tensor (one
positional argument), a tuple or list (positional arguments) or a dict (keyword arguments).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lit_compress.errors import allowed
from lit_compress.surgery.modules import module_device_dtype, preserve_mode

ExampleInputs = Any  # torch.Tensor | tuple | list | dict[str, Any]


def split_inputs(example_inputs: ExampleInputs) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``example_inputs`` as ``(args, kwargs)`` for ``model(*args, **kwargs)``.

    A tensor is one positional argument, a tuple or list the positional arguments, a dict the
    keyword arguments.

    Raises:
        ConfigError: If ``example_inputs`` is ``None``.
    """
    if example_inputs is None:
        raise allowed("example_inputs", None, "a tensor, a tuple/list of positional arguments or a dict of kwargs")
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    return (example_inputs,), {}


def map_tensors(value: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor in a nest of tuples, lists and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    return value


def inputs_to(example_inputs: ExampleInputs, device: torch.device) -> ExampleInputs:
    """``example_inputs`` with every tensor on ``device`` (dtypes unchanged)."""
    return map_tensors(example_inputs, lambda t: t.to(device))


def describe_inputs(example_inputs: ExampleInputs) -> str:
    """A short description for error messages, e.g. ``"Tensor[4, 16] float32"``."""

    def one(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            return f"Tensor{list(v.shape)} {str(v.dtype).replace('torch.', '')}"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{k}: {one(x)}" for k, x in v.items()) + "}"
        if isinstance(v, (tuple, list)):
            return "(" + ", ".join(one(x) for x in v) + ")"
        return type(v).__name__

    return one(example_inputs)


def count_flops(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """FLOPs of ``model(example_inputs)`` in eval mode under ``torch.no_grad()``.

    A multiply-add counts as 2 FLOPs (``Linear(16, 32)`` on a ``(4, 16)`` batch: ``2*4*16*32``).
    Only operations that ``FlopCounterMode`` knows are counted (matmuls, convolutions,
    attention); elementwise ops, normalisation and biases count 0. Tensors in
    ``example_inputs`` are moved to the model's device. Every module's train/eval flag is
    restored afterwards.

    Args:
        model: The model to count.
        example_inputs: A tensor, a tuple/list of positional arguments or a dict of kwargs.

    Returns:
        Total FLOPs of one forward pass at the batch size of ``example_inputs``.

    Raises:
        ConfigError: If the forward pass fails on these inputs (the message names the model,
            the input shapes and the error).
    """
    device, _ = module_device_dtype(model)
    args, kwargs = split_inputs(inputs_to(example_inputs, device))
    counter = FlopCounterMode(display=False)
    with preserve_mode(model), torch.no_grad():
        model.eval()
        try:
            with counter:
                model(*args, **kwargs)
        except Exception as err:
            raise allowed(
                "example_inputs",
                describe_inputs(example_inputs),
                f"inputs that {type(model).__name__}.forward accepts; it raised {type(err).__name__}: {err}",
            ) from err
    return int(counter.get_total_flops())


__all__ = ["count_flops", "describe_inputs", "inputs_to", "map_tensors", "split_inputs"]
