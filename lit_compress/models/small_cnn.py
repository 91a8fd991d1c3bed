"""Small plain CNNs for the quickstart and the MNIST-5k benchmark.

Both have a ``features`` ``nn.Sequential`` of Conv -> BN -> ReLU (-> MaxPool) blocks and a
``classifier`` ``nn.Sequential`` MLP, with activations as modules so that surgery can see them.
"""

from __future__ import annotations

from torch import Tensor, nn

from lit_compress.errors import allowed


def _scaled(width: int, width_mult: float) -> int:
    return max(1, round(width * width_mult))


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    ]


def _check(in_channels: int, num_classes: int, width_mult: float) -> None:
    if in_channels < 1:
        raise allowed("in_channels", in_channels, "must be >= 1")
    if num_classes < 1:
        raise allowed("num_classes", num_classes, "must be >= 1")
    if width_mult <= 0:
        raise allowed("width_mult", width_mult, "must be > 0")


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU blocks (16/32/64 channels x ``width_mult``, max-pool after the first two),
    global average pooling, and a two-layer MLP head ``Linear -> ReLU -> Linear``.

    About 30 k parameters at ``width_mult=1``; works on any input size >= 4x4.

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)``.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width_mult: float = 1.0) -> None:
        super().__init__()
        _check(in_channels, num_classes, width_mult)
        c1, c2, c3, hidden = (_scaled(w, width_mult) for w in (16, 32, 64, 128))
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c1, c2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(nn.Linear(c3, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, 64w, H/4, W/4)
        x = self.flatten(self.avgpool(x))  # (B, 64w)
        return self.classifier(x)  # (B, num_classes)


class VGGStyleCNN(nn.Module):
    """VGG-style CNN with a 3-layer MLP classifier (the MNIST-5k benchmark model).

    ``features``: [conv 32, conv 32, pool, conv 64, conv 64, pool] (x ``width_mult``), each conv
    followed by BN and ReLU; ``avgpool`` to 7x7 (the identity on 28x28 inputs); ``classifier`` with
    the layout of torchvision's VGG: Linear -> ReLU -> Dropout -> Linear -> ReLU -> Dropout -> Linear,
    hidden width 256 x ``width_mult``. 936,618 parameters at ``width_mult=1`` on 1x28x28 with 10
    classes (235,098 at 0.5).

    Shapes: ``(B, in_channels, H, W) -> (B, num_classes)``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.5
    ) -> None:
        super().__init__()
        _check(in_channels, num_classes, width_mult)
        if not 0.0 <= dropout < 1.0:
            raise allowed("dropout", dropout, "must be in [0, 1)")
        c1, c2, hidden = (_scaled(w, width_mult) for w in (32, 64, 256))
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, c1),
            *_conv_bn_relu(c1, c1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c1, c2),
            *_conv_bn_relu(c2, c2),
            nn.MaxPool2d(2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.flatten = nn.Flatten(1)
        self.classifier = nn.Sequential(
            nn.Linear(c2 * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)  # (B, 64w, H/4, W/4)
        x = self.flatten(self.avgpool(x))  # (B, 64w * 49)
        return self.classifier(x)  # (B, num_classes)


__all__ = ["SmallCNN", "VGGStyleCNN"]
