"""Sharded strategies are refused by name; event metrics reach the Trainer's TensorBoard logger and its
``callback_metrics`` (where checkpoint and early-stopping monitors look)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from lit_compress.callbacks import CompressionReport, FoldBatchNorm
from lit_compress.callbacks._distributed import check_strategy_supported
from lit_compress.errors import ConfigError
from tests.callbacks._toy import SplitLinear, ToyNet


@pytest.mark.parametrize("strategy_cls", [FSDPStrategy, ModelParallelStrategy])
def test_sharded_strategies_are_refused_with_their_name(strategy_cls: type) -> None:
    trainer = SimpleNamespace(strategy=strategy_cls())
    with pytest.raises(ConfigError, match=rf"FoldBatchNorm.*`{strategy_cls.__name__}`.*strategy='ddp'"):
        check_strategy_supported(trainer, "FoldBatchNorm")


def test_callback_setup_refuses_a_sharded_strategy() -> None:
    callback = FoldBatchNorm(at_epoch=0)
    trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[])
    with pytest.raises(ConfigError, match="FSDPStrategy"):
        callback.setup(trainer, ToyNet(), "fit")


def test_event_metrics_are_logged_to_tensorboard(tmp_path: Path, seed: int) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(str(tmp_path), name="tb")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SplitLinear(at_step=3), CompressionReport(print_report=False)],
    )
    trainer.fit(ToyNet())
    logger.experiment.flush()
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    params = [(e.step, e.value) for e in acc.Scalars("compress/params")]
    # Logged at train start (1,796 params) and after the event at step 3 (1,284 params).
    assert params[0] == (0, 1796.0)
    assert (3, 1284.0) in params
    assert any(e.value > 0 for e in acc.Scalars("compress/flops"))
    assert (Path(logger.log_dir) / "compression_report.md").is_file()


def test_compression_metrics_can_be_monitored_by_checkpoints_and_early_stopping(tmp_path: Path, seed: int) -> None:
    checkpoint = ModelCheckpoint(
        dirpath=str(tmp_path), monitor="compress/params", mode="min", save_top_k=1, filename="{epoch}"
    )
    stop = EarlyStopping(monitor="compress/params", mode="min", patience=0)
    trainer = L.Trainer(
        max_epochs=5,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[SplitLinear(at_epoch=1), checkpoint, stop, CompressionReport(print_report=False)],
    )
    trainer.fit(ToyNet())
    assert float(trainer.callback_metrics["compress/params"]) == 1284.0
    # The model shrank from 1,796 to 1,284 parameters at the start of epoch 1 and never again.
    assert float(checkpoint.best_model_score) == 1284.0
    assert Path(checkpoint.best_model_path).name == "epoch=1.ckpt"
    assert stop.stopped_epoch == 2


def test_a_resumed_report_publishes_its_latest_metrics_again() -> None:
    """After `fit(ckpt_path=...)` the monitors must find `compress/*` before the next event."""
    report = CompressionReport()
    report.load_state_dict({"initial": {"params": 1796}, "latest": {"compress/params": 1284.0}})
    trainer = SimpleNamespace(callback_metrics={})
    report.on_train_start(trainer, ToyNet())  # type: ignore[arg-type]
    assert float(trainer.callback_metrics["compress/params"]) == 1284.0
