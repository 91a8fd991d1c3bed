"""ALDS on models built from PyTorch's attention modules: torchvision's ViT, Lightning's demo Transformer.

``nn.MultiheadAttention`` reads ``out_proj.weight`` directly and ``nn.TransformerEncoderLayer``'s
inference fast path reads ``linear1.weight``/``linear2.weight``: those layers stay dense (skipped with
a reason); every other Linear is decomposed and the model still runs, in eval mode too.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.demos import Transformer
from torch import nn
from torchvision.models import vit_b_16
from torchvision.models.vision_transformer import VisionTransformer

from lit_compress.errors import SurgeryError
from lit_compress.surgery.alds import LowRankLayer, low_rank_decompose_
from lit_compress.surgery.alds.allocate import allocate, target_layers
from lit_compress.surgery.alds.low_rank import check_decomposable, max_rank


def _linears(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _full_rank_plan(model: nn.Module, names: list[str]) -> dict[str, dict[str, int]]:
    plan = {}
    for name in names:
        layer = model.get_submodule(name)
        plan[name] = {"groups": 1, "rank": max_rank(layer.out_features, layer.in_features, 1, 1)}
    return plan


def _state_bytes(model: nn.Module) -> list[tuple[str, bytes]]:
    return [(k, v.detach().numpy().tobytes()) for k, v in model.state_dict().items()]


def _check_vit(model: VisionTransformer, image_size: int, only: str = "") -> None:
    model.eval().double()
    x = torch.randn(2, 3, image_size, image_size, dtype=torch.float64)
    with torch.no_grad():
        reference = model(x)
    ok, skipped = target_layers(model, _linears(model))
    out_projs = {n for n in _linears(model) if n.endswith("self_attention.out_proj")}
    assert out_projs and set(skipped) == out_projs
    assert all("nn.MultiheadAttention" in skipped[n] and "out_proj.weight" in skipped[n] for n in out_projs)
    chosen = [n for n in ok if only in n]  # full-rank SVDs of every vit_b_16 layer take minutes on 2 cores
    low_rank_decompose_(model, _full_rank_plan(model, chosen))
    assert sum(isinstance(m, LowRankLayer) for m in model.modules()) == len(chosen) > 0
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference, rtol=1e-10, atol=1e-10)  # exact at full rank


def test_small_torchvision_vit_keeps_out_proj_dense_and_runs_exactly() -> None:
    """The classes of vit_b_16 (EncoderBlock, nn.MultiheadAttention, MLPBlock) at a small size."""
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    _check_vit(model, 32)


@pytest.mark.slow
def test_vit_b_16_keeps_out_proj_dense_and_runs_exactly() -> None:
    torch.manual_seed(0)
    _check_vit(vit_b_16(weights=None, image_size=32), 32, only="encoder_layer_11.")


def test_demo_transformer_skips_what_its_parents_read_and_runs_in_eval_and_train_mode() -> None:
    torch.manual_seed(0)
    model = Transformer(vocab_size=30, ninp=16, nhead=2, nhid=32, nlayers=2, dropout=0.0)
    names = _linears(model)
    ok, skipped = target_layers(model, names)
    assert set(skipped) == {
        *(n for n in names if n.endswith("out_proj")),
        *(f"transformer.encoder.layers.{i}.linear{j}" for i in (0, 1) for j in (1, 2)),
    }
    alloc = allocate(model, ok, 0.9, num_seeds=1, alternations=1)
    low_rank_decompose_(model, alloc.plan)
    x = torch.randint(0, 30, (2, 7))
    model.train()
    assert torch.isfinite(model(x, x)).all()
    model.eval()
    with torch.no_grad():  # nn.TransformerEncoderLayer's fast path (reads linear1/linear2.weight)
        assert torch.isfinite(model(x, x)).all()


def test_a_plan_naming_out_proj_is_refused_before_anything_changes() -> None:
    torch.manual_seed(0)
    model = Transformer(vocab_size=30, ninp=16, nhead=2, nhid=32, nlayers=1, dropout=0.0)
    before = _state_bytes(model)
    layers = dict(model.named_modules())
    plan = _full_rank_plan(model, ["decoder", "transformer.decoder.layers.0.linear1"])  # valid
    plan.update(_full_rank_plan(model, ["transformer.decoder.layers.0.self_attn.out_proj"]))  # refused
    with pytest.raises(
        SurgeryError, match=r"`transformer\.decoder\.layers\.0\.self_attn\.out_proj`.*MultiheadAttention"
    ):
        low_rank_decompose_(model, plan)
    with pytest.raises(SurgeryError, match="MultiheadAttention"):
        check_decomposable(model, plan)
    assert _state_bytes(model) == before
    assert all(layers[n] is m for n, m in model.named_modules())  # the valid layers were not replaced either
