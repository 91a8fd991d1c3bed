"""ALDS surgery: k-group low-rank decomposition of Conv2d/Linear, recomposition, skipping, replay."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lit_compress.errors import SurgeryError
from lit_compress.surgery import applied_events, record_events, replay_events_
from lit_compress.surgery.alds.low_rank import (
    GroupedLinear,
    LowRankLayer,
    decompose_layer,
    dense_weight,
    divisors,
    folded_groups,
    low_rank_decompose_,
    low_rank_layers,
    low_rank_recompose_,
    max_rank,
    recompose_layer,
    undecomposable_reason,
)

TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def conv(cin: int, cout: int, k: int = 3, **kwargs) -> nn.Conv2d:
    torch.manual_seed(cin * 100 + cout)
    c = nn.Conv2d(cin, cout, k, **kwargs).double()
    if c.bias is not None:
        with torch.no_grad():
            c.bias.normal_()
    return c


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(stride=1, padding=1),
        dict(stride=2, padding=1, bias=False),
        dict(stride=1, padding=2, dilation=2),
        dict(stride=(2, 1), padding=(0, 1), padding_mode="reflect"),
    ],
)
def test_full_rank_conv_decomposition_reproduces_outputs_for_every_k(kwargs: dict) -> None:
    layer = conv(12, 10, 3, **kwargs)
    x = torch.randn(2, 12, 11, 9, dtype=torch.float64)
    for k in divisors(12):
        j = max_rank(10, 12, 9, k)
        new = decompose_layer(layer, k, j)
        assert isinstance(new, LowRankLayer) and (new.groups, new.rank) == (k, j)
        enc, dec = new.encoder, new.decoder
        assert enc.groups == k and enc.out_channels == k * j and enc.bias is None
        assert (enc.stride, enc.padding, enc.dilation, enc.padding_mode) == (
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.padding_mode,
        )
        assert dec.kernel_size == (1, 1) and (dec.bias is None) == (layer.bias is None)
        torch.testing.assert_close(new(x), layer(x), **TOL64)
        torch.testing.assert_close(recompose_layer(new)(x), layer(x), **TOL64)


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_linear_decomposition_reproduces_outputs_for_every_k(bias: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(12, 7, bias=bias).double()
    x = torch.randn(3, 5, 12, dtype=torch.float64)  # extra leading dims, as in a transformer
    for k in divisors(12):
        new = decompose_layer(layer, k, max_rank(7, 12, 1, k))
        assert isinstance(new.encoder, nn.Linear if k == 1 else GroupedLinear)
        torch.testing.assert_close(new(x), layer(x), **TOL64)
        back = recompose_layer(new)
        assert isinstance(back, nn.Linear) and back.weight.shape == layer.weight.shape
        torch.testing.assert_close(back.weight, layer.weight, **TOL64)


def test_truncation_error_and_balanced_factors() -> None:
    layer = conv(8, 6, 3, padding=1)
    k, j = 2, 3
    new = decompose_layer(layer, k, j)
    w, _ = dense_weight(layer)
    groups = folded_groups(w, k)
    approx = folded_groups(dense_weight(new)[0], k)
    for i in range(k):
        s = torch.linalg.svdvals(groups[i])
        # Eckart-Young: the spectral error of the rank-j truncation is σ_{j+1} of each group.
        assert float(torch.linalg.matrix_norm(groups[i] - approx[i], ord=2)) == pytest.approx(float(s[j]), rel=1e-9)
        a = new.decoder.weight.detach().reshape(6, k, j)[:, i, :]  # U·S^½
        b = new.encoder.weight.detach().reshape(k, j, -1)[i]  # S^½·Vᵀ
        torch.testing.assert_close(a.norm(dim=0), s[:j].sqrt(), **TOL64)
        torch.testing.assert_close(b.norm(dim=1), s[:j].sqrt(), **TOL64)
    assert sum(p.numel() for p in new.parameters()) == j * (k * 6 + 8 * 9) + 6  # + the decoder's bias


def test_depthwise_and_grouped_convs_are_refused_with_a_reason() -> None:
    assert "depthwise" in undecomposable_reason(nn.Conv2d(8, 8, 3, groups=8))
    assert "grouped" in undecomposable_reason(nn.Conv2d(8, 8, 3, groups=2))
    assert undecomposable_reason(nn.Conv1d(4, 4, 3)) is not None
    with pytest.raises(SurgeryError, match="depthwise"):
        decompose_layer(nn.Conv2d(8, 8, 3, groups=8), 1, 1)
    with pytest.raises(SurgeryError, match=r"k=3 must divide the 8 input channels"):
        decompose_layer(nn.Conv2d(8, 8, 3), 3, 1)
    with pytest.raises(SurgeryError, match=r"rank j=9 must be in \[1, 8\]"):
        decompose_layer(nn.Linear(8, 8), 1, 9)


def test_dtype_device_and_mode_follow_the_layer() -> None:
    layer = nn.Conv2d(4, 4, 3).to(torch.bfloat16).eval()
    new = decompose_layer(layer, 2, 2)
    assert all(p.dtype == torch.bfloat16 for p in new.parameters())
    assert not new.training


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def test_model_wide_decompose_recompose_and_replay_on_a_fresh_model() -> None:
    model = _net().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    plan = {"3": {"groups": 4, "rank": 3}, "7": {"groups": 2, "rank": 4}}
    records = low_rank_decompose_(model, plan)
    record_events(model, records)
    assert low_rank_layers(model) == ["3", "7"]
    assert "3.encoder.weight" in model.state_dict() and "7.decoder.bias" in model.state_dict()
    fresh = _net().double()
    assert replay_events_(fresh, applied_events(model)) == 1
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), **TOL64)

    out = model(x)
    rec = low_rank_recompose_(model)
    record_events(model, rec)
    assert low_rank_layers(model) == [] and isinstance(model[3], nn.Conv2d)
    torch.testing.assert_close(model(x), out, **TOL64)  # recomposition is exact
    assert replay_events_(fresh, applied_events(model)) == 1
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert low_rank_recompose_(copy.deepcopy(model)) == []  # nothing left to recompose
