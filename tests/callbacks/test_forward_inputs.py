"""Which part of a training batch a module's ``forward`` takes, read from its signature only."""

from __future__ import annotations

import torch
from torch import nn

from lit_compress.callbacks._forward import inputs_from_batch


class One(nn.Module):
    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return x


class Two(nn.Module):
    def forward(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return inputs


class Keywords(nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids


x, y = torch.zeros(2, 3), torch.ones(2, 3)


def test_the_first_element_when_forward_takes_it_alone() -> None:
    inputs, why = inputs_from_batch(One(), (x, y))
    assert inputs is x and why == ""  # `y` is NOT passed as `mask`


def test_the_whole_batch_when_forward_takes_exactly_that() -> None:
    inputs, why = inputs_from_batch(Two(), (x, y))
    assert isinstance(inputs, tuple) and inputs[0] is x and inputs[1] is y and why == ""


def test_a_dict_batch_is_keyword_arguments() -> None:
    batch = {"input_ids": x, "attention_mask": y}
    inputs, _ = inputs_from_batch(Keywords(), batch)
    assert inputs is batch


def test_nothing_when_the_signature_fits_neither_and_the_reason_names_it() -> None:
    inputs, why = inputs_from_batch(Two(), (x,))
    assert inputs is None
    assert "Two.forward(inputs" in why and "Tensor[2, 3] float32" in why
    assert inputs_from_batch(Keywords(), {"ids": x})[0] is None
