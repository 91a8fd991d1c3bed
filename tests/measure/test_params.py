"""count_parameters: unique storage (ties and views count once) versus every registered use."""

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError
from lit_compress.measure import count_parameters


def tiny() -> nn.Sequential:
    # Linear(4, 8): 32 + 8; BatchNorm1d(8): 8 + 8 (buffers do not count); Linear(8, 3): 24 + 3.
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def test_exact_count_on_tiny_model():
    model = tiny()
    assert count_parameters(model) == 40 + 16 + 27 == 83
    assert count_parameters(model, unique_storage=False) == 83
    assert isinstance(count_parameters(model), int)


def test_trainable_only():
    model = tiny()
    model[1].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 83 - 16
    assert count_parameters(model, unique_storage=False, trainable_only=True) == 83 - 16


def test_tied_linear_weight_counts_once():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6))
    model[2].weight = model[0].weight  # one nn.Parameter used by two modules
    assert count_parameters(model) == 36 + 6 + 6
    assert count_parameters(model, unique_storage=False) == 2 * 36 + 6 + 6


def test_distinct_parameters_viewing_one_storage_count_the_union():
    base = torch.randn(10, 4)
    a = nn.Module()
    a.first = nn.Parameter(base[:6])  # rows 0..5 -> 24 elements
    a.second = nn.Parameter(base[4:])  # rows 4..9 -> 24 elements, rows 4..5 overlap
    assert a.first.untyped_storage().data_ptr() == a.second.untyped_storage().data_ptr()
    assert count_parameters(a) == 40
    assert count_parameters(a, unique_storage=False) == 48


def test_non_contiguous_views_count_distinct_elements():
    base = torch.randn(4, 6)
    m = nn.Module()
    m.left = nn.Parameter(base[:, :4])  # columns 0..3: 16 elements
    m.right = nn.Parameter(base[:, 3:])  # columns 3..5: 12 elements, column 3 shared
    m.other = nn.Parameter(torch.randn(5))  # its own storage
    assert not m.left.is_contiguous()
    assert count_parameters(m) == 24 + 5
    assert count_parameters(m, unique_storage=False) == 16 + 12 + 5


def test_transposed_view_of_same_storage_counts_once():
    base = torch.randn(3, 5)
    m = nn.Module()
    m.w = nn.Parameter(base)
    m.wt = nn.Parameter(base.t())
    assert count_parameters(m) == 15


def test_meta_parameters_are_counted_separately():
    model = nn.Sequential(nn.Linear(3, 4, device="meta"), nn.Linear(4, 2, device="meta"))
    assert count_parameters(model) == 16 + 10


def test_lazy_module_and_wrong_type_raise():
    with pytest.raises(ConfigError, match="forward"):
        count_parameters(nn.LazyLinear(3))
    with pytest.raises(ConfigError, match="`model`"):
        count_parameters(torch.randn(3))  # type: ignore[arg-type]
