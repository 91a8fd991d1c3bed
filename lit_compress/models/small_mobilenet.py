"""A small MobileNetV2 for 28x28 inputs (the MNIST-5k LayerMerge benchmark).

It *is* a ``torchvision.models.MobileNetV2`` (so every tool that knows torchvision's
InvertedResidual blocks applies), with a short block setting and a stride-1 stem reading
``in_channels`` channels: 28x28 -> 28 (stem) -> 28 -> 14 -> 7 -> 7 spatially.
"""

from __future__ import annotations

import torchvision
from torch import nn

from lit_compress.errors import allowed

#: (expansion t, channels c, repeats n, first stride s), as in torchvision's setting.
SMALL_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 3, 2], [6, 64, 2, 1]]


def small_mobilenet_v2(in_channels: int = 1, num_classes: int = 10, width_mult: float = 1.0) -> nn.Module:
    """A 9-block MobileNetV2 for small images: about 0.23 M parameters at ``width_mult=1``, 0.1 M of
    them in the 1280-wide head.

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)``.
    """
    if in_channels < 1:
        raise allowed("in_channels", in_channels, "must be >= 1")
    if width_mult <= 0:
        raise allowed("width_mult", width_mult, "must be > 0")
    net = torchvision.models.MobileNetV2(
        num_classes=num_classes, width_mult=width_mult, inverted_residual_setting=SMALL_SETTING
    )
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.features[0][0].weight, mode="fan_out")
    return net


__all__ = ["SMALL_SETTING", "small_mobilenet_v2"]
