"""An impossible LayerMerge budget is found before training, in shares of the original latency (issue 19, case 5).

Every latency-table entry "takes" 1 ms here, so the fastest plan of the 4-conv VGG takes 2 of 4 ms = 50 %
of the original latency, whatever the machine's load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

import lit_compress.measure.latency_table as tables
import lit_compress.surgery.layermerge.importance as importance
from lit_compress.errors import ConfigError
from lit_compress.measure.latency_table import LatencyTableWarning
from lit_compress.models import ImageClassifier
from lit_compress.surgery import applied_events
from tests.callbacks.test_layer_merge import lm, loaders, tiny_model, trainer_for

INFEASIBLE = (
    r"`budget`=0.3 is not allowed: no merge plan meets the latency budget of 30 % of the original latency: the "
    r"fastest plan of this network takes 50.0 % \(2 of 4 ms in the latency table, at batch 1 on cpu\)\. "
    r"Use budget >= 0.50\."
)


class CountSteps(Callback):
    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


@pytest.fixture
def one_ms_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tables, "latency_table", lambda space, cands, **kw: {c.key: 1.0 for c in cands})

    def no_importance(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the importance table was built for an impossible budget")

    monkeypatch.setattr(importance, "importance_table", no_importance)


def vgg() -> ImageClassifier:
    return ImageClassifier(backbone="vgg_cnn", width_mult=0.125, image_size=12)


@pytest.mark.parametrize("at_epoch", [0, 2])
def test_an_impossible_budget_fails_before_training_as_a_share(
    tmp_path: Path, one_ms_tables: None, at_epoch: int
) -> None:
    steps = CountSteps()
    trainer = trainer_for(tmp_path, [lm(tmp_path, budget=0.3, at_epoch=at_epoch), steps], max_epochs=3)
    with pytest.raises(ConfigError, match=INFEASIBLE):
        trainer.fit(vgg(), loaders())
    assert steps.batches == 0  # not one training step, and (fixture) no importance table


def test_a_plan_the_fit_never_reaches_is_not_checked(tmp_path: Path, one_ms_tables: None) -> None:
    trainer = trainer_for(tmp_path, [lm(tmp_path, budget=0.3, at_epoch=5)], max_epochs=1, limit_train_batches=1)
    with pytest.warns(UserWarning, match="LayerMerge: the plan for budget 0.3 .* will NOT run"):
        trainer.fit(vgg(), loaders())


def test_a_feasible_budget_at_a_later_epoch_plans_and_merges(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = tiny_model()
    trainer_for(tmp_path, [lm(tmp_path, budget=0.6, at_epoch=1)], max_epochs=2, limit_train_batches=2).fit(
        model, loaders()
    )
    assert [e["op"] for e in applied_events(model)] == ["layer_merge_plan", "layer_merge_final"]


def test_a_plan_measured_over_its_budget_is_warned_about_and_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The table says 1 ms per entry; the chosen plan's layers, timed together, take 100 ms: a warning says so."""
    monkeypatch.setattr(tables, "latency_table", lambda space, cands, **kw: {c.key: 1.0 for c in cands})
    monkeypatch.setattr(tables, "time_layer", lambda *args: 100.0)
    L.seed_everything(0, verbose=False)
    model = vgg()
    trainer = trainer_for(
        tmp_path, [lm(tmp_path, budget=0.6, latency_check_plan=True)], max_epochs=1, limit_train_batches=1
    )
    with pytest.warns(LatencyTableWarning, match="the plan measures 100 ms, over its budget of 2.4 ms"):
        trainer.fit(model, loaders())
    plan = applied_events(model)[0]
    assert plan["op"] == "layer_merge_plan" and plan["summary"]["measured_plan_ms"] == 100.0


class RecordLr(Callback):
    """Each optimizer step's learning rate over the one its scheduler last set."""

    def __init__(self) -> None:
        self.factors: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        scheduled = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()[0]
        self.factors.append(float(optimizer.param_groups[0]["lr"]) / scheduled)


def test_rewarm_scales_the_learning_rate_after_the_plan_and_leaves_the_schedule_alone(tmp_path: Path) -> None:
    """rewarm_steps=3, plan at epoch 1: the 3 steps after it run at 1/4, 2/4, 3/4 of the scheduled rate."""
    L.seed_everything(0, verbose=False)
    record = RecordLr()
    callback = lm(tmp_path, budget=0.6, at_epoch=1, rewarm_steps=3)
    trainer_for(tmp_path, [callback, record], max_epochs=2, limit_train_batches=4).fit(tiny_model(), loaders())
    assert record.factors == pytest.approx([1.0] * 4 + [0.25, 0.5, 0.75, 1.0])
    with pytest.raises(ConfigError, match="`rewarm_steps`=-1"):
        lm(tmp_path, rewarm_steps=-1)
