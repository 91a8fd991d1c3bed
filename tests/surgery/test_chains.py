"""Chain discovery on torchvision models and small stand-ins (GPT-2 MLP, residual and shared uses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from lit_compress.surgery.chains import (
    ConvBNAct,
    LinearChain,
    find_conv_bn_act,
    find_foldable_batchnorms,
    find_linear_chains,
    is_activation,
    sequential_conv_bn_pairs,
)

IMAGE = (1, 3, 32, 32)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None)


@pytest.fixture(scope="module")
def vgg11_bn() -> nn.Module:
    return torchvision.models.vgg11_bn(weights=None)  # built once: its 25088x4096 classifier is slow to init


def test_vgg11_classifier_is_one_stacked_chain() -> None:
    model = torchvision.models.vgg11(weights=None)
    chains = find_linear_chains(model, torch.randn(IMAGE))
    assert chains == [
        LinearChain(
            linears=["classifier.0", "classifier.3", "classifier.6"],
            activations=["classifier.1", "classifier.4"],
            dropouts=["classifier.2", "classifier.5"],
            norms=[None, None],
            transposed=[False, False, False],
        )
    ]
    first, second = chains[0].links()
    assert (first.first, first.second, second.first, second.second) == (
        "classifier.0",
        "classifier.3",
        "classifier.3",
        "classifier.6",
    )


def test_vit_mlp_blocks() -> None:
    vit = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )
    chains = find_linear_chains(vit, torch.randn(IMAGE))
    prefix = "encoder.layers.encoder_layer_{}.mlp."
    assert [c.linears for c in chains] == [[prefix.format(i) + "0", prefix.format(i) + "3"] for i in range(2)]
    assert [c.activations for c in chains] == [[prefix.format(i) + "1"] for i in range(2)]
    assert [c.dropouts for c in chains] == [[prefix.format(i) + "2"] for i in range(2)]
    assert all(isinstance(vit.get_submodule(c.activations[0]), nn.GELU) for c in chains)


class Conv1D(nn.Module):
    """GPT-2 style linear layer with weight stored (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.size()[:-1], self.nf)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class NewGELUActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608 * (x + 0.044715 * x.pow(3))))


class GPT2MLP(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * d, d)
        self.c_proj = Conv1D(d, 4 * d)
        self.act = NewGELUActivation()
        self.dropout = nn.Dropout(0.1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.act(self.c_fc(h))))


class GPT2Block(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.mlp = GPT2MLP(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


def test_gpt2_style_transposed_mlp() -> None:
    chains = find_linear_chains(GPT2Block(), torch.randn(2, 5, 8))
    assert chains == [LinearChain(["mlp.c_fc", "mlp.c_proj"], ["mlp.act"], [None], [None], [True, True])]


def test_chain_with_batchnorm1d_and_custom_activations() -> None:
    class MyAct(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.clamp(min=0)

    class Collapsible(nn.Module):
        collapsible = True

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    model = nn.Sequential(
        nn.Linear(4, 8), MyAct(), nn.Dropout(0.2), nn.BatchNorm1d(8), nn.Linear(8, 8), Collapsible(), nn.Linear(8, 2)
    )
    chains = find_linear_chains(model, torch.randn(3, 4))
    assert chains == [LinearChain(["0", "4", "6"], ["1", "5"], ["2", None], ["3", None], [False, False, False])]
    assert is_activation(MyAct()) and is_activation(Collapsible()) and not is_activation(nn.Softmax(dim=-1))


def test_unknown_leaf_or_branching_breaks_a_chain() -> None:
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)
            self.fc3, self.soft, self.fc4 = nn.Linear(4, 4), nn.Softmax(-1), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.act(self.fc1(x))
            y = self.fc2(a) + a  # activation output read twice: not a chain
            return self.fc4(self.soft(self.fc3(y)))  # Softmax is not an activation we collapse

    assert find_linear_chains(Branch(), torch.randn(2, 4)) == []


def test_shared_activation_and_functional_activation_warn() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.fc3, self.act = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.fc2(self.act(self.fc1(x)))
            return self.fc3(F.relu(self.act(x)))

    with pytest.warns(UserWarning, match=r"`fc1` -> `act` -> `fc2` \(called more than once: act\)") as record:
        chains = find_linear_chains(Shared(), torch.randn(2, 4))
    assert chains == []
    messages = " ".join(str(w.message) for w in record)
    assert "activation is a function call" not in messages  # fc2's output goes to a module first

    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.relu(self.fc1(x)))

    with pytest.warns(UserWarning, match=r"`fc1` -> torch.nn.functional.relu -> `fc2` \(activation is a function call"):
        assert find_linear_chains(Functional(), torch.randn(2, 4)) == []


def test_conv_bn_act_resnet18(resnet18: nn.Module) -> None:
    found = find_conv_bn_act(resnet18, torch.randn(IMAGE))
    assert len(found) == 20  # 17 main-path convs + 3 downsample convs
    by_conv = {p.conv: p for p in found}
    assert by_conv["conv1"] == ConvBNAct("conv1", "bn1", "relu", None, False)  # maxpool follows
    expected = ConvBNAct("layer1.0.conv1", "layer1.0.bn1", "layer1.0.relu", "layer1.0.conv2", True)
    assert by_conv["layer1.0.conv1"] == expected
    assert by_conv["layer1.0.conv1"].feeds_conv
    # bn2 feeds the residual add, so no activation and no next conv
    assert by_conv["layer2.0.conv2"] == ConvBNAct("layer2.0.conv2", "layer2.0.bn2", None, None, False)
    assert by_conv["layer2.0.downsample.0"].bn == "layer2.0.downsample.1"


def test_conv_bn_act_vgg11_bn_and_mobilenet_v2(vgg11_bn: nn.Module) -> None:
    found = find_conv_bn_act(vgg11_bn, torch.randn(IMAGE))
    assert len(found) == 8
    assert all(isinstance(vgg11_bn.get_submodule(p.activation), nn.ReLU) for p in found if p.activation)
    # conv -> bn -> relu -> conv without a max-pool in between
    assert [(p.conv, p.next_conv) for p in found if p.feeds_conv] == [
        ("features.8", "features.11"),
        ("features.15", "features.18"),
        ("features.22", "features.25"),
    ]

    mobilenet = torchvision.models.mobilenet_v2(weights=None)
    found = find_conv_bn_act(mobilenet, torch.randn(IMAGE))
    assert len(found) == 52
    assert found[0] == ConvBNAct("features.0.0", "features.0.1", "features.0.2", "features.1.conv.0.0", False)
    depthwise = mobilenet.get_submodule(found[0].next_conv)
    assert depthwise.groups == depthwise.in_channels == 32
    projection = {p.conv: p for p in found}["features.2.conv.2"]
    assert projection.activation is None and projection.bn == "features.2.conv.3"


def test_foldable_batchnorms_resnet18_and_structural_fallback(resnet18: nn.Module) -> None:
    traced = find_foldable_batchnorms(resnet18, torch.randn(IMAGE))
    assert len(traced) == 20
    assert traced[:2] == [("conv1", "bn1"), ("layer1.0.conv1", "layer1.0.bn1")]
    assert ("layer3.0.downsample.0", "layer3.0.downsample.1") in traced
    # without an input only Sequential adjacency is visible: the three downsample branches
    fallback = find_foldable_batchnorms(resnet18)
    assert fallback == [(f"layer{i}.0.downsample.0", f"layer{i}.0.downsample.1") for i in (2, 3, 4)]
    assert set(fallback) <= set(traced)


def test_foldable_batchnorms_vgg11_bn_trace_matches_fallback(vgg11_bn: nn.Module) -> None:
    traced = find_foldable_batchnorms(vgg11_bn, torch.randn(IMAGE))
    assert traced == sequential_conv_bn_pairs(vgg11_bn)
    assert traced[0] == ("features.0", "features.1") and len(traced) == 8


class ResidualBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn2(self.conv2(self.bn(y) + y))  # y read by bn and by the add


def test_conv_output_read_elsewhere_is_not_foldable() -> None:
    with pytest.warns(UserWarning, match=r"`conv` -> `bn` \(output of `conv` also read by `torch.Tensor.add`\)"):
        pairs = find_foldable_batchnorms(ResidualBN(), torch.randn(1, 4, 5, 5))
    assert pairs == [("conv2", "bn2")]


def test_shared_bn_no_stats_and_3d_linear_are_not_foldable() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.bn = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.c3, self.nostats = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)
            self.fc, self.bn1d = nn.Linear(16, 4), nn.BatchNorm1d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.bn(self.c2(self.bn(self.c1(x))))  # bn called twice
            x = self.nostats(self.c3(x))
            return self.bn1d(self.fc(x.flatten(2)))  # fc output (N, 4, 4): BN1d normalises dim 1, not fc's features

    with pytest.warns(UserWarning) as record:
        pairs = find_foldable_batchnorms(Odd(), torch.randn(1, 3, 4, 4))
    assert pairs == []
    message = str(record[0].message)
    assert "`c1` -> `bn` (called more than once: bn)" in message
    assert "`c3` -> `nostats` (BatchNorm keeps no running statistics)" in message
    assert "`fc` -> `bn1d` (BatchNorm1d over a non-2-D Linear output)" in message


def test_structural_fallback_skips_custom_sequential_and_shared_modules() -> None:
    class Custom(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + x

    conv, bn = nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)
    model = nn.Sequential(
        Custom(nn.Conv2d(2, 2, 1), nn.BatchNorm2d(2)),
        nn.Sequential(conv, bn),
        nn.Sequential(conv, bn),  # the same modules registered twice
        nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3)),
    )
    assert sequential_conv_bn_pairs(model) == [("3.0", "3.1")]
