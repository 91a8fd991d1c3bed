"""ALDS under a latency budget, on a tiny net with injected (fake) latency tables: the optimiser alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.alds.allocate import allocate
from lit_compress.surgery.alds.latency_budget import LayerLatency, allocate_latency
from lit_compress.surgery.alds.low_rank import low_rank_decompose_, low_rank_size

NAMES = ["0", "2", "4"]


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3))
    with torch.no_grad():  # distinct, decaying spectra
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.logspace(0, -1.5, m.weight.shape[0]).reshape(-1, 1, 1, 1))
    return net


def _fake(layer: nn.Conv2d, slow: bool = False) -> LayerLatency:
    """Time proportional to the weights, plus 10 % per group; ``slow``: every decomposition 1.5x dense."""
    f, c, kk = layer.out_channels, layer.in_channels, 9
    dense = f * c * kk / 1000.0
    points: dict[int, list[tuple[int, float]]] = {}
    for k in (1, 2, 4):
        top = (f * c * kk - 1) // (k * f + c * kk)
        ranks = sorted({max(1, round(top * q)) for q in (0.125, 0.25, 0.5, 1.0)})
        ms = [(1.5 * dense if slow else low_rank_size(f, c, kk, k, j) / 1000.0 * (1 + 0.1 * k)) for j in ranks]
        points[k] = list(zip(ranks, ms))
    return LayerLatency(dense, points)


def _table(net: nn.Module, slow: str | None = None) -> dict[str, LayerLatency]:
    return {n: _fake(net.get_submodule(n), slow=n == slow) for n in NAMES}


@pytest.mark.parametrize("ratio", [0.4, 0.6, 0.8, 0.95])
def test_plan_table_latency_never_exceeds_the_budget(ratio: float) -> None:
    net = _net()
    table = _table(net)
    alloc = allocate_latency(net, NAMES, ratio, table, progress=False)
    assert alloc.latency_ms_dense == pytest.approx(sum(t.dense for t in table.values()))
    plan_ms = sum(table[n].time(s["groups"], s["rank"]) for n, s in alloc.plan.items())
    plan_ms += sum(table[n].dense for n in alloc.kept_dense)
    assert plan_ms == pytest.approx(alloc.latency_ms_after)
    assert plan_ms <= ratio * alloc.latency_ms_dense + 1e-12
    assert all(s["rank"] >= 2 for s in alloc.plan.values())
    # the parameter accounting is exact
    low_rank_decompose_(net, alloc.plan)
    assert sum(p.numel() for p in net.parameters()) == alloc.params_after


def test_looser_budgets_never_raise_the_worst_error_and_ratio_one_keeps_all_dense() -> None:
    net = _net()
    table = _table(net)
    worst = [allocate_latency(net, NAMES, r, table, progress=False).max_error for r in (0.4, 0.6, 0.8)]
    assert worst[0] >= worst[1] >= worst[2] and worst[0] > worst[2]
    full = allocate_latency(net, NAMES, 1.0, table, progress=False)
    assert full.plan == {} and full.max_error == 0.0


def test_a_layer_whose_decompositions_are_all_slower_stays_dense() -> None:
    net = _net()
    table = _table(net, slow="2")
    for ratio in (0.7, 0.85):
        alloc = allocate_latency(net, NAMES, ratio, table, progress=False)
        assert "2" in alloc.kept_dense and "2" not in alloc.plan
        for name, spec in alloc.plan.items():  # nothing picked is slower than (0.9 x) its dense layer
            assert table[name].time(spec["groups"], spec["rank"]) <= 0.9 * table[name].dense


def test_min_saving_drops_candidates_that_save_under_a_tenth_of_the_time() -> None:
    net = _net()
    table = _table(net)
    slow = table["4"]  # every decomposition of layer 4 saves only 5 %
    slow.points = {k: [(j, 0.95 * slow.dense) for j, _ in p] for k, p in slow.points.items()}
    guarded = allocate_latency(net, NAMES, 0.8, table, progress=False)
    assert "4" in guarded.kept_dense
    plain = allocate_latency(net, NAMES, 0.8, table, progress=False, min_saving=0.0)
    assert "4" in plain.plan


def test_bad_input_names_the_argument() -> None:
    net = _net()
    table = _table(net)
    for bad in (0, 1.5, -0.2):
        with pytest.raises(ConfigError, match=rf"`latency_ratio`={bad} is not allowed: must be in \(0, 1\]"):
            allocate_latency(net, NAMES, bad, table, progress=False)
    with pytest.raises(ConfigError, match=r"`latency_ratio`=0.01 is not allowed: the fastest .* at least 0\.\d+"):
        allocate_latency(net, NAMES, 0.01, table, progress=False)
    with pytest.raises(ConfigError, match=r"no entry for \['4'\]"):
        allocate_latency(net, NAMES, 0.5, {n: table[n] for n in ("0", "2")}, progress=False)
    with pytest.raises(ConfigError, match=r"`error`='code'"):
        allocate_latency(net, NAMES, 0.5, table, error="code", progress=False)  # type: ignore[arg-type]


def test_params_budget_with_the_latency_guard_never_picks_a_slow_decomposition() -> None:
    net = _net()
    table = _table(net, slow="2")
    plain = allocate(net, NAMES, 0.75, num_seeds=3, progress=False)
    assert "2" in plain.plan  # without the guard the slow layer is decomposed
    guarded = allocate(net, NAMES, 0.75, num_seeds=3, progress=False, latencies=table)
    assert "2" in guarded.kept_dense and guarded.params_after <= 0.75 * guarded.params_dense
    assert guarded.plan
    for name, spec in guarded.plan.items():
        assert spec["groups"] in table[name].points
        assert table[name].time(spec["groups"], spec["rank"]) <= 0.9 * table[name].dense
