"""Layer Fusion (O'Neill, Ver Steeg, Galstyan): tie similar same-group layers to ONE shared weight.

A fusion ties two *clusters* of units (a unit alone is a cluster of one; layers tied earlier form a
bigger one) so that every member module holds the SAME ``nn.Parameter`` objects for its weight and
bias. Storage shrinks by one unit (counted with ``count_parameters(unique_storage=True)``), autograd
sums the gradients of all uses into the shared parameter, and every layer still runs (FLOPs do not
change). The policies differ only in the value the shared parameter starts from:

- ``mean``: ``(n_a·W_a + n_b·W_b)/(n_a + n_b)``, the mean over all member layers (``n`` = cluster size;
  for two single layers the paper's ``(W_i + W_j)/2``), weight and bias alike.
- ``mix``: elementwise random mixing, ``M ⊙ W_a + (1 − M) ⊙ W_b`` with ``M ~ Bernoulli(n_a/(n_a + n_b))``
  drawn from a seeded generator (the seed is in the record). The paper's "dynamic mixing" redraws
  ``M`` at every step and sums the pair's gradients, but keeps two stored copies, so it compresses
  nothing until the copies are merged; here the mixed value becomes the one shared weight and the
  summed gradient is what autograd gives a tied weight.
- ``freeze`` (the paper's "drop"): one member cluster's weights are kept, the other's
  are dropped (its gradient is frozen out and from then on added to the kept one's). The kept
  cluster is drawn with probability ``n/(n_a + n_b)`` from the seeded generator (recorded as ``kept``).

A plan is a list of :class:`PlannedFusion`; each event is logged as a :class:`FuseLayersRecord`
whose ``fusions`` (:class:`Fusion`) list the two clusters, the tied parameter names, the seed and
the kept side; the replayer rebuilds the ties on a fresh model (the values then come from the
checkpoint, where a tied parameter appears once per name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn
from typing_extensions import NotRequired

from lit_compress.errors import ReplayError, SurgeryError, allowed
from lit_compress.surgery.fusion.adapters import add_adapters_, replay_adapters_
from lit_compress.surgery.fusion.align import align_cluster_
from lit_compress.surgery.fusion.groups import (
    unit_parameter,
    unit_weight,
)
from lit_compress.surgery.log import plain_record
from lit_compress.surgery.modules import get_submodule, set_parameter
from lit_compress.surgery.replay import register_replay

POLICIES = ("mean", "mix", "freeze")


class PlannedFusion(TypedDict):
    """One step of a plan: tie cluster ``a`` to cluster ``b`` (qualified module names)."""

    a: list[str]
    b: list[str]
    params: list[str]  # the parameter names tied, the weight first
    seed: NotRequired[int]  # of the ``mix``/``freeze`` draw (0 when absent)
    score: NotRequired[float]  # the similarity measure's value for the pair, kept in the log
    distance: NotRequired[float]  # the size-normalised distance the pair was ranked by


class Fusion(TypedDict):
    """One applied fusion, as :func:`fuse_pair_` returns it and the log keeps it."""

    a: list[str]
    b: list[str]
    params: list[str]
    seed: int
    kept: str  # "a" or "b" for ``freeze``, else ""
    removed: int  # unique stored parameters removed (one unit)
    also: dict[str, list[str]]  # per tied name: parameters outside the clusters that held it, re-pointed too
    score: NotRequired[float]
    distance: NotRequired[float]
    aligned: NotRequired[list[str]]  # tensors permuted to align ``b``'s hidden units to ``a``'s
    align_skipped: NotRequired[str]  # why ``b`` was not aligned
    adapters: NotRequired[list[str]]  # members given a new per-channel output scale (``adapters=True``)
    adapter_params: NotRequired[int]  # parameters those scales add


class FuseLayersRecord(TypedDict):
    """Log record of :func:`fuse_layers_`."""

    op: Literal["fuse_layers"]
    policy: str
    fusions: list[Fusion]
    removed_params: int  # net: storage the ties removed minus the adapters they added


def check_policy(policy: str, argument: str = "policy") -> str:
    if policy not in POLICIES:
        raise allowed(argument, policy, f"must be one of {', '.join(repr(p) for p in POLICIES)}")
    return policy


@torch.no_grad()
def fused_values(
    a: Sequence[Tensor], b: Sequence[Tensor], n_a: int, n_b: int, policy: str, seed: int
) -> tuple[list[Tensor], str]:
    """The shared parameter values of a fusion of clusters ``a`` and ``b`` (sizes ``n_a``, ``n_b``).

    ``a``/``b`` hold the clusters' parameters in the unit's order (weight first). Returns the values
    (dtype and device of ``a``) and which side was kept (``"a"``/``"b"`` for ``freeze``, else ``""``).
    """
    check_policy(policy)
    generator = torch.Generator().manual_seed(int(seed))
    share_a = n_a / (n_a + n_b)
    if policy == "freeze":
        kept = "a" if float(torch.rand((), generator=generator)) < share_a else "b"
        return [t.detach().clone() for t in (a if kept == "a" else b)], kept
    out = []
    for ta, tb in zip(a, b):
        dtype = torch.promote_types(ta.dtype, torch.float32)  # bf16/fp16 weights are averaged in float32
        x = ta.detach().to(dtype)
        y = tb.detach().to(ta.device, dtype)
        if policy == "mean":
            value = torch.lerp(y, x, share_a)  # share_a·x + (1 − share_a)·y
        else:  # mix: the mask is drawn on the CPU, so it is the same on every device
            mask = torch.rand(tuple(ta.shape), generator=generator, dtype=torch.float64) < share_a
            value = torch.where(mask.to(ta.device), x, y)
        out.append(value.to(ta.dtype))
    return out, ""


def _params_of(model: nn.Module, unit_name: str, params: Sequence[str]) -> list[nn.Parameter]:
    module = get_submodule(model, unit_name)
    return [unit_parameter(module, p) for p in params]


@torch.no_grad()
def fuse_pair_(
    model: nn.Module,
    a: Sequence[str],
    b: Sequence[str],
    params: Sequence[str],
    policy: str,
    seed: int,
    align: bool = False,
    adapters: bool = False,
) -> Fusion:
    """Tie every module of clusters ``a`` and ``b`` to new shared parameters; return the fusion's plain data.

    With ``align``, cluster ``b``'s hidden units are first permuted to match ``a``'s
    (:func:`~lit_compress.surgery.fusion.align.align_cluster_`; the function does not change), so
    the average is taken over matching units; the fusion then lists the tensors permuted
    (``aligned``) or why none were (``align_skipped``). With ``adapters``, every member that can
    take one and has none gets an all-ones per-channel output scale
    (:mod:`~lit_compress.surgery.fusion.adapters`), listed in ``adapters``.
    """
    a, b = list(a), list(b)
    if not a or not b or set(a) & set(b):
        raise SurgeryError(f"fuse_pair_: clusters must be non-empty and disjoint, got {a} and {b}.")
    pa, pb = _params_of(model, a[0], params), _params_of(model, b[0], params)
    for name in a[1:] + b[1:]:  # clusters are what they say: members already share the first's params
        others = _params_of(model, name, params)
        ref = pa if name in a else pb
        if any(x is not y for x, y in zip(others, ref)):
            raise SurgeryError(
                f"fuse_pair_: `{name}` is listed in a cluster but is not tied to `{(a if name in a else b)[0]}`."
            )
    if any(x.shape != y.shape for x, y in zip(pa, pb)):
        raise SurgeryError(
            f"fuse_pair_: `{a[0]}` and `{b[0]}` have different shapes; only same-shape layers can be tied."
        )
    aligned, skipped = align_cluster_(model, a, b) if align else ([], "")
    if aligned:
        pb = _params_of(model, b[0], params)
    values, kept = fused_values(pa, pb, len(a), len(b), policy, seed)
    shared = [nn.Parameter(v, requires_grad=p.requires_grad) for v, p in zip(values, pa)]
    before = {id(p): p.numel() for p in pa + pb}
    also = _repoint_(model, a + b, params, [[x, y] for x, y in zip(pa, pb)], shared)
    removed = sum(before.values()) - sum(p.numel() for p in shared)
    fusion: Fusion = {
        "a": a,
        "b": b,
        "params": list(params),
        "seed": int(seed),
        "kept": kept,
        "removed": int(removed),
        "also": also,
    }
    if align:
        fusion["aligned"] = aligned
        if skipped:
            fusion["align_skipped"] = skipped
    if adapters:
        fusion["adapters"], fusion["adapter_params"] = add_adapters_(model, a + b)
    return fusion


def parameter_holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """``id(parameter)`` → every ``(module name, module, attribute)`` that holds it (ties included)."""
    holders: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None:
                holders.setdefault(id(p), []).append((mname, module, pname))
    return holders


def _repoint_(
    model: nn.Module,
    members: Sequence[str],
    params: Sequence[str],
    old: Sequence[Sequence[nn.Parameter]],
    shared: Sequence[nn.Parameter],
) -> dict[str, list[str]]:
    """Re-point every holder of each ``old[k]`` parameter (by identity) to ``shared[k]``.

    Returns, per name in ``params``, the qualified names re-pointed that are not ``members``' own
    (a tied head, a module outside the targets); names with none are left out.
    """
    holders = parameter_holders(model)
    inside = {(m, p) for m in members for p in params}
    also: dict[str, list[str]] = {}
    for pname_k, olds, new in zip(params, old, shared):
        seen: set[int] = set()
        for param in olds:
            if id(param) in seen:
                continue
            seen.add(id(param))
            for mname, module, pname in holders.get(id(param), []):
                if module._parameters.get(pname) is not new:
                    set_parameter(module, pname, new)
                outside = also.setdefault(pname_k, [])
                if (mname, pname) not in inside and f"{mname}.{pname}" not in outside:
                    outside.append(f"{mname}.{pname}")
        if not also.get(pname_k):
            also.pop(pname_k, None)
    return also


def fuse_layers_(
    model: nn.Module, fusions: Sequence[PlannedFusion], policy: str, align: bool = False, adapters: bool = False
) -> list[dict[str, Any]]:
    """Apply ``fusions`` (each ``{"a": [...], "b": [...], "params": [...], "seed": int}``) in order.

    ``align``: permute each ``b`` cluster's hidden units to match ``a``'s before averaging (see
    :func:`fuse_pair_`); ``adapters``: give the members per-channel output scales (see there).

    Returns one :class:`FuseLayersRecord` (or none if ``fusions`` is empty).
    """
    check_policy(policy)
    done = [
        fuse_pair_(model, f["a"], f["b"], f["params"], policy, int(f.get("seed", 0)), align, adapters) for f in fusions
    ]
    for f, plan in zip(done, fusions):
        for key in ("score", "distance"):
            if key in plan:
                f[key] = float(plan[key])
    if not done:
        return []
    record: FuseLayersRecord = {
        "op": "fuse_layers",
        "policy": policy,
        "fusions": done,
        "removed_params": sum(f["removed"] - f.get("adapter_params", 0) for f in done),
    }
    return [plain_record(record)]


@register_replay("fuse_layers")
def _replay_fuse_layers(model: nn.Module, record: FuseLayersRecord) -> None:
    for fusion in record["fusions"]:
        members = list(fusion["a"]) + list(fusion["b"])
        first = get_submodule(model, members[0])
        old: list[list[nn.Parameter]] = []
        shared: list[nn.Parameter] = []
        for pname in fusion["params"]:
            param = first._parameters.get(pname)
            if not isinstance(param, nn.Parameter):
                raise ReplayError(f"`{members[0]}` has no parameter `{pname}` to tie.")
            olds = []
            for name in members:
                own = get_submodule(model, name)._parameters.get(pname)
                if not isinstance(own, nn.Parameter) or own.shape != param.shape:
                    raise ReplayError(f"`{name}.{pname}` cannot be tied to `{members[0]}.{pname}`: shapes differ.")
                olds.append(own)
            for qualified in fusion.get("also", {}).get(pname, []):
                mname, _, attr = qualified.rpartition(".")
                own = get_submodule(model, mname)._parameters.get(attr) if mname or attr else None
                if not isinstance(own, nn.Parameter) or own.shape != param.shape:
                    raise ReplayError(
                        f"`{qualified}` cannot be tied to `{members[0]}.{pname}`: it is missing or its shape differs."
                    )
                olds.append(own)
            old.append(olds)
            shared.append(param)
        _repoint_(model, members, fusion["params"], old, shared)
        replay_adapters_(model, fusion.get("adapters", []))


def tied_groups(model: nn.Module) -> list[list[str]]:
    """Qualified names of parameters that share one ``nn.Parameter`` (groups of two or more)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return [names for names in by_id.values() if len(names) > 1]


__all__ = [
    "POLICIES",
    "FuseLayersRecord",
    "Fusion",
    "PlannedFusion",
    "check_policy",
    "fuse_layers_",
    "fuse_pair_",
    "fused_values",
    "parameter_holders",
    "tied_groups",
    "unit_weight",
]
