"""LayerMerge's dynamic program: maximise summed importance under a latency budget.

Entries are ``(start, end, time, importance, payload)`` for blocks ``(start, end]``. Time is
discretised as ``g = floor(time / unit)``; with ``D[0][t] = 0`` for every ``t >= 0``::

    D[e][t] = max over entries (s, e) with g <= t of  D[s][t - g] + I

and the answer is ``D[L][floor(budget / unit)]``. Ties go to the smaller accumulated (discretised)
time. The table is exact: every tiling of 0..L by entries whose discretised times sum to at most
the budget is considered. Vectorised over ``t`` with numpy, so 10^5 time units take seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lit_compress.errors import ConfigError

__all__ = ["DPEntry", "DPResult", "fastest_plan_time", "solve_merge_dp"]


@dataclass(frozen=True)
class DPEntry:
    """One table row: block ``(start, end]`` costs ``time`` and is worth ``importance``."""

    start: int
    end: int
    time: float
    importance: float
    payload: Any = None


@dataclass(frozen=True)
class DPResult:
    """The chosen entries (in order), their summed importance and (discretised and real) time."""

    entries: list[DPEntry]
    importance: float
    time_units: int
    time: float
    budget_units: int


def solve_merge_dp(entries: Sequence[DPEntry], depth: int, budget: float, unit: float) -> DPResult:
    """Exact optimum of the LayerMerge DP.

    Args:
        entries: Table rows; blocks ``(s, e]`` with ``0 <= s < e <= depth``.
        depth: ``L``, the last position.
        budget: The latency budget ``T0`` (same unit as the entries' ``time``).
        unit: The time quantum (e.g. 0.1 ms in the paper; smaller is finer and slower).

    Raises:
        ConfigError: For a bad argument, or if no tiling of 0..L fits the budget (the message gives
            the smallest achievable time).
    """
    if not (isinstance(unit, (int, float)) and unit > 0 and math.isfinite(unit)):
        raise ConfigError(f"`time_unit`={unit!r} is not allowed: must be a finite number > 0.")
    if not (isinstance(budget, (int, float)) and budget >= 0 and math.isfinite(budget)):
        raise ConfigError(f"`budget`={budget!r} is not allowed: must be a finite number >= 0.")
    budget_units = math.floor(budget / unit + 1e-9)
    if budget_units > 5_000_000:
        raise ConfigError(
            f"`time_unit`={unit!r} is too fine for a budget of {budget:g}: {budget_units} time units; "
            "use a coarser unit."
        )
    by_end: dict[int, list[DPEntry]] = {}
    for entry in entries:
        if not 0 <= entry.start < entry.end <= depth:
            raise ConfigError(f"DP entry ({entry.start}, {entry.end}] lies outside positions 0..{depth}.")
        by_end.setdefault(entry.end, []).append(entry)
    size = budget_units + 1
    neg = -np.inf
    value = np.full((depth + 1, size), neg)
    used = np.zeros((depth + 1, size), dtype=np.int64)
    choice = np.full((depth + 1, size), -1, dtype=np.int64)
    value[0, :] = 0.0
    flat: list[DPEntry] = []
    for e in range(1, depth + 1):
        for entry in by_end.get(e, []):
            g = math.floor(entry.time / unit + 1e-9)
            if g > budget_units:
                flat.append(entry)
                continue
            k = len(flat)
            flat.append(entry)
            prev_v = value[entry.start, : size - g]
            cand_v = prev_v + entry.importance
            cand_t = used[entry.start, : size - g] + g
            cur_v = value[e, g:]
            cur_t = used[e, g:]
            better = np.isfinite(prev_v) & ((cand_v > cur_v) | ((cand_v == cur_v) & (cand_t < cur_t)))
            value[e, g:] = np.where(better, cand_v, cur_v)
            used[e, g:] = np.where(better, cand_t, cur_t)
            choice[e, g:] = np.where(better, k, choice[e, g:])
    if not np.isfinite(value[depth, budget_units]):
        minimum = _min_time(entries, depth, unit)
        raise ConfigError(
            f"no merge plan meets the latency budget {budget:g} ({budget_units} units of {unit:g}); the fastest plan "
            f"takes {minimum:g}"
            + ("" if math.isfinite(minimum) else " (no plan covers every position)")
            + ". Raise the budget."
        )
    chosen: list[DPEntry] = []
    e, t = depth, budget_units
    while e > 0:
        entry = flat[int(choice[e, t])]
        chosen.append(entry)
        t -= math.floor(entry.time / unit + 1e-9)
        e = entry.start
    chosen.reverse()
    return DPResult(
        entries=chosen,
        importance=float(value[depth, budget_units]),
        time_units=int(used[depth, budget_units]),
        time=float(sum(c.time for c in chosen)),
        budget_units=budget_units,
    )


def fastest_plan_time(entries: Sequence[DPEntry], depth: int, unit: float) -> float:
    """The smallest budget any plan can meet: the least summed discretised time of a tiling, times ``unit``.

    ``inf`` when no tiling of 0..L exists.
    """
    return _min_time(entries, depth, unit)


def _min_time(entries: Sequence[DPEntry], depth: int, unit: float) -> float:
    """The smallest summed (discretised) time of any tiling, times ``unit``."""
    best = [math.inf] * (depth + 1)
    best[0] = 0.0
    for e in range(1, depth + 1):
        for entry in entries:
            if entry.end == e and math.isfinite(best[entry.start]):
                best[e] = min(best[e], best[entry.start] + math.floor(entry.time / unit + 1e-9))
    return best[depth] * unit
