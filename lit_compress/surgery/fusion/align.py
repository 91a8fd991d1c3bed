"""Alignment before averaging: permute one layer's hidden units to match the other's (weight matching).

Two layers of different blocks may compute nearly the same function with their hidden units in a
different order; averaging them unaligned mixes unrelated units. Before a tie, the hidden units of
the second cluster's blocks are permuted to match the first's, as weight matching (Git Re-Basin,
Ainsworth et al. 2023) does: the permutation maximises ``Σ_h ⟨f_a[h], f_b[π(h)]⟩`` over the units'
weights (the producers' rows and biases, the consumer's columns), solved exactly with SciPy's
``linear_sum_assignment`` when SciPy is installed, else greedily. The permutation changes no
function: it is applied to every tensor of the hidden space at once.

A *hidden space* (:func:`hidden_space`) is known for

- a transformer FFN: the ``ffn_in`` (and ``ffn_gate``) producers and the one ``ffn_out`` consumer
  of one parent module (``nn.Linear`` or HF ``Conv1D``): Llama's ``gate_proj``/``up_proj``/
  ``down_proj``, GPT-2's ``c_fc``/``c_proj``, BERT's and ``nn.TransformerEncoderLayer``'s;
- a residual block ``conv1 → bn1 → conv2`` (torchvision's and our ``BasicBlock``), ungrouped convs.

Any unit of such a space (a producer or the consumer) can be aligned; other layers (attention
projections, stems, heads) cannot and are tied unaligned. The similarity ranking is computed on
the unaligned weights (``wasserstein`` is unchanged by a permutation anyway).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lit_compress.surgery.fusion.adapters import ADAPTER, has_adapter
from lit_compress.surgery.fusion.groups import linear_role
from lit_compress.surgery.modules import get_submodule, set_parameter

_PRODUCER_ROLES = ("ffn_in", "ffn_gate")


@dataclass(frozen=True)
class Axis:
    """One tensor of a hidden space: ``module.attr`` indexed by hidden unit along ``dim``."""

    module: str
    attr: str
    dim: int
    feature: bool  # used to match units (weights and biases of producers and consumer)


def _linear_out_dim(module: nn.Module) -> int:
    """The output axis of a linear-like weight: 0 for ``nn.Linear``, 1 for HF ``Conv1D`` (in, out)."""
    return 1 if type(module).__name__ == "Conv1D" else 0


def _weight(module: nn.Module) -> Tensor:
    weight = module._parameters["weight"]
    assert weight is not None
    return weight


def _ffn_space(model: nn.Module, parent: str) -> list[Axis] | None:
    prefix = f"{parent}." if parent else ""
    module = get_submodule(model, parent) if parent else model
    producers, consumers = [], []
    for child_name, child in module.named_children():
        if not (isinstance(child, nn.Linear) or type(child).__name__ == "Conv1D"):
            continue
        role = linear_role(prefix + child_name)
        if role in _PRODUCER_ROLES:
            producers.append((prefix + child_name, child))
        elif role == "ffn_out":
            consumers.append((prefix + child_name, child))
    if not producers or len(consumers) != 1:
        return None
    axes = []
    sizes: set[int] = set()
    for name, child in producers:
        out_dim = _linear_out_dim(child)
        sizes.add(_weight(child).shape[out_dim])
        axes.append(Axis(name, "weight", out_dim, True))
        if getattr(child, "bias", None) is not None:
            axes.append(Axis(name, "bias", 0, True))
        if has_adapter(child):  # its per-channel output scale follows its units
            axes.append(Axis(name, ADAPTER, 0, False))
    name, child = consumers[0]
    in_dim = 1 - _linear_out_dim(child)
    sizes.add(_weight(child).shape[in_dim])
    axes.append(Axis(name, "weight", in_dim, True))
    return axes if len(sizes) == 1 else None


def _conv_space(model: nn.Module, parent: str) -> list[Axis] | None:
    module = get_submodule(model, parent) if parent else model
    conv1, conv2, bn1 = getattr(module, "conv1", None), getattr(module, "conv2", None), getattr(module, "bn1", None)
    convs = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    if not isinstance(conv1, convs) or not isinstance(conv2, convs) or conv1.groups != 1 or conv2.groups != 1:
        return None
    if conv1.out_channels != conv2.in_channels:
        return None
    prefix = f"{parent}." if parent else ""
    axes = [Axis(prefix + "conv1", "weight", 0, True)]
    if conv1.bias is not None:
        axes.append(Axis(prefix + "conv1", "bias", 0, True))
    if has_adapter(conv1):
        axes.append(Axis(prefix + "conv1", ADAPTER, 0, False))
    if isinstance(bn1, nn.modules.batchnorm._BatchNorm):
        if bn1.num_features != conv1.out_channels:
            return None
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(bn1, attr, None) is not None:
                axes.append(Axis(prefix + "bn1", attr, 0, False))
    elif bn1 is not None:
        return None
    axes.append(Axis(prefix + "conv2", "weight", 1, True))
    return axes


def hidden_space(model: nn.Module, unit_name: str) -> list[Axis] | None:
    """The tensors indexed by the hidden units that ``unit_name`` produces or consumes, or ``None``."""
    parent, _, leaf = unit_name.rpartition(".")
    module = get_submodule(model, unit_name)
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        space = _conv_space(model, parent) if leaf in ("conv1", "conv2") else None
    elif isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        space = _ffn_space(model, parent)
    else:
        space = None
    if space is None or not any(a.module == unit_name for a in space):
        return None
    return space


def _tensor(model: nn.Module, axis: Axis) -> Tensor:
    return getattr(get_submodule(model, axis.module), axis.attr)


def _features(model: nn.Module, space: Sequence[Axis]) -> Tensor:
    """``(hidden, features)``: every feature tensor of the space with the hidden axis first."""
    parts = []
    for axis in space:
        if axis.feature:
            t = _tensor(model, axis).detach().to(torch.float64)
            parts.append(t.movedim(axis.dim, 0).reshape(t.shape[axis.dim], -1))
    return torch.cat(parts, dim=1)


def match(fa: Tensor, fb: Tensor) -> Tensor:
    """The permutation ``π`` (as indices) maximising ``Σ_h ⟨fa[h], fb[π[h]]⟩``: Hungarian or greedy."""
    gain = (fa @ fb.T).cpu()
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:  # greedy: the best remaining pair first
        n = gain.shape[0]
        perm = torch.full((n,), -1, dtype=torch.long)
        work = gain.clone()
        for _ in range(n):
            flat = int(torch.argmax(work))
            r, c = divmod(flat, n)
            perm[r] = c
            work[r, :] = -torch.inf
            work[:, c] = -torch.inf
        return perm
    rows, cols = linear_sum_assignment(gain.numpy(), maximize=True)
    perm = torch.empty(len(rows), dtype=torch.long)
    perm[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return perm


def _holders(model: nn.Module) -> dict[int, set[tuple[str, str]]]:
    found: dict[int, set[tuple[str, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                found.setdefault(id(t), set()).add((mname, attr))
    return found


@torch.no_grad()
def align_cluster_(model: nn.Module, a: Sequence[str], b: Sequence[str]) -> tuple[list[str], str]:
    """Permute the hidden units of cluster ``b``'s blocks to match cluster ``a``'s first member.

    Returns the qualified names of the tensors permuted (empty if nothing was) and, when the
    alignment was skipped, the reason. Skipped when a member has no hidden space, or when a tensor
    of ``b``'s spaces is also held outside them (a tie to another block): permuting it would change
    that block's function.
    """
    space_a = hidden_space(model, a[0])
    spaces_b = [hidden_space(model, name) for name in b]
    if space_a is None or any(s is None for s in spaces_b):
        missing = a[0] if space_a is None else next(n for n, s in zip(b, spaces_b) if s is None)
        return [], f"`{missing}` has no hidden units it can permute (not an FFN projection or a residual block conv)"
    entries = [axis for space in spaces_b if space is not None for axis in space]
    allowed = {(axis.module, axis.attr) for axis in entries}
    holders = _holders(model)
    distinct: dict[int, Axis] = {}
    for axis in entries:
        t = _tensor(model, axis)
        outside = holders.get(id(t), set()) - allowed
        if outside:
            mname, attr = sorted(outside)[0]
            return [], f"`{axis.module}.{axis.attr}` is also held by `{mname}.{attr}` outside the blocks aligned"
        distinct.setdefault(id(t), axis)
    first_b = spaces_b[0]
    assert first_b is not None
    fa, fb = _features(model, space_a), _features(model, first_b)
    if fa.shape != fb.shape:
        return [], f"`{a[0]}` and `{b[0]}` have hidden spaces of different shapes"
    perm = match(fa, fb)
    if torch.equal(perm, torch.arange(len(perm))):
        return [], ""
    done = []
    for axis in distinct.values():
        module = get_submodule(model, axis.module)
        t = getattr(module, axis.attr)
        value = t.detach().index_select(axis.dim, perm.to(t.device))
        if isinstance(t, nn.Parameter):
            set_parameter(module, axis.attr, nn.Parameter(value, requires_grad=t.requires_grad))
            # every other holder of this parameter lies inside the aligned blocks: re-point them too
            for mname, attr in holders.get(id(t), set()):
                other = get_submodule(model, mname)
                if other._parameters.get(attr) is t:
                    set_parameter(other, attr, module._parameters[axis.attr])
        else:
            t.copy_(value)  # a running statistic (not journaled: a failed event does not restore it)
        done.append(f"{axis.module}.{axis.attr}")
    return done, ""


__all__ = ["Axis", "align_cluster_", "hidden_space", "match"]
