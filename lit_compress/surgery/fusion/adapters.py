"""Per-layer output scales on a shared weight (beyond the authors; ``LayerFusion(adapters=True)``).

After a tie every member layer computes the same ``W x + b``. An *adapter* gives each member its own
per-output-channel scale ``s`` (``out_features`` / ``out_channels`` numbers), so member ``i``
computes ``s_i ⊙ (W x + b)``: ``s`` multiplies the layer's output along its channel axis (axis 1 of a
conv's ``(N, C, ...)`` output, the last axis of a linear's ``(..., out)``). It is the parameter
``fusion_scale`` of the member module (so it is in the state dict, the optimizer and the parameter
count) and is applied by a forward hook on that module.

A new scale is all ones: adding adapters changes the fused network not at all (exactly), so the
network right after a tie is the plain fused one whatever ``adapters`` says, and the scales only
learn from there. (Starting each member at its own per-channel norm ratio ``‖W_i[c]‖ / ‖W[c]‖``
would move each layer back toward its original's magnitudes at creation, but it changes the
function at the moment of the tie, which BatchNorm recalibration and the event's forward check would
then see as part of the fusion.) A layer fused again keeps its learned scale; the shared weight is
the average of the raw weights, scales left out.

Adapters are added to ``nn.Linear``, ``nn.Conv1d/2d/3d`` and Hugging Face ``Conv1D`` members, except
where the parent module reads the weight without calling the layer (the ``out_proj`` of
``nn.MultiheadAttention``, the linears of ``nn.Transformer{Encoder,Decoder}Layer``, whose fast path
skips their forward): :func:`adapter_skip_reason` names why. Each fusion lists the modules that got a
new adapter, and the replayer adds exactly those (their values then load from the checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lit_compress.errors import ReplayError
from lit_compress.surgery.modules import get_submodule, set_parameter

#: The parameter name of an adapter on its module.
ADAPTER = "fusion_scale"
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _is_hf_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None


def adapter_channels(module: nn.Module) -> int | None:
    """Output channels an adapter of ``module`` scales, or ``None`` for a module kind without adapters."""
    weight = module._parameters.get("weight")
    if weight is None:
        return None
    if isinstance(module, (nn.Linear, *_CONVS)):
        return int(weight.shape[0])
    if _is_hf_conv1d(module):
        return int(weight.shape[1])  # Conv1D stores (in, out)
    return None


def adapter_skip_reason(model: nn.Module, name: str) -> str | None:
    """Why the module ``name`` cannot take an adapter, or ``None`` if it can."""
    module = get_submodule(model, name)
    if adapter_channels(module) is None:
        return f"a {type(module).__name__} (adapters scale the outputs of linears and convs only)"
    parent_name = name.rpartition(".")[0]
    parent = get_submodule(model, parent_name)
    if isinstance(parent, _READS_WEIGHTS):
        return f"its parent {type(parent).__name__} reads its weight without calling it"
    return None


def _scale_output(module: nn.Module, args: Any, output: Any) -> Any:
    """Forward hook: ``output`` times the module's ``fusion_scale`` along the channel axis."""
    scale = module._parameters.get(ADAPTER)
    if scale is None or not isinstance(output, Tensor):  # an adapter removed by a rolled-back event
        return None
    if isinstance(module, _CONVS):
        axis = output.dim() - len(module.kernel_size) - 1  # 1 for a batch, 0 for an unbatched input
        shape = [1] * output.dim()
        shape[axis] = -1
        return output * scale.to(output.dtype).view(shape)
    return output * scale.to(output.dtype)


def has_adapter(module: nn.Module) -> bool:
    """Whether ``module`` carries an adapter."""
    return isinstance(module._parameters.get(ADAPTER), nn.Parameter)


def add_adapter_(module: nn.Module) -> int:
    """Give ``module`` an all-ones ``fusion_scale`` and its hook; return the parameters added (0 if it has one)."""
    channels = adapter_channels(module)
    if channels is None:
        raise ValueError(f"a {type(module).__name__} cannot take an adapter")
    if has_adapter(module):
        return 0
    weight = module._parameters["weight"]
    assert weight is not None
    scale = torch.ones(channels, dtype=weight.dtype, device=weight.device)
    set_parameter(module, ADAPTER, nn.Parameter(scale, requires_grad=weight.requires_grad))
    if not any(hook is _scale_output for hook in module._forward_hooks.values()):
        module.register_forward_hook(_scale_output)
    return channels


@torch.no_grad()
def add_adapters_(model: nn.Module, names: Sequence[str]) -> tuple[list[str], int]:
    """Add adapters to the modules ``names`` that can take one and have none; return their names and size."""
    added, size = [], 0
    for name in names:
        if adapter_skip_reason(model, name) is not None:
            continue
        n = add_adapter_(get_submodule(model, name))
        if n:
            added.append(name)
            size += n
    return added, size


@torch.no_grad()
def replay_adapters_(model: nn.Module, names: Sequence[str]) -> None:
    """Add the adapters a logged fusion added (values come from the checkpoint afterwards)."""
    for name in names:
        why = adapter_skip_reason(model, name)
        if why is not None:
            raise ReplayError(f"`{name}` cannot take the adapter the log records for it: {why}.")
        add_adapter_(get_submodule(model, name))


def adapter_params(model: nn.Module) -> int:
    """Parameters held by the model's adapters."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        scale = module._parameters.get(ADAPTER)
        if scale is not None and id(scale) not in seen:
            seen.add(id(scale))
            total += scale.numel()
    return total


__all__ = [
    "ADAPTER",
    "adapter_channels",
    "adapter_params",
    "adapter_skip_reason",
    "add_adapter_",
    "add_adapters_",
    "has_adapter",
    "replay_adapters_",
]
