"""LayerMerge's latency table: the cache is keyed by device, batch and shape.

The cache logic runs on a fake timer (``measure_latency`` replaced); only the test marked ``slow``
times the layers for real.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lit_compress.measure.latency_table as table_module
from lit_compress.errors import ConfigError
from lit_compress.measure.latency_table import (
    LatencyTableWarning,
    check_plan_latency,
    inconsistent_entries,
    latency_key,
    latency_table,
    measure_plan,
)
from lit_compress.surgery.layermerge.blocks import (
    analyze_merge_space,
    enumerate_candidates,
    original_latency,
    site_input_shapes,
)


def _space(size: int = 12):
    from lit_compress.models.cifar_resnet import cifar_resnet

    net = cifar_resnet(8, in_channels=1, width_mult=0.25)
    space = analyze_merge_space(net)
    site_input_shapes(net, space, torch.zeros(1, 1, size, size))
    return net, space, enumerate_candidates(net, space)


@pytest.fixture
def timed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Replace the timer: a layer "takes" 1 ms per 1000 weights; each call's (weights, batch) is listed."""
    calls: list[tuple[int, int]] = []

    def fake_latency(layer: nn.Module, *, batch_size: int, **_: Any) -> dict[str, float]:
        weights = sum(p.numel() for p in layer.parameters())
        calls.append((weights, batch_size))
        return {"median_ms": weights / 1000.0}

    monkeypatch.setattr(table_module, "measure_latency", fake_latency)
    return calls


def test_latency_cache_is_reused_only_for_the_same_context(tmp_path: Path, timed: list[tuple[int, int]]) -> None:
    _net, space, cands = _space()
    cache = tmp_path / "lat.json"
    logs: list[str] = []
    kw = dict(warmup=0, repeats=1, cache=cache, progress=False, log=logs.append)
    first = latency_table(space, cands, batch_size=1, **kw)
    assert set(first) == {c.key for c in cands} and all(v > 0 for v in first.values())
    data = json.loads(cache.read_text())
    (context,) = data["tables"]
    entries = data["tables"][context]["entries"]
    assert len(timed) == 3 * len(entries) and len(entries) < len(cands)  # equal layers once per round (3 rounds)
    assert data["tables"][context]["threads"] == torch.get_num_threads() and "loadavg" in data["tables"][context]
    assert original_latency(space, cands, first) > 0
    # a doctored cached value is reused in the same context ...
    for key in data["tables"][context]["entries"]:
        data["tables"][context]["entries"][key] = 123.0
    cache.write_text(json.dumps(data))
    before = len(timed)
    assert set(latency_table(space, cands, batch_size=1, **kw).values()) == {123.0}
    assert len(timed) == before  # nothing was timed again
    # ... but never for another batch size or input shape
    other = latency_table(space, cands, batch_size=2, **kw)
    assert 123.0 not in other.values() and any("none is reused" in m for m in logs)
    assert {b for _, b in timed[before:]} == {2}
    _, space16, cands16 = _space(16)
    assert 123.0 not in latency_table(space16, cands16, batch_size=1, **kw).values()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not a LayerMerge latency cache"):
        latency_table(space, cands, cache=bad, progress=False)


@pytest.mark.slow
def test_real_timings_are_positive(tmp_path: Path) -> None:
    _net, space, cands = _space()
    table = latency_table(space, cands, batch_size=1, warmup=0, repeats=1, cache=tmp_path / "lat.json", progress=False)
    assert set(table) == {c.key for c in cands} and all(v > 0 for v in table.values())
    assert original_latency(space, cands, table) > 0


@pytest.mark.filterwarnings("ignore::lit_compress.measure.latency_table.LatencyTableWarning")  # real timing, any load
def test_measuring_the_table_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """Building candidate layers and drawing inputs must not shift training's RNG (a run that reads the
    table from the cache would otherwise diverge from one that measured it: resume was not bit-exact)."""
    _net, space, cands = _space(8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    latency_table(space, cands[:3], batch_size=1, warmup=0, repeats=1, cache=tmp_path / "lat.json", progress=False)
    assert torch.equal(torch.get_rng_state(), state)


def test_each_entry_is_the_best_of_interleaved_rounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst of load during one round does not stick: entries are the minimum over rounds, and the rounds
    interleave (every entry once per round), so one slow stretch of time hits one round of several entries."""
    _net, space, cands = _space()
    order: list[int] = []
    clock = iter(range(10_000))

    def loaded_timer(layer: nn.Module, input_shape: Any, batch_size: int, *_: Any) -> float:
        weights = sum(p.numel() for p in layer.parameters())
        order.append(weights)
        tick = next(clock)
        return weights / 1000.0 * (50.0 if tick < 4 else 1.0)  # the first 4 timings run under load

    monkeypatch.setattr(table_module, "time_layer", loaded_timer)
    table = latency_table(space, cands, rounds=2, progress=False, log=lambda _: None)
    n = len(order) // 2
    assert order[:n] == order[n:]  # round 2 repeats round 1's order: interleaved, not 2 in a row per entry
    unit = {
        c.key: (c.in_channels * (1 if c.depthwise else c.out_channels) * c.kernel**2 + c.out_channels) / 1000
        for c in cands
    }
    for key, ms in table.items():
        assert ms == pytest.approx(unit[key])  # the loaded first round is gone everywhere


def test_a_corrupted_entry_is_detected_and_remeasured(tmp_path: Path, timed: list[tuple[int, int]]) -> None:
    """One cached entry 100x too slow (a 5x5 timed under load) is found by the kernel-order check and re-measured."""
    _net, space, cands = _space()
    cache = tmp_path / "lat.json"
    logs: list[str] = []
    kw: dict[str, Any] = dict(progress=False, cache=cache, log=logs.append)
    clean = latency_table(space, cands, **kw)
    data = json.loads(cache.read_text())
    (context,) = data["tables"]
    entries = data["tables"][context]["entries"]
    big = next(k for k in entries if "_k5_" in k or "_k7_" in k)
    entries[big] *= 100.0
    cache.write_text(json.dumps(data))
    before = len(timed)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyTableWarning)  # fixed by re-measuring: no warning
        again = latency_table(space, cands, **kw)
    assert again == clean and any("re-measuring" in m and big in m for m in logs)
    assert 0 < len(timed) - before < 3 * len(entries)  # only the suspicious entries were timed again
    assert json.loads(cache.read_text())["tables"][context]["entries"][big] == pytest.approx(entries[big] / 100.0)


def test_an_entry_that_stays_inconsistent_is_named_in_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """A timer that keeps timing one kernel faster than a smaller one: re-measured, then a warning names it."""
    _net, space, cands = _space()
    calls: list[int] = []

    def odd_timer(layer: nn.Module, *_: Any) -> float:
        conv = next(m for m in layer.modules() if isinstance(m, nn.Conv2d))
        calls.append(conv.kernel_size[0])
        return 0.01 if conv.kernel_size[0] > 3 else 1.0  # every larger kernel "faster" than its 3x3

    monkeypatch.setattr(table_module, "time_layer", odd_timer)
    with pytest.warns(LatencyTableWarning, match=r"stay inconsistent after 2 re-measurement.*faster than the smaller"):
        latency_table(space, cands, rounds=1, remeasure=2, progress=False, log=lambda _: None)
    first = len({latency_key_of(c, space) for c in cands})
    assert len(calls) > first  # re-measured before warning
    with pytest.raises(ConfigError, match="`latency_rounds`=0"):
        latency_table(space, cands, rounds=0, progress=False)


def test_inconsistent_entries_checks_both_directions() -> None:
    base = "in8_out8_s1_dense_h6_w6_ReLU"
    k3, k5 = base.replace("in8_out8_", "in8_out8_k3_"), base.replace("in8_out8_", "in8_out8_k5_")
    assert inconsistent_entries({k3: 1.0, k5: 2.5}) == {}  # 2.78x the multiply-adds, 2.5x the time: fine
    assert set(inconsistent_entries({k3: 1.0, k5: 0.5})) == {k3, k5}  # larger kernel faster
    assert set(inconsistent_entries({k3: 1.0, k5: 100.0})) == {k3, k5}  # 100x: more than 3x the ratio
    other = k5.replace("h6_w6", "h7_w7")
    assert inconsistent_entries({k3: 1.0, other: 100.0}) == {}  # another shape: not comparable


def test_measured_plan_over_budget_or_off_the_table_warns(timed: list[tuple[int, int]]) -> None:
    _net, space, cands = _space()
    table = latency_table(space, cands, progress=False, log=lambda _: None)
    chosen = [c for c in cands if c.is_original(space)]
    predicted = sum(table[c.key] for c in chosen)
    measured = measure_plan(space, chosen, rounds=2)
    assert measured == pytest.approx(predicted)  # the fake timer is additive: the chain equals the table sum
    assert timed[-1][1] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatencyTableWarning)
        assert check_plan_latency(measured, predicted, budget_ms=predicted) == []
    with pytest.warns(LatencyTableWarning, match="over its budget"):
        assert len(check_plan_latency(measured, predicted, budget_ms=0.5 * predicted)) == 1
    with pytest.warns(LatencyTableWarning, match="entries sum to"):
        assert len(check_plan_latency(2 * predicted, predicted, budget_ms=4 * predicted)) == 1


def latency_key_of(c: Any, space: Any) -> str:
    return latency_key(c, space.input_shapes[c.start + 1], space.act_class)
