"""Parameter counts that see through weight tying and storage sharing.

Layer Fusion ties layers to one shared weight, so a plain ``sum(p.numel())`` over
``named_parameters(remove_duplicate=False)`` counts a tied weight once per use. The default
count here is by *unique storage*: one ``nn.Parameter`` used by two modules counts once, and
distinct ``nn.Parameter`` objects that view the same storage count the union of the elements
they cover once.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from lit_compress.errors import allowed


def count_parameters(model: nn.Module, unique_storage: bool = True, trainable_only: bool = False) -> int:
    """Number of parameter elements of ``model``.

    Args:
        model: Any module.
        unique_storage: Count each stored element once (tied and view-sharing parameters count
            once). ``False`` counts every registered use, as
            ``named_parameters(remove_duplicate=False)`` lists them.
        trainable_only: Count only parameters with ``requires_grad=True``.

    Returns:
        The element count (a plain ``int``).

    Raises:
        ConfigError: If ``model`` is not an ``nn.Module`` or holds uninitialized (lazy) parameters.
    """
    if not isinstance(model, nn.Module):
        raise allowed("model", type(model).__name__, "an nn.Module")
    uses = [p for _, p in model.named_parameters(remove_duplicate=False)]
    if trainable_only:
        uses = [p for p in uses if p.requires_grad]
    for p in uses:
        if isinstance(p, nn.parameter.UninitializedParameter):
            raise allowed(
                "model", type(model).__name__, "a module without uninitialized lazy parameters (run one forward first)"
            )
    if not unique_storage:
        return int(sum(p.numel() for p in uses))

    unique: dict[int, torch.Tensor] = {}
    for p in uses:
        unique.setdefault(id(p), p)
    groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for t in unique.values():
        groups[_storage_key(t)].append(t)
    return int(sum(_count_group(ts) for ts in groups.values()))


def _storage_key(t: torch.Tensor) -> tuple:
    """Tensors with equal keys share storage; tensors without real storage get a key of their own."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("own", id(t))
    try:
        ptr = t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return ("own", id(t))
    if ptr == 0:
        return ("own", id(t))
    return (str(t.device), ptr, t.dtype)


def _count_group(tensors: list[torch.Tensor]) -> int:
    """Distinct storage elements covered by ``tensors`` (all of one storage and dtype)."""
    if len(tensors) == 1 and not _self_overlapping(tensors[0]):
        return tensors[0].numel()
    if all(t.is_contiguous() for t in tensors):
        spans = sorted((int(t.storage_offset()), int(t.storage_offset()) + t.numel()) for t in tensors)
        total, end = 0, -1
        for start, stop in spans:
            if start >= end:
                total += stop - start
            elif stop > end:
                total += stop - end
            end = max(end, stop)
        return total
    return torch.unique(torch.cat([_storage_indices(t) for t in tensors])).numel()


def _self_overlapping(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may alias (a zero stride on a dimension longer than one)."""
    return any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))


def _storage_indices(t: torch.Tensor) -> torch.Tensor:
    """The storage position of every element of ``t``; shape ``(t.numel(),)``, int64 on CPU."""
    index = torch.full((1,), t.storage_offset(), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        index = (index[:, None] + torch.arange(size, dtype=torch.int64)[None, :] * stride).reshape(-1)
    return index


__all__ = ["count_parameters"]
