"""Exact conv composition (LayerMerge merge step): chains, groups, skip fusion, model-wide merge, replay."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError, ReplayError, SurgeryError
from lit_compress.surgery import replay_events_
from lit_compress.surgery.layermerge.conv import (
    compose_conv_chain,
    compose_convs,
    fuse_downsample_skip,
    fuse_identity_skip,
    merge_conv_chain_,
    move_chain_padding_,
    move_padding_to_first,
)

# Float64: the composed kernel sums at most a few hundred products per output; 1e-10 is far above
# rounding (~1e-14) and far below any structural error (~1e-1).
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def conv(cin, cout, k, s=1, p=None, groups=1, bias=True, dilation=1):
    p = (dilation * (k - 1)) // 2 if p is None else p
    torch.manual_seed(cin * 100 + cout * 10 + k + s)
    c = nn.Conv2d(cin, cout, k, stride=s, padding=p, groups=groups, bias=bias, dilation=dilation).double()
    with torch.no_grad():
        if bias:
            c.bias.normal_()  # make bias effects visible at the border
    return c


def chain_out(convs, x):
    for c in convs:
        x = c(x)
    return x


@pytest.mark.parametrize("ka,kb", [(3, 3), (3, 1), (1, 3), (5, 3)])
@pytest.mark.parametrize("sa,sb", [(1, 1), (2, 1), (1, 2)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_compose_equals_chain_with_moved_padding(ka, kb, sa, sb, bias):
    a, b = conv(3, 5, ka, sa, bias=bias), conv(5, 4, kb, sb, bias=bias)
    merged = compose_convs(a, b)
    assert merged.kernel_size == (ka + (kb - 1) * sa,) * 2
    assert merged.stride == (sa * sb,) * 2
    assert merged.padding == ((ka // 2) + sa * (kb // 2),) * 2
    assert (merged.bias is not None) == bias
    moved = move_padding_to_first([a, b])
    assert moved[1].padding == (0, 0) and a.padding == (ka // 2,) * 2  # inputs untouched
    for size in (11, 12):  # even and odd sizes exercise the stride floors
        x = torch.randn(2, 3, size, size + 1, dtype=torch.float64)
        ref = b(a(x))
        out = merged(x)
        assert out.shape == ref.shape  # output size of the ORIGINAL chain is kept
        torch.testing.assert_close(out, chain_out(moved, x), **TOL64)


def test_original_chain_differs_only_on_the_border():
    a, b = conv(2, 3, 3), conv(3, 2, 3)
    x = torch.randn(1, 2, 9, 9, dtype=torch.float64)
    ref, out = b(a(x)), compose_convs(a, b)(x)
    assert not torch.allclose(ref, out)
    torch.testing.assert_close(out[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], **TOL64)


def test_unpadded_second_conv_is_exact_on_the_original_chain():
    a, b = conv(3, 4, 3, 2, p=1), conv(4, 6, 3, 1, p=0)
    x = torch.randn(2, 3, 13, 10, dtype=torch.float64)
    torch.testing.assert_close(compose_convs(a, b)(x), b(a(x)), **TOL64)


def test_dilation_and_anisotropic_are_expanded():
    a = nn.Conv2d(2, 3, (3, 1), stride=(1, 2), padding=(2, 0), dilation=(2, 1)).double()
    b = nn.Conv2d(3, 2, (1, 3), stride=(2, 1), padding=(0, 2), dilation=(1, 2)).double()
    merged = compose_convs(a, b)
    assert merged.dilation == (1, 1) and merged.kernel_size == (5, 1 + 2 * 2 * 2)
    x = torch.randn(1, 2, 12, 15, dtype=torch.float64)
    torch.testing.assert_close(merged(x), chain_out(move_padding_to_first([a, b]), x), **TOL64)


def test_depthwise_then_pointwise_is_dense():
    dw, pw = conv(6, 6, 3, 2, groups=6), conv(6, 8, 1)
    merged = compose_convs(dw, pw)
    assert merged.groups == 1 and merged.weight.shape == (8, 6, 3, 3)
    x = torch.randn(2, 6, 10, 10, dtype=torch.float64)
    torch.testing.assert_close(merged(x), pw(dw(x)), **TOL64)  # pointwise has no padding: exact as is


def test_pointwise_depthwise_pointwise_stepwise():
    """MobileNetV2 inverted residual without activations: expand 1x1, 3x3 depthwise (stride 2), project 1x1."""
    pw1, dw, pw2 = conv(4, 12, 1), conv(12, 12, 3, 2, groups=12), conv(12, 5, 1)
    step1 = compose_convs(pw1, dw)  # pointwise∘depthwise -> dense
    assert step1.groups == 1 and step1.weight.shape == (12, 4, 3, 3)
    merged = compose_convs(step1, pw2)
    assert merged.weight.shape == (5, 4, 3, 3) and merged.stride == (2, 2) and merged.padding == (1, 1)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    # the depthwise conv pads the expanded map, where pw1's bias lives: compare with moved padding
    torch.testing.assert_close(merged(x), chain_out(move_padding_to_first([pw1, dw, pw2]), x), **TOL64)
    assert merged(x).shape == pw2(dw(pw1(x))).shape
    torch.testing.assert_close(compose_conv_chain([pw1, dw, pw2])(x), merged(x), **TOL64)


def test_depthwise_then_depthwise_stays_depthwise():
    a, b = conv(6, 6, 3, groups=6), conv(6, 6, 5, 2, groups=6)
    merged = compose_convs(a, b)
    assert merged.groups == 6 and merged.weight.shape == (6, 1, 7, 7)
    x = torch.randn(2, 6, 13, 13, dtype=torch.float64)
    torch.testing.assert_close(merged(x), chain_out(move_padding_to_first([a, b]), x), **TOL64)


def test_grouped_mixed_groups_go_dense():
    a, b = conv(4, 8, 3, groups=2), conv(8, 6, 3, groups=2)
    assert compose_convs(a, b).groups == 2
    c = conv(8, 8, 3, groups=4)
    merged = compose_convs(a, c)
    assert merged.groups == 1
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(merged(x), chain_out(move_padding_to_first([a, c]), x), **TOL64)


def test_float32_result_keeps_dtype():
    a, b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 2, 1)
    merged = compose_convs(a, b)
    assert merged.weight.dtype == torch.float32
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(merged(x), b(a(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_identity_skip(groups, k):
    c = conv(4, 4, k, groups=groups)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64)
    fused = fuse_identity_skip(c)
    torch.testing.assert_close(fused(x), c(x) + x, **TOL64)


def test_identity_skip_after_merge():
    a, b = conv(4, 4, 3), conv(4, 4, 3)
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    fused = fuse_identity_skip(compose_convs(a, b))
    torch.testing.assert_close(fused(x), chain_out(move_padding_to_first([a, b]), x) + x, **TOL64)


@pytest.mark.parametrize("bias", [True, False])
def test_downsample_skip(bias):
    c, ds = conv(4, 8, 3, 2, bias=bias), conv(4, 8, 1, 2, bias=bias)
    fused = fuse_downsample_skip(c, ds)
    for size in (8, 9):
        x = torch.randn(2, 4, size, size, dtype=torch.float64)
        torch.testing.assert_close(fused(x), c(x) + ds(x), **TOL64)


def test_downsample_skip_after_merge():
    """ResNet basic block with a downsample, activations removed: conv3x3/s2 -> conv3x3 plus 1x1/s2 shortcut."""
    a, b, ds = conv(4, 8, 3, 2), conv(8, 8, 3), conv(4, 8, 1, 2)
    merged = compose_convs(a, b)  # kernel 3 + 2*2 = 7, padding 1 + 2 = 3: centre tap 3
    fused = fuse_downsample_skip(merged, ds)
    x = torch.randn(2, 4, 12, 12, dtype=torch.float64)
    torch.testing.assert_close(fused(x), chain_out(move_padding_to_first([a, b]), x) + ds(x), **TOL64)


def test_refusals():
    with pytest.raises(SurgeryError, match="4 output channels but the second expects 5"):
        compose_convs(conv(3, 4, 3), conv(5, 2, 3))
    with pytest.raises(SurgeryError, match=r"expected nn\.Conv2d, got Linear"):
        compose_convs(nn.Linear(2, 2), conv(2, 2, 1))
    with pytest.raises(SurgeryError, match="padding_mode='reflect'"):
        compose_convs(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), conv(2, 2, 1))
    with pytest.raises(SurgeryError, match="padding='same'"):
        compose_convs(nn.Conv2d(2, 2, 3, padding="same"), conv(2, 2, 1))
    with pytest.raises(SurgeryError, match="in_channels=3 != out_channels=4"):
        fuse_identity_skip(conv(3, 4, 3))
    with pytest.raises(SurgeryError, match=r"stride=\(2, 2\), need \(1, 1\)"):
        fuse_identity_skip(conv(4, 4, 3, 2))
    with pytest.raises(SurgeryError, match="is not odd"):
        fuse_identity_skip(conv(4, 4, 2, p=0))
    with pytest.raises(SurgeryError, match="keeps the input size"):
        fuse_identity_skip(conv(4, 4, 3, p=0))
    with pytest.raises(SurgeryError, match="strides differ"):
        fuse_downsample_skip(conv(4, 8, 3, 2), conv(4, 8, 1, 1))
    with pytest.raises(SurgeryError, match="need \\(1, 1\\)"):
        fuse_downsample_skip(conv(4, 8, 3, 2), conv(4, 8, 3, 2))
    with pytest.raises(SurgeryError, match="paddings do not line up"):
        fuse_downsample_skip(conv(4, 8, 3, 2, p=0), conv(4, 8, 1, 2))
    with pytest.raises(SurgeryError, match="channels 4->8 of the conv do not match 4->6"):
        fuse_downsample_skip(conv(4, 8, 3, 2), conv(4, 6, 1, 2))


def three_conv_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),
        nn.Conv2d(8, 6, 1),
        nn.ReLU(),
        nn.Flatten(),
    ).double()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.bias)
    return net


def test_merge_conv_chain_in_sequential_and_replay():
    net = three_conv_net()
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    names = ["0", "1", "2"]
    rec_pad = move_chain_padding_(net, names)
    assert rec_pad == [{"op": "move_padding", "names": names, "paddings": [[2, 2], [0, 0], [0, 0]]}]
    before = net(x)
    rec_merge = merge_conv_chain_(net, names)
    assert rec_merge == [
        {
            "op": "merge_convs",
            "names": names,
            "in_channels": 3,
            "out_channels": 6,
            "kernel_size": [5, 5],
            "stride": [2, 2],
            "padding": [2, 2],
            "groups": 1,
            "bias": True,
        }
    ]
    assert isinstance(net[1], nn.Identity) and isinstance(net[2], nn.Identity)
    torch.testing.assert_close(net(x), before, **TOL64)

    fresh = three_conv_net()
    fresh[0].weight.data.zero_()
    assert replay_events_(fresh, rec_pad + rec_merge) == 2
    fresh.load_state_dict(net.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x), net(x), rtol=0, atol=0)


def test_merge_conv_chain_refusals_leave_model_unchanged():
    net = three_conv_net()
    state = copy.deepcopy(net.state_dict())
    with pytest.raises(ConfigError, match="at least 2 distinct"):
        merge_conv_chain_(net, ["0"])
    with pytest.raises(ConfigError, match="give a list"):
        merge_conv_chain_(net, "0")
    with pytest.raises(SurgeryError, match=r"`3` is a ReLU, expected nn\.Conv2d"):
        merge_conv_chain_(net, ["2", "3"])
    with pytest.raises(SurgeryError, match="not a conv chain"):
        merge_conv_chain_(net, ["2", "0"])
    assert all(isinstance(net[i], nn.Conv2d) for i in range(3))
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())


def test_replay_refuses_mismatched_model():
    net = three_conv_net()
    records = merge_conv_chain_(net, ["0", "1", "2"])
    other = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 1)).double()
    with pytest.raises(ReplayError, match=r"maps 3->4 channels, the record 3->6"):
        replay_events_(other, records)
    assert all(isinstance(m, nn.Conv2d) for m in other)


def test_moved_padding_keeps_output_size_for_long_chains():
    ks = [3, 1, 5, 3]
    ss = [2, 1, 2, 1]
    cs = [3, 4, 5, 6, 2]
    convs = [conv(cs[i], cs[i + 1], k, s) for i, (k, s) in enumerate(zip(ks, ss))]
    moved = move_padding_to_first(convs)
    merged = compose_conv_chain(convs)
    for h, w in itertools.product((15, 16), (17, 18)):
        x = torch.randn(1, 3, h, w, dtype=torch.float64)
        assert chain_out(moved, x).shape == chain_out(convs, x).shape == merged(x).shape
        torch.testing.assert_close(merged(x), chain_out(moved, x), **TOL64)
