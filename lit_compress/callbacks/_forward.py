"""How to call a module on a training batch, when its ``forward`` signature says so.

Lightning leaves the mapping from a batch to the module's ``forward`` to ``training_step``; this
module reads it from the signature instead, and only where the answer is unambiguous:

1. the batch's first element (``batch[0]`` of a tuple/list; a tensor or dict as is), if ``forward``
   accepts it alone (``forward(x)``, ``forward(x, mask=None)``, ``forward(**batch)``);
2. otherwise the whole tuple/list batch as positional arguments, if ``forward`` accepts exactly that
   (``forward(inputs, target)`` of a ``(inputs, target)`` batch, as Lightning's demo Transformer);
3. otherwise nothing: the caller skips what needs an input and says how to enable it
   (``example_input_array``).
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from lit_compress.inputs import ExampleInputs, batch_inputs, describe_inputs, split_inputs


def _accepts(signature: inspect.Signature | None, inputs: ExampleInputs) -> bool:
    if signature is None:
        return True
    args, kwargs = split_inputs(inputs)
    try:
        signature.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


def _signature(module: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):  # builtins or C extensions without a signature
        return None


def inputs_from_batch(module: nn.Module, batch: Any) -> tuple[ExampleInputs | None, str]:
    """The ``forward`` inputs inside ``batch`` (see the module docstring), and why when there are none.

    Returns:
        ``(inputs, "")``, or ``(None, reason)`` naming the signature and the batch.
    """
    signature = _signature(module)
    first = batch_inputs(batch)
    if _accepts(signature, first):
        return first, ""
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and _accepts(signature, tuple(batch)):
        return tuple(batch), ""
    return None, (
        f"{type(module).__name__}.forward{signature} takes neither the batch's first element "
        f"({describe_inputs(first)}) alone nor the whole batch ({describe_inputs(batch)})"
    )


def how_to_enable(module: nn.Module) -> str:
    """The sentence that tells a user how to give ``module`` example inputs."""
    return (
        f"Set `example_input_array` on the {type(module).__name__} (in `__init__`, or on the instance before "
        "`fit`): a tensor for `forward(x)`, a tuple of positional arguments or a dict of keyword arguments, "
        "with a batch of 1-2 samples"
    )
