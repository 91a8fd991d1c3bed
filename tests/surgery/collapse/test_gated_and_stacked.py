"""Gated MLPs refused by every surgery entry point, all or nothing; stacked chains collapsed link by link across
calls in either order (the moved-layer map lives in the model), replayable; a post-training collapse whose check
forward fails restores the model."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from lit_compress.errors import ConfigError, SurgeryError
from lit_compress.surgery import collapse_, collapse_post_training_, make_collapsible_, replay_events_
from lit_compress.surgery.chains import ChainLink, find_linear_chains
from lit_compress.surgery.collapse.mlp import (
    CollapsedLayer,
    CollapsibleActivation,
    collapsible_activations,
    resolve_into,
)
from lit_compress.surgery.modules import replace_submodule
from lit_compress.surgery.replay import record_events

TOL = dict(rtol=1e-12, atol=1e-12)  # float64


def snapshot(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    return repr(model), {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, snap: tuple[str, dict[str, torch.Tensor]]) -> None:
    structure, state = snap
    assert repr(model) == structure
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(now[k].dtype == state[k].dtype and torch.equal(now[k], state[k]) for k in state)


def tiny_llama() -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
    )
    return transformers.LlamaModel(config).double()


MLP = "layers.0.mlp"
GATE = f"the gate `{MLP}.gate_proj` multiplies with `{MLP}.up_proj`"
HAND_BUILT = ChainLink(f"{MLP}.gate_proj", f"{MLP}.act_fn", None, None, f"{MLP}.down_proj")


def test_chain_discovery_names_the_gate() -> None:
    model = tiny_llama()
    with pytest.warns(UserWarning, match=GATE):
        chains = find_linear_chains(model, torch.randint(0, 32, (2, 6)))
    assert not any(MLP in name for c in chains for name in c.linears)


@pytest.mark.parametrize("target", ["name", "link"])
def test_make_collapsible_refuses_a_gated_mlp_and_changes_nothing(target: str) -> None:
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match=rf"Cannot make `{MLP}.act_fn` collapsible: .*{GATE}"):
        make_collapsible_(model, [f"{MLP}.act_fn"] if target == "name" else [HAND_BUILT])
    assert_unchanged(model, snap)


def test_collapse_refuses_a_hand_built_gated_link_and_changes_nothing() -> None:
    model = tiny_llama()
    replace_submodule(model, f"{MLP}.act_fn", CollapsibleActivation("silu", 1.0, dtype=torch.float64))
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=rf"Cannot collapse the MLP at `{MLP}.act_fn`: .*{GATE}"):
        collapse_(model, [HAND_BUILT])
    assert_unchanged(model, snap)
    model(torch.randint(0, 32, (2, 6)))  # still runs


def test_collapse_post_training_refuses_a_gated_mlp_and_changes_nothing() -> None:
    model = tiny_llama()
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=GATE):
        collapse_post_training_(model, [HAND_BUILT], torch.randint(0, 32, (2, 6)))
    assert_unchanged(model, snap)


class FailsWithoutFc2(nn.Module):
    """A plain MLP whose forward checks its own structure: the failure comes after a successful merge."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.fc2, nn.Linear):
            raise RuntimeError("fc2 is gone")
        return self.fc2(self.act(self.fc1(x)))


def test_post_training_collapse_restores_the_model_when_the_check_forward_fails() -> None:
    model = FailsWithoutFc2()
    snap = snapshot(model)
    with pytest.raises(SurgeryError, match=r"failed on `example_inputs` \(RuntimeError: fc2 is gone\).*restored"):
        collapse_post_training_(model, [ChainLink("fc1", "act", None, None, "fc2")], torch.randn(3, 8))
    assert_unchanged(model, snap)


def stacked() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
    ).double()


@pytest.mark.parametrize("order", [["1", "4"], ["4", "1"]])
def test_stacked_chain_collapses_link_by_link_across_calls(order: list[str]) -> None:
    model = stacked()
    x = torch.randn(5, 16, dtype=torch.float64)
    (chain,) = find_linear_chains(model, x)
    records = make_collapsible_(model, chain)
    acts = dict(collapsible_activations(model))
    model.eval()
    for name in order:  # one link per call, each after its own slope reached 1
        with torch.no_grad():
            acts[name].slope.fill_(1.0)
        before = model(x)
        new = collapse_(model, chain)
        assert [link["activation"] for link in new[0]["links"]] == [name]
        records += new
        torch.testing.assert_close(model(x), before, **TOL)
    assert isinstance(model[0], nn.Linear) and (model[0].in_features, model[0].out_features) == (16, 4)
    assert isinstance(model[3], CollapsedLayer) and isinstance(model[5], CollapsedLayer)
    assert resolve_into(model, "5") == resolve_into(model, "3") == "0"
    record_events(model, records)
    fresh = stacked()
    replay_events_(fresh, model._lit_compress_events)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x), model(x), rtol=0, atol=0)


def test_moved_layers_resolve_from_a_parent_or_a_child_of_the_collapsed_module() -> None:
    outer = nn.Sequential(nn.Sequential(stacked()))
    inner = outer[0][0]
    x = torch.randn(5, 16, dtype=torch.float64)
    (chain,) = find_linear_chains(inner, x)
    make_collapsible_(inner, chain)
    for _, act in collapsible_activations(inner):
        with torch.no_grad():
            act.slope.fill_(1.0)
    outer.eval()
    before = outer(x)
    collapse_(inner, chain.links()[0])  # names relative to `inner`
    prefixed = ChainLink("0.0.3", "0.0.4", None, None, "0.0.5")
    collapse_(outer, prefixed)  # names relative to `outer`: `0.0.3` was merged into `0` of `inner`
    torch.testing.assert_close(outer(x), before, **TOL)
    assert resolve_into(outer, "0.0.5") == "0.0.0"
