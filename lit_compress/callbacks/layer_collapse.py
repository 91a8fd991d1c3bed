"""``LayerCollapse`` (Zibakhsh Shabgahi, Shariff, Koushanfar 2023): linearise MLP activations, then collapse.

Each selected MLP (``Linear → activation → Linear`` with an optional dropout and ``BatchNorm1d`` on either
side of the activation; see :func:`~lit_compress.surgery.chains.find_linear_chains`) gets a collapsible
activation ``φ_a(h) = max(0, h) + a·min(0, h)`` with one scalar slope ``a``. A regulariser
``λ·Σ(a − 1)²`` pushes the slopes towards 1 (the identity); once ``|a − 1| < τ`` the slope is set to
1 and the two linears are merged into one (``W = W2·W1``, ``b = W2·b1 + b2``, BatchNorm folded,
dropout removed). The math lives in :mod:`lit_compress.surgery.collapse.mlp`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, Literal, TypedDict

import lightning as L
import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, OpenUnitInterval, PositiveInt
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_compress.callbacks._args import check_choice, check_float, check_int
from lit_compress.callbacks._types import UnitFraction
from lit_compress.callbacks.base import CompressionCallback, Moment, Record, target_patterns
from lit_compress.errors import ConfigError, allowed
from lit_compress.surgery.chains import ChainLink, discover_mlps, linear_features
from lit_compress.surgery.collapse.mlp import (
    CollapsibleActivation,
    collapse_,
    collapsible_activations,
    kind_and_init_slope,
    make_collapsible_,
    resolve_into,
)
from lit_compress.surgery.select import name_matches

PenaltyMode = Literal["auto", "loss", "decoupled"]


class Link(TypedDict):
    """One MLP, by module names: ``first → activation → second`` with its dropout and norm (a ``ChainLink``)."""

    first: str
    activation: str
    dropout: str | None
    norm: str | None
    second: str


class CollapsePlan(TypedDict):
    """What one LayerCollapse event does (plain data, broadcast from rank 0).

    ``selected`` is the whole selection (output side last), stored by every rank on the first event.
    """

    selected: list[Link]
    collapse: list[Link]
    convert: list[Link]


class LayerCollapse(CompressionCallback[CollapsePlan]):
    """Collapse MLPs during training with the LayerCollapse regulariser (see the module docstring).

    Which MLPs: ``targets`` (patterns over any module name of the MLP: its linears, activation,
    dropout or norm), then optionally only the last ``last_n`` of them, or the last ``fraction``,
    counted from the output side. ReLU-family activations start at slope 0 (the same function);
    GELU/SiLU start at 0.01, which CHANGES the function: such models need regularised fine-tuning
    before a collapse is accurate.

    Args:
        targets: fnmatch globs or ``re:`` regexes; default: every MLP found by tracing.
        last_n: Keep only the last ``n`` selected MLPs (output side first).
        fraction: Keep only the last ``fraction`` (0, 1] of the selected MLPs, rounded up.
        stage_size: Convert this many MLPs at a time (output side first); when all of a stage have
            collapsed, the next stage is converted (progressive LayerCollapse). Default: all at once.
        lambda_start: λ at the start of the warm-up.
        lambda_final: λ after the warm-up.
        warmup: Length of the linear λ warm-up, in ``warmup_unit``.
        warmup_unit: ``"epochs"`` or ``"steps"``.
        tau: Collapse an MLP once ``|a − 1| < tau``.
        collapse_at: ``"epoch_start"``: check (and collapse) at the start of every epoch, i.e. after
            the previous epoch's training and validation, and at fit end; ``"fit_end"``: only at the end.
        penalty: ``"loss"`` adds ``2λ(a − 1)`` to the slopes' gradients before each optimizer step
            (the same as adding the penalty to the loss; the authors' choice under SGD);
            ``"decoupled"`` steps ``a ← a − lr·2λ(a − 1)`` after the optimizer step (the authors'
            choice under Adam, whose normalisation would otherwise tie the strength to the
            learning rate); ``"auto"`` picks decoupled for Adam-family optimizers.
        log_every_n_steps: How often slopes and λ go to the loggers.
        bn_recalibration_batches: See :class:`CompressionCallback` (off by default: a collapse changes
            nothing upstream of the MLP).
    """

    def __init__(
        self,
        targets: str | list[str] | None = None,
        last_n: PositiveInt | None = None,
        fraction: UnitFraction | None = None,
        stage_size: PositiveInt | None = None,
        lambda_start: NonNegativeFloat = 0.0,
        lambda_final: NonNegativeFloat = 1.0,
        warmup: NonNegativeFloat = 0,
        warmup_unit: Literal["epochs", "steps"] = "epochs",
        tau: OpenUnitInterval = 0.05,
        collapse_at: Literal["epoch_start", "fit_end"] = "epoch_start",
        penalty: PenaltyMode = "auto",
        log_every_n_steps: PositiveInt = 50,
        bn_recalibration_batches: NonNegativeInt = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(bn_recalibration_batches=bn_recalibration_batches, name=name)
        check_int("last_n", last_n, 1, optional=True)
        check_float("fraction", fraction, 0, 1, low_open=True, optional=True)
        if last_n is not None and fraction is not None:
            raise allowed("fraction", fraction, "give `last_n` or `fraction`, not both")
        check_int("stage_size", stage_size, 1, optional=True)
        for name, value in (("lambda_start", lambda_start), ("lambda_final", lambda_final), ("warmup", warmup)):
            check_float(name, value, 0)
        check_float("tau", tau, 0, 1, low_open=True, high_open=True)
        check_choice("penalty", penalty, ["auto", "loss", "decoupled"])
        check_choice("collapse_at", collapse_at, ["epoch_start", "fit_end"])
        check_choice("warmup_unit", warmup_unit, ["epochs", "steps"])
        check_int("log_every_n_steps", log_every_n_steps, 1)
        self.targets = target_patterns(targets) or ["*"]
        self.last_n, self.fraction, self.stage_size = last_n, fraction, stage_size
        self.lambda_start, self.lambda_final = float(lambda_start), float(lambda_final)
        self.warmup, self.warmup_unit = float(warmup), warmup_unit
        self.tau, self.collapse_at, self.penalty = float(tau), collapse_at, penalty
        self.log_every_n_steps = log_every_n_steps
        self.selected: list[Link] | None = None  # the chosen MLPs, output side last (set by the first event)
        self.converted = 0  # how many of `selected` have been converted so far
        self.collapsed: list[str] = []  # activation names collapsed so far

    # ------------------------------------------------------------------ schedule
    def current_lambda(self, trainer: pl.Trainer) -> float:
        """λ at the trainer's position: a linear ramp from ``lambda_start`` to ``lambda_final``."""
        if self.warmup <= 0:
            return self.lambda_final
        if self.warmup_unit == "steps":
            progress = trainer.global_step / self.warmup
        else:
            batches = trainer.num_training_batches
            batches = int(batches) if batches not in (None, float("inf")) and batches > 0 else 1
            steps_per_epoch = max(1, math.ceil(batches / trainer.accumulate_grad_batches))
            progress = trainer.global_step / (self.warmup * steps_per_epoch)
        progress = min(1.0, max(0.0, progress))
        return self.lambda_start + (self.lambda_final - self.lambda_start) * progress

    @override
    def event_due(self, trainer: pl.Trainer, pl_module: L.LightningModule, moment: Moment) -> bool:
        if moment == "fit_start":
            return self.selected is None or self.converted == 0
        if moment == "epoch_start" and self.collapse_at == "epoch_start" and trainer.current_epoch > 0:
            return self._collapsible_now(pl_module)
        if moment == "fit_end":
            return self._collapsible_now(pl_module)
        return False

    def _collapsible_now(self, pl_module: L.LightningModule) -> bool:
        return any(abs(float(a.slope.detach()) - 1.0) < self.tau for _, a in collapsible_activations(pl_module))

    # ------------------------------------------------------------------ plan / apply
    @override
    def plan_event(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> CollapsePlan | None:
        selected = self.selected if self.selected is not None else self._select(trainer, pl_module)
        live = dict(collapsible_activations(pl_module))
        converted = selected[len(selected) - self.converted :]  # converted from the output side
        ready = [
            link
            for link in converted
            if link["activation"] in live and abs(float(live[link["activation"]].slope.detach()) - 1.0) < self.tau
        ]
        collapse: list[Link] = []
        for link in ready:
            reason = _no_saving_reason(pl_module, link)
            if reason:
                rank_zero_warn(f"LayerCollapse: not collapsing the MLP at `{link['activation']}`: {reason}")
            else:
                collapse.append(link)
        done = set(self.collapsed) | {link["activation"] for link in collapse}
        pending = [link for link in converted if link["activation"] not in done]
        convert: list[Link] = []
        if not pending and self.converted < len(selected):
            step = self.stage_size or len(selected)
            start = len(selected) - self.converted  # convert from the output side backwards
            convert = selected[max(0, start - step) : start]
        if not collapse and not convert:
            return None
        return {"selected": selected, "collapse": collapse, "convert": convert}

    @override
    def apply_event(self, pl_module: L.LightningModule, plan: CollapsePlan) -> list[Record]:
        if self.selected is None:
            self.selected = [_as_link(link) for link in plan["selected"]]
        records: list[Record] = []
        if plan["collapse"]:
            links = [ChainLink(**link) for link in plan["collapse"]]
            records += collapse_(pl_module, links, tau=self.tau)
            self.collapsed += [link["activation"] for link in plan["collapse"]]
        if plan["convert"]:
            records += make_collapsible_(pl_module, [ChainLink(**link) for link in plan["convert"]])
            self.converted += len(plan["convert"])
        return records

    def _select(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> list[Link]:
        """The MLPs to work on, in model order (the last ones are nearest the output)."""
        inputs = self.reporter(trainer).example_inputs(trainer, pl_module)
        if inputs is None:
            raise ConfigError(
                "LayerCollapse needs an example input to find MLPs: set `example_input_array` on the module."
            )
        discovery = discover_mlps(pl_module, inputs)
        links = [_as_link(asdict(link)) for chain in discovery.chains for link in chain.links()]
        matched = self._chosen(links)
        found: list[Link] = []
        refused: list[str] = []
        for link in matched:
            reason = _unsupported_reason(pl_module, link)
            if reason:
                refused.append(f"`{link['first']}` → `{link['activation']}` → `{link['second']}`: {reason}")
            else:
                found.append(link)
        refused += [
            g.describe()
            for g in discovery.gated
            if any(name_matches(n, self.targets) for n in (g.gate, g.activation, g.up, g.down))
        ]
        refused += [
            note
            for note in discovery.skipped
            if any(name_matches(n, self.targets) for n in re.findall(r"`([^`]+)`", note))
        ]
        if not found:
            names = ", ".join(link["activation"] for link in links) or "none"
            why = f" Candidates it cannot collapse: {'; '.join(refused)}." if refused else ""
            raise ConfigError(
                f"`targets`={self.targets!r} matches no collapsible MLP (Linear → activation → Linear, with "
                f"optional Dropout and BatchNorm1d). MLPs found, by activation name: {names}.{why}"
            )
        if refused:
            rank_zero_warn(
                f"LayerCollapse: {len(refused)} MLP candidate(s) will not be collapsed: {'; '.join(refused)}."
            )
        return found

    def _chosen(self, links: list[Link]) -> list[Link]:
        """``links`` filtered by ``targets``, then cut to ``last_n`` or ``fraction`` (output side kept)."""
        found = [link for link in links if any(name_matches(n, self.targets) for n in _names(link))]
        if found and self.last_n is not None:
            found = found[-self.last_n :]
        elif found and self.fraction is not None:
            found = found[-max(1, math.ceil(len(found) * self.fraction)) :]
        return found

    @override
    def claimed_modules(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> list[str] | None:
        """The linears, activations, dropouts and norms of the selected MLPs (needs ``example_input_array``)."""
        if self.selected is None:
            example = getattr(pl_module, "example_input_array", None)
            if example is None:
                return None
            found = self._chosen(_links(pl_module, example))
        else:
            found = self.selected
        return sorted({n for link in found for n in _names(link)})

    @override
    def shortfalls(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> list[str]:
        """Selected MLPs that did not collapse: a slope short of ``tau``, or a stage never converted."""
        if not self.selected:
            return []
        live = dict(collapsible_activations(pl_module))
        short = [
            (link, float(live[link["activation"]].slope.detach()))
            for link in self.selected
            if link["activation"] in live and abs(float(live[link["activation"]].slope.detach()) - 1.0) >= self.tau
        ]
        out = [
            f"LayerCollapse: the MLP `{link['first']}` → `{link['second']}` ended with slope a={a:.4g} at "
            f"`{link['activation']}`, short of tau: |a − 1| = {abs(a - 1):.3g} >= tau={self.tau:g}, so it was NOT "
            f"collapsed and keeps the activation max(0, h) + {a:.4g}·min(0, h). Train longer, raise `lambda_final`, "
            "or collapse it after training (lit_compress.surgery.collapse_post_training_, which changes the function)."
            for link, a in short
        ]
        waiting = len(self.selected) - self.converted
        if waiting > 0:
            out.append(
                f"LayerCollapse: {waiting} of the {len(self.selected)} selected MLPs were never converted (their "
                f"stage, stage_size={self.stage_size}, waits for the MLPs after them to collapse)."
            )
        return out

    # ------------------------------------------------------------------ the regulariser
    def _mode(self, trainer: pl.Trainer) -> str:
        if self.penalty != "auto":
            return self.penalty
        opt = trainer.optimizers[0] if trainer.optimizers else None
        return "decoupled" if opt is not None and "adam" in type(opt).__name__.lower() else "loss"

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._mode(trainer) != "loss":
            return
        lam = self.current_lambda(trainer)
        for _, act in collapsible_activations(pl_module):
            if act.slope.grad is None:
                act.slope.grad = torch.zeros_like(act.slope)
            act.slope.grad.add_(2.0 * lam * (act.slope.detach() - 1.0))

    @override
    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        if self._mode(trainer) == "decoupled":
            self._decoupled_step(trainer, pl_module)
        if trainer.global_step % self.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    @torch.no_grad()
    def _decoupled_step(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        lam = self.current_lambda(trainer)
        lrs = {id(p): g["lr"] for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        for _, act in collapsible_activations(pl_module):
            lr = lrs.get(id(act.slope))
            if lr is not None:
                act.slope.sub_(lr * 2.0 * lam * (act.slope - 1.0))

    def _log(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {"collapse/lambda": self.current_lambda(trainer)}
        metrics.update(
            {f"collapse/slope/{name}": float(a.slope.detach()) for name, a in collapsible_activations(pl_module)}
        )
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        _warn_about_weight_decay(trainer, pl_module)

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"selected": self.selected, "converted": self.converted, "collapsed": list(self.collapsed)}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        selected = state.get("selected")
        self.selected = None if selected is None else [_as_link(link) for link in selected]
        self.converted = int(state.get("converted", 0))
        self.collapsed = list(state.get("collapsed", []))


def _links(pl_module: nn.Module, inputs: Any) -> list[Link]:
    """Every MLP found by tracing ``pl_module`` on ``inputs``, in model order."""
    found = discover_mlps(pl_module, inputs)
    return [_as_link(asdict(link)) for chain in found.chains for link in chain.links()]


def _as_link(fields: Mapping[str, Any]) -> Link:
    """A :class:`Link` from a mapping with its five names (a ``ChainLink`` as a dict, or saved state)."""
    return Link(
        first=str(fields["first"]),
        activation=str(fields["activation"]),
        dropout=fields.get("dropout"),
        norm=fields.get("norm"),
        second=str(fields["second"]),
    )


def _names(link: Link) -> list[str]:
    """The module names of one MLP (its linears, activation, and dropout/norm where present)."""
    return [n for n in (link["first"], link["activation"], link["dropout"], link["norm"], link["second"]) if n]


def _no_saving_reason(model: nn.Module, link: Link) -> str | None:
    """Why merging the link's linears (``first`` resolved through earlier collapses) saves nothing, or ``None``."""
    first = model.get_submodule(resolve_into(model, link["first"]))
    second = model.get_submodule(link["second"])
    pair = sum(p.numel() for p in first.parameters()) + sum(p.numel() for p in second.parameters())
    (d_in, _), (_, d_out) = linear_features(first), linear_features(second)
    merged = d_in * d_out + d_out
    if merged >= pair:
        return f"one Linear({d_in}, {d_out}) has {merged} parameters, not fewer than the pair's {pair}"
    return None


def _unsupported_reason(model: nn.Module, link: Link) -> str | None:
    """Why the callback cannot collapse a discovered link (activation type, no saving), or ``None``."""
    try:
        kind_and_init_slope(link["activation"], model.get_submodule(link["activation"]))
    except ConfigError as err:
        return str(err)
    return _no_saving_reason(model, link)


def _warn_about_weight_decay(trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
    for opt in trainer.optimizers:
        for group in opt.param_groups:
            if group.get("weight_decay", 0) and any(
                isinstance(p, torch.nn.Parameter) and p.dim() == 0 for p in group["params"]
            ):
                slopes = {id(a.slope) for _, a in collapsible_activations(pl_module)}
                if any(id(p) in slopes for p in group["params"]):
                    rank_zero_warn(
                        "LayerCollapse: the activation slopes sit in a parameter group with "
                        f"weight_decay={group['weight_decay']}; the method expects none (decay pulls the slopes "
                        "away from 1). Put parameters with fewer than 2 dimensions (or named '*.slope') in a "
                        "group with weight_decay=0 in `configure_optimizers`."
                    )
                    return


__all__ = ["CollapsibleActivation", "LayerCollapse"]
