"""LayerMerge plans: the planned (fine-tuning) network equals the merged one exactly (float64, eval)."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torchvision
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery import record_events, replay_events_
from lit_compress.surgery.layermerge.blocks import analyze_merge_space, enumerate_candidates
from lit_compress.surgery.layermerge.plan import (
    PlannedUnit,
    apply_merge_plan_,
    check_plan,
    identity_plan,
    merge_planned_,
    single_block_plan,
)


def _randomize_bn(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)


def _random_plan(space, candidates, rng: random.Random, prefer_long: bool = True) -> list:
    by_end: dict[int, list] = {}
    for c in candidates:
        by_end.setdefault(c.end, []).append(c)
    plan, e = [], space.depth
    while e > 0:
        options = by_end[e]
        if prefer_long and rng.random() < 0.7:
            options = [max(options, key=lambda c: (c.end - c.start, rng.random()))]
        c = rng.choice(options)
        plan.append([c.start, c.end, list(c.kept)])
        e = c.start
    return plan[::-1]


def _nets():
    from lit_compress.models.cifar_resnet import cifar_resnet
    from lit_compress.models.small_mobilenet import small_mobilenet_v2

    return {
        "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 32, 32)),
        "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.25), (2, 3, 24, 24)),
        "cifar_resnet20": (lambda: cifar_resnet(20, in_channels=1, width_mult=0.5), (2, 1, 20, 20)),
        "small_mobilenet_v2": (lambda: small_mobilenet_v2(width_mult=0.5), (2, 1, 20, 20)),
        "vgg_cnn": (
            lambda: __import__("lit_compress.models.small_cnn", fromlist=["x"]).VGGStyleCNN(width_mult=0.25),
            (2, 1, 28, 28),
        ),
    }


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "cifar_resnet20", "small_mobilenet_v2", "vgg_cnn"])
def test_merged_network_equals_the_planned_one(name: str) -> None:
    build, shape = _nets()[name]
    torch.manual_seed(0)
    net = build().double()
    _randomize_bn(net)
    space = analyze_merge_space(net)
    candidates = enumerate_candidates(net, space)
    rng = random.Random(0)
    x = torch.randn(*shape, dtype=torch.float64)
    merged_any = False
    for _ in range(2):
        model = copy.deepcopy(net)
        plan = _random_plan(space, candidates, rng)
        merged_any |= any(e - s > 1 for s, e, _ in plan)
        record = apply_merge_plan_(model, plan)[0]
        model.train()
        with torch.no_grad():
            model(x)  # a training-mode pass changes BN statistics: the merge must use the new ones
        model.eval()
        expected = model(x)
        out = merge_planned_(model, record)[0]
        assert out["op"] == "layer_merge_final" and len(out["kernels"]) == len(plan)
        got = model(x)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.detach().abs().max()))
        n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
        assert n_convs < sum(isinstance(m, nn.Conv2d) for m in net.modules()) or len(plan) == space.depth
    assert merged_any


def test_identity_plan_keeps_the_function() -> None:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).double().eval()
    _randomize_bn(net)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    expected = net(x)
    space = analyze_merge_space(net)
    apply_merge_plan_(net, identity_plan(space))
    assert isinstance(net.layer1[0], PlannedUnit)
    torch.testing.assert_close(net(x), expected)


def test_moved_padding_and_residual_padding_during_fine_tuning() -> None:
    """A chain over two identity-skip units: padding moves to the first conv, skip inputs are resized."""
    from lit_compress.models.cifar_resnet import cifar_resnet

    net = cifar_resnet(8, in_channels=1, width_mult=0.5).double()
    _randomize_bn(net)
    space = analyze_merge_space(net)
    assert [(r.start, r.end, r.skip) for r in space.residuals] == [(0, 2, "identity"), (2, 4, "conv"), (4, 6, "conv")]
    plan = single_block_plan(space, 0, 2, [1, 2])
    apply_merge_plan_(net, plan)
    unit = net.layer1[0]
    assert unit.body.conv0.padding == (2, 2) and unit.body.conv1.padding == (0, 0)
    assert isinstance(unit.body.act0, nn.Identity) and isinstance(unit.post, nn.ReLU)
    x = torch.randn(1, 1, 12, 12, dtype=torch.float64)
    # the skip of the second unit of a chain over both stage-1 units reads a map 2 pixels larger
    net2 = cifar_resnet(14, in_channels=1, width_mult=0.5).double()
    space2 = analyze_merge_space(net2)
    apply_merge_plan_(net2, single_block_plan(space2, 0, 4, [1, 2, 3, 4]))
    assert (net2.layer1[0].margin_in, net2.layer1[0].margin_out) == (0, 2)
    assert (net2.layer1[1].margin_in, net2.layer1[1].margin_out) == (2, 0)
    assert net2.layer1[0].body.conv0.padding == (4, 4)
    assert net2.eval()(x).shape == net.eval()(x).shape == (1, 10)


def test_replay_rebuilds_the_planned_and_merged_structure() -> None:
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.5)
    fresh = copy.deepcopy(net)
    space = analyze_merge_space(net)
    plan = _random_plan(space, enumerate_candidates(net, space), random.Random(3))
    records = apply_merge_plan_(net, plan)
    records += merge_planned_(net, records[0])
    record_events(net, records)
    replay_events_(fresh, records)
    fresh.load_state_dict(net.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), net.eval()(x))


def test_bad_plans_are_clear_errors() -> None:
    net = torchvision.models.resnet18()
    space = analyze_merge_space(net)
    with pytest.raises(ConfigError, match="does not continue the tiling"):
        check_plan(space, [[0, 1, [1]], [2, 3, [3]]])
    with pytest.raises(ConfigError, match="not valid"):
        check_plan(space, single_block_plan(space, 1, 3, [2, 3]))  # cuts the first residual unit
    with pytest.raises(ConfigError, match="must be sorted"):
        check_plan(space, single_block_plan(space, 4, 5, []))
    mbv2 = analyze_merge_space(torchvision.models.mobilenet_v2())
    with pytest.raises(ConfigError, match="cannot be pruned"):
        check_plan(mbv2, single_block_plan(mbv2, 0, 2, [1]))  # drops the 32->16 projection
    with pytest.raises(ConfigError, match="end at position"):
        check_plan(space, [[0, 1, [1]]])
