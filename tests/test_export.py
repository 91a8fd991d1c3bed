"""export_compressed / load_compressed / load_exported_program: outputs survive the round trip."""

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError, ReplayError
from lit_compress.export import export_compressed, load_compressed, load_exported_program
from lit_compress.surgery import record_events, register_replay, replace_submodule
from lit_compress.surgery.log import make_record

OP = "test_export_shrink_hidden"


@register_replay(OP)
def _replay_shrink(model: nn.Module, record: dict) -> None:
    """Rebuild the structure that :func:`shrink_hidden` produced (values come from the state dict)."""
    first, last = model[0], model[2]
    replace_submodule(model, "0", nn.Linear(first.in_features, record["hidden"]))
    replace_submodule(model, "2", nn.Linear(record["hidden"], last.out_features))


def shrink_hidden(model: nn.Sequential, hidden: int) -> None:
    """A structural event done by hand: keep the first ``hidden`` units of the hidden layer."""
    first, last = model[0], model[2]
    new_first, new_last = nn.Linear(first.in_features, hidden), nn.Linear(hidden, last.out_features)
    with torch.no_grad():
        new_first.weight.copy_(first.weight[:hidden])
        new_first.bias.copy_(first.bias[:hidden])
        new_last.weight.copy_(last.weight[:, :hidden])
        new_last.bias.copy_(last.bias)
    replace_submodule(model, "0", new_first)
    replace_submodule(model, "2", new_last)
    record_events(model, [make_record(OP, hidden=hidden)])


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))


class TinyNet(nn.Module):
    """Stands in for a LightningModule: its ``hparams`` are the constructor's kwargs."""

    def __init__(self, width: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.hparams = {"width": width, "depth": depth}
        self.body = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.body(x))


class DataDependent(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[x > 0] if x.sum().item() > 0 else x  # data-dependent control flow: torch.export fails


def test_sequential_without_events_round_trip(tmp_path):
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(5, 6)
    paths = export_compressed(model, tmp_path / "m.pt", x)
    assert set(paths) == {"state", "pt2"}
    payload = torch.load(paths["state"], weights_only=True)
    assert payload["format"] == "lit_compress.export" and payload["version"] == 1
    assert payload["model_class"] == "torch.nn.modules.container.Sequential"
    assert payload["events"] == [] and payload["init_kwargs"] == {}
    loaded = load_compressed(paths["state"], mlp())
    assert not loaded.training
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_class_is_rebuilt_from_hparams_and_modes_restored(tmp_path):
    torch.manual_seed(0)
    model, x = TinyNet(width=5, depth=3).train(), torch.randn(2, 5)
    paths = export_compressed(model, tmp_path / "tiny.pt", x)
    assert model.training and model.drop.training  # export used eval mode and gave training back
    loaded = load_compressed(paths["state"])
    assert type(loaded) is TinyNet and len(loaded.body) == 3 and not loaded.training
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_structural_event_replayed_with_strict_loading(tmp_path):
    torch.manual_seed(0)
    model, x = mlp(), torch.randn(4, 6)
    shrink_hidden(model, 7)
    paths = export_compressed(model, tmp_path / "small.pt", x)
    payload = torch.load(paths["state"], weights_only=True)
    assert payload["events"] == [{"op": OP, "hidden": 7}]
    fresh = mlp()
    assert fresh[0].out_features == 10
    loaded = load_compressed(paths["state"], fresh)
    assert loaded is fresh and loaded[0].out_features == 7
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    program = load_exported_program(paths["pt2"])
    torch.testing.assert_close(program(x), model(x), rtol=0, atol=0)
    exported = torch.export.load(paths["pt2"])  # torch alone is enough
    torch.testing.assert_close(exported.module()(x), model(x), rtol=0, atol=0)


def test_tied_weights_survive(tmp_path):
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    model[2].weight = model[0].weight
    paths = export_compressed(model, tmp_path / "tied.pt", torch_export=False)
    fresh = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    fresh[2].weight = fresh[0].weight
    x = torch.randn(3, 4)
    torch.testing.assert_close(load_compressed(paths["state"], fresh)(x), model(x), rtol=0, atol=0)
    assert set(paths) == {"state"}


def test_unbuildable_or_mismatched_model_says_what_to_pass(tmp_path):
    plain = export_compressed(mlp(), tmp_path / "plain.pt")["state"]
    with pytest.raises(ConfigError, match=r"`model=`"):
        load_compressed(plain)  # Sequential() has no layers to load the weights into
    model = mlp()
    shrink_hidden(model, 3)
    path = export_compressed(model, tmp_path / "m.pt")["state"]
    with pytest.raises(ReplayError, match=r"Sequential\(\*\*\{\}\).*`model=`"):
        load_compressed(path)  # nor layers to replay the event on
    with pytest.raises(ConfigError, match="architecture"):
        load_compressed(path, nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4)))
    payload = torch.load(path, weights_only=True)
    payload["model_class"] = "no_such_package.Net"
    torch.save(payload, tmp_path / "bad_class.pt")
    with pytest.raises(ConfigError, match=r"cannot import `no_such_package.Net`.*model=Net\(\.\.\.\)"):
        load_compressed(tmp_path / "bad_class.pt")
    payload["events"] = [{"op": "no_such_op"}]
    torch.save(payload, tmp_path / "bad_op.pt")
    with pytest.raises(ReplayError, match="no_such_op"):
        load_compressed(tmp_path / "bad_op.pt", mlp())


def test_wrong_format_and_bad_path(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match="export_compressed"):
        load_compressed(tmp_path / "plain.pt", mlp())
    with pytest.raises(ConfigError, match=r"\.pt2"):
        export_compressed(mlp(), tmp_path / "m.pt2")
    with pytest.raises(ConfigError, match="existing file"):
        load_compressed(tmp_path / "missing.pt", mlp())


def test_failed_torch_export_warns_and_skips_pt2(tmp_path):
    model = DataDependent().train()
    with pytest.warns(UserWarning, match="was not written"):
        paths = export_compressed(model, tmp_path / "dd.pt", torch.randn(3))
    assert set(paths) == {"state"} and not (tmp_path / "dd.pt2").exists() and model.training


def test_pt2_takes_any_batch_size(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    ).eval()
    paths = export_compressed(model, tmp_path / "cnn.pt", torch.randn(2, 1, 8, 8))
    program = torch.export.load(paths["pt2"]).module()
    for batch in (1, 5, 64):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(program(x), model(x), rtol=1e-5, atol=1e-6)
    static = export_compressed(model, tmp_path / "static.pt", torch.randn(2, 1, 8, 8), dynamic_batch=False)
    # the example's batch only: a failed shape guard (AssertionError in torch 2.14, RuntimeError before)
    with pytest.raises((AssertionError, RuntimeError)):
        torch.export.load(static["pt2"]).module()(torch.randn(5, 1, 8, 8))
