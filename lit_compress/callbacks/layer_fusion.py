"""``LayerFusion`` (O'Neill, Ver Steeg, Galstyan 2020): tie similar layers during (re)training.

Two budgets for ``fraction`` ``p``, both reached in ``K`` even fusion steps spread over training:

- ``budget="layers_per_group"`` (the paper's unit, the authors' ``compute_merge``): in each group of
  ``n`` same-role, same-shape layers, ``⌊p·n⌋`` layers are fused (the group ends with ``n − ⌊p·n⌋``
  distinct weights); step ``k`` brings every group to its share ``round(⌊p·n⌋·k/K)``. The unique
  parameters removed follow from the groups' sizes (reported as ``fusion/unique_param_reduction``).
- ``budget="parameters"`` (default): ``p`` is the share of the model's unique parameters removed,
  ``ceil(p·N₀·k/K)`` after step ``k``; CR on unique storage ``≈ 1/(1 − p)``. Pairs of all groups
  are ranked together on the size-normalised distance, most alike first.

At each step every same-group pair of (clusters of) layers is scored at once on the current
weights (:func:`lit_compress.surgery.fusion.pairwise.pairwise`) and the closest are tied to one
shared ``nn.Parameter``. Every layer still runs: FLOPs and latency do not change, storage does.

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
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from lit_compress.callbacks._args import check_bool, check_choice, check_float, check_int
from lit_compress.callbacks._optim import OptimizerSnapshot
from lit_compress.callbacks._rewarm import RewarmHooks
from lit_compress.callbacks._schedule import FitLength, ScheduledEvent
from lit_compress.callbacks.base import CompressionCallback, Moment, Record, target_patterns
from lit_compress.errors import ConfigError, allowed
from lit_compress.measure import count_parameters
from lit_compress.surgery.fusion.adapters import adapter_skip_reason
from lit_compress.surgery.fusion.align import hidden_space
from lit_compress.surgery.fusion.groups import FusionGroup, candidate_groups, clusters, fusion_units, max_removable
from lit_compress.surgery.fusion.plan import plan_fusions, plan_group_fusions, shared_elsewhere
from lit_compress.surgery.fusion.similarity import MEASURES
from lit_compress.surgery.fusion.tie import POLICIES, PlannedFusion, fuse_layers_
from lit_compress.surgery.modules import get_submodule

MeasureName = Literal["cosine", "covariance", "cka", "euclidean", "manhattan", "kl", "wasserstein"]
PolicyName = Literal["mean", "mix", "freeze"]
BudgetName = Literal["layers_per_group", "parameters"]
BUDGETS = ("layers_per_group", "parameters")


def group_key(group: FusionGroup) -> str:
    """A stable text key of a fusion group (kept in checkpoints)."""
    role, kind, params, shapes = group
    return f"{role}|{kind}|{','.join(params)}|{';'.join('x'.join(map(str, s)) for s in shapes)}"


class FusionPlan(TypedDict):
    """One fusion step (plain data, broadcast from rank 0): the pairs to tie and the step's number."""

    fusions: list[PlannedFusion]  # see ``lit_compress.surgery.fusion.tie.plan_fusions``
    increment: int


class LayerFusion(RewarmHooks, CompressionCallback[FusionPlan]):
    """Tie similar same-role, same-shape layers in ``increments`` fusion steps (see the module docstring).

    Args:
        fraction: ``p`` in (0, 1). With ``budget="parameters"`` the share of the model's unique
            parameters to remove by tying (CR ``1/(1 − p)``, 0.7 → 3.33; :meth:`setup` refuses a
            ``p`` the targets cannot reach); with ``"layers_per_group"`` the share of the layers of
            each same-role, same-shape group that are fused (``⌊p·n⌋`` of ``n``), as in the paper.
        budget: ``"parameters"`` (default) or ``"layers_per_group"`` (the paper's unit); see above.
        increments: Number ``K`` of fusion steps; each takes an even share of the budget.
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
        align: Before each tie, permute the hidden units of the second cluster's blocks to match the
            first's (weight matching; the function is unchanged), so the average is taken over matching
            units. Applies to FFN projections and residual-block convs
            (:mod:`lit_compress.surgery.fusion.align`); other selected layers are tied unaligned, named
            in a warning at setup. The permuted tensors' optimizer state is reset. Off by default.
        adapters: Beyond the authors: give every tied linear or conv its own per-output-channel scale
            of its output (``s_i ⊙ (W x + b)`` with the shared ``W, b``;
            :mod:`lit_compress.surgery.fusion.adapters`), all ones when created, so the fused network is
            unchanged by them and they learn from there. They cost ``out_channels`` parameters per tied
            layer, which count against the removed parameters (the budget and
            ``fusion/unique_param_reduction`` are net of them). Layers that cannot take one are named in a
            warning at setup. Off by default.
        rewarm_steps: After each fusion step that tied something, re-warm the learning rate over this
            many optimizer steps: step ``k`` (0-based) after it runs at ``(k + 1) / (rewarm_steps + 1)``
            times the rate the optimizer and its scheduler set; the schedule itself is unchanged
            (:mod:`lit_compress.callbacks._rewarm`). Kept in the callback's state, so a resumed run
            continues a re-warm where it was. Default 0 (off): the authors' recipe and what the
            benchmark rows measured; no re-warm length has been measured here yet.
        min_steps_after_last: Optimizer steps of training the last fusion step must leave before the fit
            ends; when training starts (the steps of an epoch are known then) a warning names the
            numbers if the schedule leaves fewer. Default 100, a floor rather than a recipe (the
            issue-14 review found the last ResNet-20 tie followed by only 32 low-rate steps). 0: no check.
        seed: Seed of the ``mix``/``freeze`` random draws (with the fusion step's index).
        bn_recalibration_batches: See :class:`CompressionCallback` (a tied conv changes the statistics
            its BatchNorm sees).
    """

    def __init__(
        self,
        fraction: OpenUnitInterval = 0.5,
        budget: BudgetName = "parameters",
        increments: PositiveInt = 10,
        every_n_epochs: PositiveInt | None = None,
        every_n_steps: PositiveInt | None = None,
        at_epoch: NonNegativeInt | None = None,
        at_step: NonNegativeInt | None = None,
        measure: MeasureName = "wasserstein",
        policy: PolicyName = "mean",
        targets: str | list[str] | None = None,
        include_norms: bool = False,
        include_embeddings: bool = False,
        optimizer_state: Literal["reset", "average"] = "reset",
        align: bool = False,
        adapters: bool = False,
        rewarm_steps: NonNegativeInt = 0,
        min_steps_after_last: NonNegativeInt = 100,
        seed: int = 0,
        bn_recalibration_batches: NonNegativeInt = 20,
        name: str | None = None,
    ) -> None:
        super().__init__(bn_recalibration_batches=bn_recalibration_batches, name=name)
        check_float("fraction", fraction, 0, 1, low_open=True, high_open=True)
        check_int("increments", increments, 1)
        check_bool("include_norms", include_norms)
        check_bool("include_embeddings", include_embeddings)
        check_int("seed", seed)
        check_bool("align", align)
        check_bool("adapters", adapters)
        check_int("rewarm_steps", rewarm_steps, 0)
        check_int("min_steps_after_last", min_steps_after_last, 0)
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
        check_choice("budget", budget, list(BUDGETS))
        self.fraction, self.increments, self.budget = float(fraction), int(increments), str(budget)
        self.every_n_epochs, self.every_n_steps = every_n_epochs, every_n_steps
        self.at_epoch, self.at_step = at_epoch, at_step
        self.measure, self.policy = measure, policy
        self.targets = target_patterns(targets) or None
        self.include_norms, self.include_embeddings = bool(include_norms), bool(include_embeddings)
        self.optimizer_state, self.seed, self.align = optimizer_state, int(seed), bool(align)
        self.rewarm_steps, self.min_steps_after_last = int(rewarm_steps), int(min_steps_after_last)
        self.adapters = bool(adapters)
        self.rewarm_from: int | None = None  # global_step of the last fusion step that tied something
        self.increments_done = 0
        self.base_params: int | None = None  # unique parameters before the first fusion step
        self.removed_params = 0  # removed by this callback's ties (other methods' events do not count)
        self.group_start: dict[str, int] = {}  # distinct weights per group when fusion started (layers_per_group)
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
            units = self._usable_units(pl_module, warn=True)
            self._check_feasible(pl_module, units)
            self.base_params = count_parameters(pl_module)
            self.group_start = {
                group_key(g): len(clusters(pl_module, members)) for g, members in candidate_groups(units).items()
            }

    def _usable_units(self, pl_module: L.LightningModule, warn: bool = False) -> list:
        """The candidate units minus those whose parameter a candidate of another group also holds."""
        units = self._units(pl_module)
        skip = shared_elsewhere(pl_module, units)
        if warn and skip:
            listed = ", ".join(f"`{name}` (shares a parameter with `{other}`)" for name, other in sorted(skip.items()))
            rank_zero_warn(f"LayerFusion leaves out layers whose parameters another group's layer holds: {listed}.")
        if warn and self.targets:
            singles = sorted(u.name for u in units if u.name not in skip and u.group not in candidate_groups(units))
            if singles:
                rank_zero_warn(
                    "LayerFusion: these selected layers have no other layer of the same role and shape, so they "
                    f"cannot be fused: {', '.join(f'`{n}`' for n in singles)}."
                )
        usable = [u for u in units if u.name not in skip]
        if warn and self.align:
            grouped = [u.name for members in candidate_groups(usable).values() for u in members]
            fixed = [name for name in grouped if hidden_space(pl_module, name) is None]
            if fixed:
                listed = ", ".join(f"`{n}`" for n in fixed[:8]) + (
                    f" and {len(fixed) - 8} more" if len(fixed) > 8 else ""
                )
                rank_zero_warn(
                    f"LayerFusion(align=True) cannot permute the hidden units of {listed} (only FFN projections and "
                    "residual-block convs are aligned); they are tied unaligned."
                )
        if warn and self.adapters:
            grouped = [u.name for members in candidate_groups(usable).values() for u in members]
            lacking = [(n, why) for n in grouped if (why := adapter_skip_reason(pl_module, n)) is not None]
            if lacking:
                listed = "; ".join(f"`{n}` ({why})" for n, why in lacking[:6]) + (
                    f" and {len(lacking) - 6} more" if len(lacking) > 6 else ""
                )
                rank_zero_warn(f"LayerFusion(adapters=True) ties these layers without an adapter: {listed}.")
        return usable

    def _group_targets(self, pl_module: L.LightningModule, units: Sequence[Any]) -> dict[FusionGroup, int]:
        """Distinct weights each group must end with: ``n − ⌊p·n⌋`` (at least 1)."""
        return {g: max(1, len(m) - math.floor(self.fraction * len(m))) for g, m in candidate_groups(units).items()}

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
        if self.budget == "layers_per_group":
            if all(math.floor(self.fraction * len(m)) == 0 for m in groups.values()):
                largest = max(len(m) for m in groups.values())
                raise allowed(
                    "fraction",
                    self.fraction,
                    f"with budget='layers_per_group' it fuses floor(p * n) layers of a group of n, which is 0 in "
                    f"every group (the largest has {largest} layers); use fraction >= {1 / largest:.3f}",
                )
            return
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

    def steps_after_last(self, length: FitLength) -> int | None:
        """Optimizer steps the fit runs after the last fusion step (``None``: unbounded or unknown)."""
        total = length.total_steps()
        if total is None or self.interval is None:
            return None
        last = self.first_event_at + (self.increments - 1) * self.interval
        if self.unit == "epochs":
            if not length.steps_per_epoch:
                return None
            return total - last * length.steps_per_epoch
        return total - max(last, 1)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        length = FitLength.of(trainer)
        after = self.steps_after_last(length)
        if self.increments_done < self.increments and after is not None and 0 <= after < self.min_steps_after_last:
            event = self.scheduled_events(trainer)[-1]
            rank_zero_warn(
                f"LayerFusion: the last fusion step ({event.what}, {event.when()}) leaves {after} optimizer "
                f"step{'' if after == 1 else 's'} of training after it, fewer than min_steps_after_last="
                f"{self.min_steps_after_last}: this fit {length.describe()}. Lengthen the fit, fuse earlier "
                "(`at_epoch`/`at_step`, `every_n_epochs`/`every_n_steps`, fewer `increments`) or lower "
                "`min_steps_after_last`."
            )
        super().on_train_start(trainer, pl_module)

    # ------------------------------------------------------------------ learning-rate re-warm
    @override
    def rewarm_event_step(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> int | None:
        """The step of the last fusion step that tied something (kept in the state dict)."""
        return self.rewarm_from

    # ------------------------------------------------------------------ plan / apply
    @override
    def plan_event(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> FusionPlan | None:
        base = int(self.base_params or count_parameters(pl_module))
        k = self.increments_done + 1
        seed = self.seed * 1_000_003 + self.increments_done
        units = self._usable_units(pl_module)
        if self.budget == "layers_per_group":
            counts = {}
            for group, target in self._group_targets(pl_module, units).items():
                now = len(clusters(pl_module, candidate_groups(units)[group]))
                start = self.group_start.get(group_key(group), now)
                share = max(start - target, 0)
                goal = start - (2 * share * k + self.increments) // (2 * self.increments)  # round(share·k/K)
                if now > goal:
                    counts[group] = now - goal
            fusions = plan_group_fusions(pl_module, units, self.measure, counts, self.policy, seed=seed)
        else:
            goal = math.ceil(self.fraction * base * k / self.increments)
            remove = goal - self.removed_params
            if remove <= 0:
                return None
            fusions = plan_fusions(pl_module, units, self.measure, remove, self.policy, seed=seed)
        return FusionPlan(fusions=fusions, increment=k) if fusions else None

    @override
    def apply_event(self, pl_module: L.LightningModule, plan: FusionPlan) -> list[Record]:
        records = fuse_layers_(pl_module, plan["fusions"], self.policy, align=self.align, adapters=self.adapters)
        for record in records:
            record.update(
                increment=int(plan["increment"]), increments=self.increments, measure=self.measure, budget=self.budget
            )
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
        if records:
            self.rewarm_from = int(trainer.global_step)
        if records and snapshot is not None and trainer.optimizers:
            merge_fused_optimizer_state_(trainer.optimizers, pl_module, records, snapshot.states, self.optimizer_state)
            _reset_aligned_state_(trainer.optimizers, pl_module, records)
        if records and trainer.is_global_zero and self.base_params:
            ratio = self.base_params / max(count_parameters(pl_module), 1)
            metrics = {"fusion/compression_ratio": ratio, "fusion/unique_param_reduction": self.achieved_reduction}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    @property
    def achieved_reduction(self) -> float:
        """Share of the unique parameters (when fusion started) that this callback's ties removed."""
        return self.removed_params / self.base_params if self.base_params else 0.0

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
            "group_start": dict(self.group_start),
            "rewarm_from": self.rewarm_from,
        }

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.increments_done = int(state.get("increments_done", 0))
        self.base_params = state.get("base_params", self.base_params)
        self.removed_params = int(state.get("removed_params", 0))
        self.unit = state.get("unit", self.unit)
        self.interval = state.get("interval", self.interval)
        self.group_start = {str(k): int(v) for k, v in dict(state.get("group_start", {})).items()}
        rewarm_from = state.get("rewarm_from")
        self.rewarm_from = None if rewarm_from is None else int(rewarm_from)


def _reset_aligned_state_(
    optimizers: Sequence[torch.optim.Optimizer], model: torch.nn.Module, records: Sequence[dict[str, Any]]
) -> None:
    """Drop the optimizer state of tensors permuted by alignment (their moments no longer line up)."""
    names = {n for r in records for f in r.get("fusions", []) for n in f.get("aligned", [])}
    params = dict(model.named_parameters(remove_duplicate=False))
    for opt in optimizers:
        for name in names:
            if name in params:
                opt.state.pop(params[name], None)


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
