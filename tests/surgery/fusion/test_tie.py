"""Layer Fusion surgery: roles and groups, real ties (one storage, summed gradients), policies, planning, replay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.errors import SurgeryError
from lit_compress.measure import count_parameters
from lit_compress.models.transformer import TransformerLM
from lit_compress.surgery import SurgeryTransaction, applied_events, record_events, replay_events_
from lit_compress.surgery.fusion.groups import candidate_groups, clusters, fusion_units, max_removable
from lit_compress.surgery.fusion.plan import plan_fusions
from lit_compress.surgery.fusion.tie import fuse_layers_, fuse_pair_, fused_values, tied_groups


class Stack(nn.Module):
    """stem → four Linear(8, 8) → head; the four middle layers are one candidate group."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def roles(model: nn.Module, **kwargs: bool) -> dict[str, str]:
    return {u.name: u.role for u in fusion_units(model, **kwargs)}


def test_roles_of_our_transformer() -> None:
    r = roles(TransformerLM(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=8))
    assert r["blocks.0.attn.q_proj"] == "attn_q" and r["blocks.1.attn.k_proj"] == "attn_k"
    assert r["blocks.0.attn.v_proj"] == "attn_v" and r["blocks.0.attn.out_proj"] == "attn_out"
    assert r["blocks.1.mlp.fc_in"] == "ffn_in" and r["blocks.1.mlp.fc_out"] == "ffn_out"
    assert r["head"] == "linear" and "blocks.0.ln1" not in r and "tok_emb" not in r
    with_norms = roles(TransformerLM(vocab_size=11, block_size=8, n_layer=2, d_model=8, n_head=2), include_norms=True)
    assert with_norms["blocks.0.ln1"] == "norm:blocks.*.ln1" != with_norms["blocks.0.ln2"]
    groups = candidate_groups(fusion_units(TransformerLM(vocab_size=11, block_size=8, n_layer=2, n_head=2, d_model=8)))
    # q, k, v, out, ffn_in, ffn_out: six groups of two (q_proj never groups with k_proj, same shape or not)
    assert sorted(g[0] for g in groups) == ["attn_k", "attn_out", "attn_q", "attn_v", "ffn_in", "ffn_out"]
    assert all(len(v) == 2 for v in groups.values())


def test_roles_of_hugging_face_gpt2_and_bert() -> None:
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=11, n_positions=8, n_embd=8, n_layer=2, n_head=2)
    )
    r = roles(gpt2, include_norms=True)
    assert r["transformer.h.0.attn.c_attn"] == "attn_qkv"  # the packed QKV Conv1D is one unit
    assert r["transformer.h.0.attn.c_proj"] == "attn_out" and r["transformer.h.1.mlp.c_fc"] == "ffn_in"
    assert r["transformer.h.1.mlp.c_proj"] == "ffn_out" and r["transformer.h.0.ln_1"].startswith("norm:")
    unit = next(u for u in fusion_units(gpt2) if u.name == "transformer.h.0.attn.c_attn")
    assert unit.kind == "Conv1D" and unit.shapes == ((8, 24), (24,))
    bert = transformers.BertModel(
        transformers.BertConfig(
            vocab_size=11, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16
        )
    )
    r = roles(bert)
    assert (
        r["encoder.layer.0.attention.self.query"] == "attn_q" and r["encoder.layer.0.attention.self.value"] == "attn_v"
    )
    assert r["encoder.layer.1.attention.output.dense"] == "attn_out"
    assert r["encoder.layer.1.intermediate.dense"] == "ffn_in" and r["encoder.layer.1.output.dense"] == "ffn_out"


def test_multihead_attention_packed_projection_is_one_unit() -> None:
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2))
    r = roles(model)
    assert r["0"] == "attn_qkv" and r["0.out_proj"] == "attn_out"
    fuse_pair_(model, ["0"], ["1"], ["in_proj_weight", "in_proj_bias"], "mean", 0)
    assert model[0].in_proj_weight is model[1].in_proj_weight
    x = torch.randn(3, 1, 8)
    model[0](x, x, x)[0].sum().backward()  # the module still runs with the tied packed weight


def test_mean_tie_is_real_one_storage_summed_gradients_and_exact_count() -> None:
    torch.manual_seed(0)
    model = Stack()
    before = count_parameters(model)
    w1, w2 = model.layers[1].weight.detach().clone(), model.layers[2].weight.detach().clone()
    fuse_pair_(model, ["layers.1"], ["layers.2"], ["weight", "bias"], "mean", seed=0)
    l1, l2 = model.layers[1], model.layers[2]
    assert l1.weight is l2.weight and l1.bias is l2.bias
    assert l1.weight.data_ptr() == l2.weight.data_ptr()
    torch.testing.assert_close(l1.weight.detach(), (w1 + w2) / 2)
    assert count_parameters(model) == before - (8 * 8 + 8)  # exactly one unit
    assert count_parameters(model, unique_storage=False) == before
    assert len(list(model.parameters())) == 2 * 6 - 2
    # Gradient reaching the shared weight = sum of the gradients of its two uses.
    x = torch.randn(5, 4)
    model(x).sum().backward()
    total = l1.weight.grad.clone()
    shared = l1.weight
    grads = []
    for use in (1, 2):  # untie one use at a time with a detached copy to get each use's own gradient
        probe = Stack()
        probe.load_state_dict(model.state_dict())
        other = 3 - use
        fuse_pair_(probe, ["layers.1"], ["layers.2"], ["weight", "bias"], "mean", 0)
        probe.layers[other].weight = nn.Parameter(shared.detach().clone(), requires_grad=False)
        probe.zero_grad()
        probe(x).sum().backward()
        grads.append(probe.layers[use].weight.grad)
    torch.testing.assert_close(total, grads[0] + grads[1])


def test_policies() -> None:
    a, b = [torch.zeros(64), torch.zeros(3)], [torch.ones(64), torch.ones(3)]
    mean, _ = fused_values(a, b, 3, 1, "mean", 0)
    torch.testing.assert_close(mean[0], torch.full((64,), 0.25))  # weighted by cluster size
    mix1, _ = fused_values(a, b, 1, 1, "mix", 7)
    mix2, _ = fused_values(a, b, 1, 1, "mix", 7)
    mix3, _ = fused_values(a, b, 1, 1, "mix", 8)
    assert torch.equal(mix1[0], mix2[0]) and not torch.equal(mix1[0], mix3[0])  # seeded
    assert set(mix1[0].tolist()) == {0.0, 1.0} and 10 < mix1[0].sum() < 54  # elementwise from either side
    kept = {fused_values(a, b, 1, 1, "freeze", s)[1] for s in range(20)}
    assert kept == {"a", "b"}
    frozen, side = fused_values(a, b, 1, 1, "freeze", 3)
    assert torch.equal(frozen[0], (a if side == "a" else b)[0])


def test_clusters_grow_and_replay_rebuilds_ties_for_a_strict_load() -> None:
    torch.manual_seed(0)
    model = Stack()
    units = fusion_units(model, ["layers.*"])
    assert max_removable(model, units) == 3 * 72
    records = fuse_layers_(
        model, [{"a": ["layers.0"], "b": ["layers.1"], "params": ["weight", "bias"], "seed": 1}], "mix"
    )
    records += fuse_layers_(
        model, [{"a": ["layers.0", "layers.1"], "b": ["layers.3"], "params": ["weight", "bias"], "seed": 2}], "freeze"
    )
    record_events(model, records)
    assert sorted(tied_groups(model)[0]) == ["layers.0.weight", "layers.1.weight", "layers.3.weight"]
    assert len(clusters(model, units)) == 2 and max_removable(model, units) == 72
    fresh = Stack()
    replay_events_(fresh, applied_events(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert fresh.layers[0].weight is fresh.layers[3].weight and fresh.layers[2].weight is not fresh.layers[0].weight
    assert count_parameters(fresh) == count_parameters(model)
    x = torch.randn(3, 4)
    torch.testing.assert_close(fresh(x), model(x))


def test_plan_picks_the_most_similar_pair_and_reaches_the_target() -> None:
    torch.manual_seed(0)
    model = Stack()
    with torch.no_grad():
        model.layers[3].weight.copy_(model.layers[0].weight + 1e-3)
    units = fusion_units(model)
    plan = plan_fusions(model, units, "euclidean", remove=1, policy="mean", seed=0)
    assert [(f["a"], f["b"]) for f in plan] == [(["layers.0"], ["layers.3"])]
    plan = plan_fusions(model, units, "cosine", remove=3 * 72, policy="mean", seed=0)
    assert len(plan) == 3  # a second round re-scores the fused clusters
    assert plan_fusions(model, units, "cosine", remove=3 * 72, policy="mix", seed=0) == plan_fusions(
        model, units, "cosine", remove=3 * 72, policy="mix", seed=0
    )
    assert sum(len(v) for v in candidate_groups(units).values()) == 4  # stem and head have no same-shape partner
    before = count_parameters(model)
    fuse_layers_(model, plan, "mean")
    assert count_parameters(model) == before - 3 * 72
    assert len(plan_fusions(model, units, "cosine", remove=10**6, policy="mean")) == 0  # nothing left to tie


def test_failed_fusion_is_rolled_back() -> None:
    model = Stack()
    weights = [layer.weight for layer in model.layers]
    with pytest.raises(SurgeryError, match="different shapes"), SurgeryTransaction():
        fuse_pair_(model, ["layers.0"], ["layers.1"], ["weight", "bias"], "mean", 0)
        fuse_pair_(model, ["layers.2"], ["stem"], ["weight", "bias"], "mean", 0)
    assert all(layer.weight is w for layer, w in zip(model.layers, weights))


def test_plan_takes_the_most_alike_pair_first_even_when_it_overshoots() -> None:
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"s0": nn.Linear(4, 4), "s1": nn.Linear(4, 4), "b0": nn.Linear(16, 16), "b1": nn.Linear(16, 16)}
    )
    with torch.no_grad():
        model["b1"].weight.copy_(model["b0"].weight)  # the big pair is the most similar
        model["b1"].bias.copy_(model["b0"].bias)
    units = fusion_units(model)
    plan = plan_fusions(model, units, "euclidean", remove=10, policy="mean")
    # the most redundant pair goes first, not the pair that fits what is left (no knapsack waiting)
    assert [f["a"] for f in plan] == [["b0"]] and plan[0]["distance"] == 0.0
    plan = plan_fusions(model, units, "euclidean", remove=300, policy="mean")
    assert sorted(f["a"][0] for f in plan) == ["b0", "s0"]  # then the small pair covers the rest
