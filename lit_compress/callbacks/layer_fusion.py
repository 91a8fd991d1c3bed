"""``LayerFusion`` (O'Neill, Ver Steeg, Galstyan 2020): tie similar layers during (re)training.

The target fraction ``p`` of the model's parameters (unique storage when fusion starts) is removed
in ``K`` equal increments spread over training: at each fusion step the similarity of every
same-group pair of (clusters of) layers is recomputed on the current weights, and the most alike
pairs are tied to one shared ``nn.Parameter`` until ``ceil(p·N₀·k/K)`` parameters are gone after
step ``k``. The compression ratio on unique storage is then ``N₀/(N₀ − removed) ≈ 1/(1 − p)``.
Every layer still runs: FLOPs and latency do not change, storage does.

The math lives in :mod:`lit_compress.surgery.fusion.tie` (policies, planning, replay),
:mod:`lit_compress.surgery.fusion.groups` (roles and groups) and
:mod:`lit_compress.surgery.fusion.similarity` (measures). The plan is made on rank 0 and broadcast, so
every DDP rank ties the same pairs; checkpoints carry ``"fuse_layers"`` records that rebuild the
ties on resume and in ``lit_compress.load_from_checkpoint``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, TypedDict

import lightning as L
import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveInt
from typing_extensions import override

from lit_compress.callbacks._args import check_bool, check_choice, check_float, check_int
from lit_compress.callbacks._optim import OptimizerSnapshot
from lit_compress.callbacks._schedule import ScheduledEvent
from lit_compress.callbacks.base import CompressionCallback, Moment, Record
from lit_compress.errors import ConfigError, allowed
from lit_compress.measure import count_parameters
from lit_compress.surgery.fusion.groups import candidate_groups, fusion_units, max_removable
from lit_compress.surgery.fusion.similarity import MEASURES
from lit_compress.surgery.fusion.tie import POLICIES, PlannedFusion, fuse_layers_, plan_fusions
from lit_compress.surgery.modules import get_submodule

MeasureName = Literal["cosine", "covariance", "cka", "euclidean", "manhattan", "kl", "wasserstein"]
PolicyName = Literal["mean", "mix", "freeze"]


class FusionPlan(TypedDict):
    """One fusion step (plain data, broadcast from rank 0): the pairs to tie and the step's number."""

    fusions: list[PlannedFusion]  # see ``lit_compress.surgery.fusion.tie.plan_fusions``
    increment: int


class LayerFusion(CompressionCallback[FusionPlan]):
    """Tie similar same-role, same-shape layers in ``increments`` fusion steps (see the module docstring).

    Args:
        fraction: Target fraction ``p`` in (0, 1) of the model's parameters to remove by tying; the
            compression ratio on unique storage is ``1/(1 − p)`` (0.7 → 3.33). Fusion stops short
            only if the targets run out of same-group pairs, which :meth:`setup` refuses up front.
        increments: Number ``K`` of fusion steps; each removes another ``p/K``.
        every_n_epochs: Fuse at the start of every ``n``-th epoch, from epoch ``at_epoch``.
        every_n_steps: Fuse after every ``n``-th optimizer step, from step ``at_step``.
            With neither, the ``K`` steps are spread evenly over ``max_epochs`` (or, with ``at_step``
            or without ``max_epochs``, over ``max_steps``) after the first one, leaving the last
            interval for retraining.
        at_epoch: Epoch of the first fusion step (its start; 0 = before any training). Default 0.
        at_step: Optimizer step after which the first fusion step runs (instead of ``at_epoch``;
            the series then counts steps).
        measure: Similarity measure (``lit_compress.surgery.fusion.similarity``): ``cosine``, ``covariance``,
            ``cka``, ``euclidean``, ``manhattan``, ``kl`` or ``wasserstein`` (exact 1-D earth mover's
            distance between the weights' value distributions).
        policy: ``mean`` (average the pair), ``mix`` (seeded elementwise random mix) or ``freeze``
            (keep one member, seeded choice); in every case one shared ``nn.Parameter`` results,
            which receives the summed gradients of all its uses.
        targets: fnmatch globs or ``re:`` regexes over module names; default: every candidate.
        include_norms: Also tie LayerNorm/GroupNorm/RMSNorm layers (same position in their block only).
        include_embeddings: Also tie same-shape embeddings.
        optimizer_state: What a newly tied parameter's optimizer state becomes: ``reset`` (fresh
            moments, the authors' choice) or ``average`` (moments averaged over the tied layers,
            weighted by cluster size; the step count is the larger one).
        seed: Seed of the ``mix``/``freeze`` random draws (with the fusion step's index).
        bn_recalibration_batches: See :class:`CompressionCallback` (a tied conv changes the statistics
            its BatchNorm sees).
    """

    def __init__(
        self,
        fraction: OpenUnitInterval = 0.5,
        increments: PositiveInt = 10,
        every_n_epochs: PositiveInt | None = None,
        every_n_steps: PositiveInt | None = None,
        at_epoch: NonNegativeInt | None = None,
        at_step: NonNegativeInt | None = None,
        measure: MeasureName = "wasserstein",
        policy: PolicyName = "mean",
        targets: list[str] | None = None,
        include_norms: bool = False,
        include_embeddings: bool = False,
        optimizer_state: Literal["reset", "average"] = "reset",
        seed: int = 0,
        bn_recalibration_batches: NonNegativeInt = 20,
    ) -> None:
        super().__init__(bn_recalibration_batches=bn_recalibration_batches)
        check_float("fraction", fraction, 0, 1, low_open=True, high_open=True)
        check_int("increments", increments, 1)
        check_bool("include_norms", include_norms)
        check_bool("include_embeddings", include_embeddings)
        check_int("seed", seed)
        if every_n_epochs is not None and every_n_steps is not None:
            raise allowed("every_n_steps", every_n_steps, "give `every_n_epochs` or `every_n_steps`, not both")
        for name, value in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            check_int(name, value, 1, optional=True)
        for name, value in (("at_epoch", at_epoch), ("at_step", at_step)):
            check_int(name, value, 0, optional=True)
        if at_epoch is not None and at_step is not None:
            raise allowed("at_step", at_step, "give `at_epoch` or `at_step`, not both")
        if at_epoch is not None and every_n_steps is not None:
            raise allowed("at_epoch", at_epoch, "a series `every_n_steps` starts `at_step`")
        if at_step is not None and every_n_epochs is not None:
            raise allowed("at_step", at_step, "a series `every_n_epochs` starts `at_epoch`")
        check_choice("measure", measure, list(MEASURES))
        check_choice("policy", policy, list(POLICIES))
        check_choice("optimizer_state", optimizer_state, ["reset", "average"])
        self.fraction, self.increments = float(fraction), int(increments)
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.at_epoch, self.at_step = at_epoch, at_step
        self.measure, self.policy = measure, policy
        self.targets = list(targets) if targets else None
        self.include_norms, self.include_embeddings = bool(include_norms), bool(include_embeddings)
        self.optimizer_state, self.seed = optimizer_state, int(seed)
        self.increments_done = 0
        self.base_params: int | None = None  # unique parameters before the first fusion step
        self.removed_params = 0  # removed by this callback's ties (other methods' events do not count)
        self.unit: str | None = None  # "epochs" or "steps", resolved at setup
        self.interval: int | None = None

    # ------------------------------------------------------------------ setup and schedule
    def _units(self, pl_module: L.LightningModule) -> list:
        return fusion_units(
            pl_module, self.targets, include_norms=self.include_norms, include_embeddings=self.include_embeddings
        )

    @override
    def setup(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._resolve_schedule(trainer)
        if self.base_params is None:
            units = self._units(pl_module)
            self._check_feasible(pl_module, units)
            self.base_params = count_parameters(pl_module)

    def _check_feasible(self, pl_module: L.LightningModule, units: Sequence[Any]) -> None:
        groups = candidate_groups(units)
        if not groups:
            found = sorted({u.group_label for u in units})
            raise ConfigError(
                f"`targets`={self.targets!r} selects no two layers of the same role and shape, so nothing can be "
                f"tied. Layers selected, by role and shape: {', '.join(found[:12]) or 'none'}. Allowed: patterns "
                "selecting at least two same-role, same-shape convs, linears, attention or FFN projections "
                "(norms with `include_norms`, embeddings with `include_embeddings`)."
            )
        base = count_parameters(pl_module)
        need, can = math.ceil(self.fraction * base), max_removable(pl_module, units)
        if need > can:
            raise allowed(
                "fraction",
                self.fraction,
                f"tying the selected layers can remove at most {can:,} of the model's {base:,} parameters, a "
                f"fraction of {can / base:.3f} (CR {base / max(base - can, 1):.2f}); use fraction <= {can / base:.3f} "
                "or select more layers with `targets`",
            )

    @property
    def first_event_at(self) -> int:
        """The first fusion step's epoch or step (in :attr:`unit`)."""
        return int(self.at_step if self.at_step is not None else self.at_epoch or 0)

    def _resolve_schedule(self, trainer: pl.Trainer) -> None:
        if self.interval is not None:
            return
        if self.every_n_steps is not None:
            self.unit, self.interval = "steps", self.every_n_steps
            return
        if self.every_n_epochs is not None:
            self.unit, self.interval = "epochs", self.every_n_epochs
            return
        max_epochs = getattr(trainer, "max_epochs", None)
        max_steps = getattr(trainer, "max_steps", -1)
        if self.at_step is None and max_epochs is not None and max_epochs > 0:
            self.unit, total = "epochs", int(max_epochs)
        elif self.at_epoch is None and max_steps is not None and max_steps > 0:
            self.unit, total = "steps", int(max_steps)
        else:
            name, value = ("at_step", self.at_step) if self.at_step is not None else ("every_n_epochs", None)
            raise allowed(
                name,
                value,
                "needs `every_n_epochs`/`every_n_steps`, or the Trainer's `max_epochs` (or `max_steps` with "
                "`at_step`) to spread the fusion steps over",
            )
        self.interval = max(1, (total - self.first_event_at) // (self.increments + 1))

    @override
    def event_due(self, trainer: pl.Trainer, pl_module: L.LightningModule, moment: Moment) -> bool:
        if self.increments_done >= self.increments or self.interval is None:
            return False
        due_at = self.first_event_at + self.increments_done * self.interval
        if self.unit == "epochs":
            return moment == "epoch_start" and trainer.current_epoch >= due_at
        return moment == "step" and trainer.global_step >= max(due_at, 1)

    @override
    def scheduled_events(self, trainer: pl.Trainer) -> list[ScheduledEvent]:
        if self.interval is None:
            return []
        out = []
        for k in range(self.increments_done, self.increments):
            at, what = self.first_event_at + k * self.interval, f"fusion step {k + 1} of {self.increments}"
            out.append(ScheduledEvent(what, epoch=at) if self.unit == "epochs" else ScheduledEvent(what, step=at))
        return out

    # ------------------------------------------------------------------ plan / apply
    @override
    def plan_event(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> FusionPlan | None:
        base = int(self.base_params or count_parameters(pl_module))
        k = self.increments_done + 1
        goal = math.ceil(self.fraction * base * k / self.increments)
        remove = goal - self.removed_params
        if remove <= 0:
            return None
        units = self._units(pl_module)
        fusions = plan_fusions(
            pl_module, units, self.measure, remove, self.policy, seed=self.seed * 1_000_003 + self.increments_done
        )
        return FusionPlan(fusions=fusions, increment=k) if fusions else None

    @override
    def apply_event(self, pl_module: L.LightningModule, plan: FusionPlan) -> list[Record]:
        records = fuse_layers_(pl_module, plan["fusions"], self.policy)
        for record in records:
            record.update(increment=int(plan["increment"]), increments=self.increments, measure=self.measure)
        return records

    @override
    def after_event(
        self,
        trainer: pl.Trainer,
        pl_module: L.LightningModule,
        records: list[Record],
        snapshot: OptimizerSnapshot | None,
    ) -> None:
        """Count the step (also an empty one), give tied parameters their optimizer state, log the ratio."""
        self.increments_done += 1
        self.removed_params += sum(int(r.get("removed_params", 0)) for r in records)
        if records and snapshot is not None and trainer.optimizers:
            merge_fused_optimizer_state_(trainer.optimizers, pl_module, records, snapshot.states, self.optimizer_state)
        if records and trainer.is_global_zero and self.base_params:
            ratio = self.base_params / max(count_parameters(pl_module), 1)
            for logger in trainer.loggers:
                logger.log_metrics({"fusion/compression_ratio": ratio}, step=trainer.global_step)

    @override
    def claimed_modules(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> list[str] | None:
        return [u.name for members in candidate_groups(self._units(pl_module)).values() for u in members]

    @override
    def extra_state(self) -> dict[str, Any]:
        return {
            "increments_done": self.increments_done,
            "base_params": self.base_params,
            "removed_params": self.removed_params,
            "unit": self.unit,
            "interval": self.interval,
        }

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.increments_done = int(state.get("increments_done", 0))
        self.base_params = state.get("base_params", self.base_params)
        self.removed_params = int(state.get("removed_params", 0))
        self.unit = state.get("unit", self.unit)
        self.interval = state.get("interval", self.interval)


def _average_states(a: dict[str, Any], b: dict[str, Any], n_a: int, n_b: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, va in a.items():
        vb = b.get(key)
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape:
            if va.dim() == 0:  # a step count
                out[key] = torch.maximum(va, vb).clone()
            else:
                out[key] = (va * n_a + vb.to(va.device, va.dtype) * n_b) / (n_a + n_b)
        else:
            out[key] = va
    return out


def _state_of(
    names: Sequence[str],
    pname: str,
    current: dict[str, dict[str, Any] | None],
    before: dict[str, dict[str, Any]],
) -> dict[str, Any] | None:
    """The state of parameter ``pname`` of a cluster ``names``: as merged earlier in this event, else from before."""
    for n in names:
        if f"{n}.{pname}" in current:
            return current[f"{n}.{pname}"]
    for n in names:
        if f"{n}.{pname}" in before:
            return before[f"{n}.{pname}"]
    return None


def merge_fused_optimizer_state_(
    optimizers: Sequence[torch.optim.Optimizer],
    model: torch.nn.Module,
    records: Sequence[dict[str, Any]],
    before: Sequence[dict[str, dict[str, Any]]],
    mode: str,
) -> int:
    """Give each parameter tied by ``records`` the optimizer state ``mode`` asks for; return how many.

    ``before[i]`` is optimizer ``i``'s state by parameter name, captured before the event (the
    engine's :class:`OptimizerSnapshot`). ``reset`` drops the tied parameter's state (Adam starts
    its moments afresh, SGD its momentum); ``average`` sets it to the cluster-size-weighted mean of
    the members' states (scalar step counts: the larger one). Without this, the engine would keep
    the state of whichever member comes first by name.
    """
    changed = 0
    for opt, states in zip(optimizers, before):
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        current: dict[str, dict[str, Any] | None] = {}
        final: dict[int, tuple[torch.nn.Parameter, dict[str, Any] | None]] = {}
        for record in records:
            if record.get("op") != "fuse_layers":
                continue
            for fusion in record["fusions"]:
                a, b = list(fusion["a"]), list(fusion["b"])
                for pname in fusion["params"]:
                    merged: dict[str, Any] | None = None
                    if mode == "average":
                        sa, sb = _state_of(a, pname, current, states), _state_of(b, pname, current, states)
                        if sa and sb:
                            merged = _average_states(sa, sb, len(a), len(b))
                    for n in a + b:
                        current[f"{n}.{pname}"] = merged
                    param = get_submodule(model, a[0])._parameters[pname]
                    if param is not None:
                        final[id(param)] = (param, merged)
        for param, merged in final.values():
            if id(param) not in in_opt:
                continue
            if merged:
                opt.state[param] = merged
            else:
                opt.state.pop(param, None)
            changed += 1
    return changed


__all__ = ["LayerFusion", "merge_fused_optimizer_state_"]
