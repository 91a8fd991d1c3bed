"""CIFAR-style ResNets (He et al. 2016, section 4.2): 6n+2 layers, three stages of widths 16/32/64.

Every operation is a named ``nn.Module`` (activations included, none in place, so forward hooks see
unmodified outputs), so that module- and graph-based surgery can see and replace each one. A block's
shortcut is always an ``nn.Sequential``: empty when it is the identity, ``(conv 1x1, bn)`` for
``shortcut="conv"`` (option B, the default) or a parameter-free :class:`PadShortcut` for
``shortcut="pad"`` (option A of the paper).

Parameters of ResNet-20 with 10 classes: 269,722 with option A on 3x32x32 (the paper's 0.27 M);
272,474 with option B (3 channels) and 272,186 on 1x28x28.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from lit_compress.errors import ConfigError, allowed
from lit_compress.surgery.layermerge.adapters import UnitLayout, register_merge_trunk, register_merge_unit

ShortcutKind = Literal["conv", "pad"]

#: Depths of the paper's CIFAR ResNets; any 6n+2 with n >= 1 works.
RESNET_DEPTHS = (20, 32, 44, 56, 110)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the channels (no parameters).

    Shapes: ``(B, C_in, H, W) -> (B, C_out, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise allowed("out_channels", out_channels, f"must be >= in_channels={in_channels} for a padding shortcut")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra == 0:
            return x
        before = extra // 2
        return nn.functional.pad(x, (0, 0, 0, 0, before, extra - before))

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _make_shortcut(in_channels: int, out_channels: int, stride: int, kind: ShortcutKind) -> nn.Sequential:
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()  # identity: an empty Sequential returns its input
    if kind == "pad":
        return nn.Sequential(PadShortcut(in_channels, out_channels, stride))
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection: ``relu2(bn2(conv2(relu1(bn1(conv1(x))))) + shortcut(x))``.

    Shapes: ``(B, C_in, H, W) -> (B, C_out, H / stride, W / stride)``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, shortcut: ShortcutKind = "conv") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = _make_shortcut(in_channels, out_channels, stride, shortcut)
        self.relu2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet for small images: stem conv, three stages of ``blocks_per_stage`` blocks, global pool, fc.

    Args:
        blocks_per_stage: ``n`` in the paper's ``6n + 2`` layers.
        in_channels: Input channels (1 for MNIST, 3 for CIFAR).
        num_classes: Output logits.
        width_mult: Multiplies the stage widths 16/32/64 (rounded, at least 1).
        shortcut: ``"conv"`` (1x1 conv + BN, option B) or ``"pad"`` (subsample + zero-pad, option A).

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self,
        blocks_per_stage: int,
        in_channels: int = 3,
        num_classes: int = 10,
        width_mult: float = 1.0,
        shortcut: ShortcutKind = "conv",
    ) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise allowed("blocks_per_stage", blocks_per_stage, "must be >= 1")
        if shortcut not in ("conv", "pad"):
            raise allowed("shortcut", shortcut, "must be 'conv' (1x1 conv + BN) or 'pad' (zero-padding, option A)")
        if width_mult <= 0:
            raise allowed("width_mult", width_mult, "must be > 0")
        widths = [max(1, round(w * width_mult)) for w in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu1 = nn.ReLU()
        stages = []
        in_w = widths[0]
        for i, w in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_w, w, stride, shortcut))
                in_w = w
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(widths[-1], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))  # (B, 16w, H, W)
        x = self.layer3(self.layer2(self.layer1(x)))  # (B, 64w, H/4, W/4)
        return self.fc(self.flatten(self.avgpool(x)))  # (B, num_classes)


def cifar_resnet(
    depth: int,
    in_channels: int = 3,
    num_classes: int = 10,
    width_mult: float = 1.0,
    shortcut: ShortcutKind = "conv",
) -> CifarResNet:
    """Build a CIFAR ResNet of ``depth`` = 6n + 2 layers (20, 32, 44, 56, 110, ...).

    Raises:
        ConfigError: If ``depth`` is not of the form 6n + 2 with n >= 1.
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        examples = ", ".join(map(str, RESNET_DEPTHS))
        raise allowed("depth", depth, f"must be of the form 6n+2 with n >= 1, e.g. {examples}")
    return CifarResNet((depth - 2) // 6, in_channels, num_classes, width_mult, shortcut)


def resnet20(**kwargs: object) -> CifarResNet:
    """ResNet-20 (0.27 M parameters on CIFAR-10 with ``shortcut="pad"``)."""
    return cifar_resnet(20, **kwargs)  # type: ignore[arg-type]


def resnet32(**kwargs: object) -> CifarResNet:
    """ResNet-32."""
    return cifar_resnet(32, **kwargs)  # type: ignore[arg-type]


def resnet44(**kwargs: object) -> CifarResNet:
    """ResNet-44."""
    return cifar_resnet(44, **kwargs)  # type: ignore[arg-type]


def resnet56(**kwargs: object) -> CifarResNet:
    """ResNet-56."""
    return cifar_resnet(56, **kwargs)  # type: ignore[arg-type]


def resnet110(**kwargs: object) -> CifarResNet:
    """ResNet-110."""
    return cifar_resnet(110, **kwargs)  # type: ignore[arg-type]


__all__ = [
    "RESNET_DEPTHS",
    "BasicBlock",
    "CifarResNet",
    "PadShortcut",
    "cifar_resnet",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]


def _merge_layout(block: nn.Module) -> UnitLayout:
    """LayerMerge's view of a :class:`BasicBlock` (identity or 1x1-conv shortcut; option A is refused)."""
    assert isinstance(block, BasicBlock), type(block)  # registered for BasicBlock only
    if any(isinstance(m, PadShortcut) for m in block.shortcut):
        raise ConfigError(
            "LayerMerge: a CIFAR ResNet block with a zero-padding shortcut (shortcut='pad') cannot be merged; only "
            "identity and 1x1-conv shortcuts are supported (build the CIFAR ResNet with shortcut='conv')."
        )
    identity = len(block.shortcut) == 0
    return UnitLayout(
        convs=(("conv1", "bn1", "relu1"), ("conv2", "bn2", "relu2")),
        skip="identity" if identity else "conv",
        shortcut=None if identity else "shortcut",
        act_class=type(block.relu1).__name__,
    )


register_merge_unit(BasicBlock, _merge_layout)
register_merge_trunk(
    CifarResNet,
    lambda net: [f"{stage}.{i}" for stage in ("layer1", "layer2", "layer3") for i in range(len(getattr(net, stage)))],
    arch="cifar_resnet",
)
