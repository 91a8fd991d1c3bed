"""Fusion roles in PyTorch's own transformer layers and Hugging Face Llama: ties never cross roles."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.surgery.fusion.groups import candidate_groups, fusion_units
from lit_compress.surgery.fusion.plan import plan_group_fusions
from lit_compress.surgery.fusion.tie import fuse_layers_, tied_groups


def _roles(model: nn.Module) -> dict[str, str]:
    return {u.name: u.role for u in fusion_units(model)}


def _fuse_everything(model: nn.Module) -> list[list[str]]:
    """Tie every group down to one weight; return the tied groups of parameter names."""
    units = fusion_units(model)
    counts = {g: len(m) - 1 for g, m in candidate_groups(units).items()}
    fuse_layers_(model, plan_group_fusions(model, units, "wasserstein", counts, "mean"), "mean")
    return tied_groups(model)


def _leaf_role(name: str) -> str:
    """The position of a parameter inside its block: the path after the block index."""
    parts = name.split(".")
    index = max(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[index + 1 :])


def test_pytorch_encoder_and_decoder_layers_keep_roles_apart() -> None:
    torch.manual_seed(0)
    # d_model == dim_feedforward, so linear1 (FFN in) and linear2 (FFN out) have the same shape
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=8)
    encoder = nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    r = _roles(encoder)
    assert r["layers.0.linear1"] == "ffn_in" and r["layers.0.linear2"] == "ffn_out"
    assert r["layers.0.self_attn"] == "attn_qkv" and r["layers.0.self_attn.out_proj"] == "attn_out"
    decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, dim_feedforward=8), num_layers=3)
    r = _roles(decoder)
    assert r["layers.1.self_attn"] == "attn_qkv" and r["layers.1.multihead_attn"] == "xattn_qkv"
    assert r["layers.1.self_attn.out_proj"] == "attn_out" and r["layers.1.multihead_attn.out_proj"] == "xattn_out"
    for model in (encoder, decoder):
        x = torch.randn(5, 2, 8)
        groups = _fuse_everything(model)
        assert groups
        for group in groups:  # every tie joins the same position in different layers
            assert len({_leaf_role(n) for n in group}) == 1, group
        if model is decoder:
            model(x, torch.randn(4, 2, 8)).sum().backward()
        else:
            model(x).sum().backward()


def test_hugging_face_llama_roles_from_config() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=16,  # gate/up/down all 16x16: only the role keeps them apart
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config)
    r = _roles(model)
    block = "model.layers.0"
    assert r[f"{block}.self_attn.q_proj"] == "attn_q" and r[f"{block}.self_attn.k_proj"] == "attn_k"
    assert r[f"{block}.self_attn.v_proj"] == "attn_v" and r[f"{block}.self_attn.o_proj"] == "attn_out"
    assert r[f"{block}.mlp.gate_proj"] == "ffn_gate" and r[f"{block}.mlp.up_proj"] == "ffn_in"
    assert r[f"{block}.mlp.down_proj"] == "ffn_out"
    groups = _fuse_everything(model)
    new = [g for g in groups if not any("embed" in n or "lm_head" in n for n in g)]
    assert len(new) == 7  # q, k, v, o, gate, up, down: each three layers into one weight
    for group in new:
        assert len(group) == 3 and len({_leaf_role(n) for n in group}) == 1, group
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the model's own tie is kept
    model(torch.randint(0, 32, (1, 5))).logits.sum().backward()
