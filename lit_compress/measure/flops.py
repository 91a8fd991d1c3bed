"""FLOPs of one forward pass, counted by ``torch.utils.flop_counter`` (no estimates by hand).

``example_inputs`` follow :mod:`lit_compress.inputs`: a tensor is one positional argument, a tuple
or list the positional arguments, a dict the keyword arguments.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lit_compress.errors import allowed
from lit_compress.inputs import ExampleInputs, describe_inputs, inputs_to, split_inputs
from lit_compress.surgery.modules import module_device_dtype, preserve_mode


def count_flops(model: nn.Module, example_inputs: ExampleInputs) -> int:
    """FLOPs of ``model(example_inputs)`` in eval mode under ``torch.no_grad()``.

    A multiply-add counts as 2 FLOPs (``Linear(16, 32)`` on a ``(4, 16)`` batch: ``2*4*16*32``).
    Only operations that ``FlopCounterMode`` knows are counted (matmuls, convolutions,
    attention); elementwise ops, normalisation and biases count 0. Tensors in
    ``example_inputs`` are moved to the model's device (floating ones cast to its dtype).
    Every module's train/eval flag is restored afterwards.

    Args:
        model: The model to count.
        example_inputs: A tensor, a tuple/list of positional arguments or a dict of kwargs.

    Returns:
        Total FLOPs of one forward pass at the batch size of ``example_inputs``.

    Raises:
        ConfigError: If the forward pass fails on these inputs (the message names the model,
            the input shapes and the error).
    """
    device, dtype = module_device_dtype(model)  # floating inputs follow the model's dtype (`*-true` precision)
    args, kwargs = split_inputs(inputs_to(example_inputs, device, dtype))
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


__all__ = ["count_flops"]
