"""Learning-rate re-warm after a structural event (shared by ``LayerMerge`` and ``LayerFusion``).

After an event that ran when ``trainer.global_step`` was ``s``, the optimizer step taken at
``global_step == s + k`` (``k`` = 0 is the first step after the event) runs at
``(k + 1) / (n + 1)`` times the learning rate the optimizer and its scheduler set, for ``k < n``
(``n`` = ``rewarm_steps``); from ``k = n`` on the schedule's own rate applies.

The scaled rate is written into every param group at the start of the training batch and the
scheduled rate is written back right after ``optimizer.step()`` (a step post-hook), that is before
Lightning steps the scheduler: the schedule is exactly what it would be without the re-warm, also
for schedulers that read the group's current rate (``StepLR``, ``CosineAnnealingLR``). If the step
is skipped (an AMP step with infinite gradients) the rate is written back at the end of the batch.

The re-warm holds no state of its own beyond ``s``, which each callback keeps where a resumed run
finds it (LayerMerge: the plan event's record in the surgery log; LayerFusion: its state dict), so a
run resumed in the middle of a re-warm continues with the same factors. When two callbacks re-warm
the same optimizer step, the smaller factor applies (not their product).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import lightning as L
import lightning.pytorch as pl
import torch
from torch.utils.hooks import RemovableHandle


@dataclass
class _Scaled:
    """One optimizer scaled for the coming step: its groups' scheduled rates, the factor, the hook."""

    lrs: list[Any]
    factor: float
    handle: RemovableHandle


#: Optimizers whose rates are scaled right now (engine runtime state, never saved).
_ACTIVE: weakref.WeakKeyDictionary[torch.optim.Optimizer, _Scaled] = weakref.WeakKeyDictionary()


def rewarm_factor(global_step: int, event_step: int | None, rewarm_steps: int) -> float | None:
    """The factor of the optimizer step taken at ``global_step`` after an event at ``event_step``.

    ``(k + 1) / (rewarm_steps + 1)`` with ``k = global_step − event_step`` for ``0 ≤ k < rewarm_steps``,
    else ``None`` (no event, re-warm off, or outside the re-warm).
    """
    if event_step is None or rewarm_steps <= 0:
        return None
    k = int(global_step) - int(event_step)
    if not 0 <= k < rewarm_steps:
        return None
    return (k + 1) / (rewarm_steps + 1)


def scale_learning_rates(optimizers: Iterable[torch.optim.Optimizer], factor: float) -> None:
    """Run the coming step of every optimizer at ``factor`` × its scheduled rates (restored after the step)."""
    for optimizer in optimizers:
        active = _ACTIVE.get(optimizer)
        if active is None:
            handle = optimizer.register_step_post_hook(_restore_after_step)
            active = _Scaled([group["lr"] for group in optimizer.param_groups], float(factor), handle)
            _ACTIVE[optimizer] = active
        else:  # another callback (or another micro-batch of an accumulation window) scaled it already
            active.factor = min(active.factor, float(factor))
        for group, lr in zip(optimizer.param_groups, active.lrs):
            group["lr"] = lr * active.factor


def restore_learning_rates(optimizers: Iterable[torch.optim.Optimizer] | None = None) -> None:
    """Write the scheduled rates back into ``optimizers`` (default: every scaled one)."""
    for optimizer in list(_ACTIVE.keys()) if optimizers is None else list(optimizers):
        active = _ACTIVE.pop(optimizer, None)
        if active is None:
            continue
        active.handle.remove()
        for group, lr in zip(optimizer.param_groups, active.lrs):
            group["lr"] = lr


def _restore_after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    restore_learning_rates([optimizer])


__all__ = ["restore_learning_rates", "rewarm_factor", "scale_learning_rates"]


class RewarmHooks(pl.Callback):
    """The Lightning hooks of the re-warm, for a callback that says when its last event ran.

    Subclasses set ``rewarm_steps`` and implement :meth:`rewarm_event_step`; put this class before the
    callback base in the bases, so its hooks run and chain to the base's with ``super()``.
    """

    rewarm_steps: int

    def rewarm_event_step(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> int | None:
        """``trainer.global_step`` of the event the re-warm counts from, or ``None`` (no re-warm yet)."""
        raise NotImplementedError

    def rewarm_factor(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> float | None:
        """The learning-rate factor of the coming optimizer step, or ``None`` outside the re-warm."""
        return rewarm_factor(int(trainer.global_step), self.rewarm_event_step(trainer, pl_module), self.rewarm_steps)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        factor = self.rewarm_factor(trainer, pl_module)
        if factor is not None:
            scale_learning_rates(trainer.optimizers, factor)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        restore_learning_rates(trainer.optimizers)  # a skipped step's; before an event rebuilds the optimizer
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def teardown(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        restore_learning_rates(trainer.optimizers)  # a fit that raised mid-step
        super().teardown(trainer, pl_module, stage)
