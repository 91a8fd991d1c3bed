"""BatchNorm folding: exactness of the leaf folds and of the model-wide fold, replay, rollback."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from lit_compress.errors import ConfigError, ReplayError, SurgeryError
from lit_compress.surgery import fold_batchnorm_, replay_events_
from lit_compress.surgery.bn_fold import fold_conv_bn, fold_linear_bn
from lit_compress.surgery.replay import registered_ops

# Float64 folds are exact up to rounding of a few multiply-adds per output.
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial running stats and affine params (a fresh BN is the identity in eval)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            dtype = m.running_mean.dtype
            m.running_mean.copy_(torch.randn(n, generator=gen, dtype=dtype))
            m.running_var.copy_(torch.rand(n, generator=gen, dtype=dtype) * 2 + 0.1)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.randn(n, generator=gen, dtype=dtype))
                    m.bias.copy_(torch.randn(n, generator=gen, dtype=dtype))
    return model


CONVS = {
    "conv1d": (lambda **kw: nn.Conv1d(4, 6, 3, **kw), nn.BatchNorm1d, (2, 4, 9)),
    "conv2d": (lambda **kw: nn.Conv2d(4, 6, 3, stride=2, padding=1, **kw), nn.BatchNorm2d, (2, 4, 7, 7)),
    "conv3d": (lambda **kw: nn.Conv3d(4, 6, 2, **kw), nn.BatchNorm3d, (2, 4, 3, 3, 3)),
    "grouped": (lambda **kw: nn.Conv2d(4, 6, 3, groups=2, **kw), nn.BatchNorm2d, (2, 4, 5, 5)),
    "depthwise": (lambda **kw: nn.Conv2d(6, 6, 3, groups=6, padding=1, **kw), nn.BatchNorm2d, (2, 6, 5, 5)),
}


@pytest.mark.parametrize("kind", list(CONVS))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_fold_conv_bn_is_exact_in_float64(kind: str, bias: bool, affine: bool) -> None:
    torch.manual_seed(0)
    make_conv, bn_type, shape = CONVS[kind]
    conv = make_conv(bias=bias).double()
    bn = randomise_bn(bn_type(6, affine=affine).double()).eval()
    x = torch.randn(shape, dtype=torch.float64)
    folded = fold_conv_bn(conv, bn)
    assert type(folded) is type(conv) and folded is not conv
    assert folded.bias is not None and folded.groups == conv.groups
    assert (conv.bias is None) == (not bias)  # the input conv is not modified
    torch.testing.assert_close(folded(x), bn(conv(x)), **TOL64)


def test_fold_keeps_dtype_and_is_close_in_float32() -> None:
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 5, 3), randomise_bn(nn.BatchNorm2d(5)).eval()
    folded = fold_conv_bn(conv, bn)
    assert folded.weight.dtype == folded.bias.dtype == torch.float32
    assert folded.weight.device == conv.weight.device and folded.weight.requires_grad
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(folded(x), bn(conv(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_fold_linear_bn_is_exact(bias: bool) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(5, 7, bias=bias).double()
    bn = randomise_bn(nn.BatchNorm1d(7).double()).eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    folded = fold_linear_bn(linear, bn)
    assert isinstance(folded, nn.Linear) and folded.bias is not None
    torch.testing.assert_close(folded(x), bn(linear(x)), **TOL64)


def test_leaf_folds_reject_impossible_inputs() -> None:
    with pytest.raises(SurgeryError, match=r"`ConvTranspose2d`: transposed convolutions are not supported"):
        fold_conv_bn(nn.ConvTranspose2d(3, 4, 2), nn.BatchNorm2d(4))
    with pytest.raises(SurgeryError, match=r"`track_running_stats=False`"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(SurgeryError, match=r"\(5 features\) into `Conv2d` \(4 output channels\)"):
        fold_conv_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(SurgeryError, match=r"`Conv2d` with fold_linear_bn: expected nn.Linear"):
        fold_linear_bn(nn.Conv2d(3, 4, 1), nn.BatchNorm1d(4))


@pytest.fixture(scope="module")
def resnet_pair() -> tuple[nn.Module, nn.Module, torch.Tensor, list[dict]]:
    """(original, folded) float64 resnet18 with random BN stats, an input and the fold records."""
    torch.manual_seed(0)
    original = randomise_bn(torchvision.models.resnet18(weights=None, num_classes=10).double()).eval()
    folded = copy.deepcopy(original)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    records = fold_batchnorm_(folded, example_inputs=x)
    return original, folded, x, records


def test_fold_batchnorm_resnet18_preserves_outputs_exactly(resnet_pair) -> None:
    original, folded, x, records = resnet_pair
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert len(records) == 1 and records[0]["op"] == "fold_batchnorm"
    assert len(records[0]["pairs"]) == 20 and records[0]["pairs"][0] == ["conv1", "bn1"]
    assert ["layer2.0.downsample.0", "layer2.0.downsample.1"] in records[0]["pairs"]
    # same module names in the same order: BNs became Identity, convs were replaced in place
    assert [n for n, _ in folded.named_modules()] == [n for n, _ in original.named_modules()]
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(folded(x), original(x), **TOL64)


def test_fold_record_is_plain_data_and_replays_for_strict_load(resnet_pair, tmp_path) -> None:
    original, folded, x, records = resnet_pair
    assert "fold_batchnorm" in registered_ops()
    path = tmp_path / "log.pt"
    torch.save(records, path)
    loaded = torch.load(path, weights_only=True)
    assert loaded == records
    fresh = torchvision.models.resnet18(weights=None, num_classes=10).double().eval()
    assert replay_events_(fresh, loaded) == 1
    fresh.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), folded(x), rtol=0, atol=0)
        torch.testing.assert_close(fresh(x), original(x), **TOL64)


def test_conv_output_used_elsewhere_is_not_folded() -> None:
    class ResidualBN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)
            self.conv2, self.bn2 = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn2(self.conv2(self.bn(y) + y))

    model = randomise_bn(ResidualBN().double()).eval()
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    expected = model(x)
    with pytest.warns(UserWarning, match=r"output of `conv` also read by"):
        records = fold_batchnorm_(model, example_inputs=x)
    assert records[0]["pairs"] == [["conv2", "bn2"]]
    assert isinstance(model.bn, nn.BatchNorm2d) and isinstance(model.bn2, nn.Identity)
    torch.testing.assert_close(model(x), expected, **TOL64)


def test_linear_batchnorm1d_model_and_structural_discovery() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model = randomise_bn(model.double()).eval()
    x = torch.randn(5, 6, dtype=torch.float64)
    expected = model(x)
    records = fold_batchnorm_(model)  # no input: Sequential adjacency
    assert records == [{"op": "fold_batchnorm", "pairs": [["0", "1"]]}]
    assert [type(m).__name__ for m in model] == ["Linear", "Identity", "ReLU", "Linear"]
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "3.weight", "3.bias"]
    torch.testing.assert_close(model(x), expected, **TOL64)


def test_targets_select_pairs_and_nothing_to_fold_returns_no_record() -> None:
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    )
    assert fold_batchnorm_(model, targets=["re:1\\..*"]) == [{"op": "fold_batchnorm", "pairs": [["1.0", "1.1"]]}]
    assert isinstance(model[0][1], nn.BatchNorm2d) and isinstance(model[1][1], nn.Identity)
    assert fold_batchnorm_(model, targets=["1.*"]) == []  # already folded: nothing left there


def test_failing_fold_leaves_model_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 1), nn.BatchNorm2d(4))
    before_modules = list(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SurgeryError, match=r"Cannot fold `3` into `2`: .*\(4 features\) into `Conv2d` \(5 output"):
        fold_batchnorm_(model, pairs=[("0", "1"), ("2", "3")])
    assert all(a is b for a, b in zip(model, before_modules))
    assert model.state_dict().keys() == before_state.keys()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before_state[k], rtol=0, atol=0)


def test_bad_pairs_are_config_errors() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match=r"`pairs` entry '0' is not allowed: each entry must be two module names"):
        fold_batchnorm_(model, pairs=["0"])
    with pytest.raises(ConfigError, match=r"each module may appear in one pair only"):
        fold_batchnorm_(model, pairs=[("0", "1"), ("0", "1")])
    with pytest.raises(SurgeryError, match=r"No submodule named `nope`"):
        fold_batchnorm_(model, pairs=[("nope", "1")])
    assert isinstance(model[1], nn.BatchNorm2d)


def test_replay_rejects_already_folded_structure() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    records = fold_batchnorm_(model)
    conv = nn.Conv2d(3, 4, 1, bias=False)
    fresh = nn.Sequential(conv, nn.Identity())
    with pytest.raises(ReplayError, match=r"`1` is a Identity, expected a BatchNorm"):
        replay_events_(fresh, records)
    assert fresh[0] is conv and conv.bias is None  # the replay was rolled back
