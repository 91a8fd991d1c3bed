"""Rebuild optimizers and LR schedulers after a structural change, keeping what survives.

``Strategy.setup_optimizers`` re-runs the user's ``configure_optimizers``; on its own that restarts
every LR schedule and drops all optimizer state (measured on Lightning 2.6). This module
snapshots the state by parameter *name* before the surgery and puts it back afterwards:

- scheduler state (``last_epoch`` etc.) is reloaded, and each param group's hyper-parameters
  (``lr``, ``initial_lr``, ``momentum``/``betas``, ...) are copied back by group index, because
  loading a scheduler's state does not touch ``param_group["lr"]``;
- per-parameter state (momentum, Adam moments, step) is re-attached for every parameter whose name
  and shape survived; new parameters start with empty state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn


@dataclass
class OptimizerSnapshot:
    """Optimizer and scheduler state captured by parameter name before a structural change."""

    states: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # per optimizer: name -> state
    groups: list[list[dict[str, Any]]] = field(default_factory=list)  # per optimizer: group hypers
    schedulers: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def capture(cls, trainer: pl.Trainer, module: nn.Module) -> OptimizerSnapshot:
        names = {id(p): n for n, p in module.named_parameters()}
        snap = cls()
        for opt in trainer.optimizers:
            snap.states.append({names[id(p)]: s for p, s in opt.state.items() if id(p) in names})
            snap.groups.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
        snap.schedulers = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        return snap

    def restore(self, trainer: pl.Trainer, module: nn.Module) -> dict[str, int]:
        """Re-attach the snapshot to the freshly built optimizers; return kept/fresh counts."""
        kept = fresh = 0
        optimizers = trainer.optimizers
        for i, opt in enumerate(optimizers):
            if i < len(self.groups) and len(self.groups[i]) == len(opt.param_groups):
                for group, hypers in zip(opt.param_groups, self.groups[i]):
                    group.update(hypers)
            old_states = self.states[i] if i < len(self.states) else {}
            in_optimizer = {id(p) for g in opt.param_groups for p in g["params"]}
            for name, param in module.named_parameters():
                if id(param) not in in_optimizer:
                    continue
                state = old_states.get(name)
                if state is not None and _state_fits(state, param):
                    opt.state[param] = state
                    kept += 1
                else:
                    fresh += 1
        configs = trainer.lr_scheduler_configs
        for cfg, state in zip(configs, self.schedulers):
            cfg.scheduler.load_state_dict(state)
        return {"optimizer_state_kept": kept, "optimizer_state_fresh": fresh}


def _state_fits(state: dict[str, Any], param: torch.Tensor) -> bool:
    """A state fits when every per-element buffer has the parameter's shape."""
    for value in state.values():
        if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != param.shape:
            return False
    return True


def rebuild_optimizers(trainer: pl.Trainer, module: nn.Module, snapshot: OptimizerSnapshot) -> dict[str, int]:
    """``setup_optimizers`` followed by the snapshot's restore (no-op when not fitting)."""
    if not trainer.optimizers:
        return {"optimizer_state_kept": 0, "optimizer_state_fresh": 0}
    trainer.strategy.setup_optimizers(trainer)
    return snapshot.restore(trainer, module)
