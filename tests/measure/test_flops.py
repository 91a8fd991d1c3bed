"""count_flops: exact counts from torch's flop counter, modes restored, clear errors."""

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.measure import count_flops


def test_linear_flops():
    assert count_flops(nn.Linear(16, 32), torch.randn(4, 16)) == 2 * 4 * 16 * 32


def test_conv_flops_hand_computed():
    conv = nn.Conv2d(3, 8, kernel_size=3, padding=1)
    # output (2, 8, 10, 10); each output element costs 3*3*3 multiply-adds
    expected = 2 * (2 * 8 * 10 * 10) * (3 * 3 * 3)
    assert count_flops(conv, torch.randn(2, 3, 10, 10)) == expected == 86400


def test_sequential_sums_layers_and_accepts_tuple_and_dict_inputs():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    x = torch.randn(3, 5)
    expected = 2 * 3 * 5 * 7 + 2 * 3 * 7 * 2
    assert count_flops(model, x) == expected
    assert count_flops(model, (x,)) == expected
    assert count_flops(model, {"input": x}) == expected


def test_modes_restored_and_eval_used():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append((m.training, torch.is_grad_enabled())))
    running = model[2].running_mean.clone()
    count_flops(model, torch.randn(2, 4))
    assert seen == [(False, False)]
    assert model.training and model[0].training and not model[1].training and model[2].training
    assert torch.equal(model[2].running_mean, running)  # BatchNorm ran in eval mode


def test_forward_failure_names_model_and_shape():
    with pytest.raises(ConfigError, match=r"Tensor\[4, 3\].*Linear\.forward") as info:
        count_flops(nn.Linear(16, 32), torch.randn(4, 3))
    assert "`example_inputs`" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
