"""Layer Fusion planning: which clusters to tie in one fusion step (nothing in the model changes).

Two budgets, both ranked on the size-normalised distance of :func:`~lit_compress.surgery.fusion.pairwise.pairwise`
(scale-free, so a group of big layers and a group of small ones compete on one scale):

- :func:`plan_group_fusions` (the paper's unit, ``budget="layers_per_group"``): fuse a given number of
  layers in each group. Inside a group the closest pairs of clusters go first; a round ties disjoint
  pairs, and if a group needs more ties than a round can give, the fused values are scored again.
- :func:`plan_fusions` (``budget="parameters"``): remove at least ``remove`` stored parameters. Pairs
  of all groups are taken most alike first (smallest normalised distance), whatever their size; a
  step overshoots by less than one unit. No pair waits because it does not fit what is left.

Every group's pairs are scored at once (one batched call per group and round, on the weights'
device). Units whose parameters are also held by a candidate unit of another group are left out
(:func:`shared_elsewhere`); modules outside the candidates that hold a member's parameter (a tied
LM head) are re-pointed with it by :func:`~lit_compress.surgery.fusion.tie.fuse_pair_`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from lit_compress.surgery.fusion.groups import FusionGroup, FusionUnit, candidate_groups, clusters, unit_parameter
from lit_compress.surgery.fusion.pairwise import pairwise
from lit_compress.surgery.fusion.similarity import check_measure
from lit_compress.surgery.fusion.tie import PlannedFusion, check_policy, fused_values, parameter_holders

#: A cluster in the planner's virtual state: member names and the shared tensors (weight first).
_Cluster = tuple[list[str], list[Tensor]]


def shared_elsewhere(model: nn.Module, units: Sequence[FusionUnit]) -> dict[str, str]:
    """Units whose parameter is also held by a candidate of ANOTHER group, with the holder's name.

    Tying such a unit would re-point the other group's layer too (and break or merge that group's
    ties), so the planners leave these units out. Holders that are not candidates (a tied LM head,
    a module outside ``targets``) are fine: they are re-pointed with the cluster.
    """
    holders = parameter_holders(model)
    where: dict[str, FusionUnit] = {u.name: u for u in units}
    out: dict[str, str] = {}
    for unit in units:
        module = model.get_submodule(unit.name)
        for pname in unit.params:
            for other_name, _, other_pname in holders.get(id(unit_parameter(module, pname)), []):
                other = where.get(other_name)
                if other is not None and (other.group != unit.group or other_pname != pname):
                    out[unit.name] = f"{other_name}.{other_pname}"
    return out


def _state(model: nn.Module, units: Sequence[FusionUnit]) -> dict[FusionGroup, list[_Cluster]]:
    skip = shared_elsewhere(model, units)
    usable = [u for u in units if u.name not in skip]
    state: dict[FusionGroup, list[_Cluster]] = {}
    for group, members in candidate_groups(usable).items():
        found = []
        for cluster in clusters(model, members):
            module = model.get_submodule(cluster[0].name)
            found.append(([u.name for u in cluster], [unit_parameter(module, p).detach() for p in cluster[0].params]))
        if len(found) >= 2:
            state[group] = found
    return state


def _scored_pairs(measure: str, found: Sequence[_Cluster]) -> list[tuple[float, int, int, float]]:
    """``(distance, i, j, raw)`` for every pair of clusters ``i < j``, most alike first."""
    raw, dist = pairwise(measure, torch.stack([tensors[0] for _, tensors in found]))
    raw, dist = raw.cpu(), dist.cpu()
    n = len(found)
    pairs = [(float(dist[i, j]), i, j, float(raw[i, j])) for i in range(n) for j in range(i + 1, n)]
    pairs.sort(key=lambda t: (t[0] if t[0] == t[0] else float("inf"), t[1], t[2]))
    return pairs


def _fuse_virtual(found: Sequence[_Cluster], i: int, j: int, policy: str, seed: int) -> _Cluster:
    """The cluster that tying ``found[i]`` and ``found[j]`` makes, with the values it would get."""
    (names_a, ta), (names_b, tb) = found[i], found[j]
    values, _ = fused_values(ta, tb, len(names_a), len(names_b), policy, seed)
    return names_a + names_b, values


def _next_round(
    found: Sequence[_Cluster], chosen: Sequence[tuple[int, int, int]], policy: str, more: bool
) -> list[_Cluster]:
    """The clusters after tying ``chosen`` ``(i, j, seed)``; values are simulated only if ``more`` rounds follow."""
    touched = {k for i, j, _ in chosen for k in (i, j)}
    rest = [c for k, c in enumerate(found) if k not in touched]
    if not more:
        return rest + [(found[i][0] + found[j][0], []) for i, j, _ in chosen]
    return rest + [_fuse_virtual(found, i, j, policy, seed) for i, j, seed in chosen]


def _seed(generator: torch.Generator) -> int:
    return int(torch.randint(0, 2**31 - 1, (), generator=generator))


def _planned(
    names_a: list[str], names_b: list[str], unit: FusionUnit, seed: int, raw: float, dist: float
) -> PlannedFusion:
    return {"a": names_a, "b": names_b, "params": list(unit.params), "seed": seed, "score": raw, "distance": dist}


def plan_group_fusions(
    model: nn.Module,
    units: Sequence[FusionUnit],
    measure: str,
    counts: Mapping[FusionGroup, int],
    policy: str,
    seed: int = 0,
) -> list[PlannedFusion]:
    """Fuse ``counts[group]`` more layers in each group (fewer where the group runs out of clusters).

    Each fusion ties two clusters into one (one layer fewer stored). Inside a group, disjoint pairs
    are tied closest first; when a round cannot give enough, the fused values are scored again.
    Seeds of the ``mix``/``freeze`` draws come from ``seed``, so the plan is reproducible.
    """
    check_measure(measure)
    check_policy(policy)
    generator = torch.Generator().manual_seed(int(seed))
    unit_of = {u.group: u for u in units}
    plan: list[PlannedFusion] = []
    for group, found in _state(model, units).items():
        need = int(counts.get(group, 0))
        while need > 0 and len(found) >= 2:
            touched: set[int] = set()
            chosen: list[tuple[int, int, int]] = []
            for dist, i, j, raw in _scored_pairs(measure, found):
                if need <= 0:
                    break
                if i in touched or j in touched:
                    continue
                touched.update((i, j))
                chosen.append((i, j, _seed(generator)))
                plan.append(_planned(found[i][0], found[j][0], unit_of[group], chosen[-1][2], raw, dist))
                need -= 1
            found = _next_round(found, chosen, policy, more=need > 0)
    return plan


def plan_fusions(
    model: nn.Module,
    units: Sequence[FusionUnit],
    measure: str,
    remove: int,
    policy: str,
    seed: int = 0,
) -> list[PlannedFusion]:
    """Choose fusions that remove at least ``remove`` stored parameters (fewer if impossible).

    Pairs of every group are ranked together by normalised distance and taken most alike first
    (disjoint within a round) until ``remove`` is reached; the last one may overshoot by less than
    its unit. If a round did not remove enough, the fused values are scored again.
    """
    check_measure(measure)
    check_policy(policy)
    generator = torch.Generator().manual_seed(int(seed))
    unit_of = {u.group: u for u in units}
    state = _state(model, units)
    plan: list[PlannedFusion] = []
    removed = 0
    while removed < remove:
        pairs = [
            (dist, group, i, j, raw)
            for group, found in state.items()
            if len(found) >= 2
            for dist, i, j, raw in _scored_pairs(measure, found)
        ]
        if not pairs:
            break
        pairs.sort(key=lambda t: (t[0] if t[0] == t[0] else float("inf"), unit_of[t[1]].name, t[2], t[3]))
        touched: set[tuple[FusionGroup, int]] = set()
        chosen: dict[FusionGroup, list[tuple[int, int, int]]] = {}
        for dist, group, i, j, raw in pairs:
            if removed >= remove:
                break
            if (group, i) in touched or (group, j) in touched:
                continue
            touched.update(((group, i), (group, j)))
            fseed = _seed(generator)
            chosen.setdefault(group, []).append((i, j, fseed))
            plan.append(_planned(state[group][i][0], state[group][j][0], unit_of[group], fseed, raw, dist))
            removed += unit_of[group].numel
        for group, found in state.items():
            state[group] = _next_round(found, chosen.get(group, []), policy, more=removed < remove)
    return plan


__all__ = ["plan_fusions", "plan_group_fusions", "shared_elsewhere"]
