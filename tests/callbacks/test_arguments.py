"""Every constructor argument of every public callback is checked when the callback is built: a bad value
is a ConfigError that names the argument (and the value), NaN and inf included. Unwritable outputs and
``log_every_n_steps`` problems are found at setup, before any training step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.callbacks import Callback

from lit_compress.callbacks import (
    ALDS,
    CompressionReport,
    Distillation,
    FoldBatchNorm,
    LayerCollapse,
    LayerFusion,
    LayerMerge,
)
from lit_compress.errors import ConfigError
from tests.callbacks._toy import MLPNet, ToyNet

NAN, INF = math.nan, math.inf

# (callback class, required arguments, the bad argument, its bad value)
CASES: list[tuple[type, dict[str, Any], str, Any]] = [
    # every callback's BatchNorm re-estimation
    (LayerFusion, {}, "bn_recalibration_batches", -1),
    (LayerFusion, {}, "bn_recalibration_batches", 2.5),
    (FoldBatchNorm, {}, "bn_recalibration_batches", True),
    (ALDS, {"keep_ratio": 0.5}, "bn_recalibration_batches", "20"),
    # LayerFusion
    (LayerFusion, {}, "fraction", 0),
    (LayerFusion, {}, "fraction", 1),
    (LayerFusion, {}, "fraction", NAN),
    (LayerFusion, {}, "fraction", INF),
    (LayerFusion, {}, "fraction", "0.5"),
    (LayerFusion, {}, "fraction", True),
    (LayerFusion, {}, "increments", 0),
    (LayerFusion, {}, "increments", 2.0),
    (LayerFusion, {}, "every_n_epochs", 0),
    (LayerFusion, {}, "every_n_steps", -3),
    (LayerFusion, {}, "at_epoch", -1),
    (LayerFusion, {}, "at_step", 1.5),
    (LayerFusion, {}, "measure", "cosine?"),
    (LayerFusion, {}, "policy", "median"),
    (LayerFusion, {}, "optimizer_state", "keep"),
    (LayerFusion, {}, "include_norms", "yes"),
    (LayerFusion, {}, "include_embeddings", 1),
    (LayerFusion, {}, "seed", 0.5),
    (LayerFusion, {}, "budget", "layers"),
    (LayerFusion, {}, "align", "yes"),
    (LayerFusion, {}, "name", 3),
    # ALDS
    (ALDS, {}, "keep_ratio", 0),
    (ALDS, {}, "keep_ratio", 1.5),
    (ALDS, {}, "keep_ratio", NAN),
    (ALDS, {}, "keep_ratio", INF),
    (ALDS, {"keep_ratio": 0.5}, "at_epoch", -2),
    (ALDS, {}, "cascade", [[0, 0.5], [0, 0.3]]),
    (ALDS, {}, "cascade", [[0, NAN]]),
    (ALDS, {}, "cascade", "0:0.5"),
    (ALDS, {}, "cascade", []),
    (ALDS, {"keep_ratio": 0.5}, "method", "svd"),
    (ALDS, {"keep_ratio": 0.5}, "error", "paper"),
    (ALDS, {"keep_ratio": 0.5}, "min_rank", 0),
    (ALDS, {"keep_ratio": 0.5}, "min_saving", NAN),
    (ALDS, {"keep_ratio": 0.5}, "budget", "flops"),
    (ALDS, {"keep_ratio": 0.5}, "latency_ratio", 0.5),
    (ALDS, {"keep_ratio": 0.5}, "name", ""),
    (ALDS, {"keep_ratio": 0.5}, "num_seeds", 0),
    (ALDS, {"keep_ratio": 0.5}, "alternations", 1.5),
    (ALDS, {"keep_ratio": 0.5}, "retrain_epochs", -1),
    (ALDS, {"keep_ratio": 0.5}, "rewind_lr", "no"),
    (ALDS, {"keep_ratio": 0.5}, "progress", None),
    (ALDS, {"keep_ratio": 0.5}, "seed", "0"),
    # LayerCollapse
    (LayerCollapse, {}, "last_n", 0),
    (LayerCollapse, {}, "fraction", 0),
    (LayerCollapse, {}, "fraction", NAN),
    (LayerCollapse, {}, "stage_size", 0),
    (LayerCollapse, {}, "lambda_start", -0.1),
    (LayerCollapse, {}, "lambda_final", NAN),
    (LayerCollapse, {}, "lambda_final", INF),
    (LayerCollapse, {}, "warmup", INF),
    (LayerCollapse, {}, "warmup_unit", "batches"),
    (LayerCollapse, {}, "tau", 0),
    (LayerCollapse, {}, "tau", NAN),
    (LayerCollapse, {}, "collapse_at", "never"),
    (LayerCollapse, {}, "penalty", "l2"),
    (LayerCollapse, {}, "log_every_n_steps", 0),
    (LayerCollapse, {}, "log_every_n_steps", "10"),
    # FoldBatchNorm
    (FoldBatchNorm, {}, "at_epoch", -1),
    (FoldBatchNorm, {}, "at_step", "3"),
    (FoldBatchNorm, {"at_epoch": 1}, "at_step", 2),
    # LayerMerge
    (LayerMerge, {}, "budget", 0),
    (LayerMerge, {}, "budget", 1),
    (LayerMerge, {}, "budget", NAN),
    (LayerMerge, {}, "importance", "random"),
    (LayerMerge, {}, "reset_layers", 1),
    (LayerMerge, {"importance": "loss_proxy"}, "reset_layers", True),
    (LayerMerge, {"importance": "uniform"}, "reset_layers", True),
    (LayerMerge, {}, "importance_steps", 0),
    (LayerMerge, {}, "importance_lr", 0),
    (LayerMerge, {}, "importance_lr", NAN),
    (LayerMerge, {}, "importance_lr", INF),
    (LayerMerge, {}, "importance_batches", 0),
    (LayerMerge, {}, "holdout_batches", True),
    (LayerMerge, {}, "latency_batch_size", 0),
    (LayerMerge, {}, "latency_input_size", 0),
    (LayerMerge, {}, "latency_device", "gpu7"),
    (LayerMerge, {}, "latency_warmup", -1),
    (LayerMerge, {}, "latency_repeats", 0),
    (LayerMerge, {}, "latency_rounds", 0),
    (LayerMerge, {}, "latency_check_plan", "yes"),
    (LayerMerge, {}, "rewarm_steps", -1),
    (LayerMerge, {}, "latency_cache", ""),
    (LayerMerge, {}, "time_unit_ms", INF),
    (LayerMerge, {}, "time_unit_ms", -1.0),
    (LayerMerge, {}, "load_plan", "/nonexistent/plan.json"),
    (LayerMerge, {}, "save_plan", 3),
    (LayerMerge, {}, "merge_at_end", "yes"),
    (LayerMerge, {}, "at_epoch", -1),
    (LayerMerge, {}, "progress", 0),
    # CompressionReport
    (CompressionReport, {}, "measure_flops", "yes"),
    (CompressionReport, {}, "measure_latency", 1),
    (CompressionReport, {}, "latency_batch_size", 0),
    (CompressionReport, {}, "latency_input_shape", []),
    (CompressionReport, {}, "latency_input_shape", [3, 0]),
    (CompressionReport, {}, "latency_input_shape", "3x32x32"),
    (CompressionReport, {}, "latency_repeats", 0),
    (CompressionReport, {}, "latency_rounds", 1.5),
    (CompressionReport, {}, "latency_compare", None),
    (CompressionReport, {}, "output_dir", 5),
    (CompressionReport, {}, "print_report", "no"),
    # Distillation
    (Distillation, {}, "alpha", 0),
    (Distillation, {}, "alpha", NAN),
    (Distillation, {}, "temperature", INF),
    (Distillation, {}, "temperature", -1.0),
    (Distillation, {}, "teacher_checkpoint", 3),
]


def test_the_table_covers_every_public_callback() -> None:
    assert len(CASES) >= 50
    assert {c[0] for c in CASES} == {
        ALDS,
        CompressionReport,
        Distillation,
        FoldBatchNorm,
        LayerCollapse,
        LayerFusion,
        LayerMerge,
    }


@pytest.mark.parametrize(
    ("cls", "required", "name", "value"),
    [pytest.param(*case, id=f"{case[0].__name__}-{case[2]}={case[3]!r}") for case in CASES],
)
def test_bad_argument_is_a_config_error_naming_it(cls: type, required: dict[str, Any], name: str, value: Any) -> None:
    with pytest.raises(ConfigError) as info:
        cls(**{**required, name: value})
    message = str(info.value)
    assert f"`{name}`" in message, message
    assert repr(value) in message or str(value) in message, message


def trainer_for(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    )
    options.update(kwargs)
    return L.Trainer(**options)


class StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def test_unwritable_report_output_dir_fails_at_setup(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    counter = StepCounter()
    report = CompressionReport(output_dir=str(blocker / "reports"), print_report=False)
    with pytest.raises(ConfigError, match=r"`output_dir`=.*a_file"):
        trainer_for(tmp_path, [FoldBatchNorm(), report, counter]).fit(ToyNet())
    assert counter.steps == 0


@pytest.mark.parametrize("argument", ["save_plan", "latency_cache"])
def test_unwritable_layer_merge_files_fail_at_setup(tmp_path: Path, argument: str) -> None:
    from lit_compress.models import ImageClassifier

    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    counter = StepCounter()
    merge = LayerMerge(**{argument: str(blocker / "out.json")}, at_epoch=1, progress=False)
    model = ImageClassifier(backbone="cifar_resnet20", width_mult=0.25, image_size=12)
    with pytest.raises(ConfigError, match=rf"`{argument}`=.*a_file"):
        trainer_for(tmp_path, [merge, counter]).fit(model)
    assert counter.steps == 0


def test_trainer_log_every_n_steps_zero_trains_layer_collapse(tmp_path: Path, seed: int) -> None:
    collapse = LayerCollapse(log_every_n_steps=1)
    trainer = trainer_for(tmp_path, [collapse], log_every_n_steps=0, limit_train_batches=3, limit_val_batches=0)
    trainer.fit(MLPNet())
    assert trainer.global_step == 3


def test_unreachable_alds_keep_ratio_fails_at_setup(tmp_path: Path) -> None:
    from lit_compress.surgery.alds.allocate import min_keep_ratio

    model = ToyNet()
    floor = min_keep_ratio(model, ["fc1", "mid", "head"], min_rank=2, min_saving=0.1)  # ALDS's defaults
    assert 0 < floor < 1
    counter = StepCounter()
    alds = ALDS(keep_ratio=floor / 2, at_epoch=1, progress=False)
    with pytest.raises(ConfigError, match=rf"`keep_ratio`={floor / 2!r}.*keeps {floor:.4f}.*cannot be reached"):
        trainer_for(tmp_path, [alds, counter], max_epochs=2).fit(model)
    assert counter.steps == 0
    # the floor is reachable: the allocation at the planned epoch agrees
    alds = ALDS(keep_ratio=min(1.0, floor + 0.02), at_epoch=0, progress=False, num_seeds=1, alternations=1)
    trainer_for(tmp_path, [alds], limit_train_batches=1, limit_val_batches=0).fit(ToyNet())
    assert alds.allocations
