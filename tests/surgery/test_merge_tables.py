"""LayerMerge tables: the latency cache is keyed by device, batch and shape; importance scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.merge_blocks import analyze_merge_space, enumerate_candidates, site_input_shapes
from lit_compress.surgery.merge_tables import importance_table, latency_table, original_latency


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


def _loss(model: nn.Module, batch):
    x, y = batch
    out = model(x)
    return nn.functional.cross_entropy(out, y), int((out.argmax(1) == y).sum()), len(y)


@pytest.mark.parametrize("method", ["loss_proxy", "finetune"])
def test_importance_is_one_for_unchanged_blocks_and_positive_elsewhere(method: str) -> None:
    torch.manual_seed(0)
    net, space, cands = _space()
    batches = [(torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))) for _ in range(3)]
    before = {k: v.clone() for k, v in net.state_dict().items()}
    table = importance_table(
        net,
        space,
        cands,
        train_batches=batches[:2],
        holdout_batches=batches[2:],
        forward_loss=_loss,
        method=method,
        steps=2,
        progress=False,
    )
    assert set(table) == {c.key for c in cands}
    assert all(table[c.key] == 1.0 for c in cands if c.is_original(space))
    assert all(v > 0 for v in table.values())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # the model is untouched
    with pytest.raises(ConfigError, match="importance"):
        importance_table(
            net, space, cands, train_batches=batches, holdout_batches=batches, forward_loss=_loss, method="magic"
        )
