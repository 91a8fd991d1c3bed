"""``ALDS`` (Liebenwein, Maalouf et al., NeurIPS 2021): globally allocated low-rank decomposition.

At the start of a chosen epoch every target ``Conv2d`` (groups = 1) and ``Linear`` becomes a
k-group encoder followed by a 1×1 decoder, with ``(k, j)`` per layer chosen so the worst relative
error is as small as possible while the whole model keeps ``keep_ratio`` of its parameters
(:mod:`lit_compress.surgery.alds.allocate`; the surgery is :mod:`lit_compress.surgery.alds.low_rank`).
Training then goes on as retraining, with the learning-rate schedule rewound (see ``rewind_lr``).

With ``budget="latency"`` the budget is time instead: each target layer and a few of its
decompositions are timed on the training device (:mod:`lit_compress.measure.alds_latency`, cached)
and the worst error is minimised so the targets' summed time is at most ``latency_ratio`` × dense
(:mod:`lit_compress.surgery.alds.latency_budget`).

A **cascade** of ``(epoch, keep_ratio)`` pairs repeats this: before each new compression every
decomposed layer is recomposed into a dense weight and ALDS runs again on the current weights.

The allocation runs on rank 0 (with a progress bar when it takes more than a second) and is
broadcast. Decomposed layers get new parameter names (``<layer>.encoder.weight``,
``<layer>.decoder.weight/bias``), so their optimizer state (momentum, Adam moments) starts fresh
after each event; recomposed layers likewise.
"""

from __future__ import annotations

import inspect
import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Literal, TypedDict

import lightning as L
import lightning.pytorch as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import override

from lit_compress.callbacks._args import check_bool, check_choice, check_int
from lit_compress.callbacks._inputs import isolated_rng
from lit_compress.callbacks._optim import OptimizerSnapshot
from lit_compress.callbacks._schedule import ScheduledEvent
from lit_compress.callbacks._types import UnitFraction
from lit_compress.callbacks.base import CompressionCallback, Moment, Record, target_patterns
from lit_compress.errors import ConfigError, allowed
from lit_compress.surgery.alds.allocate import (
    Allocation,
    allocate,
    check_guards,
    dense_param_count,
    min_keep_ratio,
    target_layers,
)
from lit_compress.surgery.alds.latency_budget import allocate_latency
from lit_compress.surgery.alds.low_rank import LowRankLayer, LowRankPlan, low_rank_decompose_, low_rank_recompose_
from lit_compress.surgery.select import select_modules

_TYPES = (nn.Conv2d, nn.Linear, LowRankLayer)


class ALDSPlan(TypedDict):
    """One ALDS event (plain data, broadcast from rank 0).

    ``layers``: the target layers (resolved once); ``recompose``: decomposed layers made dense
    first; ``decompose``: ``{name: {"groups": k, "rank": j}}``; ``summary``: the allocation's numbers.
    """

    layers: list[str]
    recompose: list[str]
    decompose: LowRankPlan
    summary: dict[str, Any]


class ALDS(CompressionCallback[ALDSPlan]):
    """Compress with ALDS, one-shot or as a cascade of keep ratios, with LR rewinding.

    Args:
        keep_ratio: One-shot: the fraction (0, 1] of the model's parameters to keep, all parameters
            counted (BatchNorm, biases and untouched layers included; a decomposed layer counts its
            encoder and decoder).
        at_epoch: One-shot: compress at the start of this epoch (0-based; 0 = before any training,
            i.e. compress the weights the model starts ``fit`` with).
        cascade: Iterative mode instead: ``[[epoch, keep_ratio], ...]`` with increasing epochs; at
            each epoch start every decomposed layer is recomposed and ALDS runs again. Keep ratios are
            relative to the dense (original) model.
        method: ``"alds"``; or a baseline for comparison: ``"uniform"`` (plain SVD, k = 1, the same
            fraction of every layer's rank) or ``"energy"`` (plain SVD, each layer keeps the same
            fraction of its squared singular values); baselines use the same budget accounting.
        targets: fnmatch globs or ``re:`` regexes over module names; default every ``Conv2d`` and
            ``Linear`` (the first conv and the classifier included). Depthwise/grouped convs,
            layers whose weight is shared (tied embeddings), the ``out_proj`` of an
            ``nn.MultiheadAttention`` and ``linear1``/``linear2`` of an ``nn.TransformerEncoderLayer``
            (their parents read ``.weight`` directly) are skipped with a warning.
        seed: Seed of the random starting ``k`` (seeds 4 and later); the allocation is deterministic.
        num_seeds: Starting points of the search (the paper's code: 15).
        alternations: Global/local rounds per starting point (the paper's code: 4).
        error: The per-layer error the allocation minimises the worst of: ``"exact"`` (default), the
            exact relative Frobenius error ‖Ŵ − W‖_F/‖W‖_F of the decomposition; ``"lower_bound"``:
            max_i σ_{j+1}(W_i)/σ₁(W), the authors' code, a lower bound of the paper's Eq. (1) that
            pushes k to the channel count (slow depthwise + 1×1 layers); ``"theorem"``: Theorem 1's
            upper bound, √k times the lower bound.
        min_rank: Smallest rank kept per group (default 2; rank-1 layers cost accuracy).
        min_saving: A layer is decomposed only if that saves at least this fraction of its weights
            (default 0.1); otherwise it stays dense (a barely smaller pair of layers is slower on CPU).
        rewind_lr: LR rewinding: after each compression the LR schedulers go back ``retrain_epochs``
            epochs (never before their start), so retraining reuses the learning rates of the
            epochs [e − r, e) that preceded it, as in the paper. With ``False`` the schedule continues.
        retrain_epochs: ``r``; default: the epochs until the next cascade step or the end of ``fit``.
        progress: Show a progress bar while the error tables are computed (rank 0, after 1 s).
        budget: ``"params"`` (the paper's: ``keep_ratio`` or ``cascade``) or ``"latency"``: one event at
            ``at_epoch`` that makes the targets' summed measured latency at most ``latency_ratio`` × their
            dense latency (each layer takes the fastest measured decomposition within the error threshold;
            a layer whose decompositions are all slower stays dense).
        latency_ratio: ``budget="latency"``: the target fraction (0, 1] of the targets' dense latency.
        latency_groups: ``budget="latency"``: the ``k`` timed (those dividing a layer's input channels).
        latency_ranks: ``budget="latency"``: ranks timed per ``k`` (others are interpolated).
        latency_batch_size: ``budget="latency"``: batch size the layers are timed at.
        latency_device: ``budget="latency"``: device to time on; default: the one the model trains on.
        latency_threads: ``budget="latency"``: CPU threads to time with (default: as set).
        latency_cache: ``budget="latency"``: JSON cache of the tables; default
            ``<default_root_dir>/alds_latency.json`` (keyed by device, torch, dtype, batch and threads).
        latency_guard: ``budget="params"``: also time the candidates (the ``latency_*`` options) and
            keep dense every layer whose decompositions are not ``min_saving`` faster than it; only the
            timed ``k`` are searched.
        bn_recalibration_batches: See :class:`CompressionCallback` (re-estimating BatchNorm statistics
            after the decomposition is on by default).
    """

    def __init__(
        self,
        keep_ratio: UnitFraction | None = None,
        at_epoch: NonNegativeInt = 0,
        cascade: list[tuple[NonNegativeInt, UnitFraction]] | None = None,
        method: Literal["alds", "uniform", "energy"] = "alds",
        targets: str | list[str] | None = None,
        seed: int = 0,
        num_seeds: PositiveInt = 15,
        alternations: PositiveInt = 4,
        error: Literal["exact", "lower_bound", "theorem"] = "exact",
        min_rank: PositiveInt = 2,
        min_saving: float = 0.1,
        rewind_lr: bool = True,
        retrain_epochs: NonNegativeInt | None = None,
        progress: bool = True,
        bn_recalibration_batches: NonNegativeInt = 20,
        budget: Literal["params", "latency"] = "params",
        latency_ratio: UnitFraction | None = None,
        latency_groups: list[PositiveInt] | None = None,
        latency_ranks: PositiveInt = 4,
        latency_batch_size: PositiveInt = 1,
        latency_device: str | None = None,
        latency_threads: PositiveInt | None = None,
        latency_cache: str | None = None,
        latency_guard: bool = False,
        name: str | None = None,
    ) -> None:
        super().__init__(bn_recalibration_batches=bn_recalibration_batches, name=name)
        if budget not in ("params", "latency"):
            raise allowed("budget", budget, "must be 'params' or 'latency'")
        if budget == "latency":
            _check_ratio("latency_ratio", latency_ratio, "must be in (0, 1] with budget='latency'")
            if keep_ratio is not None or cascade is not None:
                raise allowed("keep_ratio", keep_ratio, "None with budget='latency' (give `latency_ratio`, no cascade)")
            keep_ratio = latency_ratio
            if method != "alds":
                raise allowed("method", method, "'alds' with budget='latency' (the baselines budget parameters)")
            if latency_groups is not None and (
                not latency_groups
                or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in latency_groups)
            ):
                raise allowed("latency_groups", latency_groups, "a non-empty list of ints >= 1, or None")
        elif latency_ratio is not None:
            raise allowed("latency_ratio", latency_ratio, "None unless budget='latency'")
        if cascade is not None and keep_ratio is not None:
            raise allowed("cascade", cascade, "give `keep_ratio` (one-shot) or `cascade`, not both")
        if cascade is None and keep_ratio is None:
            raise allowed("keep_ratio", keep_ratio, "give `keep_ratio` in (0, 1] (one-shot) or a `cascade`")
        if keep_ratio is not None:
            _check_ratio("keep_ratio", keep_ratio)
        check_int("at_epoch", at_epoch, 0)
        steps: list[tuple[Any, ...]] = []
        if cascade is not None:
            if isinstance(cascade, (str, bytes)) or not all(isinstance(step, (list, tuple)) for step in cascade):
                raise allowed("cascade", cascade, "a non-empty list of [epoch, keep_ratio] pairs")
            steps = [tuple(step) for step in cascade]
            if not steps or any(len(step) != 2 for step in steps):
                raise allowed("cascade", cascade, "must be a non-empty list of [epoch, keep_ratio] pairs")
            for epoch, ratio in steps:
                if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                    raise allowed("cascade", cascade, f"epochs must be integers >= 0 (got {epoch!r})")
                if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                    raise allowed("cascade", cascade, f"keep ratios must be in (0, 1] (got {ratio!r})")
            if any(b[0] <= a[0] for a, b in itertools.pairwise(steps)):
                raise allowed("cascade", cascade, "epochs must be strictly increasing")
        check_choice("method", method, ["alds", "uniform", "energy"])
        check_guards(error, min_rank, min_saving)
        for name, value in (("num_seeds", num_seeds), ("alternations", alternations)):
            check_int(name, value, 1)
        check_int("retrain_epochs", retrain_epochs, 0, optional=True)
        check_int("seed", seed)
        check_bool("rewind_lr", rewind_lr)
        check_bool("progress", progress)
        self.schedule: list[tuple[int, float]] = [(int(e), float(r)) for e, r in steps]
        if keep_ratio is not None:
            self.schedule = [(int(at_epoch), float(keep_ratio))]
        self.method, self.targets = method, target_patterns(targets) or ["*"]
        self.seed, self.num_seeds, self.alternations = int(seed), num_seeds, alternations
        self.error, self.min_rank, self.min_saving = error, min_rank, float(min_saving)
        self.rewind_lr, self.retrain_epochs = rewind_lr, retrain_epochs
        self.progress = progress
        self.budget, self.latency_groups = budget, list(latency_groups) if latency_groups else [1, 2, 4, 8]
        self.latency_ranks, self.latency_batch_size = latency_ranks, latency_batch_size
        self.latency_device, self.latency_cache = latency_device, latency_cache
        check_bool("latency_guard", latency_guard)
        self.latency_threads, self.latency_guard = latency_threads, bool(latency_guard)
        if self.latency_guard and (budget != "params" or method != "alds"):
            raise allowed("latency_guard", latency_guard, "False unless budget='params' and method='alds'")
        self.layer_names: list[str] | None = None  # resolved once, before the first event
        self.allocations: list[dict[str, Any]] = []  # a summary per event (rank 0's plan, broadcast)

    # ------------------------------------------------------------------ targets
    def resolve_targets(self, pl_module: nn.Module) -> list[str]:
        """The decomposable layers ``targets`` select (resolved once; later events reuse the names)."""
        if self.layer_names is None:
            self.layer_names = self._find_targets(pl_module)
        return self.layer_names

    def _find_targets(self, pl_module: nn.Module) -> list[str]:
        """Resolve ``targets`` on ``pl_module`` now (warns about skipped layers)."""
        inside = {n for n, m in pl_module.named_modules() if isinstance(m, LowRankLayer)}
        names = select_modules(pl_module, self.targets, types=_TYPES, require_each=False)
        names = [n for n in names if not any(n.startswith(p + ".") for p in inside)]
        ok, skipped = target_layers(pl_module, names)
        attention = [n for n, r in skipped.items() if "directly" in r]
        if attention:
            rank_zero_warn(
                f"ALDS: leaving {len(attention)} layer(s) of PyTorch's attention/transformer modules dense "
                f"({', '.join(f'`{n}`' for n in attention[:3])}{', ...' if len(attention) > 3 else ''}): "
                "nn.MultiheadAttention reads `out_proj.weight` directly, and nn.TransformerEncoderLayer reads "
                "`linear1.weight`/`linear2.weight` in its inference fast path, so a decomposed layer there would "
                "break the forward. Their other Linear layers are decomposed as usual."
            )
        for name, reason in skipped.items():
            if name not in attention:
                rank_zero_warn(f"ALDS: skipping `{name}`: {reason}.")
        if not ok:
            raise allowed(
                "targets",
                self.targets,
                "it must select at least one decomposable layer (Conv2d with groups=1, or Linear, weight not shared)"
                + (f"; skipped: {'; '.join(f'{n}: {r}' for n, r in list(skipped.items())[:5])}" if skipped else ""),
            )
        return ok

    @override
    def claimed_modules(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> list[str] | None:
        return list(self.resolve_targets(pl_module))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and self.events_done == 0 and self.budget == "params":  # latency: checked by its table
            self._check_reachable(pl_module, self.resolve_targets(pl_module))

    def _check_reachable(self, pl_module: nn.Module, names: list[str]) -> None:
        """Refuse, before training, a keep ratio below what rank ``min_rank`` in every target leaves.

        Raises:
            ConfigError: Naming ``keep_ratio`` (or ``cascade``), the value and the smallest reachable ratio.
        """
        floor = min_keep_ratio(pl_module, names, self.min_rank, self.min_saving)
        for epoch, ratio in self.schedule:
            if ratio < floor - 1e-12:
                name, value = ("keep_ratio", ratio) if len(self.schedule) == 1 else ("cascade", self.schedule)
                raise allowed(
                    name,
                    value,
                    f"even rank {self.min_rank} (`min_rank`) in every decomposable target keeps {floor:.4f} of the "
                    f"model's parameters with "
                    f"these `targets`, so keep ratio {ratio:g} (epoch {epoch}) cannot be reached; use at least "
                    f"{math.ceil(floor * 10000) / 10000:.4f} or widen `targets`",
                )

    # ------------------------------------------------------------------ schedule
    @override
    def event_due(self, trainer: pl.Trainer, pl_module: L.LightningModule, moment: Moment) -> bool:
        if moment != "epoch_start" or self.events_done >= len(self.schedule):
            return False
        return trainer.current_epoch >= self.schedule[self.events_done][0]

    @override
    def scheduled_events(self, trainer: pl.Trainer) -> list[ScheduledEvent]:
        n = len(self.schedule)
        return [
            ScheduledEvent(
                f"the compression to {'latency' if self.budget == 'latency' else 'keep'}_ratio {ratio:g}"
                + (f" (cascade step {i + 1} of {n})" if n > 1 else ""),
                epoch=epoch,
            )
            for i, (epoch, ratio) in enumerate(self.schedule)
            if i >= self.events_done
        ]

    @override
    def plan_event(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> ALDSPlan | None:
        names = self.layer_names if self.layer_names is not None else self._find_targets(pl_module)
        keep = self.schedule[self.events_done][1]
        current = sum(p.numel() for p in pl_module.parameters()) / dense_param_count(pl_module, names)
        if self.budget == "latency":
            return self._plan_latency(trainer, pl_module, names, keep)
        alloc = allocate(
            pl_module,
            names,
            keep,
            method=self.method,
            seed=self.seed,
            num_seeds=self.num_seeds,
            alternations=self.alternations,
            error=self.error,
            min_rank=self.min_rank,
            min_saving=self.min_saving,
            progress=self.progress and trainer.is_global_zero,
            current_ratio=min(1.0, current),
            latencies=self._latency_table(trainer, pl_module, names)[0] if self.latency_guard else None,
        )
        rank_zero_info(
            f"[lit_compress] ALDS ({self.method}) keep {keep:.4g}: {len(alloc.plan)} layer(s) decomposed, "
            f"{len(alloc.kept_dense)} kept dense, params {alloc.params_dense:,} -> {alloc.params_after:,} "
            f"({alloc.achieved_ratio:.4f}), max error {alloc.max_error:.4g}, allocation {alloc.seconds:.1f}s"
        )
        return self._plan(pl_module, names, alloc)

    def _plan(self, pl_module: nn.Module, names: list[str], alloc: Allocation) -> ALDSPlan:
        recompose = [n for n in names if isinstance(pl_module.get_submodule(n), LowRankLayer)]
        summary = {k: v for k, v in alloc.to_plain().items() if k not in ("plan", "errors", "skipped")}
        return ALDSPlan(layers=names, recompose=recompose, decompose=alloc.plan, summary=summary)

    def _plan_latency(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, names: list[str], ratio: float
    ) -> ALDSPlan:
        """``budget="latency"``: time the candidates (or read the cache), then allocate under the time budget."""
        table, info = self._latency_table(trainer, pl_module, names)
        show = self.progress and trainer.is_global_zero
        alloc = allocate_latency(
            pl_module,
            names,
            ratio,
            table,
            error=self.error,
            min_rank=self.min_rank,
            min_saving=self.min_saving,
            progress=show,
        )
        rank_zero_info(
            f"[lit_compress] ALDS latency {ratio:.4g}: table {info['measured']} configuration(s) timed, "
            f"{info['cached']} cached ({info['seconds']:.1f}s); {len(alloc.plan)} layer(s) decomposed, "
            f"{len(alloc.kept_dense)} kept dense, table latency {alloc.latency_ms_dense:.4g} -> "
            f"{alloc.latency_ms_after:.4g} ms, params {alloc.params_dense:,} -> {alloc.params_after:,}, "
            f"max error {alloc.max_error:.4g}"
        )
        plan = self._plan(pl_module, names, alloc)
        plan["summary"]["latency_table_s"] = round(float(info["seconds"]), 3)
        return plan

    def _latency_table(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, names: list[str]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """The targets' latency table on the training device (measured, or read from the cache)."""
        from lit_compress.measure.alds_latency import alds_latency_table

        inputs = self.reporter(trainer).example_inputs(trainer, pl_module)
        if inputs is None:
            raise ConfigError("ALDS latency table: needs an example input (example_input_array or a training batch).")
        cache = self.latency_cache or str(Path(trainer.default_root_dir) / "alds_latency.json")
        show = self.progress and trainer.is_global_zero
        with isolated_rng():  # the timing draws random inputs: keep training's RNG stream untouched
            table, info = alds_latency_table(
                pl_module,
                names,
                inputs,
                groups=self.latency_groups,
                ranks_per_group=self.latency_ranks,
                min_rank=self.min_rank,
                device=self.latency_device,
                batch_size=self.latency_batch_size,
                cache=cache,
                progress=show,
                num_threads=self.latency_threads,
            )
        return dict(table), info

    @override
    def apply_event(self, pl_module: L.LightningModule, plan: ALDSPlan) -> list[Record]:
        if self.layer_names is None:
            self.layer_names = list(plan["layers"])
        records = low_rank_recompose_(pl_module, plan["recompose"])
        decompose = low_rank_decompose_(pl_module, plan["decompose"])
        s = plan["summary"]
        decompose[0].update(
            method=s["method"],
            keep_ratio=s["keep_ratio"],
            achieved_ratio=s["achieved_ratio"],
            max_error=s["max_error"],
            kept_dense=list(s["kept_dense"]),
        )
        if s.get("budget") == "latency":
            decompose[0].update(budget="latency", table_ms=[s["latency_ms_dense"], s["latency_ms_after"]])
        self.allocations.append(dict(s))
        return records + decompose

    @override
    def after_event(
        self,
        trainer: pl.Trainer,
        pl_module: L.LightningModule,
        records: list[Record],
        snapshot: OptimizerSnapshot | None,
    ) -> None:
        """LR rewinding: move the schedulers back (the base has just restored their pre-event state)."""
        if records and self.rewind_lr:
            index = self.events_done - 1  # this event's place in the schedule
            positions = rewind_schedulers(trainer, self._retrain_epochs(trainer, index))
            for record in records:
                record["lr_rewound_to"] = positions

    def _retrain_epochs(self, trainer: pl.Trainer, index: int) -> int | None:
        if self.retrain_epochs is not None:
            return self.retrain_epochs
        epoch = int(trainer.current_epoch)
        if index + 1 < len(self.schedule):
            return self.schedule[index + 1][0] - epoch
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs > 0:
            return max(0, max_epochs - epoch)
        return None

    @override
    def extra_state(self) -> dict[str, Any]:
        return {"layer_names": self.layer_names, "allocations": self.allocations}

    @override
    def load_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("layer_names") is not None:
            self.layer_names = list(state["layer_names"])
        self.allocations = list(state.get("allocations", []))


def _check_ratio(name: str, value: Any, what: str = "must be in (0, 1]") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not 0 < value <= 1:
        raise allowed(name, value, what)


def _steps_per_epoch(trainer: pl.Trainer) -> int | None:
    batches = trainer.num_training_batches
    if batches is None or batches == float("inf") or batches <= 0:
        return None
    return max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))


def rewind_schedulers(trainer: pl.Trainer, epochs: int | None) -> list[int | None]:
    """Move every LR scheduler back ``epochs`` epochs (clamped at its start); return the new positions.

    The scheduler is replayed from its start (param groups reset to ``base_lrs``, then stepped to the
    target position), so closed-form and chainable schedulers alike land on the learning rate they
    had there. Schedulers that cannot be replayed (see :func:`unrewindable_reason`: ``ReduceLROnPlateau``,
    ``SequentialLR``, ``ChainedScheduler`` and the like) are left alone with a warning.
    """
    positions: list[int | None] = []
    for cfg in trainer.lr_scheduler_configs:
        sched = cfg.scheduler
        reason = unrewindable_reason(sched)
        if reason is not None:
            rank_zero_warn(
                f"ALDS: cannot rewind the LR scheduler {type(sched).__name__} ({reason}); it continues where it was."
            )
            positions.append(None)
            continue
        back = epochs
        if back is not None and cfg.interval == "step":
            per_epoch = _steps_per_epoch(trainer)
            back = None if per_epoch is None else back * per_epoch
        if back is None:
            if trainer.max_steps and trainer.max_steps > 0 and cfg.interval == "step":
                back = max(0, trainer.max_steps - trainer.global_step)
            else:
                rank_zero_warn("ALDS: `retrain_epochs` is unknown (no max_epochs); the LR schedule is not rewound.")
                positions.append(None)
                continue
        target = max(0, int(sched.last_epoch) - int(back))
        _replay_to(sched, target)
        positions.append(target)
    return positions


#: What replaying a scheduler from its start needs (``LRScheduler``'s closed-form machinery).
_REPLAY_NEEDS = ("optimizer", "base_lrs", "last_epoch", "_step_count", "_initial_step", "get_lr")


def unrewindable_reason(sched: Any) -> str | None:
    """Why ``sched`` cannot be replayed to an earlier position, or ``None`` if it can.

    Decided by behaviour, not by class (``ReduceLROnPlateau`` subclasses ``LRScheduler`` in recent
    torch): a ``step`` that takes a metric depends on values that cannot be replayed; a scheduler
    wrapping others (``_schedulers``) has positions of its own per child; and replaying needs the
    attributes in :data:`_REPLAY_NEEDS`.
    """
    step = getattr(sched, "step", None)
    if not callable(step):
        return "it has no `step()`"
    try:
        params = inspect.signature(step).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    if "metrics" in params or "metric" in params:
        return "its `step()` follows a monitored metric, whose past values cannot be replayed"
    if hasattr(sched, "_schedulers"):
        return "it chains other schedulers"
    missing = [name for name in _REPLAY_NEEDS if not hasattr(sched, name)]
    if missing:
        return "it lacks " + ", ".join(f"`{m}`" for m in missing)
    return None


def _replay_to(sched: torch.optim.lr_scheduler.LRScheduler, position: int) -> None:
    count = sched._step_count
    for group, base in zip(sched.optimizer.param_groups, sched.base_lrs):
        group["lr"] = base
    sched.last_epoch = -1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched._initial_step()
        for _ in range(position):
            sched.step()
    sched._step_count = max(count, 2)


__all__ = ["ALDS", "rewind_schedulers", "unrewindable_reason"]
