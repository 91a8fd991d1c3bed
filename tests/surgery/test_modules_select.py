"""The shared helpers: replacement with an undo journal, parameter tying, target selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.surgery import SurgeryTransaction, get_submodule, replace_submodule, select_modules
from lit_compress.surgery.modules import preserve_mode, set_parameter
from lit_compress.surgery.select import name_matches


def net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(4, 2),
    )


def test_replace_submodule_keeps_registration_order() -> None:
    model = net()
    names_before = [n for n, _ in model.named_modules()]
    old = replace_submodule(model, "0.1", nn.Identity())
    assert isinstance(old, nn.BatchNorm2d)
    assert [n for n, _ in model.named_modules()] == names_before
    assert list(model[0]._modules) == ["0", "1", "2"] and isinstance(model[0][1], nn.Identity)
    params = ["0.0.weight", "0.0.bias", "1.0.weight", "1.0.bias", "3.weight", "3.bias"]
    assert [n for n, _ in model.named_parameters()] == params


def test_get_and_replace_unknown_names_raise() -> None:
    model = net()
    assert get_submodule(model, "") is model and get_submodule(model, "1.0") is model[1][0]
    with pytest.raises(SurgeryError, match=r"No submodule named `1.9` in Sequential"):
        get_submodule(model, "1.9")
    with pytest.raises(SurgeryError, match=r"`0.weight` is not a registered submodule"):
        replace_submodule(model, "0.weight", nn.Identity())


def test_transaction_rolls_back_modules_and_parameters() -> None:
    model = net()
    conv, bn, weight = model[1][0], model[0][1], model[3].weight
    with pytest.raises(RuntimeError, match="stop"), SurgeryTransaction():
        replace_submodule(model, "1.0", nn.Identity())
        replace_submodule(model, "0.1", nn.Identity())
        set_parameter(model[3], "weight", nn.Parameter(torch.zeros(2, 4)))
        set_parameter(model[3], "extra", nn.Parameter(torch.ones(1)))
        raise RuntimeError("stop")
    assert model[1][0] is conv and model[0][1] is bn and model[3].weight is weight
    assert "extra" not in model[3]._parameters


def test_nested_transaction_commit_is_undone_by_outer_failure() -> None:
    model = net()
    conv, linear = model[0][0], model[3]
    with pytest.raises(ValueError, match="outer"), SurgeryTransaction():
        with SurgeryTransaction():
            replace_submodule(model, "0.0", nn.Identity())
        assert isinstance(model[0][0], nn.Identity)  # inner committed
        replace_submodule(model, "3", nn.Identity())
        raise ValueError("outer")
    assert model[0][0] is conv and model[3] is linear


def test_inner_failure_only_undoes_inner_edits() -> None:
    model = net()
    conv = model[1][0]
    with SurgeryTransaction():
        replace_submodule(model, "2", nn.Identity())
        with pytest.raises(KeyError), SurgeryTransaction():
            replace_submodule(model, "1.0", nn.Identity())
            raise KeyError("inner")
    assert model[1][0] is conv and isinstance(model[2], nn.Identity)


def test_set_parameter_ties_and_keeps_position() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    model = nn.Sequential(a, b)
    set_parameter(b, "weight", a.weight)
    assert b.weight is a.weight
    assert [n for n, _ in model.named_parameters()] == ["0.weight", "0.bias", "1.bias"]  # tied: counted once
    assert list(b._parameters) == ["weight", "bias"]
    set_parameter(b, "bias", None)
    assert b.bias is None and list(b._parameters) == ["weight", "bias"]


def test_preserve_mode_restores_flags() -> None:
    model = net().train()
    model[0][1].eval()
    flags = [m.training for m in model.modules()]
    with preserve_mode(model):
        model.eval()
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == flags


def test_select_modules_globs_regex_and_types() -> None:
    model = net()
    assert select_modules(model, ["0.*"]) == ["0.0", "0.1", "0.2"]
    assert select_modules(model, ["*"], types=(nn.Conv2d,)) == ["0.0", "1.0"]
    assert select_modules(model, ["re:[01]\\.0", "3"]) == ["0.0", "1.0", "3"]
    assert select_modules(model, "3") == ["3"]  # a single string is one pattern
    assert select_modules(model, ["1.0", "0.0"]) == ["0.0", "1.0"]  # model order, no duplicates
    assert name_matches("layer1.0.conv1", ["layer?.*.conv1"]) and not name_matches("layer1.0.conv1", ["re:conv1"])


def test_select_modules_no_match_lists_close_names() -> None:
    model = net()
    with pytest.raises(ConfigError, match=r"`targets`='0\.3' matches no module\. Close names: 0\.2, 0\.1, 0\.0"):
        select_modules(model, ["0.*", "0.3"])
    with pytest.raises(ConfigError, match=r"`layers`='1\.\*' matches no module of type Linear"):
        select_modules(model, ["1.*"], types=(nn.Linear,), argument="layers")
    assert select_modules(model, ["nothing", "3"], require_each=False) == ["3"]
    with pytest.raises(ConfigError, match=r"is not a valid regular expression"):
        select_modules(model, ["re:("])
