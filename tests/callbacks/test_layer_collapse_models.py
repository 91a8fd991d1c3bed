"""LayerCollapse inside ``fit`` reaching real collapses: Hugging Face GPT-2/BERT structures built from configs, a
stacked 3-Linear head whose links cross tau in different epochs (both orders), MLP candidates the callback cannot
collapse (a named warning before training), and gated Llama MLPs (refused before the first training step)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.callbacks import CompressionReport, LayerCollapse
from lit_compress.errors import ConfigError
from lit_compress.surgery import applied_events
from lit_compress.surgery.collapse.mlp import CollapsedLayer, collapsible_activations
from tests.callbacks._toy import MLPNet

TOL64 = dict(rtol=1e-10, atol=1e-10)  # float64 training (precision="64-true")


def trainer_for(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
        callbacks=[*callbacks, CompressionReport(print_report=False)],
    )
    options.update(kwargs)
    return L.Trainer(**options)


def eval_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = module.training
    module.eval()
    with torch.no_grad():
        out = module(x)
    module.train(was)
    return out


class ForceSlopes(Callback):
    """Listed before LayerCollapse: at the start of epoch ``e`` set the slopes named in ``schedule[e]`` to 1 and
    record the eval output; :class:`AfterEvent` records it again right after the event (before any step)."""

    def __init__(self, schedule: dict[int, list[str]], x: torch.Tensor) -> None:
        self.schedule, self.x = schedule, x
        self.before: dict[int, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        names = self.schedule.get(trainer.current_epoch)
        if not names:
            return
        live = dict(collapsible_activations(pl_module))
        with torch.no_grad():
            for name in names:
                live[next(n for n in live if n.endswith(name))].slope.fill_(1.0)
        self.before[trainer.current_epoch] = eval_output(pl_module, self.x)


class AfterEvent(Callback):
    def __init__(self, epochs: list[int], x: torch.Tensor) -> None:
        self.epochs, self.x = epochs, x
        self.after: dict[int, torch.Tensor] = {}

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch in self.epochs:
            self.after[trainer.current_epoch] = eval_output(pl_module, self.x)


def collapse_events(model: nn.Module) -> list[dict[str, Any]]:
    return [e for e in applied_events(model) if e["op"] == "collapse"]


@pytest.mark.parametrize("architecture", ["gpt2", "bert"])
def test_hf_structure_reaches_an_exact_collapse_in_fit(tmp_path: Path, seed: int, architecture: str) -> None:
    # Before the fix, GPT-2 raised AttributeError: 'Conv1D' object has no attribute 'in_features' at epoch 1.
    pytest.importorskip("transformers")
    from lit_compress.models import CausalLanguageModel

    model = CausalLanguageModel(
        vocab_size=30, block_size=8, n_layer=2, n_head=2, d_model=16, architecture=architecture, warmup_steps=1
    )
    tokens = torch.randint(0, 30, (8, 9))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=4)
    act = "h.1.mlp.act" if architecture == "gpt2" else "layer.1.intermediate.intermediate_act_fn"
    force, after = ForceSlopes({1: [act]}, tokens[:2, :-1]), AfterEvent([1], tokens[:2, :-1])
    callbacks = [force, LayerCollapse(last_n=1, lambda_final=0.0), after]
    trainer_for(tmp_path, callbacks, max_epochs=2, limit_train_batches=1, precision="64-true").fit(model, loader)
    (event,) = collapse_events(model)
    assert event["epoch"] == 1 and event["links"][0]["activation"].endswith(act)
    torch.testing.assert_close(after.after[1], force.before[1], **TOL64)
    assert event["after"]["params"] < event["before"]["params"]


class MLPNet64(MLPNet):
    """:class:`MLPNet` (Linear(16,32) → ReLU → Dropout → Linear(32,32) → ReLU → Linear(32,4)) in float64."""

    def __init__(self) -> None:
        super().__init__(dropout=0.1)
        self.double()
        self.example_input_array = torch.zeros(2, 16, dtype=torch.float64)

    def _data(self, seed: int) -> DataLoader:
        x, y = super()._data(seed).dataset.tensors  # type: ignore[attr-defined]
        return DataLoader(TensorDataset(x.double(), y), batch_size=8)


@pytest.mark.parametrize("order", ["input_side_first", "output_side_first"])
def test_stacked_head_collapses_link_by_link_across_epochs(tmp_path: Path, seed: int, order: str) -> None:
    # Before the fix, the input-side-first order raised AttributeError: 'Identity' object has no attribute
    # 'in_features' at epoch 2.
    model = MLPNet64()
    x = torch.randn(8, 16, dtype=torch.float64)
    first, second = ("classifier.1", "classifier.4")
    if order == "output_side_first":
        first, second = second, first
    force, after = ForceSlopes({1: [first], 2: [second]}, x), AfterEvent([1, 2], x)
    callbacks = [force, LayerCollapse(lambda_final=0.0), after]
    trainer_for(tmp_path, callbacks, max_epochs=3, limit_train_batches=2).fit(model)
    events = collapse_events(model)
    assert [(e["epoch"], [link["activation"] for link in e["links"]]) for e in events] == [(1, [first]), (2, [second])]
    for epoch in (1, 2):
        torch.testing.assert_close(after.after[epoch], force.before[epoch], **TOL64)
    (linear,) = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert isinstance(model.classifier[0], nn.Linear) and (linear.in_features, linear.out_features) == (16, 4)
    assert all(isinstance(model.classifier[i], CollapsedLayer) for i in (3, 5))


class TanhBottleneckNet(MLPNet):
    """MLPNet with a Tanh in the second MLP and a bottleneck MLP (Linear(16,2) → ReLU → Linear(2,16)) in front."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier[4] = nn.Tanh()
        self.bottleneck = nn.Sequential(nn.Linear(16, 2), nn.ReLU(), nn.Linear(2, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x + self.bottleneck(x))


def test_candidates_it_cannot_collapse_get_one_named_warning_before_training(tmp_path: Path, seed: int) -> None:
    steps: list[int] = []

    class Steps(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            steps.append(trainer.global_step)

    model = TanhBottleneckNet()
    with pytest.warns(UserWarning, match=r"LayerCollapse: 2 MLP candidate\(s\) will not be collapsed") as caught:
        trainer_for(tmp_path, [LayerCollapse(), Steps()], max_epochs=1, limit_train_batches=1).fit(model)
    (message,) = [str(w.message) for w in caught if "will not be collapsed" in str(w.message)]
    assert "`classifier.4`" in message and "Tanh is not supported" in message
    assert "`bottleneck.1`" in message and "not fewer than the pair's" in message
    assert [name for name, _ in collapsible_activations(model)] == ["classifier.1"]  # the supported MLP still runs
    assert steps == [0]


class SharedLinearNet(MLPNet):
    """MLPNet whose last Linear is also called on a side branch: its MLP cannot collapse."""

    def __init__(self) -> None:
        super().__init__()
        self.side = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x) + self.classifier[5](self.side(x))


def test_mlp_with_a_shared_linear_is_named_in_the_warning(tmp_path: Path, seed: int) -> None:
    shared = r"will not be collapsed: .*`classifier.4`.*called more than once: classifier.5"
    with pytest.warns(UserWarning, match=shared):
        trainer_for(tmp_path, [LayerCollapse()], max_epochs=1, limit_train_batches=1).fit(model := SharedLinearNet())
    assert [name for name, _ in collapsible_activations(model)] == ["classifier.1"]


def test_targets_matching_only_unsupported_mlps_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"matches no collapsible MLP.*`bottleneck.1`.*not fewer than the pair"):
        trainer_for(tmp_path, [LayerCollapse(targets=["bottleneck.*"])], max_epochs=1).fit(TanhBottleneckNet())


class LlamaLM(L.LightningModule):
    """A tiny Llama causal LM built from a config; ``head_mlp`` adds a plain ReLU MLP head when True."""

    def __init__(self, head_mlp: bool = False) -> None:
        super().__init__()
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=16,
        )
        self.llama = transformers.LlamaModel(config)
        self.head = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 32)) if head_mlp else nn.Linear(16, 32)
        self.example_input_array = torch.zeros(2, 8, dtype=torch.long)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.llama(input_ids=ids).last_hidden_state)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, target = batch
        return nn.functional.cross_entropy(self(ids).flatten(0, 1), target.flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        tokens = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)


def test_gated_llama_mlp_is_refused_by_the_callback_before_the_first_step(tmp_path: Path, seed: int) -> None:
    pytest.importorskip("transformers")
    steps: list[int] = []

    class Steps(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            steps.append(trainer.global_step)

    model = LlamaLM()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structure = repr(model)
    with pytest.raises(ConfigError, match=r"gated MLP: the gate `llama.layers.0.mlp.gate_proj` multiplies with"):
        trainer_for(tmp_path, [LayerCollapse(), Steps()], max_epochs=1).fit(model)
    assert steps == []
    assert repr(model) == structure
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_gated_mlp_next_to_a_plain_one_is_named_in_a_warning(tmp_path: Path, seed: int) -> None:
    pytest.importorskip("transformers")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer_for(tmp_path, [LayerCollapse()], max_epochs=1, limit_train_batches=1).fit(LlamaLM(head_mlp=True))
    (message,) = [str(w.message) for w in caught if "will not be collapsed" in str(w.message)]
    assert "gate `llama.layers.0.mlp.gate_proj`" in message


class HFGPT2(L.LightningModule):
    """A Hugging Face ``GPT2LMHeadModel`` built from a config (no weights downloaded), trained on random tokens."""

    def __init__(self, config: Any, seq_len: int = 16, batches: int = 2) -> None:
        super().__init__()
        import transformers

        self.lm = transformers.GPT2LMHeadModel(config)
        self.seq_len, self.batches, self.vocab = seq_len, batches, config.vocab_size
        self.example_input_array = torch.zeros(2, seq_len, dtype=torch.long)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        ids, target = batch
        return nn.functional.cross_entropy(self(ids).flatten(0, 1), target.flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.vocab, (2 * self.batches, self.seq_len + 1), generator=g)
        return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=2)


@pytest.mark.slow
def test_gpt2_small_from_config_reaches_a_collapse_in_fit(tmp_path: Path, seed: int) -> None:
    """GPT2Config defaults (12 layers, d=768, 124 M parameters), 2 batches of 2×16 tokens per epoch, 2 epochs;
    the last block's slope is forced to 1 at epoch 1, so the epoch-1 event collapses c_fc/c_proj into one Linear."""
    import time

    transformers = pytest.importorskip("transformers")
    model = HFGPT2(transformers.GPT2Config())
    x = torch.randint(0, model.vocab, (2, 16), generator=torch.Generator().manual_seed(1))
    force, after = ForceSlopes({1: ["h.11.mlp.act"]}, x), AfterEvent([1], x)
    start = time.perf_counter()
    trainer_for(tmp_path, [force, LayerCollapse(last_n=1, lambda_final=0.0), after], max_epochs=2).fit(model)
    seconds = time.perf_counter() - start
    print(f"\nGPT-2-small LayerCollapse fit: {seconds:.1f} s")
    (event,) = collapse_events(model)
    assert event["epoch"] == 1 and event["links"][0]["into"] == "lm.transformer.h.11.mlp.c_fc"
    mlp = model.lm.transformer.h[11].mlp
    assert isinstance(mlp.c_fc, nn.Linear) and (mlp.c_fc.in_features, mlp.c_fc.out_features) == (768, 768)
    assert event["before"]["params"] - event["after"]["params"] == 2 * 768 * 3072 + 3072 - 768 * 768 + 1  # + the slope
    # float32 model: the merge is computed in float64 and rounded once; logits are O(1).
    torch.testing.assert_close(after.after[1], force.before[1], rtol=1e-4, atol=1e-4)


def test_distillation_teacher_is_the_model_before_conversion(tmp_path: Path, seed: int) -> None:
    """The paper's optional loss, 0.5·CE + 0.5·KL to the model before conversion: ``Distillation`` next to
    ``LayerCollapse`` takes its frozen teacher just before the conversion event."""
    from lit_compress.callbacks import Distillation

    model = MLPNet64()
    x = torch.randn(8, 16, dtype=torch.float64)
    reference = eval_output(model, x)  # the model before conversion
    distill = Distillation(alpha=0.5, temperature=2.0)
    force = ForceSlopes({1: ["classifier.1", "classifier.4"]}, x)
    trainer_for(tmp_path, [distill, force, LayerCollapse(lambda_final=0.0)], max_epochs=2, limit_train_batches=2).fit(
        model
    )
    assert distill.teacher is not None
    assert not collapsible_activations(distill.teacher)
    assert [type(m) for m in distill.teacher.classifier] == [type(m) for m in MLPNet64().classifier]
    torch.testing.assert_close(eval_output(distill.teacher, x), reference, rtol=0, atol=0)
    assert [e["op"] for e in applied_events(model)] == ["make_collapsible", "collapse"]
