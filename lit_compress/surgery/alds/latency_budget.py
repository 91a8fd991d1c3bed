"""ALDS under a latency budget: minimise the worst per-layer error so the layers run ``latency_ratio`` × as fast.

Beyond the paper (which budgets parameters) and the authors' code. Input: a per-layer latency table
(:class:`LayerLatency`, measured on the training device by :mod:`lit_compress.measure.alds_latency`):
the dense layer's time and, for a few group counts ``k``, the time of a handful of ranks ``j``; ranks
in between are interpolated linearly (latency grows with the rank), ranks below the smallest measured
one take its time (an over-estimate), ranks above the largest measured one are not candidates.

Problem: ``min max_ℓ ε_ℓ(k_ℓ, j_ℓ)`` subject to ``Σ_ℓ T_ℓ(k_ℓ, j_ℓ) ≤ latency_ratio · Σ_ℓ T_ℓ(dense)``,
summed over the decomposable targets (the rest of the network is not counted). A layer may stay dense
(error 0, its dense time). A decomposition is a candidate only if its table time is at most
``(1 − min_saving)`` × the dense layer's, so a layer whose every decomposition is slower stays dense.

Solution (exact for the table): for a threshold ε every layer takes its fastest candidate with
``ε_ℓ ≤ ε`` (or stays dense); the summed time is non-increasing in ε, so bisection over the
candidates' errors finds the smallest ε that fits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from lit_compress.errors import ConfigError, allowed
from lit_compress.surgery.alds.allocate import (
    Allocation,
    ErrorKind,
    LayerTable,
    _tables,
    check_guards,
    dense_param_count,
    target_layers,
)
from lit_compress.surgery.alds.low_rank import LowRankPlan, low_rank_size


@dataclass
class LayerLatency:
    """One layer's measured times in ms: ``dense`` and ``points[k] = [(j, ms), ...]`` (ascending j)."""

    dense: float
    points: dict[int, list[tuple[int, float]]] = field(default_factory=dict)

    def time(self, k: int, j: int) -> float:
        """Interpolated time of ``(k, j)``; ``inf`` above the largest measured rank or for an unmeasured k."""
        pts = self.points.get(k)
        if not pts or j > pts[-1][0]:
            return float("inf")
        ranks = np.array([p[0] for p in pts], dtype=np.float64)
        ms = np.array([p[1] for p in pts], dtype=np.float64)
        return float(np.interp(j, ranks, ms))  # clamps below the first point to its time


@dataclass
class _Options:
    """A layer's candidates, sorted by error: ``errors`` ascending, ``best`` = fastest time among the first i+1."""

    errors: np.ndarray
    best: np.ndarray
    best_choice: list[tuple[int, int, float, float]]  # (k, j, error, ms) of that fastest one
    dense_ms: float

    def pick(self, eps: float) -> tuple[int, int, float, float] | None:
        """The fastest candidate with error <= eps, or ``None`` (stay dense)."""
        i = int(np.searchsorted(self.errors, eps, side="right"))
        if i == 0:
            return None
        return self.best_choice[i - 1]

    def cost(self, eps: float) -> float:
        choice = self.pick(eps)
        return self.dense_ms if choice is None else choice[3]


def _options(table: LayerTable, lat: LayerLatency, min_saving: float) -> _Options:
    cap = (1.0 - min_saving) * lat.dense
    cands: list[tuple[float, float, int, int]] = []  # (error, ms, k, j)
    for k, pts in lat.points.items():
        if k not in table.errors or not pts:
            continue
        for j in range(table.lowest(k), min(pts[-1][0], len(table.errors[k])) + 1):
            if low_rank_size(table.f, table.c, table.kk, k, j) >= table.dense:
                break
            ms = lat.time(k, j)
            if ms <= cap:
                cands.append((float(table.errors[k][j - 1]), ms, k, j))
    cands.sort()
    errors = np.array([c[0] for c in cands], dtype=np.float64)
    best = np.empty(len(cands))
    choice: list[tuple[int, int, float, float]] = []
    for i, (err, ms, k, j) in enumerate(cands):
        if i == 0 or ms < best[i - 1]:
            best[i] = ms
            choice.append((k, j, err, ms))
        else:
            best[i] = best[i - 1]
            choice.append(choice[-1])
    return _Options(errors, best, choice, lat.dense)


def allocate_latency(
    model: nn.Module,
    names: Sequence[str],
    latency_ratio: float,
    latencies: dict[str, LayerLatency],
    error: ErrorKind = "exact",
    min_rank: int = 2,
    min_saving: float = 0.1,
    progress: bool = True,
) -> Allocation:
    """Allocate ``(k, j)`` for ``names`` so their summed table time is at most ``latency_ratio`` × dense.

    ``latencies`` must hold every decomposable layer of ``names``; only its ``k`` are considered.

    Raises:
        ConfigError: ``latency_ratio`` outside (0, 1], a bad ``error``/``min_rank``/``min_saving``, no
            decomposable layer, a layer missing from ``latencies``, or a ratio below what the fastest
            candidates reach (the message gives the smallest reachable ratio).
    """
    start = time.perf_counter()
    if isinstance(latency_ratio, bool) or not isinstance(latency_ratio, (int, float)) or not 0 < latency_ratio <= 1:
        raise allowed("latency_ratio", latency_ratio, "must be in (0, 1]")
    check_guards(error, min_rank, min_saving)
    ok, skipped = target_layers(model, names)
    if not ok:
        raise ConfigError(
            "`targets` select no decomposable layer (Conv2d with groups=1 or Linear, weights not shared)."
        )
    missing = [n for n in ok if n not in latencies]
    if missing:
        raise ConfigError(f"ALDS latency budget: the latency table has no entry for {missing[:5]}.")
    ks = {n: sorted(k for k in latencies[n].points) or [1] for n in ok}
    tables = _tables(model, ok, all_k=True, error=error, progress=progress, min_rank=min_rank, ks=ks)
    opts = [_options(t, latencies[t.name], min_saving) for t in tables]
    dense_ms = sum(o.dense_ms for o in opts)
    budget = latency_ratio * dense_ms

    def total(eps: float) -> float:
        return sum(o.cost(eps) for o in opts)

    cand = np.unique(np.concatenate([np.zeros(1)] + [o.errors for o in opts]))
    if total(float(cand[-1])) > budget:
        raise allowed(
            "latency_ratio",
            latency_ratio,
            f"the fastest measured candidates sum to {total(float(cand[-1])):.4g} of {dense_ms:.4g} ms, "
            f"so it must be at least {total(float(cand[-1])) / dense_ms:.4f} with these `targets`",
        )
    lo, hi = 0, len(cand) - 1  # the smallest threshold whose choices fit
    while lo < hi:
        mid = (lo + hi) // 2
        if total(float(cand[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    eps = float(cand[lo])
    plan: LowRankPlan = {}
    dense: list[str] = []
    errors: dict[str, float] = {}
    after_ms = 0.0
    params_dense = dense_param_count(model, ok)
    params_after = params_dense
    for t, o in zip(tables, opts):
        choice = o.pick(eps)
        if choice is None:
            dense.append(t.name)
            errors[t.name] = 0.0
            after_ms += o.dense_ms
            continue
        k, j, err, ms = choice
        plan[t.name] = {"groups": int(k), "rank": int(j)}
        errors[t.name] = err
        after_ms += ms
        params_after += low_rank_size(t.f, t.c, t.kk, k, j) - t.dense
    return Allocation(
        method="alds",
        keep_ratio=params_after / params_dense,
        plan=plan,
        kept_dense=dense,
        params_dense=params_dense,
        params_after=params_after,
        max_error=max(errors.values()),
        errors=errors,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        budget="latency",
        latency_ms_dense=dense_ms,
        latency_ms_after=after_ms,
    )


__all__ = ["LayerLatency", "allocate_latency"]
