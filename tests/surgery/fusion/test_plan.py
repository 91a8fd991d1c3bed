"""Layer Fusion planning: batched scores, scale-free ranking across groups, per-group budgets, sharing sets."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.measure import count_parameters
from lit_compress.surgery import applied_events, record_events, replay_events_
from lit_compress.surgery.fusion.groups import candidate_groups, fusion_units
from lit_compress.surgery.fusion.pairwise import pairwise
from lit_compress.surgery.fusion.plan import plan_fusions, plan_group_fusions, shared_elsewhere
from lit_compress.surgery.fusion.similarity import MEASURES, score
from lit_compress.surgery.fusion.tie import fuse_layers_


def unique_params(model: nn.Module) -> int:
    """Unique storage counted by hand: every distinct Parameter object once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("measure", list(MEASURES))
def test_pairwise_matches_the_pair_measure_and_is_scale_free(measure: str) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 6, 5, generator=g) * torch.rand(4, 1, 1, generator=g)
    raw, dist = pairwise(measure, w)
    expected = torch.tensor([[score(measure, w[i], w[j]) for j in range(4)] for i in range(4)], dtype=torch.float64)
    off = ~torch.eye(4, dtype=torch.bool)
    torch.testing.assert_close(raw[off], expected[off], rtol=1e-5, atol=1e-6)
    assert torch.all(dist >= 0) and torch.all(dist <= 1) and torch.allclose(dist, dist.T)
    assert torch.all(dist.diagonal() == 0)
    torch.testing.assert_close(pairwise(measure, 1000.0 * w)[1], dist)  # the magnitude does not decide


def _two_groups(scale_small: float, scale_big: float) -> nn.ModuleDict:
    """s0/s1: Linear(4, 4), relative difference 1 %; b0/b1: Linear(32, 32), relative difference 20 %."""
    g = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({n: nn.Linear(k, k) for n, k in (("s0", 4), ("s1", 4), ("b0", 32), ("b1", 32))})
    with torch.no_grad():
        for prefix, k, scale, noise in (("s", 4, scale_small, 0.01), ("b", 32, scale_big, 0.2)):
            w = torch.randn(k, k, generator=g) * scale
            model[f"{prefix}0"].weight.copy_(w)
            model[f"{prefix}1"].weight.copy_(w + noise * scale * torch.randn(k, k, generator=g))
    return model


@pytest.mark.parametrize("measure", ["euclidean", "manhattan", "wasserstein", "kl", "cosine"])
def test_ranking_across_groups_does_not_let_raw_scale_or_size_decide(measure: str) -> None:
    # big-magnitude small layers that are nearly equal vs tiny-magnitude big layers that differ by 20 %
    model = _two_groups(scale_small=100.0, scale_big=0.01)
    units = fusion_units(model)
    if measure == "euclidean":  # the raw distance would rank the big, much less alike pair first
        assert score(measure, model["b0"].weight, model["b1"].weight) < score(
            measure, model["s0"].weight, model["s1"].weight
        )
    plan = plan_fusions(model, units, measure, remove=1, policy="mean")
    assert [(f["a"], f["b"]) for f in plan] == [(["s0"], ["s1"])]


def test_per_group_budget_fuses_floor_p_n_layers_in_each_group() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict({f"a{i}": nn.Linear(8, 8) for i in range(5)} | {f"b{i}": nn.Linear(8, 4) for i in range(3)})
    units = fusion_units(model)
    groups = candidate_groups(units)
    counts = {g: int(0.5 * len(m)) for g, m in groups.items()}  # floor(0.5 * 5) = 2, floor(0.5 * 3) = 1
    before = unique_params(model)
    plan = plan_group_fusions(model, units, "wasserstein", counts, "mean")
    assert sorted(f["a"][0][0] for f in plan) == ["a", "a", "b"]
    fuse_layers_(model, plan, "mean")
    assert before - unique_params(model) == 2 * (64 + 8) + 1 * (32 + 4)  # counted by hand
    counts = {g: len(m) for g, m in groups.items()}  # more than the group can give: down to one weight
    plan = plan_group_fusions(model, units, "wasserstein", counts, "mean")
    fuse_layers_(model, plan, "mean")
    assert all(model[f"a{i}"].weight is model["a0"].weight for i in range(5))
    assert all(model[f"b{i}"].weight is model["b0"].weight for i in range(3))


class PreTied(nn.Module):
    """Three Linear(8, 8) layers; ``proj`` (outside the targets) already shares ``layers.2``'s weight."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.proj = nn.Linear(8, 8, bias=False)
        self.proj.weight = self.layers[2].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.proj(x)


def test_a_tie_keeps_an_existing_tie_and_counts_the_real_unique_drop() -> None:
    torch.manual_seed(0)
    model = PreTied()
    before = unique_params(model)
    records = fuse_layers_(
        model, [{"a": ["layers.1"], "b": ["layers.2"], "params": ["weight", "bias"], "seed": 0}], "mean"
    )
    assert model.proj.weight is model.layers[1].weight is model.layers[2].weight  # the whole sharing set
    assert records[0]["fusions"][0]["also"] == {"weight": ["proj.weight"]}
    assert before - unique_params(model) == records[0]["removed_params"] == 64 + 8
    assert count_parameters(model) == unique_params(model)
    record_events(model, records)
    fresh = PreTied()
    replay_events_(fresh, applied_events(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert fresh.proj.weight is fresh.layers[1].weight and unique_params(fresh) == unique_params(model)
    x = torch.randn(2, 8)
    torch.testing.assert_close(fresh(x), model(x))


def test_a_unit_sharing_a_parameter_with_another_groups_layer_is_left_out() -> None:
    model = nn.ModuleDict(
        {f"blk{i}": nn.ModuleDict({"q_proj": nn.Linear(8, 8), "k_proj": nn.Linear(8, 8)}) for i in range(3)}
    )
    model["blk0"]["k_proj"].weight = model["blk0"]["q_proj"].weight  # pre-shared across roles
    units = fusion_units(model)
    assert shared_elsewhere(model, units) == {
        "blk0.q_proj": "blk0.k_proj.weight",
        "blk0.k_proj": "blk0.q_proj.weight",
    }
    counts = {g: 5 for g in candidate_groups(units)}
    plan = plan_group_fusions(model, units, "euclidean", counts, "mean")
    assert plan and all("blk0" not in n for f in plan for n in f["a"] + f["b"])
    assert plan_fusions(model, units, "euclidean", 10**6, "mean") and all(
        "blk0" not in n for f in plan_fusions(model, units, "euclidean", 10**6, "mean") for n in f["a"] + f["b"]
    )
