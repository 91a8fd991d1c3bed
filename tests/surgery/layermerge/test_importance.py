"""LayerMerge importance scores: 1 for unchanged blocks, positive elsewhere, the model untouched; Δ against
the unmodified model given the same treatment (computed once); re-initialised single-conv blocks; and a
different table on a real network's candidates changes the DP's plan."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.layermerge.blocks import analyze_merge_space, enumerate_candidates, site_input_shapes
from lit_compress.surgery.layermerge.dp import DPEntry, solve_merge_dp
from lit_compress.surgery.layermerge.importance import (
    WORST_DP_VALUE,
    ImportanceScorer,
    _evaluate,
    dp_value,
    importance_table,
)


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


class _Counting:
    """A forward_loss that counts its calls in train mode (fine-tune steps); ``accuracy=False`` scores by loss."""

    def __init__(self, accuracy: bool = True) -> None:
        self.accuracy = accuracy
        self.train_calls = 0

    def __call__(self, model: nn.Module, batch: Any) -> tuple[torch.Tensor, int | None, int]:
        loss, correct, n = _loss(model, batch)
        self.train_calls += int(model.training)
        return loss, correct if self.accuracy else None, n


def _batches(n: int, size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 1, 12, 12, generator=gen), torch.randint(0, 10, (size,), generator=gen)) for _ in range(n)
    ]


def test_delta_is_taken_against_the_fine_tuned_unmodified_model_computed_once() -> None:
    """Fine-tuning on the held-out batches themselves gains many points for any network: that gain is the
    baseline's too, so an unmodified block scores exactly 1 and no candidate gets the gain as its own."""
    torch.manual_seed(0)
    net, space, cands = _space()
    batches = _batches(2)
    forward = _Counting()
    options: dict[str, Any] = dict(
        train_batches=batches, holdout_batches=batches, forward_loss=forward, method="finetune", steps=15, lr=0.1
    )
    scorer = ImportanceScorer(net, space, **options)
    untreated_acc = _evaluate(net, batches, _loss)[1]
    base_acc = scorer.baseline()[1]
    assert untreated_acc is not None and base_acc is not None
    gain = base_acc - untreated_acc
    assert gain > 30  # the fine-tune memorises the batches: against the untreated model, everything would gain
    original = next(c for c in cands if c.is_original(space))
    assert scorer.score(original) == 1.0  # the same treatment from the same seed reproduces the baseline exactly
    assert scorer.baseline_runs == 1 and forward.train_calls == 2 * 15
    forward.train_calls = 0
    table = importance_table(net, space, cands, progress=False, **options)
    changed = [c for c in cands if not c.is_original(space)]
    assert changed and forward.train_calls == 15 * (1 + len(changed))  # one baseline, one fine-tune per change
    assert all(table[c.key] < math.exp(gain / 200) for c in changed)  # not credited with the fine-tune's gain


def test_reset_layers_scores_the_reinitialised_single_conv_blocks() -> None:
    torch.manual_seed(0)
    net, space, cands = _space()
    batches = _batches(3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    forward = _Counting(accuracy=False)  # scored by loss: continuous values
    options: dict[str, Any] = dict(
        train_batches=batches[:2], holdout_batches=batches[2:], forward_loss=forward, steps=3, progress=False
    )
    table = importance_table(net, space, cands, method="finetune", reset_layers=True, **options)
    changed = [c for c in cands if not c.is_original(space)]
    covered = {i for c in changed for i in range(c.start + 1, c.end + 1)}
    originals = {c.end: c for c in cands if c.is_original(space)}
    assert covered and set(originals) - covered  # the tiny net has sites that no merge covers
    assert forward.train_calls == 3 * (1 + len(changed) + len(covered))
    for site, c in originals.items():
        if site in covered:
            assert table[c.key] != 1.0 and table[c.key] > 0  # re-initialised and fine-tuned: it costs something
        else:
            assert table[c.key] == 1.0  # in every plan: its value cannot change the plan, so it is not computed
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # without the reset, the same table scores every single-conv block 1 without a fine-tune
    plain = importance_table(net, space, cands, method="finetune", **options)
    assert all(plain[c.key] == 1.0 for c in originals.values())
    assert all(plain[c.key] == pytest.approx(table[c.key], rel=1e-6) for c in changed)
    with pytest.raises(ConfigError, match="`reset_layers`=True is not allowed with importance='loss_proxy'"):
        importance_table(net, space, cands, method="loss_proxy", reset_layers=True, **options)


def test_a_different_importance_table_changes_the_plan_of_a_real_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """ResNet-20's real candidates and a multiply-add latency table at a 50 % budget: the plan follows the table.

    With every merge nearly harmless, the DP takes some set of merged blocks; declaring exactly those
    harmful makes it choose other blocks, at the same budget.
    """
    import lit_compress.measure.latency_table as lat
    from lit_compress.models.cifar_resnet import cifar_resnet
    from tests._latency import cost_model_ms

    torch.manual_seed(0)  # the kept convs of a block are those of largest L1 norm
    net = cifar_resnet(20, in_channels=1, width_mult=0.25)
    space = analyze_merge_space(net)
    site_input_shapes(net, space, torch.zeros(1, 1, 12, 12))
    cands = enumerate_candidates(net, space)
    monkeypatch.setattr(lat, "time_layer", cost_model_ms)
    latency = lat.latency_table(space, cands, progress=False, log=lambda _: None)
    total = sum(latency[c.key] for c in cands if c.is_original(space))

    def plan(table: dict[str, float]) -> list[tuple[int, int, tuple[int, ...]]]:
        entries = [DPEntry(c.start, c.end, latency[c.key], dp_value(table[c.key]), c) for c in cands]
        result = solve_merge_dp(entries, space.depth, 0.5 * total, total / 1000)
        assert result.time <= 0.5 * total + len(result.entries) * total / 1000
        return [(e.start, e.end, e.payload.kept) for e in result.entries]

    harmless = {c.key: 1.0 if c.is_original(space) else 0.99 for c in cands}
    first = plan(harmless)
    merged = {(s, e, kept) for s, e, kept in first if e - s > 1 or len(kept) != 1}
    assert merged  # at 50 % the plan must merge or prune somewhere
    harmful = {
        c.key: 0.5 if (c.start, c.end, c.kept) in merged else v for c, v in zip(cands, harmless.values(), strict=True)
    }
    second = plan(harmful)
    assert second != first and merged - set(second)  # some block declared harmful is avoided

    def value(blocks: list[tuple[int, int, tuple[int, ...]]], table: dict[str, float]) -> float:
        keys = {(c.start, c.end, c.kept): c.key for c in cands}
        return sum(dp_value(table[keys[b]]) for b in blocks)

    assert value(second, harmful) > value(first, harmful) + 0.1  # and the new plan is the better one for it
