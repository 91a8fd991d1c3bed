"""LayerMerge's DP: the optimum on hand-checked tables, and against brute force on random ones."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from lit_compress.errors import ConfigError
from lit_compress.surgery.layermerge.dp import DPEntry, solve_merge_dp


def test_hand_checked_table() -> None:
    # positions 0..3. Keeping everything: 3 + 3 + 3 = 9 ms, importance 3.
    # Merging (0, 2] costs 4 ms with importance 1.8; (1, 3] costs 4 ms, importance 1.5; (0, 3] 5 ms, 0.9.
    entries = [
        DPEntry(0, 1, 3.0, 1.0, "a"),
        DPEntry(1, 2, 3.0, 1.0, "b"),
        DPEntry(2, 3, 3.0, 1.0, "c"),
        DPEntry(0, 2, 4.0, 1.8, "ab"),
        DPEntry(1, 3, 4.0, 1.5, "bc"),
        DPEntry(0, 3, 5.0, 0.9, "abc"),
    ]

    def pick(budget: float) -> list[str]:
        return [e.payload for e in solve_merge_dp(entries, 3, budget, 1.0).entries]

    assert pick(9.0) == ["a", "b", "c"]  # 3.0
    assert pick(8.0) == ["ab", "c"]  # 2.8 beats a + bc (2.5)
    assert pick(7.0) == ["ab", "c"]
    assert pick(6.0) == ["abc"]  # only the full merge fits
    result = solve_merge_dp(entries, 3, 7.5, 1.0)
    assert math.isclose(result.importance, 2.8) and result.time_units == 7 and result.budget_units == 7
    with pytest.raises(ConfigError, match="fastest plan takes 5"):
        solve_merge_dp(entries, 3, 4.5, 1.0)


def test_ties_go_to_the_smaller_time() -> None:
    entries = [DPEntry(0, 1, 2.0, 1.0, "slow"), DPEntry(0, 1, 1.0, 1.0, "fast"), DPEntry(1, 2, 1.0, 1.0, "x")]
    result = solve_merge_dp(entries, 2, 10.0, 1.0)
    assert [e.payload for e in result.entries] == ["fast", "x"] and result.time_units == 2


def test_time_is_discretised_by_the_unit() -> None:
    entries = [DPEntry(0, 1, 0.29, 1.0, "a"), DPEntry(0, 1, 0.1, 0.5, "b")]
    assert solve_merge_dp(entries, 1, 0.2, 0.1).entries[0].payload == "a"  # floor(2.9) = 2 units fit
    assert solve_merge_dp(entries, 1, 0.19, 0.1).entries[0].payload == "b"


@pytest.mark.parametrize("seed", range(5))
def test_random_tables_match_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    depth = 5
    entries = [
        DPEntry(s, e, rng.randint(1, 6) * 0.5, rng.random(), (s, e, k))
        for e in range(1, depth + 1)
        for s in range(e)
        for k in range(rng.randint(0 if e - s > 1 else 1, 2))
    ]
    budget = rng.uniform(3, 12)
    best = -math.inf
    by_start: dict[int, list[DPEntry]] = {}
    for entry in entries:
        by_start.setdefault(entry.start, []).append(entry)

    def walk(pos: int, t: int, imp: float) -> None:
        nonlocal best
        if t > math.floor(budget / 0.5 + 1e-9):
            return
        if pos == depth:
            best = max(best, imp)
            return
        for entry in by_start.get(pos, []):
            walk(entry.end, t + int(entry.time / 0.5 + 1e-9), imp + entry.importance)

    walk(0, 0, 0.0)
    if best == -math.inf:
        with pytest.raises(ConfigError):
            solve_merge_dp(entries, depth, budget, 0.5)
        return
    result = solve_merge_dp(entries, depth, budget, 0.5)
    assert math.isclose(result.importance, best, rel_tol=1e-12)
    assert next(e.start for e in result.entries) == 0 and result.entries[-1].end == depth
    assert all(a.end == b.start for a, b in itertools.pairwise(result.entries))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match="time_unit"):
        solve_merge_dp([DPEntry(0, 1, 1.0, 1.0)], 1, 1.0, 0.0)
    with pytest.raises(ConfigError, match="outside"):
        solve_merge_dp([DPEntry(0, 2, 1.0, 1.0)], 1, 1.0, 1.0)
