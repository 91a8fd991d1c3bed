"""LayerMerge importance scores: 1 for unchanged blocks, positive elsewhere, the model untouched."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.layermerge.blocks import analyze_merge_space, enumerate_candidates, site_input_shapes
from lit_compress.surgery.layermerge.dp import DPEntry, solve_merge_dp
from lit_compress.surgery.layermerge.importance import WORST_DP_VALUE, dp_value, importance_table


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


def _plan(importances: dict[tuple[int, int], float], value: Any) -> list[tuple[int, int]]:
    """The DP's blocks for depth 4 at budget 2.5: singles take 1, (0, 4] takes 2 and (2, 4] takes 0.5."""
    times = {(0, 1): 1.0, (1, 2): 1.0, (2, 3): 1.0, (3, 4): 1.0, (0, 4): 2.0, (2, 4): 0.5}
    entries = [DPEntry(s, e, t, value(importances.get((s, e), 1.0))) for (s, e), t in times.items()]
    return [(x.start, x.end) for x in solve_merge_dp(entries, 4, 2.5, 0.5).entries]


def test_dp_values_let_blocks_of_any_depth_compare_fairly() -> None:
    """A nearly harmless 4-conv merge (I = 0.95) beats two unmodified blocks plus a harmful 2-conv merge (I = 0.5).

    Summing I itself picks the latter (3 blocks worth about 1 each); the DP's log-values pick the former,
    and a table in which the 4-conv merge is harmful (I = 0.3) changes the plan back.
    """
    table = {(0, 4): 0.95, (2, 4): 0.5}
    assert _plan(table, lambda i: i) == [(0, 1), (1, 2), (2, 4)]  # the old objective counts blocks
    assert _plan(table, dp_value) == [(0, 4)]
    assert _plan({(0, 4): 0.3, (2, 4): 0.5}, dp_value) == [(0, 1), (1, 2), (2, 4)]
    assert dp_value(1.0) == 0.0 and dp_value(0.0) == WORST_DP_VALUE
    assert dp_value(math.exp(-0.02)) == pytest.approx(-0.02)  # 2 accuracy points lost
    with pytest.raises(ConfigError, match="`importance`=nan"):
        dp_value(float("nan"))
