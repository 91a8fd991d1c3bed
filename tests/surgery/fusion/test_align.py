"""Alignment before averaging: a permuted copy of a block is matched back exactly, the function kept."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lit_compress.models.cifar_resnet import BasicBlock
from lit_compress.surgery.fusion.align import align_cluster_, hidden_space, match
from lit_compress.surgery.fusion.tie import fuse_layers_, fuse_pair_


class FFN(nn.Module):
    def __init__(self, d: int = 6, h: int = 12, gated: bool = False) -> None:
        super().__init__()
        self.gated = gated
        if gated:  # Llama names
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)
        else:
            self.fc_in, self.fc_out = nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))
        return x + self.fc_out(torch.tanh(self.fc_in(x)))


class Net(nn.Module):
    def __init__(self, gated: bool = False) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([FFN(gated=gated) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@torch.no_grad()
def permuted_copy(model: nn.Module, perm: torch.Tensor) -> None:
    """Block 1 := block 0 with its hidden units permuted by ``perm`` (same function as block 0)."""
    src, dst = model.blocks[0], model.blocks[1]
    for name, axis_of in (("fc_in", 0), ("gate_proj", 0), ("up_proj", 0), ("fc_out", 1), ("down_proj", 1)):
        if hasattr(src, name):
            getattr(dst, name).weight.copy_(getattr(src, name).weight.index_select(axis_of, perm))
            bias = getattr(src, name).bias
            getattr(dst, name).bias.copy_(bias.index_select(0, perm) if axis_of == 0 else bias)


@pytest.mark.parametrize("gated", [False, True])
def test_a_permuted_copy_is_matched_back_exactly(gated: bool) -> None:
    torch.manual_seed(0)
    perm = torch.randperm(12)
    x = torch.randn(5, 6)
    errors = {}
    for align in (False, True):
        model = Net(gated)
        permuted_copy(model, perm)
        before = model(x)
        original = {k: v.clone() for k, v in model.blocks[0].state_dict().items()}
        first = "blocks.0.gate_proj" if gated else "blocks.0.fc_in"
        unit = first.rsplit(".", 1)[1]
        fusion = fuse_pair_(model, [first], [first.replace("0", "1", 1)], ["weight", "bias"], "mean", 0, align)
        if align:  # the fused weight is the original: the permuted copy was matched back
            assert torch.equal(model.blocks[0].get_submodule(unit).weight, original[f"{unit}.weight"])
            assert len(fusion["aligned"]) == (5 if gated else 3)  # producers: weight, bias; consumer: weight
        errors[align] = float((model(x) - before).detach().abs().max())
    assert errors[True] < 1e-6 < 1e-2 < errors[False]


def test_residual_block_convs_are_aligned_with_their_batchnorm() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 4, 1))
    perm = torch.randperm(4)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
        a, b = model[0], model[1]
        b.conv1.weight.copy_(a.conv1.weight[perm])
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(b.bn1, attr).copy_(getattr(a.bn1, attr)[perm])
        b.conv2.weight.copy_(a.conv2.weight[:, perm])
    model.eval()
    x = torch.randn(2, 4, 6, 6)
    before = model(x)
    assert hidden_space(model, "0.conv1") is not None and hidden_space(model, "0.conv2") is not None
    fusion = fuse_pair_(model, ["0.conv1"], ["1.conv1"], ["weight"], "mean", 0, align=True)
    assert "1.bn1.running_mean" in fusion["aligned"]
    torch.testing.assert_close(model(x), before)


def test_alignment_is_skipped_with_a_reason_where_it_cannot_permute() -> None:
    model = nn.ModuleDict({f"b{i}": nn.ModuleDict({"q_proj": nn.Linear(4, 4)}) for i in range(2)})
    plan = [{"a": ["b0.q_proj"], "b": ["b1.q_proj"], "params": ["weight", "bias"]}]
    records = fuse_layers_(model, plan, "mean", align=True)  # type: ignore[arg-type]
    fusion = records[0]["fusions"][0]
    assert fusion["aligned"] == [] and "`b0.q_proj` has no hidden units it can permute" in fusion["align_skipped"]
    net = Net()
    net.blocks[1].fc_out.weight = nn.Parameter(torch.randn(6, 12))
    extra = nn.Linear(12, 6)
    extra.weight = net.blocks[1].fc_out.weight  # a tie to a module outside the aligned block
    net.extra = extra
    done, reason = align_cluster_(net, ["blocks.0.fc_in"], ["blocks.1.fc_in"])
    assert done == [] and "`blocks.1.fc_out.weight` is also held by `extra.weight`" in reason


def test_greedy_matching_without_scipy_recovers_a_permutation(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    fa = torch.randn(16, 30, generator=g, dtype=torch.float64)
    perm = torch.randperm(16, generator=g)
    fb = torch.empty_like(fa)
    fb[perm] = fa  # fb[perm[h]] = fa[h]
    assert torch.equal(match(fa, fb), perm)
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails: the greedy fallback
    assert torch.equal(match(fa, fb), perm)
