"""The one example-input convention: tensor = one argument, tuple/list = positional, dict = keyword."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.inputs import (
    batch_inputs,
    batch_size_of,
    call_with,
    describe_inputs,
    first_samples,
    inputs_to,
    module_call,
    rebatch,
    split_inputs,
    tensors_of,
)


class TwoArgs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(x)
        return y if mask is None else y * mask


def test_lightning_convention_for_every_container() -> None:
    x, mask = torch.randn(4, 3), torch.ones(4, 2)
    model = TwoArgs()
    assert split_inputs(x) == ((x,), {})
    assert split_inputs((x, mask))[0] == (x, mask)
    assert split_inputs({"x": x})[1] == {"x": x}
    expected = model(x, mask)
    torch.testing.assert_close(call_with(model, (x, mask)), expected)
    torch.testing.assert_close(call_with(model, [x, mask]), expected)
    torch.testing.assert_close(call_with(model, {"x": x, "mask": mask}), expected)
    torch.testing.assert_close(call_with(model, x), model(x))
    with pytest.raises(ConfigError, match="example_inputs"):
        split_inputs(None)


def test_nested_tensors_are_moved_sliced_and_repeated() -> None:
    table = torch.randn(5)  # not batched: the batch is 4
    inputs = {"x": torch.randn(4, 3), "extra": [torch.randn(4, 1), table], "flag": True}
    assert batch_size_of(inputs) == 4 and len(tensors_of(inputs)) == 3
    small, big = rebatch(inputs, 2), rebatch(inputs, 7)
    assert small["x"].shape == (2, 3) and small["extra"][0].shape == (2, 1) and small["extra"][1] is table
    assert big["x"].shape == (7, 3) and torch.equal(big["x"][4:], inputs["x"][:3])
    assert small["flag"] is True
    head = first_samples(inputs, 1)
    assert head["x"].shape == (1, 3) and head["x"].data_ptr() != inputs["x"].data_ptr()
    cast = inputs_to(inputs, "cpu", torch.float64)
    assert cast["x"].dtype == torch.float64 and cast["extra"][0].dtype == torch.float64
    assert inputs_to(torch.arange(3), "cpu", torch.float64).dtype == torch.int64  # only floating tensors cast
    assert describe_inputs((torch.zeros(2, 3), {"m": 1})) == "(Tensor[2, 3] float32, {m: int})"


def test_batches_and_modules() -> None:
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    assert batch_inputs((x, y)) is x and batch_inputs({"x": x}) == {"x": x} and batch_inputs(x) is x
    model = TwoArgs()
    torch.testing.assert_close(module_call(model, (x, torch.zeros(4, 2))), torch.zeros(4, 2))
    torch.testing.assert_close(module_call(nn.Identity(), {"input": x}), x)  # no parameters: called as is
