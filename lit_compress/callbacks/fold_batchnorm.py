"""``FoldBatchNorm``: fold BatchNorm layers into the convolution or linear layer that feeds them."""

from __future__ import annotations

from typing import TypedDict

import lightning as L
import lightning.pytorch as pl
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_compress.callbacks._args import check_int
from lit_compress.callbacks._schedule import ScheduledEvent
from lit_compress.callbacks.base import CompressionCallback, Moment, Record, target_patterns
from lit_compress.errors import allowed
from lit_compress.surgery.select import name_matches, select_modules

_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


class FoldPlan(TypedDict):
    """The (layer, BatchNorm) pairs to fold, by qualified name (plain data, broadcast from rank 0)."""

    pairs: list[list[str]]


class FoldBatchNorm(CompressionCallback[FoldPlan]):
    """Fold every (conv or linear → BatchNorm) pair into one layer; exact in eval mode.

    A pair is folded only when the BatchNorm is the sole consumer of the layer's output (found by
    tracing the model on an example input). After the fold, training goes on without those
    BatchNorms: the folded layer applies the running statistics the BatchNorm had at that moment.

    Args:
        targets: Which pairs: fnmatch globs or ``re:`` regexes over the names of the conv/linear
            layer or of the BatchNorm. Default: all.
        at_epoch: Fold at the start of this epoch (0-based).
        at_step: Fold after this optimizer step (``trainer.global_step``).
            With neither ``at_epoch`` nor ``at_step``, the fold runs at the end of ``fit``.
        bn_recalibration_batches: Re-estimate the remaining BatchNorms on this many batches after
            the fold (0: off; folding itself needs none).
    """

    def __init__(
        self,
        targets: str | list[str] | None = None,
        at_epoch: NonNegativeInt | None = None,
        at_step: NonNegativeInt | None = None,
        bn_recalibration_batches: NonNegativeInt = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(bn_recalibration_batches=bn_recalibration_batches, name=name)
        check_int("at_epoch", at_epoch, 0, optional=True)
        check_int("at_step", at_step, 0, optional=True)
        if at_epoch is not None and at_step is not None:
            raise allowed("at_step", at_step, "give `at_epoch` or `at_step`, not both")
        self.targets = target_patterns(targets) or ["*"]
        self.at_epoch = at_epoch
        self.at_step = at_step

    @override
    def setup(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.events_done == 0:
            select_modules(pl_module, self.targets, types=_FOLDABLE, require_each=True)

    @override
    def event_due(self, trainer: pl.Trainer, pl_module: L.LightningModule, moment: Moment) -> bool:
        if self.events_done:
            return False
        if self.at_epoch is not None:
            return moment == "epoch_start" and trainer.current_epoch >= self.at_epoch
        if self.at_step is not None:
            return moment == "step" and trainer.global_step >= self.at_step
        return moment == "fit_end"

    @override
    def scheduled_events(self, trainer: pl.Trainer) -> list[ScheduledEvent]:
        if self.events_done or (self.at_epoch is None and self.at_step is None):
            return []
        return [ScheduledEvent("the BatchNorm fold", epoch=self.at_epoch, step=self.at_step)]

    @override
    def plan_event(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> FoldPlan | None:
        from lit_compress.surgery.chains import find_foldable_batchnorms

        inputs = self.reporter(trainer).example_inputs(trainer, pl_module)
        pairs = find_foldable_batchnorms(pl_module, inputs)
        chosen = [[a, b] for a, b in pairs if name_matches(a, self.targets) or name_matches(b, self.targets)]
        if not chosen:
            rank_zero_warn(f"FoldBatchNorm: no foldable (layer, BatchNorm) pair matches `targets`={self.targets!r}.")
            return None
        return {"pairs": chosen}

    @override
    def apply_event(self, pl_module: L.LightningModule, plan: FoldPlan) -> list[Record]:
        from lit_compress.surgery.bn_fold import fold_batchnorm_

        return fold_batchnorm_(pl_module, pairs=[(layer, bn) for layer, bn in plan["pairs"]])
