"""LayerMerge's latency table: the cache is keyed by device, batch and shape.

The cache logic runs on a fake timer (``measure_latency`` replaced); only the test marked ``slow``
times the layers for real.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import lit_compress.measure.latency_table as table_module
from lit_compress.errors import ConfigError
from lit_compress.measure.latency_table import latency_table
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
    assert len(timed) == len(data["tables"][context]["entries"]) < len(cands)  # equal layers are timed once
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


def test_measuring_the_table_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    """Building candidate layers and drawing inputs must not shift training's RNG (a run that reads the
    table from the cache would otherwise diverge from one that measured it: resume was not bit-exact)."""
    _net, space, cands = _space(8)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    latency_table(space, cands[:3], batch_size=1, warmup=0, repeats=1, cache=tmp_path / "lat.json", progress=False)
    assert torch.equal(torch.get_rng_state(), state)
