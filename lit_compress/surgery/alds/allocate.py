"""ALDS rank allocation: choose ``(k, j)`` per layer to minimise the worst relative error under a budget.

Error table: for a layer with dense weight ``W`` (folded to ``f × c·κ1κ2``) and each divisor ``k`` of
its input channels, ``ε(k, j)`` for ``j = 1 … min(f, c/k·κ1κ2)``, where ``W_i`` are the ``k`` folded
groups (:func:`lit_compress.surgery.alds.low_rank.folded_groups`). Three definitions (``error``):

- ``"exact"`` (default): the exact relative Frobenius error of the decomposition,
  ``‖Ŵ − W‖_F / ‖W‖_F = sqrt(Σ_i Σ_{l>j} σ_l(W_i)²) / ‖W‖_F`` (the groups are disjoint column
  blocks, so their discarded energies add up); what the layer really loses;
- ``"lower_bound"``: ``max_i σ_{j+1}(W_i) / σ₁(W)``, the authors' code. It is a *lower* bound of the
  paper's Eq. (1) spectral error ``‖Ŵ − W‖₂/‖W‖₂`` (the error of one block never exceeds that of
  the whole), not an upper bound: it under-reports many-group decompositions and drives ``k`` to
  the number of input channels (depthwise + 1×1 layers, slow on CPU);
- ``"theorem"``: Theorem 1's upper bound of the spectral error, ``√k · max_i σ_{j+1}(W_i) / σ₁(W)``.

Guards: ``min_rank`` (default 2) is the smallest rank kept in a group, and a layer is decomposed
only if that saves at least ``min_saving`` (default 0.1) of its weights; otherwise it stays dense
(error 0). Rank-1 layers and decompositions that barely save anything cost accuracy and, on CPU,
time (two small layers are slower than one).

Budget: ``B = keep_ratio · P − P_fixed`` where ``P`` counts every parameter of the model as if each
target were dense (biases, BatchNorm and untouched layers included) and ``P_fixed`` is everything
but the targets' weights. A layer costs ``min(f·c·κ1κ2, j·(k·f + c·κ1κ2))``: it stays dense when the
factorisation is not smaller (error 0 then).

Search (Algorithm 1 of the paper, with the code's choices):

- **global step** (``k`` fixed): ``j_ℓ(ε)`` = smallest ``j`` with ``ε_ℓ(k_ℓ, j) ≤ ε``; the layer
  sizes are a non-increasing step function of ε, so the root of ``Σ size_ℓ(ε) = B`` is found by
  bisection over the tables' breakpoints: the smallest ε whose allocation fits (the budget is never
  exceeded; the code uses Brent's method on a continuous bracket instead, to the same end);
- **local step**: at a fixed layer budget ``b_ℓ = j_ℓ(k_ℓ·f + c·κ1κ2)`` each divisor ``k′`` gets
  ``j′ = ⌊b_ℓ/(k′·f + c·κ1κ2) + ρ⌋`` (ρ = 0.5, lowered by 0.2 when the new ``k`` make the global step
  infeasible) and the ``k′`` with the lowest ``ε(k′, j′)`` is kept (the code reads ``ε(k′, j′ − 1)``,
  an off-by-one we do not copy);
- **seeds × alternations**: seeds 0–3 start every layer at the divisor nearest 3, 5, 7, 9; later
  seeds draw a random divisor per layer (``numpy`` generator seeded by ``seed``); each seed runs
  ``alternations`` global/local rounds (all ``k`` halved if infeasible); the seed with the smallest
  worst error wins;
- **keep-ratio correction** (outer loop): when the allocation's real parameter ratio is more than
  0.5 % (relative) under the target, the allocator's own keep ratio is root-found (regula falsi on
  the shortfall, falling back to bisection, in ``[target, max(target, 0.999·current)]``, at most 20
  rounds) for the largest allocation that still fits; if that is still short, the leftover budget
  raises the rank of the worst layers one step at a time (our addition, so the budget is met within
  0.5 %; raising a rank never increases any layer's error).

Baselines: ``uniform`` (k = 1, the same fraction α of each layer's full rank, α as large as fits)
and ``energy`` (k = 1, the smallest rank keeping a fraction τ of each layer's squared singular
values, τ as large as fits).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from lit_compress.errors import ConfigError, SurgeryError, allowed
from lit_compress.surgery.alds.low_rank import (
    LowRankLayer,
    LowRankPlan,
    dense_weight,
    divisors,
    folded_groups,
    layer_shape,
    low_rank_size,
    read_by_parent_reason,
    single_thread,
    undecomposable_reason,
)
from lit_compress.surgery.modules import get_submodule

Method = Literal["alds", "uniform", "energy"]
ErrorKind = Literal["exact", "lower_bound", "theorem"]
ERROR_KINDS = ("exact", "lower_bound", "theorem")
TOLERANCE = 0.005  # relative: the budget counts as met within 0.5 %


@dataclass
class LayerTable:
    """One layer's geometry and error table: ``errors[k][j - 1] = ε(k, j)`` (non-increasing in j)."""

    name: str
    f: int
    c: int
    kk: int
    errors: dict[int, np.ndarray]
    svals: np.ndarray  # singular values of the whole folded layer (k = 1), descending
    min_rank: int = 1
    min_saving: float = 0.0
    max_j: dict[int, int] | None = None  # latency guard: per k, the largest rank measured fast enough

    @property
    def dense(self) -> int:
        return self.f * self.c * self.kk

    @property
    def cap(self) -> float:
        """The largest decomposition size allowed: it must save ``min_saving`` of the dense weights."""
        return (1.0 - self.min_saving) * self.dense

    @property
    def ks(self) -> list[int]:
        return sorted(self.errors)

    def lowest(self, k: int) -> int:
        """The smallest rank allowed for ``k`` groups (``min_rank``, or full rank if that is less)."""
        return min(self.min_rank, len(self.errors[k]))

    def clamp(self, k: int, j: int) -> int:
        return max(self.lowest(k), min(len(self.errors[k]), j))

    def decomposes(self, k: int, j: int) -> bool:
        """Whether ``(k, j)`` is smaller than dense by at least ``min_saving`` (else the layer stays dense)."""
        size = low_rank_size(self.f, self.c, self.kk, k, j)
        fast = self.max_j is None or j <= self.max_j.get(k, 0)
        return size < self.dense and size <= self.cap and fast

    def size(self, k: int, j: int) -> int:
        return low_rank_size(self.f, self.c, self.kk, k, j) if self.decomposes(k, j) else self.dense

    def error(self, k: int, j: int) -> float:
        return float(self.errors[k][j - 1]) if self.decomposes(k, j) else 0.0


@dataclass
class Allocation:
    """The result: which layers to decompose with which ``(k, j)``; everything else stays dense."""

    method: str
    keep_ratio: float
    plan: LowRankPlan  # name -> {"groups": k, "rank": j} (decomposed layers only)
    kept_dense: list[str]
    params_dense: int  # the model's parameters with every target dense
    params_after: int  # ... after this allocation
    max_error: float
    errors: dict[str, float]
    seed_index: int = -1
    internal_keep_ratio: float = 0.0
    filled_steps: int = 0
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)
    budget: str = "params"
    latency_ms_dense: float | None = None  # budget="latency": the targets' summed table latency, dense
    latency_ms_after: float | None = None  # ... and with this allocation

    @property
    def achieved_ratio(self) -> float:
        return self.params_after / self.params_dense

    def to_plain(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "keep_ratio": self.keep_ratio,
            "plan": self.plan,
            "kept_dense": self.kept_dense,
            "params_dense": self.params_dense,
            "params_after": self.params_after,
            "achieved_ratio": self.achieved_ratio,
            "max_error": self.max_error,
            "errors": self.errors,
            "seed_index": self.seed_index,
            "internal_keep_ratio": self.internal_keep_ratio,
            "filled_steps": self.filled_steps,
            "seconds": self.seconds,
            "skipped": self.skipped,
            "budget": self.budget,
            "latency_ms_dense": self.latency_ms_dense,
            "latency_ms_after": self.latency_ms_after,
        }


# ------------------------------------------------------------------------------------------ tables


@torch.no_grad()
def error_table(
    name: str,
    weight: torch.Tensor,
    all_k: bool = True,
    error: ErrorKind = "exact",
    ks: Sequence[int] | None = None,
    min_rank: int = 1,
    min_saving: float = 0.0,
) -> LayerTable:
    """The error table of one dense weight (``f × c × κ1 × κ2`` or ``f × c``).

    ``k`` runs over ``ks`` (divisors of ``c``) if given, else every divisor of ``c`` (only ``k = 1``
    unless ``all_k``). ``error`` is one of the module docstring's definitions.
    """
    w = weight.detach().to("cpu", torch.float64)
    f, c = w.shape[0], w.shape[1]
    kk = w[0, 0].numel()
    full = _singular_values(w.reshape(1, f, c * kk))[0]
    top = float(full[0]) if float(full[0]) > 0 else 1.0
    frob2 = float(w.pow(2).sum()) or 1.0
    errors: dict[int, np.ndarray] = {}
    groups = list(ks) if ks is not None else divisors(c) if all_k else [1]
    for k in groups:
        s = full[None] if k == 1 else _singular_values(folded_groups(w, k))  # k × m
        if error == "exact":
            energy = (s * s).sum(dim=0)  # Σ_i σ_l(W_i)², l = 1..m
            tail = torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0])  # Σ_{l >= j}
            e = (torch.cat([tail[1:], tail.new_zeros(1)]) / frob2).sqrt()  # ε(k, j): Σ_{l > j}, index j−1
        else:
            worst = s.max(dim=0).values / top  # max_i σ_j(W_i) / σ₁(W), j = 1..m
            e = torch.cat([worst[1:], worst.new_zeros(1)])  # ε(k, j) = max_i σ_{j+1}: index j−1
            if error == "theorem":
                e = e * math.sqrt(k)
        errors[k] = torch.cummin(e, dim=0).values.numpy()  # guard the monotonicity against rounding
    return LayerTable(name, f, c, kk, errors, full.numpy(), min_rank=min_rank, min_saving=min_saving)


def _singular_values(mats: torch.Tensor) -> torch.Tensor:
    """Descending singular values of a batch of float64 matrices, via the eigenvalues of the smaller Gram matrix.

    Much faster than an SVD for the wide folded matrices of convs; the absolute error of a singular
    value is about 1e-8·σ₁, far below what the error tables need.
    """
    gram = mats @ mats.transpose(-1, -2) if mats.shape[-2] <= mats.shape[-1] else mats.transpose(-1, -2) @ mats
    eig = torch.linalg.eigvalsh(gram).clamp_min(0.0).sqrt()  # ascending
    return eig.flip(-1)


def target_layers(model: nn.Module, names: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Split ``names`` into decomposable layers (dense or already decomposed) and skipped ones (with reasons)."""
    tied = _tied_weights(model)
    ok, skipped = [], {}
    for name in names:
        layer = get_submodule(model, name)
        reason = None if isinstance(layer, LowRankLayer) else undecomposable_reason(layer)
        if reason is None:
            reason = read_by_parent_reason(model, name)
        if reason is None and name in tied:
            reason = "its weight is shared with another module"
        if reason is None:
            ok.append(name)
        else:
            skipped[name] = reason
    return ok, skipped


def _tied_weights(model: nn.Module) -> set[str]:
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(mname)
    return {n for names in owners.values() if len(set(names)) > 1 for n in names}


def dense_param_count(model: nn.Module, names: Sequence[str]) -> int:
    """Parameters of ``model`` (unique storage) with every named :class:`LowRankLayer` counted dense."""
    total = sum(p.numel() for p in model.parameters())
    for name in names:
        layer = get_submodule(model, name)
        if isinstance(layer, LowRankLayer):
            f, c, kk = layer_shape(layer)
            bias = 0 if layer.decoder.bias is None else f
            total += f * c * kk + bias - sum(p.numel() for p in layer.parameters())
    return total


def min_keep_ratio(model: nn.Module, names: Sequence[str], min_rank: int = 1, min_saving: float = 0.0) -> float:
    """The smallest keep ratio ALDS can reach on ``model`` with ``names`` as targets: rank ``min_rank``
    (one group) everywhere, each layer left dense where that saves less than ``min_saving`` of it.

    Cheap (shapes only, no SVD), so callers can refuse an impossible ``keep_ratio`` before training;
    it is the same floor :func:`allocate` checks.
    """
    ok, _ = target_layers(model, names)
    params_dense = dense_param_count(model, ok)
    if not ok or params_dense <= 0:
        return 1.0
    floor = params_dense
    for name in ok:
        f, c, kk = layer_shape(get_submodule(model, name))
        dense = f * c * kk
        smallest = low_rank_size(f, c, kk, 1, min_rank)
        if smallest <= (1.0 - min_saving) * dense:
            floor -= dense - smallest
    return floor / params_dense


# ------------------------------------------------------------------------------------------ search


class _Search:
    """Global/local ALDS steps over fixed tables for a weight budget ``B`` (see the module docstring)."""

    def __init__(self, tables: list[LayerTable]) -> None:
        self.tables = tables
        width = max(len(e) for t in tables for e in t.errors.values())
        # Per layer and k: the error table padded with -1 (never above an ε >= 0) to a common width.
        self.padded = [
            {k: np.pad(e, (0, width - len(e)), constant_values=-1.0) for k, e in t.errors.items()} for t in tables
        ]
        self.dense = np.array([t.dense for t in tables], dtype=np.int64)
        self.cap = np.array([t.cap for t in tables], dtype=np.float64)

    def global_step(self, ks: list[int], budget: float) -> tuple[list[int], float] | None:
        """Ranks for the smallest ε that fits ``budget``, and the resulting worst error; ``None`` if none fits."""
        table = np.stack([p[k] for p, k in zip(self.padded, ks)])  # L × width
        full = np.array([len(t.errors[k]) for t, k in zip(self.tables, ks)])
        lowest = np.array([t.lowest(k) for t, k in zip(self.tables, ks)])
        big = np.iinfo(np.int64).max
        max_j = np.array([big if t.max_j is None else t.max_j.get(k, 0) for t, k in zip(self.tables, ks)])
        coef = np.array([k * t.f + t.c * t.kk for t, k in zip(self.tables, ks)], dtype=np.int64)

        def ranks(eps: float) -> np.ndarray:
            return np.clip((table > eps).sum(axis=1) + 1, lowest, full)

        def total(js: np.ndarray) -> int:
            size = js * coef
            ok = (size < self.dense) & (size <= self.cap) & (js <= max_j)
            return int(np.where(ok, size, self.dense).sum())

        cand = np.unique(table[table >= 0])
        if total(ranks(float(cand[-1]))) > budget:
            return None
        lo, hi = 0, len(cand) - 1  # bisection: the smallest breakpoint whose allocation fits
        while lo < hi:
            mid = (lo + hi) // 2
            if total(ranks(float(cand[mid]))) <= budget:
                hi = mid
            else:
                lo = mid + 1
        js = [int(j) for j in ranks(float(cand[lo]))]
        worst = max((t.error(k, j) for t, k, j in zip(self.tables, ks, js)), default=0.0)
        return js, worst

    def local_step(self, ks: list[int], js: list[int], rho: float) -> list[int]:
        new = []
        for t, k, j in zip(self.tables, ks, js):
            b = low_rank_size(t.f, t.c, t.kk, k, j)
            best_k, best_err = k, t.error(k, j)
            for k2 in t.ks:
                j2 = math.floor(b / (k2 * t.f + t.c * t.kk) + rho)
                if j2 < 1:
                    continue
                j2 = t.clamp(k2, j2)
                if not t.decomposes(k2, j2):
                    continue  # over the size/latency guards: it would stay dense, not cost b
                err = t.error(k2, j2)
                if err < best_err:
                    best_k, best_err = k2, err
            new.append(best_k)
        return new

    def solve_with_halving(self, ks: list[int], budget: float) -> tuple[list[int], list[int], float]:
        while True:
            res = self.global_step(ks, budget)
            if res is not None:
                return ks, res[0], res[1]
            if all(k == 1 for k in ks):
                raise SurgeryError("ALDS: the budget is infeasible even at k = 1")  # the caller checked it
            ks = [max(d for d in t.ks if d <= max(1, k // 2)) for t, k in zip(self.tables, ks)]

    def run_seed(self, ks: list[int], budget: float, alternations: int) -> tuple[list[int], list[int], float]:
        rho = 0.5
        ks, js, worst = self.solve_with_halving(ks, budget)
        for _ in range(alternations):
            while True:
                new_ks = self.local_step(ks, js, rho)
                res = self.global_step(new_ks, budget)
                if res is not None or rho < 0.05:
                    break
                rho -= 0.2
            if res is None:
                break
            if res[1] > worst:  # no progress: keep the better allocation
                break
            ks, (js, worst) = new_ks, res
        return ks, js, worst


def _initial_ks(tables: list[LayerTable], seed_index: int, rng: np.random.Generator) -> list[int]:
    if seed_index < 4:
        target = (3, 5, 7, 9)[seed_index]
        return [min(t.ks, key=lambda d: (abs(d - target), d)) for t in tables]
    return [int(rng.choice(t.ks)) for t in tables]


def _alds_search(
    tables: list[LayerTable], budget: float, seed: int, num_seeds: int, alternations: int
) -> tuple[list[int], list[int], float, int]:
    search = _Search(tables)
    rng = np.random.default_rng(seed)
    results: list[tuple[tuple[float, int], list[int], list[int], int]] = []
    for s in range(num_seeds):
        ks, js, worst = search.run_seed(_initial_ks(tables, s, rng), budget, alternations)
        size = sum(t.size(k, j) for t, k, j in zip(tables, ks, js))
        results.append(((worst, -size), ks, js, s))
    (worst, _), ks, js, s = min(results, key=lambda r: r[0])  # the smallest worst error, then the largest size
    return ks, js, worst, s


def _knob_search(tables: list[LayerTable], budget: float, rank_of: Any) -> list[int]:
    """Largest knob in [0, 1] whose k = 1 ranks ``rank_of(table, knob)`` fit the budget (bisection)."""

    def fits(x: float) -> bool:
        return sum(t.size(1, t.clamp(1, rank_of(t, x))) for t in tables) <= budget

    lo, hi = 0.0, 1.0
    if fits(hi):
        lo = hi
    for _ in range(50):
        if lo == hi:
            break
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return [t.clamp(1, rank_of(t, lo)) for t in tables]


def _uniform_rank(t: LayerTable, alpha: float) -> int:
    m = len(t.errors[1])
    return max(1, min(m, math.floor(alpha * m + 1e-9)))


def _energy_rank(t: LayerTable, tau: float) -> int:
    energy = np.cumsum(t.svals.astype(np.float64) ** 2)
    energy = energy / energy[-1] if energy[-1] > 0 else np.ones_like(energy)
    return max(1, min(len(energy), int(np.searchsorted(energy, tau - 1e-12, side="left")) + 1))


def _fill(tables: list[LayerTable], ks: list[int], js: list[int], leftover: float) -> tuple[list[int], int]:
    """Raise the rank of the worst layers one step at a time while the leftover budget allows."""
    js = list(js)
    heap = [(-t.error(k, j), i) for i, (t, k, j) in enumerate(zip(tables, ks, js)) if t.error(k, j) > 0]
    heapq.heapify(heap)
    steps = 0
    while heap:
        _, i = heapq.heappop(heap)
        t, k, j = tables[i], ks[i], js[i]
        if j >= len(t.errors[k]):
            continue
        delta = t.size(k, j + 1) - t.size(k, j)
        if delta > leftover:
            continue  # this layer's step no longer fits; smaller ones may
        js[i], leftover, steps = j + 1, leftover - delta, steps + 1
        if t.error(k, j + 1) > 0:
            heapq.heappush(heap, (-t.error(k, j + 1), i))
    return js, steps


# ------------------------------------------------------------------------------------------ entry point


def allocate(
    model: nn.Module,
    names: Sequence[str],
    keep_ratio: float,
    method: Method = "alds",
    seed: int = 0,
    num_seeds: int = 15,
    alternations: int = 4,
    error: ErrorKind = "exact",
    progress: bool = True,
    current_ratio: float = 1.0,
    min_rank: int = 2,
    min_saving: float = 0.1,
    latencies: Mapping[str, Any] | None = None,
) -> Allocation:
    """Allocate ``(k, j)`` for the layers ``names`` of ``model`` so the whole model keeps ``keep_ratio``.

    ``names`` may hold dense layers and :class:`LowRankLayer` (taken at their recomposed weight);
    layers that cannot be decomposed are skipped with a reason in ``Allocation.skipped``.
    Deterministic for a given ``seed``. ``error``, ``min_rank`` and ``min_saving``: see the module
    docstring. ``latencies`` (``{name: LayerLatency}``, :mod:`lit_compress.surgery.alds.latency_budget`):
    a latency guard; only its ``k`` are searched and a decomposition must time at most
    ``(1 − min_saving)`` × its dense layer, else the layer stays dense (``method="alds"`` only).

    Raises:
        ConfigError: ``keep_ratio`` outside (0, 1], ``num_seeds`` < 1, ``alternations`` < 0, an unknown
            ``error``, ``min_rank`` < 1, ``min_saving`` outside [0, 1), no
            decomposable layer among ``names``, or a budget below what rank 1 everywhere needs (the
            message gives the smallest reachable ratio).
    """
    start = time.perf_counter()
    if not isinstance(keep_ratio, (int, float)) or not 0 < keep_ratio <= 1:
        raise allowed("keep_ratio", keep_ratio, "must be in (0, 1]")
    if method not in ("alds", "uniform", "energy"):
        raise allowed("method", method, "must be one of 'alds', 'uniform', 'energy'")
    check_guards(error, min_rank, min_saving)
    for name, value, least in (("num_seeds", num_seeds, 1), ("alternations", alternations, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise allowed(name, value, f"must be an int >= {least}")
    ok, skipped = target_layers(model, names)
    if not ok:
        detail = "; ".join(f"{n}: {r}" for n, r in list(skipped.items())[:5]) or "no module given"
        raise ConfigError(
            "`targets` select no decomposable layer (allowed: Conv2d with groups=1 and Linear, weights not "
            f"shared); {detail}."
        )
    params_dense = dense_param_count(model, ok)
    guard_ks = None
    if latencies is not None:
        missing = [n for n in ok if n not in latencies]
        if missing or method != "alds":
            raise ConfigError(f"ALDS latency guard: method must be 'alds' and the table must hold {missing[:5]}.")
        guard_ks = {n: sorted({1, *latencies[n].points}) for n in ok}
    tables = _tables(
        model,
        ok,
        all_k=method == "alds",
        error=error,
        progress=progress,
        min_rank=min_rank,
        min_saving=min_saving,
        ks=guard_ks,
    )
    if latencies is not None:
        for t in tables:
            t.max_j = _fast_ranks(t, latencies[t.name], min_saving)
    fixed = params_dense - sum(t.dense for t in tables)
    target = keep_ratio * params_dense
    floor_size = sum(t.size(1, t.lowest(1)) for t in tables)
    if fixed + floor_size > target:
        raise allowed(
            "keep_ratio",
            keep_ratio,
            f"even rank {min_rank} (`min_rank`) in every decomposable target leaves {fixed + floor_size:,} "
            f"of {params_dense:,} parameters, "
            f"so it must be at least {(fixed + floor_size) / params_dense:.4f} with these `targets`",
        )

    def run(internal: float) -> tuple[list[int], list[int], float, int]:
        budget = internal * params_dense - fixed
        if method == "alds":
            return _alds_search(tables, budget, seed, num_seeds, alternations)
        rank_of = _uniform_rank if method == "uniform" else _energy_rank
        js = _knob_search(tables, budget, rank_of)
        ks = [1] * len(tables)
        return ks, js, max(t.error(1, j) for t, j in zip(tables, js)), -1

    def size_of(ks: list[int], js: list[int]) -> int:
        return fixed + sum(t.size(k, j) for t, k, j in zip(tables, ks, js))

    internal = keep_ratio
    ks, js, worst, seed_index = run(internal)
    best = (size_of(ks, js), internal, ks, js, worst, seed_index)
    if best[0] < (1 - TOLERANCE) * target and method == "alds":
        # Keep-ratio correction: root-find the allocator's own ratio so the real ratio meets the target
        # (regula falsi on the shortfall, bracket [target, max(target, 0.999·current)], at most 20 rounds).
        lo, lo_size, hi = keep_ratio, best[0], max(keep_ratio, 0.999 * current_ratio)
        for _ in range(20):
            if hi - lo < 1e-7 or best[0] >= (1 - TOLERANCE) * target:
                break
            guess = lo + (target - lo_size) / params_dense
            if not lo < guess < hi:
                guess = 0.5 * (lo + hi)
            res = run(guess)
            size = size_of(res[0], res[1])
            if size <= target:
                lo, lo_size = guess, size
                if size > best[0]:
                    best = (size, guess, *res)
            else:
                hi = guess
    size, internal, ks, js, worst, seed_index = best
    filled = 0
    if size < (1 - TOLERANCE) * target:
        js, filled = _fill(tables, ks, js, target - size)
    plan: LowRankPlan = {}
    dense: list[str] = []
    errors: dict[str, float] = {}
    for t, k, j in zip(tables, ks, js):
        errors[t.name] = t.error(k, j)
        if t.decomposes(k, j):
            plan[t.name] = {"groups": int(k), "rank": int(j)}
        else:
            dense.append(t.name)
    return Allocation(
        method=method,
        keep_ratio=float(keep_ratio),
        plan=plan,
        kept_dense=dense,
        params_dense=params_dense,
        params_after=size_of(ks, js),
        max_error=max(errors.values()),
        errors=errors,
        seed_index=seed_index,
        internal_keep_ratio=float(internal),
        filled_steps=filled,
        seconds=time.perf_counter() - start,
        skipped=skipped,
    )


def _fast_ranks(t: LayerTable, lat: Any, min_saving: float) -> dict[int, int]:
    """Per ``k``: the largest rank whose (interpolated, monotone) table time is at most ``(1 − min_saving)`` × dense."""
    cap = (1.0 - min_saving) * lat.dense
    out = {}
    for k in t.ks:
        j = 0
        while j < len(t.errors[k]) and lat.time(k, j + 1) <= cap:  # the prefix of fast ranks
            j += 1
        out[k] = j
    return out


def _tables(
    model: nn.Module,
    names: list[str],
    all_k: bool,
    error: ErrorKind,
    progress: bool,
    min_rank: int = 1,
    min_saving: float = 0.0,
    ks: dict[str, list[int]] | None = None,
) -> list[LayerTable]:
    from tqdm.auto import tqdm

    tables = []
    bar = tqdm(names, desc="ALDS error tables", unit="layer", delay=1.0, disable=not progress, leave=False)
    with single_thread():  # see its docstring: multi-threaded LAPACK stalled on a busy machine
        for name in bar:
            weight, _ = dense_weight(get_submodule(model, name))
            table = error_table(
                name,
                weight,
                all_k=all_k,
                error=error,
                ks=None if ks is None else ks[name],
                min_rank=min_rank,
                min_saving=min_saving,
            )
            tables.append(table)
    return tables


def check_guards(error: Any, min_rank: Any, min_saving: Any) -> None:
    """Validate ``error``, ``min_rank`` and ``min_saving`` (shared with the latency-budget allocator)."""
    if error not in ERROR_KINDS:
        raise allowed("error", error, "must be one of 'exact', 'lower_bound', 'theorem'")
    if isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1:
        raise allowed("min_rank", min_rank, "must be an int >= 1")
    if isinstance(min_saving, bool) or not isinstance(min_saving, (int, float)) or not 0 <= min_saving < 1:
        raise allowed("min_saving", min_saving, "must be a fraction in [0, 1)")


__all__ = [
    "ERROR_KINDS",
    "Allocation",
    "ErrorKind",
    "LayerTable",
    "allocate",
    "check_guards",
    "dense_param_count",
    "error_table",
    "target_layers",
]
