"""LayerFusion recovery (issue 14): the learning-rate re-warm after a fusion step, its resume, and the
warning when the last fusion step leaves too little training."""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_compress.callbacks import LayerFusion
from lit_compress.callbacks._schedule import FitLength
from lit_compress.errors import ConfigError
from tests.callbacks.test_layer_fusion import FusionNet, fusion_events, trainer_for


class StepDecayNet(FusionNet):
    """FusionNet with SGD and a per-step ``StepLR`` (×0.9 each step), a scheduler that reads the group's rate."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class RecordLr(Callback):
    """``{global_step: learning rate}`` of every optimizer step, read inside the step."""

    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self.lrs[int(trainer.global_step)] = float(optimizer.param_groups[0]["lr"])


def fusion(**kwargs: Any) -> LayerFusion:
    options: dict[str, Any] = dict(fraction=0.2, increments=1, every_n_steps=100, at_step=2, min_steps_after_last=0)
    options.update(kwargs)
    return LayerFusion(**options)


def test_rewarm_factors_step_by_step_after_a_fusion_step_leave_the_schedule_alone(tmp_path: Path) -> None:
    """Fusion after step 2, rewarm_steps=3: steps 2, 3, 4 run at 1/4, 2/4, 3/4 of 0.01·0.9^t, the rest at 0.9^t.

    StepLR multiplies the group's current rate, so restoring the rate after the scheduler stepped
    (the old LayerMerge order) would lose the decay of every re-warmed step."""
    record = RecordLr()
    model = StepDecayNet(lr=0.01)
    trainer_for(tmp_path, [fusion(rewarm_steps=3), record], max_epochs=2).fit(model)
    assert [e["global_step"] for e in fusion_events(model)] == [2]
    factors = [1, 1, 0.25, 0.5, 0.75, 1, 1, 1]
    assert sorted(record.lrs) == list(range(8))
    assert [record.lrs[t] for t in range(8)] == pytest.approx([0.01 * 0.9**t * f for t, f in enumerate(factors)])


def test_without_rewarm_the_rate_is_the_schedules(tmp_path: Path) -> None:
    record = RecordLr()
    trainer_for(tmp_path, [fusion(), record], max_epochs=2).fit(StepDecayNet(lr=0.01))
    assert [record.lrs[t] for t in range(8)] == pytest.approx([0.01 * 0.9**t for t in range(8)])


def test_rewarm_min_steps_and_adapters_bad_input() -> None:
    with pytest.raises(ConfigError, match="`rewarm_steps`=-1"):
        LayerFusion(rewarm_steps=-1)
    with pytest.raises(ConfigError, match="`min_steps_after_last`=-2"):
        LayerFusion(min_steps_after_last=-2)
    with pytest.raises(ConfigError, match="`adapters`='yes'"):
        LayerFusion(adapters="yes")  # type: ignore[arg-type]


def _fit(root: Path, extra: list[Callback], ckpt: str | None = None) -> RecordLr:
    record = RecordLr()
    checkpoints = ModelCheckpoint(dirpath=str(root), every_n_train_steps=4, save_top_k=-1, filename="{step}")
    trainer = trainer_for(
        root, [fusion(rewarm_steps=4), checkpoints, record, *extra], max_epochs=2, enable_checkpointing=True
    )
    trainer.fit(FusionNet(lr=0.01), ckpt_path=ckpt)
    return record


def test_a_run_resumed_mid_rewarm_continues_the_same_factors(tmp_path: Path) -> None:
    """Fusion after step 2, rewarm_steps=4 (steps 2..5); the checkpoint after step 4 is taken mid-re-warm."""

    class CrashAt(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 5:
                raise RuntimeError("simulated crash")

    L.seed_everything(0, verbose=False)
    whole = _fit(tmp_path / "a", [])
    assert [round(whole.lrs[t] / 0.01, 6) for t in range(8)] == [1, 1, 0.2, 0.4, 0.6, 0.8, 1, 1]
    L.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(tmp_path / "b", [CrashAt()])
    ckpt = tmp_path / "b" / "step=4.ckpt"
    state = torch.load(ckpt, weights_only=True)["callbacks"]["LayerFusion"]  # plain data, weights_only loads it
    assert state["rewarm_from"] == 2 and type(state["rewarm_from"]) is int
    resumed = _fit(tmp_path / "c", [], ckpt=str(ckpt))
    assert sorted(resumed.lrs) == [4, 5, 6, 7]
    assert [resumed.lrs[t] for t in range(4, 8)] == pytest.approx([whole.lrs[t] for t in range(4, 8)])


def test_rewarm_state_round_trips_through_the_state_dict() -> None:
    callback = fusion(rewarm_steps=4)
    callback.rewarm_from = 7
    fresh = fusion(rewarm_steps=4)
    fresh.load_state_dict(callback.state_dict())
    assert fresh.rewarm_from == 7
    old = {k: v for k, v in callback.state_dict().items() if k != "rewarm_from"}  # a checkpoint from before
    fresh.load_state_dict(old)
    assert fresh.rewarm_from is None


def _messages(trainer: L.Trainer) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(FusionNet())
    return [str(w.message) for w in caught if "min_steps_after_last" in str(w.message)]


def test_too_little_training_after_the_last_fusion_step_is_warned_with_the_numbers(tmp_path: Path) -> None:
    # epochs: interval 3 // (2 + 1) = 1, steps at epochs 0 and 1, 4 steps an epoch: 12 - 4 = 8 steps after
    messages = _messages(trainer_for(tmp_path, [LayerFusion(fraction=0.2, increments=2)], max_epochs=3))
    assert messages == [
        "LayerFusion: the last fusion step (fusion step 2 of 2, at the start of epoch 1) leaves 8 optimizer steps "
        "of training after it, fewer than min_steps_after_last=100: this fit runs 3 epochs of 4 optimizer steps "
        "(max_epochs=3). Lengthen the fit, fuse earlier (`at_epoch`/`at_step`, `every_n_epochs`/`every_n_steps`, "
        "fewer `increments`) or lower `min_steps_after_last`."
    ]


def test_training_after_the_last_step_is_counted_in_steps_and_epochs() -> None:
    """Epochs count whole epochs of steps after the last one's start; steps count from the step after which it runs."""
    length = FitLength(max_epochs=3, max_steps=None, steps_per_epoch=4)
    epochs = LayerFusion(fraction=0.2, increments=2, every_n_epochs=1)
    epochs._resolve_schedule(SimpleNamespace())  # type: ignore[arg-type]  # every_n_* reads no trainer
    assert epochs.steps_after_last(length) == 8  # fusion at the start of epochs 0 and 1
    steps = LayerFusion(fraction=0.2, increments=2, at_step=2, every_n_steps=3)
    steps._resolve_schedule(SimpleNamespace())  # type: ignore[arg-type]
    assert steps.steps_after_last(FitLength(max_epochs=None, max_steps=6, steps_per_epoch=4)) == 1  # after step 5
    assert steps.steps_after_last(FitLength(max_epochs=None, max_steps=None, steps_per_epoch=4)) is None
    assert epochs.steps_after_last(FitLength(max_epochs=3, max_steps=None, steps_per_epoch=None)) is None
