"""LayerMerge's search space: blocks and candidates, checked against the official counts."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.surgery.layermerge.blocks import analyze_merge_space, enumerate_candidates, valid_blocks


def test_resnet34_matches_the_official_block_and_entry_counts() -> None:
    net = torchvision.models.resnet34()
    space = analyze_merge_space(net)
    assert space.depth == 32 and space.breaks == [0, 7, 15, 27, 32]
    assert len(valid_blocks(space)) == 62
    assert len(enumerate_candidates(net, space)) == 150


def test_mobilenet_v2_matches_the_official_block_and_entry_counts() -> None:
    net = torchvision.models.mobilenet_v2()
    space = analyze_merge_space(net)
    assert space.depth == 50 and space.breaks == [0, 5, 11, 20, 41, 50]
    assert len(valid_blocks(space)) == 171
    assert len(enumerate_candidates(net, space)) == 391


def test_candidates_keep_the_max_l1_subset_and_follow_the_pruning_rule() -> None:
    from lit_compress.models.cifar_resnet import cifar_resnet

    net = cifar_resnet(8, in_channels=1)
    space = analyze_merge_space(net)
    with torch.no_grad():
        net.layer1[0].conv1.weight.mul_(10.0)  # site 1 has the larger L1 norm
    cands = {(c.start, c.end, c.kernel): c for c in enumerate_candidates(net, space)}
    assert cands[(0, 2, 3)].kept == (1,)  # one of two 3x3 convs: the heavier one
    assert cands[(0, 2, 5)].kept == (1, 2)
    # site 3 (stride 2, 16 -> 32) can never be pruned
    assert all(3 in c.kept for c in cands.values() if c.start < 3 <= c.end)
    assert all(c.stride == 2 for c in cands.values() if c.start < 3 <= c.end)


def test_sequential_cnn_breaks_at_pooling() -> None:
    from lit_compress.models.small_cnn import VGGStyleCNN

    space = analyze_merge_space(VGGStyleCNN(width_mult=0.25))
    assert space.arch == "sequential" and space.depth == 4 and space.breaks == [0, 2, 4]
    assert valid_blocks(space) == [(0, 1), (0, 2), (1, 2), (2, 3), (2, 4), (3, 4)]


def test_unsupported_architectures_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match=r"does not support .*Supported: .*torchvision ResNet"):
        analyze_merge_space(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
    with pytest.raises(ConfigError, match="does not support"):
        analyze_merge_space(torchvision.models.densenet121())
    from lit_compress.models.cifar_resnet import cifar_resnet

    with pytest.raises(ConfigError, match="zero-padding shortcut"):
        analyze_merge_space(cifar_resnet(8, shortcut="pad"))
