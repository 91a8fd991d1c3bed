"""``LayerMerge`` (Kim, El Halabi, Ji, Song, ICML 2024): remove activations and convs under a latency budget.

At fit start (rank 0; the plan is broadcast) the callback analyses the network
(:mod:`lit_compress.surgery.layermerge.blocks`), measures the latency table on the training device and
builds the importance table (:mod:`lit_compress.surgery.layermerge.importance`), and solves the DP
(:mod:`lit_compress.surgery.layermerge.dp`) for ``budget`` × the original latency; or it loads a plan
saved earlier (``load_plan``). The plan is applied to the *unmerged* network (activations dropped,
pruned convs removed, padding moved to the first conv of each chain, skips zero-padded), which is
fine-tuned for the rest of ``fit``. At fit end the network is merged (BN folded, each chain one
conv, skips fused): the merged network equals the fine-tuned one exactly (eval mode). The merge is
a logged event, so checkpoints saved afterwards and :func:`lit_compress.export.export_compressed`
hold the merged model.

``targets`` limits the search to some conv sites: a site outside it keeps its own conv, BatchNorm
and activation (the plan gives it its original single-conv block, and the final merge leaves it
alone).
"""

from __future__ import annotations

import copy
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypedDict

import lightning as L
import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, OpenUnitInterval, PositiveFloat, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_compress.callbacks._args import (
    check_bool,
    check_choice,
    check_float,
    check_int,
    check_str,
    check_writable,
)
from lit_compress.callbacks._rewarm import RewarmHooks
from lit_compress.callbacks._schedule import ScheduledEvent
from lit_compress.callbacks.base import CompressionCallback, Moment, Record, target_patterns
from lit_compress.errors import ConfigError, SurgeryError, allowed
from lit_compress.surgery.replay import applied_events
from lit_compress.surgery.select import name_matches

if TYPE_CHECKING:
    from lit_compress.surgery.layermerge.blocks import Candidate, MergeSpace
    from lit_compress.surgery.layermerge.dp import DPEntry, DPResult

ImportanceMethod = Literal["finetune", "loss_proxy", "uniform"]
LatencyTarget = Literal["convs", "network"]
PLAN_FORMAT = "lit_compress.layermerge_plan"


def _classification_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int | None, int]:
    """Cross-entropy (and the number correct) of ``model`` on an ``(x, y)`` classification batch."""
    if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[1], torch.Tensor)):
        raise ConfigError(
            "LayerMerge importance needs (inputs, class labels) batches; for other tasks pass a plan with "
            "`load_plan`, or use importance='loss_proxy' with a classification-style loader."
        )
    x, y = batch[0], batch[1]
    out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    if not (isinstance(out, torch.Tensor) and out.dim() == 2 and not y.is_floating_point()):
        raise ConfigError("LayerMerge importance: the model must return (B, classes) logits for integer labels.")
    loss = nn.functional.cross_entropy(out.float(), y)
    return loss, int((out.argmax(1) == y).sum()), int(y.shape[0])


class SearchPlan(TypedDict):
    """The searched (or loaded) plan: ``blocks`` ``[[start, end, [kept sites]], ...]``, its numbers,
    and the (1-based) conv sites that ``targets`` selects."""

    kind: Literal["plan"]
    blocks: list[list[Any]]
    summary: dict[str, Any]
    sites: list[int]


class MergeStep(TypedDict):
    """The final merge of the planned network (nothing to broadcast but the decision)."""

    kind: Literal["merge"]


MergePlan = SearchPlan | MergeStep


class LayerMerge(RewarmHooks, CompressionCallback[MergePlan]):
    """LayerMerge with a latency budget: plan at fit start, fine-tune unmerged, merge at fit end.

    Args:
        budget: Target latency as a fraction of the original's, in (0, 1): of the summed table
            latency (``latency_target="convs"``, the paper's "LayerMerge-X%" is ``budget = X / 100``)
            or of the whole network's measured latency (``"network"``).
        importance: ``"finetune"`` (the paper's: a short fine-tune per candidate, ``I = exp(Δacc/100)``),
            ``"loss_proxy"`` (BN re-estimation only, ``I = exp(-Δloss/loss)``; much cheaper), or
            ``"uniform"`` (no data, no cost: every block is worth 1 in the DP, which then keeps as many
            blocks, i.e. activations, as the budget allows, the fastest such plan; a baseline for the
            measured importances). Δ is taken against the unmodified network given the same
            treatment (fine-tune or BN re-estimation, computed once), so the treatment itself is
            never a candidate's gain.
        reset_layers: With ``importance="finetune"`` only: also score each site's unmodified
            single-conv block, with its conv and BatchNorm re-initialised and then fine-tuned like
            the candidates (the authors' ``reset_layers``), so that a kept layer is charged with what
            its trained weights are worth. Costs one more fine-tune per site that some merge
            candidate covers (ResNet-20: 14 of its 18 sites, on top of its 36 candidates). Default ``False``: the DP
            sums ``log I``, in which an unmodified block is exactly worth 0 and a plan's value is its
            summed accuracy change; a plan never re-learns a kept layer, so the reset score charges
            a cost no plan pays and pushes the DP towards merging. The paper needs it because its DP
            sums ``I`` itself, where every block is worth about 1 and the reset offsets the count of
            blocks.
        importance_steps: SGD steps per candidate with ``importance="finetune"``.
        importance_lr: Learning rate of those steps (cosine to 0, Nesterov momentum 0.9).
        importance_batches: Training batches used for the fine-tune / BN re-estimation.
        holdout_batches: Further training batches (disjoint from those) on which candidates are scored.
        latency_batch_size: Batch size of the latency table (the paper: 128 on a GPU).
        latency_input_size: Height = width of the input for the latency table; default: the example
            input's (``example_input_array`` or a training batch).
        latency_device: Device for the latency table; default: the device the model trains on.
        latency_warmup: Untimed calls per entry.
        latency_repeats: Timed calls per entry and round (median).
        latency_rounds: Interleaved rounds per entry; an entry is its best round (a burst of load hits
            one round, not the table). Entries that break the kernel order (a larger kernel faster than
            a smaller one on the same layer, or slower than its multiply-adds allow by 3x) are
            re-measured, and a warning names those that stay inconsistent.
        latency_check_plan: Time the chosen plan's layers together after the DP and warn if that
            exceeds the budget or the table's sum by more than 15 % (recorded as ``measured_plan_ms``).
        latency_target: What ``budget`` is a fraction of. ``"convs"`` (the paper's): the latency table's
            sum over the conv sites. ``"network"``: the whole network's measured latency, merged and
            deployed (eval mode, BatchNorm folded), at ``latency_batch_size`` on ``latency_device``: the
            DP's plan is merged on a copy and timed interleaved with the original, and while it is
            more than 2 % over ``budget`` the conv budget is lowered and the DP solved again (the
            importance table is reused). The layers outside the table (kept activations, residual
            adds, pooling, the head) do not shrink with the plan, so a conv budget of 70 % leaves
            ResNet-20 at about 80 % of its latency on a CPU. Costs ``2 × latency_rounds ×
            (latency_warmup + latency_repeats)`` network calls per round; time on a quiet machine.
        network_rounds: ``latency_target="network"``: most DP solves; the last plan is kept (with a
            warning) if none meets the budget.
        latency_cache: JSON file caching latency tables per device/batch/shape; default:
            ``<default_root_dir>/layermerge_latency.json``. Entries from another device or shape are
            never reused.
        time_unit_ms: DP time quantum in ms; default: the original latency / 1000.
        load_plan: A plan JSON written with ``save_plan``; skips the tables and the DP.
        save_plan: Where to write the plan (JSON) after planning.
        merge_at_end: Merge at fit end (else call :func:`merge_now` or export the unmerged network).
        at_epoch: Plan at fit start (0, the paper's setting: the model is pretrained) or at the
            start of this epoch, so that one ``fit`` can pretrain, then plan and fine-tune.
        targets: fnmatch globs or ``re:`` regexes over the trunk's conv names: the sites the plan may
            merge, prune or strip of their activation; every other site keeps its conv, BatchNorm
            and activation. Default: every site.
        progress: Show progress bars while building the tables.
        bn_recalibration_batches: Re-estimate BatchNorm statistics after the plan is applied.
        rewarm_steps: Re-warm the learning rate over this many optimizer steps after the plan: step
            ``k`` (0-based) after it runs at ``(k + 1) / (rewarm_steps + 1)`` times the learning rate the
            optimizer and its scheduler set (restored right after the optimizer step, before the scheduler
            steps, so the schedule is unchanged; :mod:`lit_compress.callbacks._rewarm`). Derived from the
            plan event's recorded step, so a resumed run continues it. 0: off.
    """

    def __init__(
        self,
        budget: OpenUnitInterval = 0.5,
        importance: ImportanceMethod = "loss_proxy",
        reset_layers: bool = False,
        importance_steps: PositiveInt = 50,
        importance_lr: PositiveFloat = 0.01,
        importance_batches: PositiveInt = 8,
        holdout_batches: PositiveInt = 4,
        latency_batch_size: PositiveInt = 1,
        latency_input_size: PositiveInt | None = None,
        latency_device: str | None = None,
        latency_warmup: NonNegativeInt = 3,
        latency_repeats: PositiveInt = 10,
        latency_rounds: PositiveInt = 3,
        latency_check_plan: bool = True,
        latency_target: LatencyTarget = "convs",
        network_rounds: PositiveInt = 4,
        latency_cache: str | None = None,
        time_unit_ms: PositiveFloat | None = None,
        load_plan: str | None = None,
        save_plan: str | None = None,
        merge_at_end: bool = True,
        at_epoch: NonNegativeInt = 0,
        targets: str | list[str] | None = None,
        progress: bool = True,
        bn_recalibration_batches: NonNegativeInt = 20,
        rewarm_steps: NonNegativeInt = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(bn_recalibration_batches=bn_recalibration_batches, name=name)
        check_float("budget", budget, 0, 1, low_open=True, high_open=True)
        check_choice("importance", importance, ["finetune", "loss_proxy", "uniform"])
        check_bool("reset_layers", reset_layers)
        if reset_layers and importance != "finetune":
            raise allowed(
                "reset_layers",
                reset_layers,
                f"must be False unless importance='finetune' (got {importance!r}): a re-initialised layer is "
                "scored after a fine-tune",
            )
        for name, value in (
            ("importance_steps", importance_steps),
            ("importance_batches", importance_batches),
            ("holdout_batches", holdout_batches),
            ("latency_batch_size", latency_batch_size),
            ("latency_repeats", latency_repeats),
            ("latency_rounds", latency_rounds),
            ("network_rounds", network_rounds),
        ):
            check_int(name, value, 1)
        check_choice("latency_target", latency_target, ["convs", "network"])
        check_int("latency_input_size", latency_input_size, 1, optional=True)
        check_int("latency_warmup", latency_warmup, 0)
        check_float("importance_lr", importance_lr, 0, low_open=True)
        check_float("time_unit_ms", time_unit_ms, 0, low_open=True, optional=True)
        check_int("at_epoch", at_epoch, 0)
        for name, text in (
            ("latency_device", latency_device),
            ("latency_cache", latency_cache),
            ("load_plan", load_plan),
            ("save_plan", save_plan),
        ):
            check_str(name, text, optional=True)
        check_bool("merge_at_end", merge_at_end)
        check_bool("latency_check_plan", latency_check_plan)
        check_int("rewarm_steps", rewarm_steps, 0)
        check_bool("progress", progress)
        if latency_device is not None:
            try:
                torch.device(latency_device)
            except (RuntimeError, TypeError) as err:
                what = f"a torch device string such as 'cpu' or 'cuda:0' ({err})"
                raise allowed("latency_device", latency_device, what) from err
        if load_plan is not None and not Path(load_plan).is_file():
            raise allowed("load_plan", load_plan, "an existing plan file written with `save_plan`")
        self.budget = float(budget)
        self.importance = importance
        self.reset_layers = reset_layers
        self.importance_steps = importance_steps
        self.importance_lr = float(importance_lr)
        self.importance_batches = importance_batches
        self.holdout_batches = holdout_batches
        self.latency_batch_size = latency_batch_size
        self.latency_input_size = latency_input_size
        self.latency_device = latency_device
        self.latency_warmup = latency_warmup
        self.latency_repeats = latency_repeats
        self.latency_rounds = latency_rounds
        self.latency_check_plan = latency_check_plan
        self.latency_target = latency_target
        self.network_rounds = network_rounds
        self.rewarm_steps = rewarm_steps
        self.latency_cache = latency_cache
        self.time_unit_ms = time_unit_ms
        self.load_plan = load_plan
        self.save_plan = save_plan
        self.merge_at_end = merge_at_end
        self.at_epoch = at_epoch
        self.targets = target_patterns(targets) or ["*"]
        self.progress = progress
        self.planned = False
        self.merged = False
        self.summary: dict[str, Any] = {}

    # ------------------------------------------------------------------ schedule
    @override
    def event_due(self, trainer: pl.Trainer, pl_module: L.LightningModule, moment: Moment) -> bool:
        if not self.planned:
            if self.at_epoch == 0:
                return moment == "fit_start"
            return moment == "epoch_start" and trainer.current_epoch >= self.at_epoch
        return moment == "fit_end" and not self.merged and self.merge_at_end

    @override
    def scheduled_events(self, trainer: pl.Trainer) -> list[ScheduledEvent]:
        if self.planned or self.at_epoch == 0:  # at epoch 0 the plan is made at fit start, which always comes
            return []
        merge = " (and with it the merge at fit end)" if self.merge_at_end else ""
        return [ScheduledEvent(f"the plan for budget {self.budget:g}{merge}", epoch=self.at_epoch)]

    # ------------------------------------------------------------------ LR re-warm after the plan
    @override
    def rewarm_event_step(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> int | None:
        """The plan event's recorded step in the surgery log (restored on resume)."""
        plans = [e for e in applied_events(pl_module) if e.get("op") == "layer_merge_plan" and "global_step" in e]
        return int(plans[-1]["global_step"]) if plans else None

    # ------------------------------------------------------------------ targets
    def targeted_sites(self, space: MergeSpace) -> set[int]:
        """Indices of the conv sites that ``targets`` selects.

        Raises:
            ConfigError: If ``targets`` selects none of the trunk's convs.
        """
        chosen = {s.index for s in space.sites if name_matches(s.conv, self.targets)}
        if not chosen:
            convs = ", ".join(s.conv for s in space.sites[:12])
            raise allowed("targets", self.targets, f"must select at least one conv of the trunk ({convs}, ...)")
        return chosen

    def _allowed(self, space: MergeSpace, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates that change targeted sites only (every site keeps its original candidate)."""
        chosen = self.targeted_sites(space)
        return [
            c for c in candidates if c.is_original(space) or all(i in chosen for i in range(c.start + 1, c.end + 1))
        ]

    @override
    def claimed_modules(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> list[str] | None:
        """The targeted sites' convs, BNs and activations; on residual networks every unit (a plan
        rebuilds them all) with everything in it, and the units' shortcuts."""
        from lit_compress.surgery.layermerge.blocks import analyze_merge_space

        try:
            space = analyze_merge_space(pl_module)
        except ConfigError:
            return None
        chosen = {s.index for s in space.sites if name_matches(s.conv, self.targets)}
        names = set(space.units)
        for s in space.sites:
            if s.index in chosen or s.unit in names:
                names.update(n for n in (s.conv, s.bn, s.act) if n)
        for r in space.residuals:
            if r.shortcut:
                names.add(r.shortcut)
        return sorted(names)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and not self.planned:
            # files written while planning: found unwritable now, not after the latency table or pretraining
            if self.save_plan is not None:
                check_writable("save_plan", self.save_plan)
            if self.load_plan is None:
                cache = self.latency_cache or str(Path(trainer.default_root_dir) / "layermerge_latency.json")
                check_writable("latency_cache", cache)
        if stage == "fit" and not self.planned and not applied_events(pl_module):
            from lit_compress.surgery.layermerge.blocks import analyze_merge_space

            # unsupported architectures and `targets` selecting no conv fail before training starts
            self.targeted_sites(analyze_merge_space(pl_module))

    # ------------------------------------------------------------------ planning (rank 0)
    @override
    def plan_event(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> MergePlan | None:
        if self.planned:
            return {"kind": "merge"}
        from lit_compress.surgery.layermerge.blocks import analyze_merge_space

        space = analyze_merge_space(pl_module)
        if self.load_plan is not None:
            blocks, summary = self._read_plan(space)
        else:
            blocks, summary = self._search(trainer, pl_module, space)
        if self.save_plan is not None:
            self._write_plan(space, blocks, summary)
        return {"kind": "plan", "blocks": blocks, "summary": summary, "sites": sorted(self.targeted_sites(space))}

    def _latency_table(self, trainer: pl.Trainer, pl_module: L.LightningModule, space: MergeSpace) -> _Table:
        """The candidates of the targeted sites and their latency table (measured, or read from the cache)."""
        from lit_compress.measure.latency_table import latency_table
        from lit_compress.surgery.layermerge.blocks import enumerate_candidates, original_latency, site_input_shapes

        inputs = self.reporter(trainer).example_inputs(trainer, pl_module)
        if inputs is None or not isinstance(inputs, torch.Tensor):
            raise ConfigError("LayerMerge needs a tensor example input (example_input_array or a training batch).")
        shape = list(inputs.shape[1:])
        if self.latency_input_size is not None:
            shape = [shape[0], self.latency_input_size, self.latency_input_size]
        probe = torch.zeros([1, *shape], dtype=inputs.dtype, device=inputs.device)
        site_input_shapes(pl_module, space, probe)
        candidates = self._allowed(space, enumerate_candidates(pl_module, space))
        device = torch.device(self.latency_device) if self.latency_device else pl_module.device
        cache = self.latency_cache or str(Path(trainer.default_root_dir) / "layermerge_latency.json")
        start = time.perf_counter()
        latency = latency_table(
            space,
            candidates,
            device=device,
            batch_size=self.latency_batch_size,
            warmup=self.latency_warmup,
            repeats=self.latency_repeats,
            rounds=self.latency_rounds,
            cache=cache,
            progress=self.progress,
            log=rank_zero_info,
        )
        total = original_latency(space, candidates, latency)
        return _Table(candidates, latency, total, self.time_unit_ms or total / 1000.0, shape, device, start)

    def check_budget(self, space: MergeSpace, table: _Table) -> float:
        """Refuse a budget below the fastest plan's latency; return the fastest plan's share of the original.

        Raises:
            ConfigError: Naming the budget, the fastest plan's share and the smallest budget that works.
        """
        from lit_compress.surgery.layermerge.dp import DPEntry, fastest_plan_time

        entries = [DPEntry(c.start, c.end, table.latency[c.key], 0.0, c) for c in table.candidates]
        fastest = fastest_plan_time(entries, space.depth, table.unit)
        if fastest <= math.floor(self.budget * table.total / table.unit + 1e-9) * table.unit + 1e-12:
            return fastest / table.total
        where = f"at batch {self.latency_batch_size} on {table.device}"
        if not math.isfinite(fastest) or table.total <= 0:
            raise allowed("budget", self.budget, f"no merge plan covers every conv of this network ({where})")
        share = fastest / table.total
        raise allowed(
            "budget",
            self.budget,
            f"no merge plan meets the latency budget of {self.budget * 100:.0f} % of the original latency: the "
            f"fastest plan of this network takes {share * 100:.1f} % ({fastest:.4g} of {table.total:.4g} ms in the "
            f"latency table, {where}). Use budget >= {math.ceil(share * 100 - 1e-9) / 100:.2f}",
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        self._check_budget_before_training(trainer, pl_module)
        super().on_train_start(trainer, pl_module)

    def _check_budget_before_training(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        """For a plan at a later epoch: build the latency table now (it is cached for the plan) and check the budget.

        The table depends on the architecture only, not on the weights, so an impossible budget is
        found before any training instead of after ``at_epoch`` epochs and the importance table.
        """
        from lit_compress.callbacks._distributed import broadcast_from_rank_zero
        from lit_compress.callbacks._schedule import FitLength
        from lit_compress.surgery.layermerge.blocks import analyze_merge_space

        events = self.scheduled_events(trainer)
        if self.load_plan is not None or not events or FitLength.of(trainer).misses(events[0]) is not None:
            return
        outcome: tuple[str, str] = ("ok", "")
        if trainer.is_global_zero:
            try:
                space = analyze_merge_space(pl_module)
                share = self.check_budget(space, self._latency_table(trainer, pl_module, space))
                rank_zero_info(
                    f"[lit_compress] LayerMerge: budget {self.budget * 100:.0f} % checked before training (the "
                    f"fastest plan takes {share * 100:.0f} % of the original latency); the latency table is cached "
                    f"for the plan at epoch {self.at_epoch}."
                )
            except ConfigError as err:
                outcome = ("config", str(err))
            except Exception as err:  # re-raised on every rank, so that no rank waits for rank 0 forever
                if trainer.world_size <= 1:
                    raise
                outcome = ("error", f"LayerMerge could not check its budget on rank 0: {type(err).__name__}: {err}")
        outcome = broadcast_from_rank_zero(trainer, outcome)
        if outcome[0] != "ok":
            raise (ConfigError if outcome[0] == "config" else SurgeryError)(outcome[1])

    def _search(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, space: MergeSpace
    ) -> tuple[list[list[Any]], dict[str, Any]]:
        from lit_compress.surgery.layermerge.dp import DPEntry, solve_merge_dp
        from lit_compress.surgery.layermerge.importance import dp_value

        start = time.perf_counter()
        table = self._latency_table(trainer, pl_module, space)
        candidates, latency, total, unit = table.candidates, table.latency, table.total, table.unit
        shape, device = table.shape, table.device
        latency_s = time.perf_counter() - table.started
        self.check_budget(space, table)  # before the importance table, the expensive part
        t0 = time.perf_counter()
        if self.importance == "uniform":  # every block worth 1: the DP keeps as many blocks as the budget allows
            values = {c.key: 1.0 for c in candidates}
        else:
            importance = self._importance_table(trainer, pl_module, space, candidates)
            values = {key: dp_value(i) for key, i in importance.items()}
        importance_s = time.perf_counter() - t0
        entries = [DPEntry(c.start, c.end, latency[c.key], values[c.key], c) for c in candidates]
        t0 = time.perf_counter()
        result = solve_merge_dp(entries, space.depth, self.budget * total, unit)
        dp_s = time.perf_counter() - t0
        network: dict[str, Any] = {}
        if self.latency_target == "network":
            result, network = self._meet_network_budget(pl_module, space, table, entries, result)
        blocks = [[e.start, e.end, list(e.payload.kept)] for e in result.entries]
        measured_ms = None
        if self.latency_check_plan:
            from lit_compress.measure.latency_table import check_plan_latency, measure_plan

            chosen = [e.payload for e in result.entries]
            measured_ms = measure_plan(
                space,
                chosen,
                device=device,
                batch_size=self.latency_batch_size,
                warmup=self.latency_warmup,
                repeats=self.latency_repeats,
                rounds=self.latency_rounds,
            )
            check_plan_latency(measured_ms, result.time, self.budget * total)
        summary = {
            "budget": self.budget,
            "importance": self.importance,
            "reset_layers": self.reset_layers,
            "depth": space.depth,
            "table_entries": len(candidates),
            "original_table_ms": total,
            "planned_table_ms": result.time,
            "planned_fraction": result.time / total if total > 0 else None,
            "measured_plan_ms": measured_ms,
            "dp_importance": result.importance,
            "time_unit_ms": unit,
            "kernels": [e.payload.kernel for e in result.entries],
            "latency_table_s": latency_s,
            "importance_table_s": importance_s,
            "dp_s": dp_s,
            "planning_s": time.perf_counter() - start,
            "latency_device": str(device),
            "latency_batch_size": self.latency_batch_size,
            "latency_input_shape": shape,
            "latency_target": self.latency_target,
            **network,
        }
        measured = f"; merged network {network['network_fraction']:.0%} of the original" if network else ""
        rank_zero_info(
            f"[lit_compress] LayerMerge plan: {len(blocks)} blocks for {space.depth} convs, table latency "
            f"{total:.3f} -> {result.time:.3f} ms ({result.time / max(total, 1e-12):.0%}, budget {self.budget:.0%})"
            f"{measured}; tables {latency_s:.1f} s + {importance_s:.1f} s, DP {dp_s:.2f} s"
        )
        return blocks, summary

    def _meet_network_budget(
        self, pl_module: L.LightningModule, space: MergeSpace, table: _Table, entries: list[DPEntry], first: DPResult
    ) -> tuple[DPResult, dict[str, Any]]:
        """``latency_target="network"``: lower the conv budget until the merged network meets ``budget``.

        Each round merges the DP's plan on a copy, times it against the original (deployed, interleaved)
        and, if it is over ``budget`` by more than 2 %, solves the DP again for a lower conv budget
        (:func:`~lit_compress.callbacks._layer_merge_network.next_conv_budget`). The importance table is
        reused. Returns the first plan within budget, or the fastest tried with a warning.
        """
        from lit_compress.callbacks._layer_merge_network import (
            NETWORK_TOLERANCE,
            NetworkStep,
            next_conv_budget,
            time_against_original,
        )
        from lit_compress.measure.latency_table import LatencyTableWarning
        from lit_compress.surgery.layermerge.dp import fastest_plan_time, solve_merge_dp

        example = torch.zeros([1, *table.shape], device=pl_module.device)
        floor = fastest_plan_time(entries, space.depth, table.unit) / table.total
        steps: list[NetworkStep] = []
        conv_budget: float | None = self.budget
        result = first
        start = time.perf_counter()
        for round_ in range(self.network_rounds):
            assert conv_budget is not None
            if round_ > 0:
                result = solve_merge_dp(entries, space.depth, conv_budget * table.total, table.unit)
            blocks = [[e.start, e.end, list(e.payload.kept)] for e in result.entries]
            plan_ms, dense_ms = time_against_original(
                pl_module,
                blocks,
                example,
                device=table.device,
                batch_size=self.latency_batch_size,
                warmup=self.latency_warmup,
                repeats=self.latency_repeats,
                rounds=self.latency_rounds,
            )
            steps.append(
                {
                    "conv_budget": conv_budget,
                    "table_fraction": result.time / table.total,
                    "network_ms": plan_ms,
                    "dense_ms": dense_ms,
                    "network_fraction": plan_ms / dense_ms,
                }
            )
            rank_zero_info(
                f"[lit_compress] LayerMerge network budget {self.budget:.0%}: conv budget {conv_budget:.3f} -> "
                f"merged network {plan_ms / dense_ms:.1%} of the original ({plan_ms:.3g} of {dense_ms:.3g} ms)"
            )
            if plan_ms <= self.budget * (1.0 + NETWORK_TOLERANCE) * dense_ms:
                break
            conv_budget = next_conv_budget(steps, self.budget, table.total, floor)
            if conv_budget is None:
                break
        last = steps[-1]
        if last["network_fraction"] > self.budget * (1.0 + NETWORK_TOLERANCE):
            warnings.warn(
                f"LayerMerge: no plan found meets the network latency budget of {self.budget:.0%}: the last one "
                f"(conv budget {last['conv_budget']:.3f}) measures {last['network_fraction']:.1%} of the original "
                f"after {len(steps)} round(s) (`network_rounds`={self.network_rounds}; the fastest plan takes "
                f"{floor:.1%} of the conv table). Raise `budget`, `network_rounds`, or time on a quiet machine.",
                LatencyTableWarning,
                stacklevel=2,
            )
        summary = {
            "network_fraction": last["network_fraction"],
            "network_calibration": steps,
            "network_calibration_s": time.perf_counter() - start,
        }
        return result, summary

    def _importance_table(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, space: MergeSpace, candidates: list[Candidate]
    ) -> dict[str, float]:
        """The measured importance table (``"finetune"`` or ``"loss_proxy"``) on a copy of the model."""
        from lit_compress.callbacks._inputs import isolated_rng, train_batches
        from lit_compress.surgery.layermerge.importance import importance_table

        with isolated_rng():
            batches = list(train_batches(trainer, self.importance_batches + self.holdout_batches))
        if len(batches) < 2:
            raise ConfigError("LayerMerge importance needs at least 2 training batches.")
        n_train = min(self.importance_batches, len(batches) - 1)
        work = _detached_copy(pl_module)
        with isolated_rng():
            torch.manual_seed(0)
            return importance_table(
                work,
                space,
                candidates,
                train_batches=batches[:n_train],
                holdout_batches=batches[n_train:],
                forward_loss=_classification_loss,
                method=self.importance,
                steps=self.importance_steps,
                lr=self.importance_lr,
                reset_layers=self.reset_layers,
                progress=self.progress,
            )

    def _read_plan(self, space: MergeSpace) -> tuple[list[list[Any]], dict[str, Any]]:
        assert self.load_plan is not None
        data = json.loads(Path(self.load_plan).read_text())
        if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
            raise allowed("load_plan", self.load_plan, f"a plan file of format {PLAN_FORMAT!r}")
        convs = [s.conv for s in space.sites]
        if data.get("convs") != convs:
            raise allowed("load_plan", self.load_plan, "a plan made for this network (its conv names differ)")
        chosen = self.targeted_sites(space)
        for start, end, kept in data["blocks"]:
            original = end == start + 1 and list(kept) == [end]
            if not original and any(i not in chosen for i in range(start + 1, end + 1)):
                raise allowed(
                    "load_plan", self.load_plan, f"a plan that changes only sites in `targets` (block ({start}, {end}])"
                )
        return data["blocks"], dict(data.get("summary") or {}, loaded_from=str(self.load_plan))

    def _write_plan(self, space: MergeSpace, blocks: list[list[Any]], summary: dict[str, Any]) -> None:
        assert self.save_plan is not None
        path = Path(self.save_plan)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "format": PLAN_FORMAT,
            "version": 1,
            "arch": space.arch,
            "convs": [s.conv for s in space.sites],
            "blocks": blocks,
            "summary": summary,
        }
        path.write_text(json.dumps(data, indent=1))

    # ------------------------------------------------------------------ surgery (every rank)
    @override
    def apply_event(self, pl_module: L.LightningModule, plan: MergePlan) -> list[Record]:
        from lit_compress.surgery.layermerge.plan import apply_merge_plan_, merge_planned_

        if plan["kind"] == "merge":
            records = merge_planned_(pl_module, self._merge_record(pl_module))
            self.merged = True
            records[0]["summary"] = dict(self.summary)
            return records
        records = apply_merge_plan_(pl_module, plan["blocks"])
        records[0]["summary"] = dict(plan["summary"])
        records[0]["targeted_sites"] = list(plan["sites"])
        self.summary = dict(plan["summary"])
        self.planned = True
        return records

    @override
    def recalibrates_batchnorm(self, plan: MergePlan) -> bool:
        return plan["kind"] != "merge"  # the merge is exact: no statistics may change

    @staticmethod
    def _merge_record(model: nn.Module) -> Record:
        """The applied plan's record, without the blocks of untargeted sites (the merge leaves them alone)."""
        record = _plan_record(model)
        targeted = record.get("targeted_sites")
        if targeted is None:  # a plan applied by hand, or logged before `targets` existed: merge every block
            return record
        chosen = set(targeted)
        blocks = [b for b in record["blocks"] if any(i in chosen for i in range(b[0] + 1, b[1] + 1))]
        return {**record, "blocks": blocks}

    def merge_now(self, pl_module: nn.Module) -> list[Record]:
        """Merge the planned network outside ``fit`` (e.g. with ``merge_at_end=False``); records are logged."""
        from lit_compress.surgery.layermerge.plan import merge_planned_
        from lit_compress.surgery.replay import record_events

        records = merge_planned_(pl_module, self._merge_record(pl_module))
        record_events(pl_module, records)
        self.merged = True
        return records

    # ------------------------------------------------------------------ state
    @override
    def extra_state(self) -> dict[str, Any]:
        return {"planned": self.planned, "merged": self.merged, "summary": dict(self.summary)}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.planned = bool(state.get("planned", False))
        self.merged = bool(state.get("merged", False))
        self.summary = dict(state.get("summary") or {})


@dataclass(frozen=True)
class _Table:
    """A LayerMerge latency table with what it was measured for."""

    candidates: list[Candidate]
    latency: dict[str, float]
    total: float  # the original network's summed table latency, ms
    unit: float  # the DP's time quantum, ms
    shape: list[int]
    device: torch.device
    started: float  # perf_counter when the table was started


def _plan_record(model: nn.Module) -> dict[str, Any]:
    plans = [e for e in applied_events(model) if e.get("op") == "layer_merge_plan"]
    if not plans:
        raise ConfigError("LayerMerge: the model carries no applied plan to merge.")
    if any(e.get("op") == "layer_merge_final" for e in applied_events(model)):
        raise ConfigError("LayerMerge: the model is already merged.")
    return plans[-1]


def _detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` without its Trainer reference (the copy is scored, not trained by Lightning)."""
    trainer = module.__dict__.get("_trainer")
    module.__dict__["_trainer"] = None
    try:
        return copy.deepcopy(module)
    finally:
        module.__dict__["_trainer"] = trainer


__all__ = ["LayerMerge"]
