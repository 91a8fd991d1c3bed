"""Per-layer output scales on a shared weight: exact at creation, the scaled function, replay, the count."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lit_compress.measure import count_parameters
from lit_compress.models.cifar_resnet import BasicBlock
from lit_compress.surgery.fusion.adapters import ADAPTER, adapter_params, adapter_skip_reason, add_adapter_
from lit_compress.surgery.fusion.align import align_cluster_
from lit_compress.surgery.fusion.tie import fuse_layers_
from lit_compress.surgery.replay import applied_events, record_events, replay_events_
from tests.surgery.fusion.test_align import Net

CONV_PLAN = [
    {"a": ["0.conv1"], "b": ["1.conv1"], "params": ["weight"]},
    {"a": ["0.conv2"], "b": ["1.conv2"], "params": ["weight"]},
]
FFN_PLAN = [
    {"a": ["blocks.0.fc_in"], "b": ["blocks.1.fc_in"], "params": ["weight", "bias"]},
    {"a": ["blocks.0.fc_out"], "b": ["blocks.1.fc_out"], "params": ["weight", "bias"]},
]


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 4, 1)).double().eval()


def ffn() -> nn.Module:
    torch.manual_seed(0)
    return Net().double()


def test_adapters_leave_the_fused_network_exactly_unchanged_at_creation_float64() -> None:
    for build, plan, x in ((resnet, CONV_PLAN, torch.randn(2, 4, 6, 6)), (ffn, FFN_PLAN, torch.randn(5, 6))):
        x = x.double()
        plain, adapted = build(), build()
        fuse_layers_(plain, plan, "mean")  # type: ignore[arg-type]
        records = fuse_layers_(adapted, plan, "mean", adapters=True)  # type: ignore[arg-type]
        fused = [n for f in records[0]["fusions"] for n in f["adapters"]]
        assert len(fused) == 4 and all(
            torch.equal(
                getattr(adapted.get_submodule(n), ADAPTER),
                torch.ones(adapted.get_submodule(n).weight.shape[0], dtype=torch.float64),
            )
            for n in fused
        )
        assert torch.equal(adapted(x), plain(x))


@torch.no_grad()
def test_a_trained_scale_multiplies_each_output_channel_of_its_layer_only() -> None:
    model = resnet()
    fuse_layers_(model, CONV_PLAN, "mean", adapters=True)  # type: ignore[arg-type]
    scale = torch.rand(4, dtype=torch.float64) + 0.5
    getattr(model[1].conv1, ADAPTER).copy_(scale)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    shared = model[0].conv1.weight
    assert model[1].conv1.weight is shared
    torch.testing.assert_close(model[1].conv1(x), nn.functional.conv2d(x, shared, padding=1) * scale.view(1, 4, 1, 1))
    torch.testing.assert_close(model[0].conv1(x), nn.functional.conv2d(x, shared, padding=1))  # its twin: scale 1
    unbatched = torch.randn(4, 6, dtype=torch.float64)
    conv1d = nn.Conv1d(4, 3, 1).double()
    add_adapter_(conv1d)
    getattr(conv1d, ADAPTER).copy_(torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(
        conv1d(unbatched),
        nn.functional.conv1d(unbatched, conv1d.weight, conv1d.bias)
        * torch.tensor([[1.0], [2.0], [3.0]], dtype=torch.float64),
    )
    linear = ffn()
    fuse_layers_(linear, FFN_PLAN, "mean", adapters=True)  # type: ignore[arg-type]
    s = torch.rand(12, dtype=torch.float64)
    getattr(linear.blocks[1].fc_in, ADAPTER).copy_(s)
    h = torch.randn(3, 6, dtype=torch.float64)
    layer = linear.blocks[1].fc_in
    torch.testing.assert_close(layer(h), (h @ layer.weight.T + layer.bias) * s)


def test_the_parameter_count_and_the_record_are_net_of_the_adapters() -> None:
    model = ffn()
    before = count_parameters(model)
    records = fuse_layers_(model, FFN_PLAN, "mean", adapters=True)  # type: ignore[arg-type]
    tied = (12 * 6 + 12) + (6 * 12 + 6)  # one fc_in and one fc_out stored once less
    added = 2 * 12 + 2 * 6  # a scale per output channel of each of the four tied layers
    assert adapter_params(model) == added == sum(f["adapter_params"] for f in records[0]["fusions"])
    assert count_parameters(model) == before - tied + added
    assert records[0]["removed_params"] == tied - added


@torch.no_grad()
def test_trained_scales_survive_replay_and_load() -> None:
    model = resnet()
    records = fuse_layers_(model, CONV_PLAN, "mean", adapters=True)  # type: ignore[arg-type]
    record_events(model, records)
    for module in model.modules():
        if hasattr(module, ADAPTER):
            getattr(module, ADAPTER).uniform_(0.5, 1.5)
    state, events = model.state_dict(), copy.deepcopy(applied_events(model))
    fresh = resnet()
    replay_events_(fresh, events)
    fresh.load_state_dict(state)  # strict: every adapter exists again, nothing else
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    assert torch.equal(fresh(x), model(x))
    assert torch.equal(fresh[1].conv2.fusion_scale, model[1].conv2.fusion_scale)
    assert fresh[0].conv1.weight is fresh[1].conv1.weight
    assert count_parameters(fresh) == count_parameters(model)


@torch.no_grad()
def test_alignment_permutes_an_existing_scale_with_its_hidden_units() -> None:
    model = ffn()
    for block in model.blocks:
        add_adapter_(block.fc_in)
        block.fc_in.fusion_scale.uniform_(0.5, 1.5)
    x = torch.randn(5, 6, dtype=torch.float64)
    before = model(x)
    done, why = align_cluster_(model, ["blocks.0.fc_in"], ["blocks.1.fc_in"])
    assert why == "" and "blocks.1.fc_in.fusion_scale" in done
    torch.testing.assert_close(model(x), before)


def test_layers_whose_parent_reads_the_weight_take_no_adapter() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    holder = nn.ModuleDict({"enc": layer, "mlp": nn.ModuleDict({"fc_in": nn.Linear(8, 8)}), "ln": nn.LayerNorm(8)})
    assert "TransformerEncoderLayer reads its weight" in str(adapter_skip_reason(holder, "enc.linear1"))
    assert "MultiheadAttention reads its weight" in str(adapter_skip_reason(holder, "enc.self_attn.out_proj"))
    assert "a LayerNorm" in str(adapter_skip_reason(holder, "ln"))
    assert adapter_skip_reason(holder, "mlp.fc_in") is None
