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

from lit_compress.callbacks import ALDS, FoldBatchNorm
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


class PerLayerNet(ToyNet):
    """ToyNet with one param group per layer (lr 0.05, 0.04, ...) and a StepLR that halves them every epoch."""

    def configure_optimizers(self) -> Any:
        groups = [
            {"params": list(child.parameters()), "lr": 0.05 - 0.01 * i}
            for i, child in enumerate(c for c in self.children() if any(True for _ in c.parameters()))
        ]
        opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class GroupLRs(Callback):
    """Records ``{first param name of the group: lr}`` at the start of ``epoch``."""

    def __init__(self, epoch: int) -> None:
        self.epoch, self.lrs, self.base_lrs = epoch, {}, {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch != self.epoch:
            return
        names = {id(p): n for n, p in pl_module.named_parameters()}
        opt = trainer.optimizers[0]
        sched = trainer.lr_scheduler_configs[0].scheduler
        for group, base in zip(opt.param_groups, sched.base_lrs):
            key = names[id(group["params"][0])].rpartition(".")[0]
            self.lrs[key], self.base_lrs[key] = group["lr"], base


def test_learning_rates_survive_an_event_that_changes_the_number_of_param_groups(tmp_path: Path, seed: int) -> None:
    before, after = GroupLRs(epoch=2), GroupLRs(epoch=2)
    model = PerLayerNet()
    trainer = quiet_trainer(tmp_path, [before, FoldBatchNorm(at_epoch=2), after])
    trainer.fit(model)
    assert [e["op"] for e in applied_events(model)][:1] == ["fold_batchnorm"]
    assert set(before.lrs) == {"fc1", "bn", "mid", "head"} and set(after.lrs) == {"fc1", "mid", "head"}
    assert before.lrs["mid"] == pytest.approx(0.03 * 0.25)  # two epochs of StepLR decay
    for name in after.lrs:
        assert after.lrs[name] == before.lrs[name], name
        assert after.base_lrs[name] == before.base_lrs[name], name
    # the schedule goes on from there: one more halving at the end of epoch 2
    assert trainer.optimizers[0].param_groups[1]["lr"] == pytest.approx(before.lrs["mid"] / 2)


def test_a_new_group_matching_nothing_from_before_is_a_clear_error() -> None:
    from lit_compress.callbacks._optim import OptimizerSnapshot
    from lit_compress.errors import ConfigError

    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    module = nn.ModuleDict({"a": a, "b": b})
    snap = OptimizerSnapshot(groups=[[{"lr": 0.1}]], group_names=[[["a.weight", "a.bias"]]])
    module["c"] = c
    opt = torch.optim.SGD([{"params": a.parameters()}, {"params": c.parameters()}], lr=0.1)
    names = {id(p): n for n, p in module.named_parameters()}
    with pytest.raises(ConfigError, match=r"from 1 to 2.*group 1 \(params \['c.weight', 'c.bias'\]\)"):
        snap._group_mapping(0, opt, names)
