"""LayerCollapse: exact identity at slope 1, exact merges in float64, refusal, penalty, replay."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.surgery import find_linear_chains, replay_events_
from lit_compress.surgery.collapse.mlp import (
    CollapsibleActivation,
    collapse_,
    collapse_linear_pair,
    collapse_penalty,
    collapse_post_training_,
    make_collapsible_,
    slope_parameters,
)

# A float64 merge differs from the layer-by-layer forward only by rounding of two matmuls.
TOL64 = {"rtol": 1e-10, "atol": 1e-10}


def vgg_like(bn: bool = False) -> nn.Module:
    """A tiny torchvision-VGG layout: features, avgpool, flatten, classifier
    Linear→ReLU→Dropout[→BN1d]→Linear→ReLU→Dropout→Linear (a stacked 3-Linear head)."""
    torch.manual_seed(0)
    head: list[nn.Module] = [nn.Linear(8 * 2 * 2, 64), nn.ReLU(inplace=True), nn.Dropout(0.5)]
    if bn:
        head.append(nn.BatchNorm1d(64))
    head += [nn.Linear(64, 64), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(64, 5)]
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)),
        nn.AdaptiveAvgPool2d((2, 2)),
        nn.Flatten(1),
        nn.Sequential(*head),
    ).double()
    if bn:
        norm = model[3][3]
        gen = torch.Generator().manual_seed(1)
        norm.running_mean.copy_(torch.randn(64, generator=gen, dtype=torch.float64))
        norm.running_var.copy_(torch.rand(64, generator=gen, dtype=torch.float64) + 0.5)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64, generator=gen, dtype=torch.float64))
            norm.bias.copy_(torch.randn(64, generator=gen, dtype=torch.float64))
    return model.eval()


def x64(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def set_slopes(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        for p in slope_parameters(model):
            p.fill_(value)


def test_slope_one_is_exact_identity_and_zero_is_relu() -> None:
    h = torch.randn(1000, dtype=torch.float64) * 10
    act = CollapsibleActivation("relu").double()
    assert act.collapsible is True and act.slope.item() == 0.0 and act.slope.dim() == 0
    assert torch.equal(act(h), torch.relu(h))
    with torch.no_grad():
        act.slope.fill_(1.0)
    assert torch.equal(act(h), h)
    with torch.no_grad():
        act.slope.fill_(0.3)
    expected = torch.clamp(h, min=0) + 0.3 * torch.clamp(h, max=0)
    torch.testing.assert_close(act(h), expected, rtol=0, atol=0)
    assert CollapsibleActivation("gelu").slope.item() == pytest.approx(0.01)


def test_make_collapsible_record_and_function_unchanged() -> None:
    model = vgg_like()
    x = x64()
    ref = model(x)
    chains = find_linear_chains(model, x)
    assert len(chains) == 1 and chains[0].linears == ["3.0", "3.3", "3.6"]
    records = make_collapsible_(model, chains)
    assert records == [
        {"op": "make_collapsible", "activations": ["3.1", "3.4"], "kinds": ["relu", "relu"], "init_slopes": [0.0, 0.0]}
    ]
    assert isinstance(model[3][1], CollapsibleActivation) and isinstance(model[3][4], CollapsibleActivation)
    assert isinstance(model[0][1], nn.ReLU)  # conv activations untouched
    torch.testing.assert_close(model(x), ref, rtol=0, atol=0)  # slope 0 == ReLU
    assert make_collapsible_(model, chains) == []  # already collapsible


def test_leaky_relu_keeps_its_slope() -> None:
    model = nn.Sequential(nn.Linear(6, 40), nn.LeakyReLU(0.2), nn.Linear(40, 3))
    make_collapsible_(model, ["1"])
    assert model[1].slope.item() == pytest.approx(0.2)
    assert model[1].kind == "leaky_relu"


@pytest.mark.parametrize("bn", [False, True], ids=["plain", "batchnorm1d"])
def test_collapse_stacked_head_at_slope_one_is_exact(bn: bool) -> None:
    model = vgg_like(bn)
    x = x64()
    chains = find_linear_chains(model, x)
    make_collapsible_(model, chains)
    set_slopes(model, 1.0)
    ref = model(x)
    n_before = sum(p.numel() for p in model.parameters())
    records = collapse_(model, chains, tau=0.05)
    head = model[3]
    assert isinstance(head[0], nn.Linear) and (head[0].in_features, head[0].out_features) == (32, 5)
    assert all(isinstance(m, nn.Identity) for m in list(head)[1:])
    assert len(head) == (8 if bn else 7)  # registration positions kept
    (rec,) = records
    assert rec["op"] == "collapse"
    assert [e["into"] for e in rec["links"]] == ["3.0", "3.0"]
    assert [e["second"] for e in rec["links"]] == (["3.4", "3.7"] if bn else ["3.3", "3.6"])
    assert rec["links"][0]["norm"] == ("3.3" if bn else None)
    assert rec["metrics"]["params_before"] == n_before
    assert rec["metrics"]["params_after"] == sum(p.numel() for p in model.parameters()) < n_before
    torch.testing.assert_close(model(x), ref, **TOL64)


def test_collapse_respects_tau_and_rolls_over_partial_chain() -> None:
    model = vgg_like()
    x = x64()
    chains = find_linear_chains(model, x)
    make_collapsible_(model, chains)
    with torch.no_grad():
        model[3][1].slope.fill_(0.5)  # not collapsible
        model[3][4].slope.fill_(0.97)  # |a-1| = 0.03 < 0.05
    records = collapse_(model, chains, tau=0.05)
    assert [e["activation"] for e in records[0]["links"]] == ["3.4"]
    assert records[0]["metrics"]["skipped"] == [{"activation": "3.1", "slope": 0.5}]
    assert isinstance(model[3][1], CollapsibleActivation)
    assert (model[3][3].in_features, model[3][3].out_features) == (64, 5)
    assert collapse_(model, chains[0].links()[:1], tau=0.05) == []


def test_collapse_linear_pair_matches_and_keeps_dtype() -> None:
    torch.manual_seed(0)
    first, second = nn.Linear(10, 50), nn.Linear(50, 4, bias=False)
    merged = collapse_linear_pair(first, second)
    assert merged.weight.dtype == torch.float32 and merged.bias is not None
    x = torch.randn(7, 10)
    torch.testing.assert_close(merged(x), second(first(x)), rtol=1e-5, atol=1e-5)


def test_refuses_when_no_parameters_saved() -> None:
    first, second = nn.Linear(16, 4), nn.Linear(4, 16)  # 16*16+16 = 272 >= 68 + 80 = 148
    with pytest.raises(SurgeryError, match=r"16\*16 \+ 16 = 272 parameters, not fewer than the pair's 148"):
        collapse_linear_pair(first, second)
    model = nn.Sequential(first, CollapsibleActivation("relu"), second)
    set_slopes(model, 1.0)
    before = [m for m in model]
    with pytest.raises(SurgeryError, match=r"Cannot collapse `0` -> `2`"):
        collapse_(model, find_linear_chains(model, torch.randn(2, 16)))
    assert [m for m in model] == before  # rolled back


def test_penalty_hand_computed() -> None:
    model = nn.Sequential(
        nn.Linear(4, 20),
        CollapsibleActivation("relu", 0.0),
        nn.Linear(20, 20),
        CollapsibleActivation("gelu", 0.5),
        nn.Linear(20, 2),
    )
    with torch.no_grad():
        model[3].slope.fill_(0.5)
    penalty = collapse_penalty(model)
    assert penalty.item() == pytest.approx((0.0 - 1) ** 2 + (0.5 - 1) ** 2)  # 1.25
    penalty.backward()
    assert model[1].slope.grad.item() == pytest.approx(-2.0)
    assert model[3].slope.grad.item() == pytest.approx(-1.0)
    assert model[0].weight.grad is None
    assert collapse_penalty(nn.Linear(2, 2)).item() == 0.0


def test_replay_on_fresh_model_then_strict_load() -> None:
    model = vgg_like(bn=True)
    x = x64()
    chains = find_linear_chains(model, x)
    records = make_collapsible_(model, chains)
    set_slopes(model, 0.99)
    records += collapse_(model, chains, tau=0.05)
    out = model(x)
    fresh = vgg_like(bn=True)
    with torch.no_grad():  # make sure values come from the checkpoint, not the seed
        for p in fresh.parameters():
            p.add_(1.0)
    assert replay_events_(fresh, copy.deepcopy(records)) == 2
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), out, rtol=0, atol=0)


def test_post_training_reports_error() -> None:
    model = vgg_like(bn=True)
    x = x64(16)
    ref = model(x)
    chains = find_linear_chains(model, x)
    records, err = collapse_post_training_(model, chains, x)
    assert err == pytest.approx(float((model(x) - ref).abs().max().detach()), rel=1e-12)
    assert err > 0  # the ReLUs were not linear
    assert records[0]["metrics"]["max_abs_output_error"] == err
    assert isinstance(model[3][1], nn.Identity)
    # an all-positive pre-activation region makes ReLU the identity: then the collapse is exact
    lin = nn.Sequential(nn.Linear(3, 30), nn.ReLU(), nn.Linear(30, 2)).double()
    with torch.no_grad():
        lin[0].weight.abs_()
        lin[0].bias.fill_(1.0)
    xp = torch.rand(5, 3, dtype=torch.float64)
    _, err0 = collapse_post_training_(lin, find_linear_chains(lin, xp), xp)
    assert err0 < 1e-12


def test_unsupported_activation_message() -> None:
    model = nn.Sequential(nn.Linear(4, 30), nn.Tanh(), nn.Linear(30, 2))
    expected = (
        r"Cannot make `1` collapsible: its type Tanh is not supported "
        r"\(supported: ReLU, LeakyReLU, PReLU, GELU, SiLU, GELUActivation"
    )
    with pytest.raises(ConfigError, match=expected):
        make_collapsible_(model, find_linear_chains(model, torch.randn(2, 4)))
    assert isinstance(model[1], nn.Tanh)
    with pytest.raises(ConfigError, match="PReLU has 30 slopes"):
        make_collapsible_(nn.Sequential(nn.Linear(4, 30), nn.PReLU(30), nn.Linear(30, 2)), ["1"])


def test_surgery_package_has_no_lightning_import() -> None:
    import lit_compress.surgery.collapse.mlp as mod

    src = Path(mod.__file__).read_text(encoding="utf-8")
    assert "lightning" not in src.replace("lit_compress", "")


def test_post_training_collapse_leaves_a_training_model_in_train_mode() -> None:
    # It measures in eval mode; the Linear/Identity modules it creates there must not stay in eval
    # (a model then trained would run with frozen BatchNorm statistics and no dropout).
    model = vgg_like(bn=True).train()
    x = x64(16)
    collapse_post_training_(model, find_linear_chains(model, x), x)
    assert [name for name, m in model.named_modules() if not m.training] == []
    model.eval()
    collapse_post_training_(model, find_linear_chains(model, x), x)  # nothing left to collapse; mode kept
    assert not any(m.training for m in model.modules())
