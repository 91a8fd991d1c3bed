"""LayerMerge adapters: a user's own residual block, registered, is planned and merged exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.layermerge import UnitLayout, register_merge_unit
from lit_compress.surgery.layermerge.adapters import _UNITS
from lit_compress.surgery.layermerge.blocks import analyze_merge_space
from lit_compress.surgery.layermerge.plan import apply_merge_plan_, merge_planned_


class UserBlock(nn.Module):
    """``act_out(bn_b(conv_b(act_a(bn_a(conv_a(x))))) + skip(x))`` with names of the user's choosing."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn_a = nn.BatchNorm2d(cout)
        self.act_a = nn.ReLU()
        self.conv_b = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn_b = nn.BatchNorm2d(cout)
        self.act_out = nn.ReLU()
        self.proj = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn_b(self.conv_b(self.act_a(self.bn_a(self.conv_a(x)))))
        return self.act_out(y + (x if self.proj is None else self.proj(x)))


class UserNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(UserBlock(4, 4), UserBlock(4, 8, 2), UserBlock(8, 8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def _layout(block: UserBlock) -> UnitLayout:
    return UnitLayout(
        convs=(("conv_a", "bn_a", "act_a"), ("conv_b", "bn_b", "act_out")),
        skip="identity" if block.proj is None else "conv",
        shortcut=None if block.proj is None else "proj",
    )


@pytest.fixture
def registered():
    register_merge_unit(UserBlock, _layout)
    yield
    _UNITS.pop(UserBlock, None)


def test_an_unregistered_block_says_how_to_register() -> None:
    _UNITS.pop(UserBlock, None)
    with pytest.raises(ConfigError, match="register_merge_unit"):
        analyze_merge_space(UserNet())


def test_a_registered_block_is_planned_and_merged_exactly(registered: None) -> None:
    torch.manual_seed(0)
    net = UserNet().double()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    space = analyze_merge_space(net)
    assert space.arch == "residual_sequential" and space.depth == 6
    assert [(r.start, r.end, r.skip) for r in space.residuals] == [
        (0, 2, "identity"),
        (2, 4, "conv"),
        (4, 6, "identity"),
    ]
    x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
    model = copy.deepcopy(net)
    record = apply_merge_plan_(model, _plan(space))[0]
    model.eval()
    expected = model(x)
    merge_planned_(model, record)
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    convs_after = sum(isinstance(m, nn.Conv2d) for m in model.blocks.modules())
    assert convs_after < sum(isinstance(m, nn.Conv2d) for m in net.blocks.modules())


def _plan(space) -> list:
    """Merge the first unit (both convs and the identity skip) into one 5x5 conv; keep the rest."""
    return [[0, 2, [1, 2]], *[[p - 1, p, [p]] for p in range(3, space.depth + 1)]]


class TimmStyleBasicBlock(nn.Module):
    """timm's ResNet ``BasicBlock`` structure (no-op drop_block / aa / drop_path, ``se`` absent), built here."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.se = None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = (
            None
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )
        self.drop_path = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        y = self.aa(self.act1(self.drop_block(self.bn1(self.conv1(x)))))
        y = self.drop_path(self.bn2(self.conv2(y)))
        if self.downsample is not None:
            shortcut = self.downsample(x)
        return self.act2(y + shortcut)


class TimmStyleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.layers = nn.Sequential(TimmStyleBasicBlock(4, 4), TimmStyleBasicBlock(4, 8, 2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


def test_a_timm_style_resnet_block_registered_by_its_names_merges_exactly() -> None:
    register_merge_unit(
        TimmStyleBasicBlock,
        lambda b: UnitLayout(
            convs=(("conv1", "bn1", "act1"), ("conv2", "bn2", "act2")),
            skip="identity" if b.downsample is None else "conv",
            shortcut=None if b.downsample is None else "downsample",
        ),
    )
    try:
        torch.manual_seed(0)
        net = TimmStyleNet().double()
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
        space = analyze_merge_space(net)
        assert space.depth == 4 and [r.skip for r in space.residuals] == ["identity", "conv"]
        x = torch.randn(2, 1, 12, 12, dtype=torch.float64)
        model = copy.deepcopy(net)
        record = apply_merge_plan_(model, _plan(space))[0]
        model.eval()
        expected = model(x)
        merge_planned_(model, record)
        torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
        assert sum(isinstance(m, nn.Conv2d) for m in model.layers.modules()) < 5
    finally:
        _UNITS.pop(TimmStyleBasicBlock, None)
