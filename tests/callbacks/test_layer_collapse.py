"""LayerCollapse callback: conversion at fit start, the regulariser under SGD and AdamW, collapse events,
progressive stages, DDP, bf16 and resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lit_compress.callbacks import CompressionReport, LayerCollapse
from lit_compress.errors import ConfigError
from lit_compress.surgery import applied_events
from lit_compress.surgery.collapse.mlp import collapsible_activations
from lit_compress.surgery.log import strip_measurements
from tests.callbacks._toy import HashRecorder, MLPNet


def trainer_for(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[*callbacks, CompressionReport(print_report=False)],
    )
    options.update(kwargs)
    return L.Trainer(**options)


def ops(model: nn.Module) -> list[str]:
    return [e["op"] for e in applied_events(model)]


def test_strong_regulariser_collapses_the_whole_head_into_one_linear(tmp_path: Path, seed: int) -> None:
    model = MLPNet(optimizer="sgd", lr=0.05)
    callback = LayerCollapse(lambda_final=20.0, tau=0.05)
    trainer_for(tmp_path, [callback], max_epochs=3).fit(model)
    assert ops(model) == ["make_collapsible", "collapse"]
    linears = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and (linears[0].in_features, linears[0].out_features) == (16, 4)
    collapse = applied_events(model)[1]
    assert collapse["after"]["params"] == 16 * 4 + 4
    assert collapse["before"]["params"] == 16 * 32 + 32 + 32 * 32 + 32 + 32 * 4 + 4 + 2  # + the two slopes


def test_collapse_is_exact_at_the_moment_it_happens(tmp_path: Path, seed: int) -> None:
    x = torch.randn(16, 16)
    outputs: dict[str, torch.Tensor] = {}

    def eval_outputs(module: nn.Module) -> torch.Tensor:
        was = module.training
        module.eval()
        with torch.no_grad():
            out = module(x)
        module.train(was)
        return out

    class Before(Callback):  # runs before LayerCollapse in the same hook: force the slopes to 1
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 2 and collapsible_activations(pl_module):
                with torch.no_grad():
                    for _, a in collapsible_activations(pl_module):
                        a.slope.fill_(1.0)
                outputs["before"] = eval_outputs(pl_module)

    class After(Callback):  # runs right after the event, before any training step
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 2:
                outputs["after"] = eval_outputs(pl_module)

    model = MLPNet(optimizer="sgd", lr=0.01)
    # λ = 0 keeps the slopes far from 1 until `Before` sets them, so the collapse happens at epoch 2.
    callbacks = [Before(), LayerCollapse(lambda_final=0.0, tau=0.05), After()]
    trainer_for(tmp_path, callbacks, max_epochs=3, limit_train_batches=2).fit(model)
    record = next(e for e in applied_events(model) if e["op"] == "collapse")
    assert record["epoch"] == 2
    assert sum(isinstance(m, nn.Linear) for m in model.classifier) == 1
    torch.testing.assert_close(outputs["after"], outputs["before"], rtol=1e-5, atol=1e-5)  # float32 tolerance


@pytest.mark.parametrize("mode", ["loss", "decoupled"])
def test_penalty_application_matches_the_paper(mode: str) -> None:
    model = MLPNet()
    from lit_compress.surgery import make_collapsible_
    from lit_compress.surgery.chains import ChainLink

    make_collapsible_(model, [ChainLink("classifier.0", "classifier.1", "classifier.2", None, "classifier.3")])
    ((_name, act),) = collapsible_activations(model)
    act.slope.data.fill_(0.25)
    act.slope.grad = torch.full_like(act.slope, 0.5)  # the task gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trainer = SimpleNamespace(optimizers=[opt], global_step=0)
    callback = LayerCollapse(lambda_final=2.0, penalty=mode)
    if mode == "loss":
        callback.on_before_optimizer_step(trainer, model, opt)
        # d/da λ(a-1)² = 2λ(a-1) = 2·2·(-0.75) = -3, added to the task gradient
        assert float(act.slope.grad) == pytest.approx(0.5 - 3.0)
        assert float(act.slope) == 0.25
    else:
        callback._decoupled_step(trainer, model)
        # a ← a − lr·2λ(a−1) = 0.25 − 0.1·(−3) = 0.55; the gradient is not touched
        assert float(act.slope) == pytest.approx(0.55)
        assert float(act.slope.grad) == 0.5


def test_auto_penalty_is_decoupled_for_adam_and_in_the_loss_for_sgd() -> None:
    callback = LayerCollapse()
    params = [nn.Parameter(torch.zeros(1))]
    assert callback._mode(SimpleNamespace(optimizers=[torch.optim.AdamW(params)])) == "decoupled"
    assert callback._mode(SimpleNamespace(optimizers=[torch.optim.SGD(params, lr=0.1)])) == "loss"


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_slopes_move_towards_one_under_both_optimizers(tmp_path: Path, seed: int, optimizer: str) -> None:
    model = MLPNet(optimizer=optimizer, lr=0.01)
    trainer_for(tmp_path, [LayerCollapse(lambda_final=5.0, collapse_at="fit_end", tau=0.01)], max_epochs=2).fit(model)
    remaining = [float(a.slope) for _, a in collapsible_activations(model)]
    collapsed = sum(1 for e in applied_events(model) if e["op"] == "collapse")
    assert collapsed or all(s > 0.5 for s in remaining), remaining


def test_lambda_warmup_is_linear_in_steps() -> None:
    callback = LayerCollapse(lambda_start=1.0, lambda_final=3.0, warmup=10, warmup_unit="steps")
    assert callback.current_lambda(SimpleNamespace(global_step=0)) == 1.0
    assert callback.current_lambda(SimpleNamespace(global_step=5)) == 2.0
    assert callback.current_lambda(SimpleNamespace(global_step=50)) == 3.0


def test_progressive_stages_convert_from_the_output_side(tmp_path: Path, seed: int) -> None:
    model = MLPNet(optimizer="sgd", lr=0.05)
    trainer_for(tmp_path, [LayerCollapse(stage_size=1, lambda_final=20.0)], max_epochs=5).fit(model)
    events = applied_events(model)
    assert events[0]["op"] == "make_collapsible" and events[0]["activations"] == ["classifier.4"]
    converted = [e["activations"] for e in events if e["op"] == "make_collapsible"]
    assert converted[:2] == [["classifier.4"], ["classifier.1"]]


def test_bad_input_names_the_argument() -> None:
    with pytest.raises(ConfigError, match=r"`tau`=1.5"):
        LayerCollapse(tau=1.5)
    with pytest.raises(ConfigError, match=r"`fraction`=0.0"):
        LayerCollapse(fraction=0.0)
    with pytest.raises(ConfigError, match=r"`lambda_final`=-1"):
        LayerCollapse(lambda_final=-1)
    callback = LayerCollapse(targets=["encoder.*"])
    trainer = SimpleNamespace(callbacks=[], strategy=SimpleNamespace(), is_global_zero=True, world_size=1)
    with pytest.raises(ConfigError, match=r"`targets`=\['encoder.\*'\] matches no collapsible MLP.*classifier.1"):
        callback._select(trainer, MLPNet())


def test_unsupported_activation_is_a_clear_error(tmp_path: Path) -> None:
    model = MLPNet()
    model.classifier[4] = nn.Tanh()
    with pytest.raises(ConfigError, match="Tanh is not supported"):
        trainer_for(tmp_path, [LayerCollapse(targets=["classifier.4"])], max_epochs=1).fit(model)


def test_collapse_under_bf16_mixed(tmp_path: Path, seed: int) -> None:
    model = MLPNet(optimizer="sgd", lr=0.05)
    trainer_for(tmp_path, [LayerCollapse(lambda_final=20.0)], max_epochs=3, precision="bf16-mixed").fit(model)
    assert "collapse" in ops(model)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_resume_after_a_collapse_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    def run(root: Path, extra: list[Callback], model: MLPNet, ckpt: str | None = None) -> L.Trainer:
        checkpoints = ModelCheckpoint(dirpath=str(root), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = trainer_for(
            root,
            [LayerCollapse(lambda_final=20.0, stage_size=1), checkpoints, *extra],
            max_epochs=5,
            deterministic=True,
            enable_checkpointing=True,
        )
        trainer.fit(model, ckpt_path=ckpt)
        return trainer

    class CrashAt(Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 4:
                raise RuntimeError("simulated crash")

    # With dropout: the callback checkpoints the RNG state, which Lightning does not.
    L.seed_everything(0, verbose=False)
    model_a = MLPNet(dropout=0.1)
    run(tmp_path / "a", [], model_a)
    L.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", [CrashAt()], MLPNet(dropout=0.1))
    ckpt = tmp_path / "b" / "epoch=2.ckpt"
    saved_ops = [e["op"] for e in torch.load(ckpt, weights_only=True)["lit_compress"]["events"]]
    assert "collapse" in saved_ops  # the checkpoint is taken after a collapse
    model_c = MLPNet(dropout=0.1)
    run(tmp_path / "c", [], model_c, ckpt=str(ckpt))
    assert [strip_measurements(e) for e in applied_events(model_a)] == [
        strip_measurements(e) for e in applied_events(model_c)
    ]
    sd_a, sd_c = model_a.state_dict(), model_c.state_dict()
    assert sd_a.keys() == sd_c.keys()
    assert all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)


def test_collapse_under_ddp_spawn_keeps_ranks_identical(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    trainer = trainer_for(
        tmp_path,
        [LayerCollapse(lambda_final=20.0), HashRecorder(str(tmp_path))],
        max_epochs=3,
        devices=2,
        strategy="ddp_spawn",
    )
    trainer.fit(MLPNet())
    after = [(tmp_path / f"after_event_rank{r}.txt").read_text() for r in (0, 1)]
    end = [(tmp_path / f"end_rank{r}.txt").read_text() for r in (0, 1)]
    assert after[0] == after[1] and end[0] == end[1]
    assert end[0] != after[0]


@pytest.mark.parametrize("architecture", ["gpt2", "bert"])
def test_hf_structures_train_with_layer_collapse(tmp_path: Path, seed: int, architecture: str) -> None:
    pytest.importorskip("transformers")
    from torch.utils.data import DataLoader, TensorDataset

    from lit_compress.models import CausalLanguageModel

    model = CausalLanguageModel(
        vocab_size=30, block_size=16, n_layer=2, n_head=2, d_model=16, architecture=architecture, warmup_steps=1
    )
    tokens = torch.randint(0, 30, (32, 17))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    callback = LayerCollapse(last_n=1, lambda_final=50.0)
    trainer_for(tmp_path, [callback], max_epochs=2).fit(model, loader, loader)
    ((name, act),) = collapsible_activations(model)  # the last block's FFN only
    assert name.endswith(("h.1.mlp.act", "layer.1.intermediate.intermediate_act_fn"))
    assert float(act.slope.detach()) > 0.01  # the decoupled penalty (AdamW) moved it towards 1
