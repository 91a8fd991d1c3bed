"""LayerCollapse on transformer MLP blocks: a GPT-2 style transposed Conv1D stand-in (always), and real
Hugging Face GPT-2 and BERT structures built from configs (when `transformers` is installed)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.surgery import collapse_, make_collapsible_, replay_events_
from lit_compress.surgery.chains import find_linear_chains
from lit_compress.surgery.collapse.mlp import collapsible_activations
from lit_compress.surgery.replay import record_events

TOL = dict(rtol=1e-10, atol=1e-10)  # float64


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored (in, out), y = x @ W + b."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.reshape(-1, x.shape[-1]) @ self.weight + self.bias).reshape(*x.shape[:-1], self.nf)


class GPT2StyleBlock(nn.Module):
    def __init__(self, d: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.c_fc = Conv1D(hidden, d)
        self.act = nn.GELU()
        self.c_proj = Conv1D(d, hidden)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.c_proj(self.act(self.c_fc(self.ln(x)))))


def collapse_all_at_slope_one(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chains = find_linear_chains(model, x)
    records = make_collapsible_(model, chains)
    with torch.no_grad():
        for _, act in collapsible_activations(model):
            act.slope.fill_(1.0)
    model.eval()
    before = model(x)
    records += collapse_(model, chains, tau=0.05)
    record_events(model, records)
    return before, model(x)


def test_gpt2_style_conv1d_block_collapses_exactly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(GPT2StyleBlock(), GPT2StyleBlock()).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    before, after = collapse_all_at_slope_one(model, x)
    torch.testing.assert_close(after, before, **TOL)
    assert isinstance(model[0].c_fc, nn.Linear) and (model[0].c_fc.in_features, model[0].c_fc.out_features) == (8, 8)
    fresh = nn.Sequential(GPT2StyleBlock(), GPT2StyleBlock()).double()
    replay_events_(fresh, model._lit_compress_events)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), after, rtol=0, atol=0)


def test_hf_gpt2_mlp_blocks_collapse_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_positions=32, vocab_size=50)
    model = transformers.GPT2Model(config).double()
    ids = torch.randint(0, 50, (2, 7))
    chains = find_linear_chains(model, ids)
    assert {c.linears[0] for c in chains} >= {"h.0.mlp.c_fc", "h.1.mlp.c_fc"}
    records = make_collapsible_(model, chains)
    with torch.no_grad():
        for _, act in collapsible_activations(model):
            act.slope.fill_(1.0)
    model.eval()
    before = model(ids).last_hidden_state
    records += collapse_(model, chains, tau=0.05)
    torch.testing.assert_close(model(ids).last_hidden_state, before, **TOL)
    assert isinstance(model.h[1].mlp.c_fc, nn.Linear)


def test_hf_bert_ffn_blocks_collapse_exactly() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50
    )
    model = transformers.BertModel(config).double()
    ids = torch.randint(0, 50, (2, 7))
    chains = find_linear_chains(model, ids)
    assert any(c.linears[0].endswith("intermediate.dense") for c in chains)
    make_collapsible_(model, chains)
    with torch.no_grad():
        for _, act in collapsible_activations(model):
            act.slope.fill_(1.0)
    model.eval()
    before = model(ids).last_hidden_state
    collapse_(model, chains, tau=0.05)
    torch.testing.assert_close(model(ids).last_hidden_state, before, **TOL)


def test_torchvision_vit_mlp_blocks_collapse_exactly() -> None:
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=64
    ).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    before, after = collapse_all_at_slope_one(model, x)
    torch.testing.assert_close(after, before, **TOL)
    mlp = model.encoder.layers.encoder_layer_1.mlp
    assert isinstance(mlp[0], nn.Linear) and (mlp[0].in_features, mlp[0].out_features) == (16, 16)
