"""Rebuild optimizers and LR schedulers after a structural change, keeping what survives.

``Strategy.setup_optimizers`` re-runs the user's ``configure_optimizers``; on its own that restarts
every LR schedule and drops all optimizer state (measured on Lightning 2.6). This module
snapshots the state by parameter *name* before the surgery and puts it back afterwards:

- scheduler state (``last_epoch`` etc.) is reloaded, and each param group's hyper-parameters
  (``lr``, ``initial_lr``, ``momentum``/``betas``, ...) are copied back, because loading a
  scheduler's state does not touch ``param_group["lr"]``. Groups are matched by index when their
  number is unchanged; when the event changed it (e.g. per-layer groups and a BatchNorm folded
  away), each new group is matched to the old group holding the same parameter names (or, for new
  parameters, the same modules), and the schedulers' per-group lists (``base_lrs``, ...) are
  remapped with it. A new group that matches no old group is a :class:`ConfigError`;
- per-parameter state (momentum, Adam moments, step) is re-attached for every parameter whose name
  and shape survived; new parameters start with empty state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lit_compress.errors import ConfigError


@dataclass
class OptimizerSnapshot:
    """Optimizer and scheduler state captured by parameter name before a structural change."""

    states: list[dict[str, dict[str, Any]]] = field(default_factory=list)  # per optimizer: name -> state
    groups: list[list[dict[str, Any]]] = field(default_factory=list)  # per optimizer: group hypers
    schedulers: list[dict[str, Any]] = field(default_factory=list)
    group_names: list[list[list[str]]] = field(default_factory=list)  # per optimizer, per group: param names

    @classmethod
    def capture(cls, trainer: pl.Trainer, module: nn.Module) -> OptimizerSnapshot:
        names = {id(p): n for n, p in module.named_parameters()}
        snap = cls()
        for opt in trainer.optimizers:
            snap.states.append({names[id(p)]: s for p, s in opt.state.items() if id(p) in names})
            snap.groups.append([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
            snap.group_names.append([[names[id(p)] for p in g["params"] if id(p) in names] for g in opt.param_groups])
        snap.schedulers = [cfg.scheduler.state_dict() for cfg in trainer.lr_scheduler_configs]
        return snap

    def restore(self, trainer: pl.Trainer, module: nn.Module) -> dict[str, int]:
        """Re-attach the snapshot to the freshly built optimizers; return kept/fresh counts."""
        kept = fresh = 0
        optimizers = trainer.optimizers
        names = {id(p): n for n, p in module.named_parameters()}
        mappings: list[list[int] | None] = []
        for i, opt in enumerate(optimizers):
            mapping = self._group_mapping(i, opt, names)
            mappings.append(mapping)
            if mapping is not None:
                for group, old in zip(opt.param_groups, mapping):
                    group.update(self.groups[i][old])
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
        for cfg, state in zip(trainer.lr_scheduler_configs, self.schedulers):
            index = next((i for i, opt in enumerate(optimizers) if opt is cfg.scheduler.optimizer), None)
            mapping = mappings[index] if index is not None else None
            if mapping is not None and index is not None and len(mapping) != len(self.groups[index]):
                state = _remap_group_lists(state, len(self.groups[index]), mapping)
            cfg.scheduler.load_state_dict(state)
        return {"optimizer_state_kept": kept, "optimizer_state_fresh": fresh}

    def _group_mapping(self, i: int, opt: torch.optim.Optimizer, names: dict[int, str]) -> list[int] | None:
        """For each param group of the rebuilt optimizer ``i``, the index of its old group (``None``: no snapshot).

        Same number of groups: by index (``configure_optimizers`` built the same layout). Otherwise by
        the parameter names each group holds, then by module (a new ``layer.encoder.weight`` belongs
        with the old ``layer.weight``).

        Raises:
            ConfigError: If a new group shares no parameter or module with any old group.
        """
        if i >= len(self.groups):
            return None
        old_groups = self.groups[i]
        if len(old_groups) == len(opt.param_groups):
            return list(range(len(old_groups)))
        old_names = self.group_names[i]
        by_name = {n: j for j, group in enumerate(old_names) for n in group}
        old_modules = [{_owner(n) for n in group} for group in old_names]
        mapping: list[int] = []
        for k, group in enumerate(opt.param_groups):
            votes = [0] * len(old_groups)
            for p in group["params"]:
                name = names.get(id(p))
                if name is None:
                    continue
                if name in by_name:
                    votes[by_name[name]] += 1
                    continue
                owner = _owner(name)
                for j, modules in enumerate(old_modules):
                    if any(_related(owner, m) for m in modules):
                        votes[j] += 1
            if max(votes, default=0) == 0:
                held = [names.get(id(p), "?") for p in group["params"]][:5]
                raise ConfigError(
                    f"a structural event changed the optimizer's param groups from {len(old_groups)} to "
                    f"{len(opt.param_groups)}, and the new group {k} (params {held}) matches no group from before "
                    "the event by parameter or module name, so its learning rate and schedule position cannot be "
                    "kept. Build the param groups in `configure_optimizers` so that each holds the same layers "
                    "before and after the event (e.g. by module name prefix)."
                )
            mapping.append(votes.index(max(votes)))
        return mapping


def _owner(param_name: str) -> str:
    """The qualified name of the module holding ``param_name`` ("" for a parameter of the root)."""
    return param_name.rpartition(".")[0]


def _related(a: str, b: str) -> bool:
    """Whether module ``a`` is ``b``, inside it or contains it (the root relates to nothing)."""
    if not a or not b:
        return a == b
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _remap_group_lists(state: dict[str, Any], old_count: int, mapping: list[int]) -> dict[str, Any]:
    """A scheduler ``state_dict`` whose per-group lists (``base_lrs``, ``_last_lr``, ...) follow ``mapping``."""
    remapped = dict(state)
    for key, value in state.items():
        if isinstance(value, list) and len(value) == old_count:
            remapped[key] = [value[j] for j in mapping]
    return remapped


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
