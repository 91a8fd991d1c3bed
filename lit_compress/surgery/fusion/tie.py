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

import math
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn
from typing_extensions import NotRequired

from lit_compress.errors import ReplayError, SurgeryError, allowed
from lit_compress.surgery.fusion.groups import (
    FusionGroup,
    FusionUnit,
    candidate_groups,
    clusters,
    unit_parameter,
    unit_weight,
)
from lit_compress.surgery.fusion.similarity import check_measure, rank_key, score
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


class Fusion(TypedDict):
    """One applied fusion, as :func:`fuse_pair_` returns it and the log keeps it."""

    a: list[str]
    b: list[str]
    params: list[str]
    seed: int
    kept: str  # "a" or "b" for ``freeze``, else ""
    removed: int  # stored parameters removed (one unit)
    score: NotRequired[float]


class FuseLayersRecord(TypedDict):
    """Log record of :func:`fuse_layers_`."""

    op: Literal["fuse_layers"]
    policy: str
    fusions: list[Fusion]
    removed_params: int


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
        x = ta.detach().to(torch.float64)
        y = tb.detach().to(ta.device, torch.float64)
        if policy == "mean":
            value = share_a * x + (1.0 - share_a) * y
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
    model: nn.Module, a: Sequence[str], b: Sequence[str], params: Sequence[str], policy: str, seed: int
) -> Fusion:
    """Tie every module of clusters ``a`` and ``b`` to new shared parameters; return the fusion's plain data."""
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
    values, kept = fused_values(pa, pb, len(a), len(b), policy, seed)
    shared = [nn.Parameter(v, requires_grad=p.requires_grad) for v, p in zip(values, pa)]
    for name in a + b:
        module = get_submodule(model, name)
        for pname, param in zip(params, shared):
            set_parameter(module, pname, param)
    removed = sum(p.numel() for p in pa)
    return {"a": a, "b": b, "params": list(params), "seed": int(seed), "kept": kept, "removed": int(removed)}


def fuse_layers_(model: nn.Module, fusions: Sequence[PlannedFusion], policy: str) -> list[dict[str, Any]]:
    """Apply ``fusions`` (each ``{"a": [...], "b": [...], "params": [...], "seed": int}``) in order.

    Returns one :class:`FuseLayersRecord` (or none if ``fusions`` is empty).
    """
    check_policy(policy)
    done = [fuse_pair_(model, f["a"], f["b"], f["params"], policy, int(f.get("seed", 0))) for f in fusions]
    for f, plan in zip(done, fusions):
        if "score" in plan:
            f["score"] = float(plan["score"])
    if not done:
        return []
    record: FuseLayersRecord = {
        "op": "fuse_layers",
        "policy": policy,
        "fusions": done,
        "removed_params": sum(f["removed"] for f in done),
    }
    return [plain_record(record)]


@register_replay("fuse_layers")
def _replay_fuse_layers(model: nn.Module, record: FuseLayersRecord) -> None:
    for fusion in record["fusions"]:
        members = list(fusion["a"]) + list(fusion["b"])
        first = get_submodule(model, members[0])
        for pname in fusion["params"]:
            shared = first._parameters.get(pname)
            if not isinstance(shared, nn.Parameter):
                raise ReplayError(f"`{members[0]}` has no parameter `{pname}` to tie.")
            for name in members[1:]:
                module = get_submodule(model, name)
                own = module._parameters.get(pname)
                if not isinstance(own, nn.Parameter) or own.shape != shared.shape:
                    raise ReplayError(f"`{name}.{pname}` cannot be tied to `{members[0]}.{pname}`: shapes differ.")
                set_parameter(module, pname, shared)


# ------------------------------------------------------------------------------------------ planning
def plan_fusions(
    model: nn.Module,
    units: Sequence[FusionUnit],
    measure: str,
    remove: int,
    policy: str,
    seed: int = 0,
) -> list[PlannedFusion]:
    """Choose the fusions that remove at least ``remove`` stored parameters (fewer if impossible).

    Greedy, as the paper: score every pair of clusters inside each group with ``measure`` on their
    CURRENT weights, take pairs best first, skipping a cluster already fused in this round and a
    pair whose unit is bigger than what is still needed; if the round did not remove enough, score
    again on the fused values and go on. When no pair fits any more, the best pair of the smallest
    unit size finishes the job (so a step overshoots by less than one unit). Nothing in ``model``
    changes (the fused values are simulated exactly with :func:`fused_values`). Seeds are drawn
    from ``seed``, so the plan is reproducible.
    """
    check_measure(measure)
    check_policy(policy)
    key = rank_key(measure)
    generator = torch.Generator().manual_seed(int(seed))
    # Virtual state: cluster id -> (member names, tensors); unit -> cluster id.
    state: dict[int, tuple[list[str], list[Tensor]]] = {}
    group_of: dict[int, FusionGroup] = {}
    for group, members in candidate_groups(units).items():
        for cluster in clusters(model, members):
            names = [u.name for u in cluster]
            tensors = [t.detach() for t in _params_of(model, names[0], cluster[0].params)]
            cid = len(state)
            state[cid] = (names, tensors)
            group_of[cid] = group
    params_of_group = {u.group: list(u.params) for u in units}
    numel_of_group = {u.group: u.numel for u in units}
    plan: list[PlannedFusion] = []
    removed = 0
    next_id = len(state)
    while removed < remove:
        pairs = []
        ids = sorted(state)
        for i, ci in enumerate(ids):
            for cj in ids[i + 1 :]:
                if group_of[ci] != group_of[cj]:
                    continue
                s = score(measure, state[ci][1][0], state[cj][1][0])
                pairs.append((_finite(key(s)), ci, cj, s))
        if not pairs:
            break
        pairs.sort(key=lambda t: (t[0], t[1], t[2]))
        touched: set[int] = set()
        chosen: list[tuple[int, int, float]] = []
        need = remove - removed
        for _, ci, cj, s in pairs:  # best first; a pair bigger than what is still needed waits
            if need <= 0:
                break
            if ci in touched or cj in touched or numel_of_group[group_of[ci]] > need:
                continue
            touched.update((ci, cj))
            chosen.append((ci, cj, s))
            need -= numel_of_group[group_of[ci]]
        if need > 0 and not chosen:  # no pair fits: the best pair of the smallest size covers the rest
            over = [t for t in pairs if t[1] not in touched and t[2] not in touched]
            if over:
                smallest = min(numel_of_group[group_of[t[1]]] for t in over)
                _, ci, cj, s = next(t for t in over if numel_of_group[group_of[t[1]]] == smallest)
                chosen.append((ci, cj, s))
        if not chosen:
            break
        for ci, cj, s in chosen:
            (names_a, ta), (names_b, tb) = state.pop(ci), state.pop(cj)
            fusion_seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
            values, _ = fused_values(ta, tb, len(names_a), len(names_b), policy, fusion_seed)
            group = group_of.pop(ci)
            group_of.pop(cj)
            new_id, next_id = next_id, next_id + 1
            state[new_id] = (names_a + names_b, values)
            group_of[new_id] = group
            plan.append(
                {"a": names_a, "b": names_b, "params": params_of_group[group], "seed": fusion_seed, "score": float(s)}
            )
            removed += numel_of_group[group]
    return plan


def _finite(x: float) -> float:
    return math.inf if not math.isfinite(x) else x


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
    "plan_fusions",
    "tied_groups",
    "unit_weight",
]
