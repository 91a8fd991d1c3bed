"""Chain discovery for the MLP shapes users bring: timm's ``Mlp`` (``norm = nn.Identity()``), a BatchNorm1d before
or after the activation, Identity and p = 0 dropouts anywhere in a link, gated MLPs (found, never chained); and the
exactness of collapsing each collapsible shape (BN folded with its running statistics, eval mode, float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.errors import SurgeryError
from lit_compress.surgery import collapse_, make_collapsible_
from lit_compress.surgery.chains import discover_mlps, find_linear_chains, linear_features
from lit_compress.surgery.collapse.mlp import collapsible_activations

TOL = dict(rtol=1e-12, atol=1e-12)  # float64


class TimmStyleMlp(nn.Module):
    """The structure and attribute names of ``timm.layers.Mlp`` (timm is not a dependency):
    ``fc1 → act → drop1 → norm (nn.Identity without a norm_layer) → fc2 → drop2``."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def with_running_stats(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (so folding is really tested)."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=torch.float64))
    return model


def collapse_at_slope_one(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval outputs before and after converting and collapsing every chain at slope 1."""
    chains = find_linear_chains(model, x)
    make_collapsible_(model, chains)
    with torch.no_grad():
        for _, act in collapsible_activations(model):
            act.slope.fill_(1.0)
    model.eval()
    before = model(x)
    collapse_(model, chains)
    return before, model(x)


SHAPES = {
    "bn_before_act": (
        lambda: nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)),
        ("0", "2", None, "1", "3"),
    ),
    "bn_then_dropout_after_act": (
        lambda: nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.BatchNorm1d(32), nn.Dropout(0.2), nn.Linear(32, 4)),
        ("0", "1", "3", "2", "4"),
    ),
    "identity_and_p0_dropout_inside": (
        lambda: nn.Sequential(
            *(nn.Linear(8, 32), nn.Identity(), nn.Dropout(0.0), nn.ReLU()),
            *(nn.Identity(), nn.Dropout(0.3), nn.Linear(32, 4)),
        ),
        ("0", "3", "5", None, "6"),
    ),
    "timm_mlp": (lambda: TimmStyleMlp(8, 32), ("fc1", "act", "drop1", None, "fc2")),
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_mlp_shape_is_found_and_collapses_exactly_in_eval_mode(shape: str) -> None:
    make, (first, act, dropout, norm, second) = SHAPES[shape]
    torch.manual_seed(0)
    model = with_running_stats(make().double())
    x = torch.randn(6, 8, dtype=torch.float64)
    (chain,) = find_linear_chains(model, x)
    (link,) = chain.links()
    assert (link.first, link.activation, link.dropout, link.norm, link.second) == (first, act, dropout, norm, second)
    before, after = collapse_at_slope_one(model, x)
    torch.testing.assert_close(after, before, **TOL)
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 1


def test_real_timm_mlp_is_found() -> None:
    layers = pytest.importorskip("timm.layers")
    model = layers.Mlp(8, 32, drop=0.1).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    (chain,) = find_linear_chains(model, x)
    assert chain.linears == ["fc1", "fc2"] and chain.activations == ["act"]
    before, after = collapse_at_slope_one(model, x)
    torch.testing.assert_close(after, before, **TOL)


def test_batchnorm_over_a_3d_value_is_not_part_of_a_link() -> None:
    class Seq3d(nn.Module):  # BatchNorm1d over (N, L, C) normalises L, not the Linear's features
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.bn, self.act, self.fc2 = nn.Linear(8, 5), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(5, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.bn(self.fc1(x))))

    assert find_linear_chains(Seq3d(), torch.randn(2, 4, 8)) == []


class GatedMLP(nn.Module):
    """Llama-style ``down(act(gate(x)) * up(x))``."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 32), nn.Linear(8, 32), nn.Linear(32, 8)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_gated_mlp_is_found_as_gated_and_named_in_the_warning() -> None:
    model = nn.Sequential(GatedMLP())
    found = discover_mlps(model, torch.randn(2, 8))
    assert found.chains == []
    assert [(g.gate, g.activation, g.up, g.down) for g in found.gated] == [
        ("0.gate_proj", "0.act_fn", "0.up_proj", "0.down_proj")
    ]
    with pytest.warns(UserWarning, match=r"the gate `0.gate_proj` multiplies with `0.up_proj`"):
        assert find_linear_chains(model, torch.randn(2, 8)) == []


def test_linear_features_reads_linear_and_conv1d_layouts() -> None:
    transformers = pytest.importorskip("transformers")
    assert linear_features(nn.Linear(3, 5)) == (3, 5)
    assert linear_features(transformers.pytorch_utils.Conv1D(nf=7, nx=3)) == (3, 7)  # weight (nx, nf)
    with pytest.raises(SurgeryError, match="A Conv2d is not a linear-like layer"):
        linear_features(nn.Conv2d(3, 5, 1))
