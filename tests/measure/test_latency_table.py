"""LayerMerge's latency table: the cache is keyed by device, batch and shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

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


def test_latency_cache_is_reused_only_for_the_same_context(tmp_path: Path) -> None:
    _net, space, cands = _space()
    cache = tmp_path / "lat.json"
    logs: list[str] = []
    kw = dict(warmup=0, repeats=1, cache=cache, progress=False, log=logs.append)
    first = latency_table(space, cands, batch_size=1, **kw)
    assert set(first) == {c.key for c in cands} and all(v > 0 for v in first.values())
    assert original_latency(space, cands, first) > 0
    data = json.loads(cache.read_text())
    (context,) = data["tables"]
    # a doctored cached value is reused in the same context ...
    for key in data["tables"][context]["entries"]:
        data["tables"][context]["entries"][key] = 123.0
    cache.write_text(json.dumps(data))
    assert set(latency_table(space, cands, batch_size=1, **kw).values()) == {123.0}
    # ... but never for another batch size or input shape
    other = latency_table(space, cands, batch_size=2, **kw)
    assert 123.0 not in other.values() and any("none is reused" in m for m in logs)
    _, space16, cands16 = _space(16)
    assert 123.0 not in latency_table(space16, cands16, batch_size=1, **kw).values()
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ConfigError, match="not a LayerMerge latency cache"):
        latency_table(space, cands, cache=bad, progress=False)
