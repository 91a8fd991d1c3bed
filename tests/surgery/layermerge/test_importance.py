"""LayerMerge importance scores: 1 for unchanged blocks, positive elsewhere, the model untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.layermerge.blocks import analyze_merge_space, enumerate_candidates, site_input_shapes
from lit_compress.surgery.layermerge.importance import importance_table


def _space(size: int = 12):
    from lit_compress.models.cifar_resnet import cifar_resnet

    net = cifar_resnet(8, in_channels=1, width_mult=0.25)
    space = analyze_merge_space(net)
    site_input_shapes(net, space, torch.zeros(1, 1, size, size))
    return net, space, enumerate_candidates(net, space)


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
