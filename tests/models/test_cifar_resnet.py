"""CIFAR ResNets: parameter counts, depths, block structure and module-only activations."""

import pytest
import torch
import torch.fx
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.models.cifar_resnet import BasicBlock, CifarResNet, PadShortcut, cifar_resnet, resnet20


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_resnet20_parameter_counts():
    # Option A (padding shortcut) on CIFAR: the paper's 0.27 M.
    assert n_params(resnet20(in_channels=3, shortcut="pad")) == 269_722
    # Option B (1x1 conv + BN, the default) adds 2,752, on 1x28x28.
    assert n_params(resnet20(in_channels=3)) == 272_474
    assert n_params(resnet20(in_channels=1)) == 272_186
    assert n_params(resnet20(in_channels=1, width_mult=0.5)) == 68_642


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_depths_have_6n_plus_2_weighted_layers(depth):
    model = cifar_resnet(depth, in_channels=1, width_mult=0.25)
    n = (depth - 2) // 6
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 3 * n
    convs3 = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs3) + 1 == depth  # 3x3 convs + the fc layer
    if depth <= 32:
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("depth", [0, 2, 19, 21, 111, 20.0])
def test_depth_not_6n_plus_2_is_rejected(depth):
    with pytest.raises(ConfigError, match=r"`depth`=.* is not allowed: must be of the form 6n\+2"):
        cifar_resnet(depth)


def test_block_structure_and_named_modules():
    model = resnet20()
    first = model.layer1[0]
    assert [n for n, _ in first.named_children()] == ["conv1", "bn1", "relu1", "conv2", "bn2", "shortcut", "relu2"]
    assert isinstance(first.shortcut, nn.Sequential) and len(first.shortcut) == 0  # identity
    down = model.layer2[0]
    assert isinstance(down.shortcut[0], nn.Conv2d) and down.shortcut[0].kernel_size == (1, 1)
    assert down.shortcut[0].stride == (2, 2) and isinstance(down.shortcut[1], nn.BatchNorm2d)
    pad = resnet20(shortcut="pad").layer3[0].shortcut
    assert len(pad) == 1 and isinstance(pad[0], PadShortcut)
    assert not any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())


def test_stage_shapes_and_pad_shortcut():
    model = resnet20(in_channels=3, width_mult=0.5).eval()
    x = torch.randn(2, 3, 32, 32)
    h = model.relu1(model.bn1(model.conv1(x)))
    assert model.layer1(h).shape == (2, 8, 32, 32)
    assert model.layer2(model.layer1(h)).shape == (2, 16, 16, 16)
    assert model(x).shape == (2, 10)
    y = PadShortcut(4, 8, 2)(torch.ones(1, 4, 5, 5))
    assert y.shape == (1, 8, 3, 3) and y[:, :2].sum() == 0 and y[:, 6:].sum() == 0 and y[:, 2:6].sum() == 36


def test_activations_are_modules_visible_to_fx():
    graph = torch.fx.symbolic_trace(resnet20(width_mult=0.25)).graph
    relu_modules = [n for n in graph.nodes if n.op == "call_module" and "relu" in str(n.target)]
    assert len(relu_modules) == 1 + 2 * 9
    assert not any(n.op == "call_function" and "relu" in str(n.target) for n in graph.nodes)


def test_invalid_arguments():
    with pytest.raises(ConfigError, match=r"`shortcut`='b' is not allowed"):
        CifarResNet(3, shortcut="b")
    with pytest.raises(ConfigError, match=r"`width_mult`=0 is not allowed: must be > 0"):
        resnet20(width_mult=0)
