"""Optimizers and LR schedulers across structural events: schedulers ALDS cannot rewind (detected by
behaviour), and param groups whose number changes with the event."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lit_compress.callbacks import ALDS
from lit_compress.callbacks.alds import unrewindable_reason
from lit_compress.surgery import applied_events
from tests.callbacks._toy import ToyNet


def quiet_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
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
        callbacks=callbacks,
    )
    options.update(kwargs)
    return L.Trainer(**options)


class PlateauNet(ToyNet):
    """ToyNet with ``ReduceLROnPlateau`` on the training loss (a subclass of ``LRScheduler`` in torch >= 2.2)."""

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.01)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "train_loss", "interval": "epoch"}}


def test_alds_warns_and_does_not_rewind_reduce_lr_on_plateau(tmp_path: Path, seed: int) -> None:
    model = PlateauNet()
    alds = ALDS(keep_ratio=0.8, at_epoch=1, num_seeds=1, alternations=1, progress=False, bn_recalibration_batches=0)
    with pytest.warns(UserWarning, match=r"cannot rewind the LR scheduler ReduceLROnPlateau.*monitored metric"):
        quiet_trainer(tmp_path, [alds]).fit(model)
    record = next(e for e in applied_events(model) if "lr_rewound_to" in e)
    assert record["lr_rewound_to"] == [None]
    assert trainer_epoch_ok(model)


def trainer_epoch_ok(model: L.LightningModule) -> bool:
    return model.trainer.current_epoch == 3 and all(torch.isfinite(p).all() for p in model.parameters())


def test_rewindability_is_decided_by_behaviour_not_class() -> None:
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    assert unrewindable_reason(torch.optim.lr_scheduler.StepLR(opt, step_size=1)) is None
    assert "metric" in str(unrewindable_reason(torch.optim.lr_scheduler.ReduceLROnPlateau(opt)))

    class DuckScheduler:  # not an LRScheduler at all, but has everything replaying needs
        def __init__(self) -> None:
            self.optimizer, self.base_lrs, self.last_epoch, self._step_count = opt, [0.1], 0, 1

        def _initial_step(self) -> None: ...
        def get_lr(self) -> list[float]:
            return [0.1]

        def step(self) -> None: ...

    assert unrewindable_reason(DuckScheduler()) is None

    class Partial:
        def step(self) -> None: ...

    assert "`base_lrs`" in str(unrewindable_reason(Partial()))
