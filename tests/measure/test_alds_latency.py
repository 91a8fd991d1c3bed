"""ALDS latency tables: input shapes, candidates, the monotonicity check, the cache (mostly with a fake timer)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.measure.alds_latency import alds_latency_table, candidate_ranks, layer_input_shapes
from lit_compress.surgery.alds.low_rank import LowRankLayer

NAMES = ["0", "2", "4", "7"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),  # the same configuration and input shape as "2": timed once
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


class Unused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used, self.spare = nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


class FakeTimer:
    """Time = weights / 100 (dense and candidates alike); counts calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def __call__(self, modules: Sequence[nn.Module], shape: tuple[int, ...]) -> list[float]:
        self.calls.append(shape)
        return [sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight")) / 100 for m in modules]


def test_input_shapes_and_candidate_ranks() -> None:
    shapes = layer_input_shapes(_net(), NAMES, torch.randn(2, 3, 6, 6))
    assert shapes == {"0": (3, 6, 6), "2": (8, 6, 6), "4": (8, 6, 6), "7": (8,)}
    ranks = candidate_ranks(64, 64, 9, 1, min_rank=2, count=4)  # below dense: j <= 36863 // 640 = 57
    assert ranks == [2, 6, 19, 57]  # geometric: 2 · 28.5^(i/3)
    assert candidate_ranks(8, 4, 1, 1, min_rank=2) == [2]  # 2·(8 + 4) = 24 < 32 weights; rank 3 is not smaller
    assert candidate_ranks(3, 3, 1, 1, min_rank=2) == []  # rank 2 costs 12 > 9
    with pytest.raises(ConfigError, match=r"\['spare'\] are not called"):
        layer_input_shapes(Unused(), ["used", "spare"], torch.randn(1, 3))


def test_table_times_each_configuration_once_and_reuses_the_cache(tmp_path: Path) -> None:
    net, cache, timer = _net(), tmp_path / "alds.json", FakeTimer()
    table, info = alds_latency_table(net, NAMES, torch.randn(2, 3, 6, 6), cache=cache, timer=timer, progress=False)
    assert len(timer.calls) == 3 and info["measured"] == 3  # "2" and "4" share a configuration
    assert sorted(table["2"].points) == [1, 2, 4, 8] and sorted(table["0"].points) == [1]  # k must divide 3
    assert table["2"].dense == pytest.approx(8 * 8 * 9 / 100)
    for lat in table.values():
        for pts in lat.points.values():
            assert all(ms < lat.dense for _, ms in pts)  # every candidate has fewer weights than dense
            assert [j for j, _ in pts] == sorted(j for j, _ in pts)

    def refuse(modules: Sequence[nn.Module], shape: tuple[int, ...]) -> list[float]:
        raise AssertionError("the cache should have answered")

    again, info = alds_latency_table(net, NAMES, torch.randn(2, 3, 6, 6), cache=cache, timer=refuse, progress=False)
    assert info["measured"] == 0 and info["cached"] == 3
    assert {n: t.points for n, t in again.items()} == {n: t.points for n, t in table.items()}
    # another batch is another context: nothing is reused
    other = FakeTimer()
    alds_latency_table(net, NAMES, torch.randn(2, 3, 6, 6), cache=cache, timer=other, batch_size=4, progress=False)
    assert len(other.calls) == 3


def test_a_larger_rank_timed_faster_is_remeasured_then_flattened() -> None:
    calls = []

    def erratic(modules: Sequence[nn.Module], shape: tuple[int, ...]) -> list[float]:
        calls.append(1)  # decomposed layers: time falls with the rank (impossible), on both runs
        return [10.0] + [5.0 / m.rank if isinstance(m, LowRankLayer) else 10.0 for m in modules[1:]]

    table, info = alds_latency_table(_net(), ["2"], torch.randn(1, 3, 6, 6), timer=erratic, progress=False)
    assert len(calls) == 2 and info["remeasured"] == 1 and info["flattened"] > 0
    for pts in table["2"].points.values():
        ms = [t for _, t in pts]
        assert ms == sorted(ms)  # the conservative envelope: non-decreasing in the rank


def test_real_timing_leaves_the_model_untouched() -> None:
    net = _net()
    before, threads = [id(m) for m in net], torch.get_num_threads()
    table, info = alds_latency_table(
        net, NAMES, torch.randn(2, 3, 6, 6), rounds=1, repeats=1, warmup=0, groups=[1, 2], progress=False, num_threads=1
    )
    assert [id(m) for m in net] == before and all(not isinstance(m, LowRankLayer) for m in net)
    assert all(t.dense > 0 and all(ms > 0 for p in t.points.values() for _, ms in p) for t in table.values())
    assert info["context"].endswith("threads1") and torch.get_num_threads() == threads


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ConfigError, match=r"`ranks_per_group`=0 is not allowed"):
        alds_latency_table(_net(), NAMES, torch.randn(1, 3, 6, 6), ranks_per_group=0, timer=FakeTimer())
    with pytest.raises(ConfigError, match=r"`latency_groups`=\[\] is not allowed"):
        alds_latency_table(_net(), NAMES, torch.randn(1, 3, 6, 6), groups=[], timer=FakeTimer())
