"""``CompressionCallback``: the structural-change contract, owned once for every method.

A subclass answers three questions and may use three hooks; it never overrides :meth:`run_event`
or touches a private attribute of this base:

- WHEN: :meth:`event_due` -- a pure function of the callback's state and the Trainer's position;
- WHAT: :meth:`plan_event` -- runs on rank 0 only, returns plain data (a ``TypedDict`` of lists,
  strings and numbers: it is pickled for the broadcast) or ``None``, and changes no state of the
  callback (other ranks would not see the change);
- HOW: :meth:`apply_event` -- runs on every rank with the broadcast plan: the surgery, and the only
  place where an event changes the callback's own state;
- hooks: :meth:`recalibrates_batchnorm` (per plan), :meth:`after_event` (every rank, once the
  optimizers are rebuilt; gets the pre-event optimizer snapshot) and :meth:`after_optimizer_step`.

This base does the rest, in the order measured to work on Lightning 2.6:

1. skip the sanity check; run step events only at optimizer-step boundaries;
2. plan on rank 0, broadcast, apply on every rank to ``trainer.lightning_module``, then run it once on
   the example input; a snapshot taken before is restored exactly if anything fails up to the end of
   the first training batch after the event (:mod:`lit_compress.callbacks._verify`);
3. new modules take their parent's train/eval mode; ``*-true`` precision converts them;
4. if the plan asks for it, re-estimate BatchNorm statistics on training batches (averaged over ranks);
5. re-wrap DDP; rebuild optimizers and schedulers, keeping surviving state by parameter name;
6. barrier; append the event (plain data) to the module's log; publish metrics; :meth:`after_event`.

Checkpoints carry the log in ``checkpoint["lit_compress"]``; on ``fit(ckpt_path=...)`` the log is
replayed on the fresh module before its weights load (see :mod:`lit_compress.checkpointing`). The
callback's own state (:meth:`state_dict`) holds torch's RNG states too, so that a resumed run draws
the same dropout masks and shuffles as an uninterrupted one.

Schedule arguments mean the same in every method:

=================  ==================================================================  =========================
argument           meaning                                                             methods
=================  ==================================================================  =========================
``at_epoch``       the event (or the first of a series) runs at the start of this      ALDS, FoldBatchNorm,
                   epoch, 0-based; 0 = before any training step                        LayerFusion, LayerMerge
``at_step``        the event (or the first of a series) runs right after this          FoldBatchNorm, LayerFusion
                   optimizer step (``trainer.global_step``; 0 = after the first)
``every_n_epochs`` period of a series, in epochs                                       LayerFusion
``every_n_steps``  period of a series, in optimizer steps                              LayerFusion
``targets``        fnmatch globs or ``re:`` regexes over module names: what the        every method
                   method may change (default: everything it supports)
=================  ==================================================================  =========================

Method-specific schedule arguments: ALDS ``cascade`` (``[[epoch, keep_ratio], ...]``, each step
at the start of its epoch); LayerCollapse ``warmup``/``warmup_unit`` (the λ ramp) and
``collapse_at`` (``"epoch_start"``: check at every epoch start and at fit end; ``"fit_end"``);
LayerMerge ``merge_at_end`` (the exact merge at fit end); LayerFusion ``increments`` (how many
steps in the series; spread over ``max_epochs``/``max_steps`` without ``every_n_*``).
"""

from __future__ import annotations

import time
import weakref
from typing import Any, Generic, Literal, TypeVar

import lightning as L
import lightning.pytorch as pl
from jsonargparse.typing import NonNegativeInt
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from typing_extensions import final, override

from lit_compress.callbacks._args import check_int
from lit_compress.callbacks._distributed import (
    average_batchnorm_stats,
    broadcast_from_rank_zero,
    check_strategy_supported,
    convert_for_precision,
    destroy_gloo_group_at_exit,
    is_spawn_launcher,
    rewrap_ddp,
)
from lit_compress.callbacks._forward import inputs_from_batch
from lit_compress.callbacks._inputs import isolated_rng, rng_states, set_rng_states, train_batches
from lit_compress.callbacks._optim import OptimizerSnapshot, rebuild_optimizers
from lit_compress.callbacks._schedule import FitLength, ScheduledEvent, missed_notes, unreachable_warnings
from lit_compress.callbacks._verify import ModelSnapshot, check_forward
from lit_compress.callbacks.report import CompressionReport
from lit_compress.checkpointing import (
    SPAWN_EVENTS_KEY,
    CompressMixin,
    install_one_shot_replay,
    log_payload,
    mark_not_replayed,
    remove_one_shot_replay,
)
from lit_compress.errors import ConfigError, SurgeryError, allowed
from lit_compress.inputs import call_with
from lit_compress.surgery.integrity import STRUCTURE_KEY, structure_digest
from lit_compress.surgery.log import LOG_KEY, to_plain
from lit_compress.surgery.modules import SurgeryTransaction, preserve_mode
from lit_compress.surgery.replay import applied_events, record_events

Moment = Literal["fit_start", "epoch_start", "step", "fit_end"]
#: One entry of the surgery log: plain data (``op`` plus the method's fields).
Record = dict[str, Any]
PlanT = TypeVar("PlanT")

#: Per callback, the model as it was before its last event (values on the CPU), kept until the first
#: training batch after the event has run: restored if that batch raises. Kept outside the callback
#: (engine runtime state, not the callback's own state).
_PENDING: weakref.WeakKeyDictionary[Any, ModelSnapshot] = weakref.WeakKeyDictionary()


class CompressionCallback(Callback, Generic[PlanT]):
    """Base class of every lit_compress callback (see the module docstring for the contract and
    the schedule vocabulary).

    Args:
        bn_recalibration_batches: After each event, re-estimate BatchNorm running statistics on
            this many training batches before training goes on (0 turns it off; ignored for models
            without BatchNorm). On by default: after a structural change the old statistics no
            longer describe the new layers' outputs.
        name: Key of this callback's state in checkpoints. Default: the method's class name, or, with
            several instances of one method in a Trainer, the class name and the set of layers the
            instance resolves to, so that respelling ``targets`` on resume keeps the state. Give names
            to tell instances apart explicitly; keep a name across resumes.
    """

    def __init__(self, bn_recalibration_batches: NonNegativeInt = 20, name: str | None = None) -> None:
        check_int("bn_recalibration_batches", bn_recalibration_batches, 0)
        self.bn_recalibration_batches = int(bn_recalibration_batches)
        if name is not None and (not isinstance(name, str) or not name.strip()):
            raise allowed("name", name, "must be a non-empty string, or None for the default state key")
        self.name = name
        self._resolved_key: str | None = None
        self.events_done = 0
        self._last_global_step = -1
        self._reporter: CompressionReport | None = None
        self._train_loop_started = False

    # ------------------------------------------------------------------ subclass API
    def event_due(self, trainer: pl.Trainer, pl_module: L.LightningModule, moment: Moment) -> bool:
        """Whether an event should run now; ``moment`` says which hook is asking.

        Called on every rank, where it must give the same answer: read the callback's state and the
        Trainer's position only, and change nothing.
        """
        return False

    def plan_event(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> PlanT | None:
        """Decide what the event does; return plain data, or ``None`` to skip.

        Runs on rank 0 only (the plan is broadcast): it must not change the callback's state, which
        the other ranks would never see. Store what the plan decides in :meth:`apply_event`.
        """
        raise NotImplementedError

    def apply_event(self, pl_module: L.LightningModule, plan: PlanT) -> list[Record]:
        """Apply ``plan`` to the module (every rank); return the log records of what was done."""
        raise NotImplementedError

    def recalibrates_batchnorm(self, plan: PlanT) -> bool:
        """Whether BatchNorm statistics are re-estimated after applying ``plan`` (an exact change says no)."""
        return True

    def after_event(
        self,
        trainer: pl.Trainer,
        pl_module: L.LightningModule,
        records: list[Record],
        snapshot: OptimizerSnapshot | None,
    ) -> None:
        """Called on every rank after each due event, once optimizers are rebuilt and the event is logged.

        ``records`` are the event's log entries (still mutable: fields added here are checkpointed);
        ``snapshot`` holds the optimizer and scheduler state from before the event. Both are empty
        (``[]``, ``None``) when :meth:`plan_event` returned ``None``. :attr:`events_done` already counts
        the event.
        """

    def after_optimizer_step(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        """Called on every rank after each optimizer step, before step events are checked."""

    def claimed_modules(self, trainer: pl.Trainer | None, pl_module: L.LightningModule) -> list[str] | None:
        """Qualified names of the modules this callback will restructure, or ``None`` if unknown.

        Called once at ``setup`` (before any event) for every lit_compress callback of the Trainer; two
        callbacks claiming the same module is a :class:`ConfigError` before training starts.
        """
        return None

    def scheduled_events(self, trainer: pl.Trainer) -> list[ScheduledEvent]:
        """The epoch- or step-scheduled events this callback has still to run, with when each is due.

        Before training starts, an event the fit never reaches (``max_epochs``, ``max_steps``, the
        steps of an epoch) is a warning; at fit end, one still listed is a warning and a report line.
        Events run at fit end and events that depend on the model's state are not listed. Default: none.
        """
        return []

    def shortfalls(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> list[str]:
        """At fit end: what the callback set out to do and did not finish, one sentence each (default: none).

        Pending :meth:`scheduled_events` are reported by the base; this is for the rest (e.g. a
        LayerCollapse slope that never got within ``tau`` of 1).
        """
        return []

    @final
    def unfinished(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> list[str]:
        """At fit end: the pending scheduled events and the :meth:`shortfalls`, one sentence each."""
        name = type(self).__name__
        return missed_notes(name, self.scheduled_events(trainer), trainer) + self.shortfalls(trainer, pl_module)

    def extra_state(self) -> dict[str, Any]:
        """Subclass state saved with the callback (plain data)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` saved."""

    # ------------------------------------------------------------------ the event
    @final
    def run_event(self, trainer: pl.Trainer, pl_module: L.LightningModule, moment: Moment) -> list[Record]:
        """Run one structural event now, following the contract; return its log records."""
        reporter = self.reporter(trainer)
        before = reporter.measure_before_event(trainer, pl_module)
        start = time.perf_counter()

        plan = self._plan_on_rank_zero(trainer, pl_module)
        if plan is None:
            self.after_event(trainer, pl_module, [], None)
            return []
        _announce_structural_change(trainer, pl_module)
        snapshot = OptimizerSnapshot.capture(trainer, pl_module)
        model_snapshot = ModelSnapshot(pl_module)
        inputs = reporter.example_inputs(trainer, pl_module)
        if inputs is not None and not _runs(trainer, pl_module, inputs):
            inputs = None  # the inputs fail on the unchanged model too: no evidence either way
        strategy = trainer.strategy
        optimizers = (strategy.model, list(strategy.optimizers), list(strategy.lr_scheduler_configs))
        records: list[Record] = []
        try:
            old_modules = {id(m) for m in pl_module.modules()}
            with SurgeryTransaction(), preserve_mode(pl_module):
                records = self.apply_event(pl_module, plan)
            _align_new_module_modes(pl_module, old_modules)
            convert_for_precision(trainer, pl_module)
            if inputs is not None:
                _check_forward_for(trainer, pl_module, inputs, model_snapshot.changed_modules())
            recalibrated = self._recalibrate_batchnorm(trainer, pl_module) if self.recalibrates_batchnorm(plan) else 0
            rewrapped = rewrap_ddp(trainer, pl_module)
            optimizer_counts = rebuild_optimizers(trainer, pl_module, snapshot)
        except Exception as err:
            model_snapshot.restore()
            strategy.model, strategy.optimizers, strategy.lr_scheduler_configs = optimizers
            ops = ", ".join(str(r.get("op")) for r in records) or "the surgery itself"
            kind = ConfigError if isinstance(err, ConfigError) else SurgeryError  # a bad argument stays one
            raise kind(
                f"{type(self).__name__}: the event at epoch {trainer.current_epoch}, step {trainer.global_step} "
                f"({ops}) failed: {err}. The model was restored exactly as it was before the event."
            ) from err
        if not any(cb in _PENDING for cb in _callbacks_of(trainer)):  # the earliest pre-event model is restored
            _PENDING[self] = model_snapshot
        trainer.strategy.barrier("lit_compress.event")
        overhead_s = time.perf_counter() - start

        # Validation metrics in `after` would be the stale ones from before the event; the report fills
        # them in at the next validation.
        after = {k: v for k, v in reporter.measure(trainer, pl_module).items() if not k.startswith("val")}
        logged = {id(e) for e in applied_events(pl_module)}
        record_events(pl_module, [r for r in records if id(r) not in logged])
        first_index = len(applied_events(pl_module)) - len(records)
        for offset, record in enumerate(records):
            record.update(
                index=first_index + offset,
                callback=type(self).__name__,
                moment=moment,
                epoch=int(trainer.current_epoch),
                global_step=int(trainer.global_step),
                before=dict(before),
                after=dict(after),
                wall_s=float(overhead_s),
                bn_recalibrated_batches=int(recalibrated),
                ddp_rewrapped=bool(rewrapped),
                **optimizer_counts,
            )
        if records:
            records[-1][STRUCTURE_KEY] = structure_digest(pl_module)
        for record in records:  # plain Python in place (the log holds these very dicts)
            plain = to_plain(record)
            record.clear()
            record.update(plain)
        self.events_done += 1
        reporter.log_stats(trainer, after)
        ops = ", ".join(r["op"] for r in records)
        rank_zero_info(
            f"[lit_compress] {type(self).__name__}: {ops} at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}: params {before.get('params')} -> {after.get('params')} "
            f"({overhead_s * 1000:.0f} ms)"
        )
        self.after_event(trainer, pl_module, records, snapshot)
        return records

    def _plan_on_rank_zero(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> PlanT | None:
        """Plan on rank 0 and broadcast; an error on rank 0 is re-raised on every rank (no hang)."""
        outcome: tuple[str, Any] = ("ok", None)
        if trainer.is_global_zero:
            try:
                outcome = ("ok", self.plan_event(trainer, pl_module))
            except Exception as err:
                if trainer.world_size <= 1:
                    raise
                outcome = ("error", f"{type(err).__name__}: {err}")
        outcome = broadcast_from_rank_zero(trainer, outcome)
        if outcome[0] == "error":
            raise SurgeryError(f"{type(self).__name__} could not plan its event on rank 0: {outcome[1]}")
        plan: PlanT | None = outcome[1]
        return plan

    def _recalibrate_batchnorm(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> int:
        if self.bn_recalibration_batches <= 0:
            return 0
        from lit_compress.surgery.bn_stats import has_batchnorm, reestimate_batchnorm_

        if not has_batchnorm(pl_module):
            return 0
        plugin = trainer.precision_plugin
        with isolated_rng():
            first = next(iter(train_batches(trainer, 1)), None)
        why = "" if first is None else inputs_from_batch(pl_module, first)[1]
        if why:
            rank_zero_warn(
                f"{type(self).__name__}: BatchNorm statistics are not re-estimated after the event: {why}, so the "
                "training batches cannot be fed to the model; pass `bn_recalibration_batches=0` to silence this."
            )
            return 0

        def forward(model: nn.Module, batch: Any) -> Any:
            with plugin.forward_context():
                return call_with(model, plugin.convert_input(inputs_from_batch(model, batch)[0]))

        with isolated_rng():
            used = reestimate_batchnorm_(
                pl_module,
                train_batches(trainer, self.bn_recalibration_batches),
                forward=forward,
                num_batches=self.bn_recalibration_batches,
            )
        average_batchnorm_stats(trainer, pl_module)
        return used

    def reporter(self, trainer: pl.Trainer) -> CompressionReport:
        """The Trainer's first ``CompressionReport``; one with defaults is added if there is none."""
        if self._reporter is None:
            found = [cb for cb in _callbacks_of(trainer) if isinstance(cb, CompressionReport)]
            if found:
                self._reporter = found[0]
            else:
                self._reporter = CompressionReport()
                _callbacks_of(trainer).append(self._reporter)
        return self._reporter

    # ------------------------------------------------------------------ Lightning hooks
    @property
    @override
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint (see ``name``); stable across respelt ``targets``.

        From ``setup`` on: ``Class{'name': ...}`` with a name, else the class name alone when the Trainer
        holds one instance of the class, else the class name and a digest of the resolved layer set.
        Before ``setup`` (when Lightning checks that keys are unique) the ``targets`` tell instances apart.
        """
        if self.name is not None:
            return self._generate_state_key(name=self.name)
        if self._resolved_key is not None:
            return self._resolved_key
        targets = getattr(self, "targets", None)
        if targets is None:
            return super().state_key
        return self._generate_state_key(targets=list(targets))

    @override
    def setup(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_strategy_supported(trainer, type(self).__name__)
        destroy_gloo_group_at_exit()
        self.reporter(trainer)
        install_one_shot_replay(pl_module)
        if self.name is None:
            self._resolved_key = _stable_state_key(trainer, pl_module, self)
        if stage == "fit":
            self._train_loop_started = False
            _refuse_weight_averaging(trainer, type(self).__name__)
            _check_claims_once(trainer, pl_module, self)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint holding lit_compress callback state that no callback of the Trainer claims
        (when resuming ``fit``; ``validate``/``test``/``predict`` continue no schedule)."""
        methods = [cb for cb in _callbacks_of(trainer) if isinstance(cb, CompressionCallback)]
        if methods and methods[0] is self and trainer.state.fn == "fit":
            _check_unclaimed_states(checkpoint, methods)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        self._train_loop_started = True
        remove_one_shot_replay(pl_module)
        if not pl_module.training:
            rank_zero_warn(
                f"{type(self).__name__}: the module is in eval mode at the start of training (Lightning keeps "
                "the mode the module is given): BatchNorm statistics stay frozen and dropout is off. Call "
                "`model.train()` before `trainer.fit(model)` unless that is intended."
            )
        self._last_global_step = trainer.global_step
        for message in unreachable_warnings(type(self).__name__, self.scheduled_events(trainer), FitLength.of(trainer)):
            rank_zero_warn(message)
        if self.event_due(trainer, pl_module, "fit_start"):
            self.run_event(trainer, pl_module, "fit_start")

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking and self.event_due(trainer, pl_module, "epoch_start"):
            self.run_event(trainer, pl_module, "epoch_start")

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # An optimizer step happened in this batch iff global_step moved (correct also on the last,
        # incomplete accumulation window of an epoch, where `batch_idx`-based tests are wrong).
        _PENDING.pop(self, None)  # a training batch ran on the changed model
        if trainer.global_step == self._last_global_step:
            return
        self._last_global_step = trainer.global_step
        self.after_optimizer_step(trainer, pl_module)
        if not trainer.sanity_checking and self.event_due(trainer, pl_module, "step"):
            self.run_event(trainer, pl_module, "step")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """The first training batch after an event failed: restore the pre-event model, say so on the error."""
        pending = _PENDING.pop(self, None)
        if pending is None or not isinstance(exception, Exception):  # not on KeyboardInterrupt
            return
        changed = pending.changed_modules()
        pending.restore()
        note = (
            f"lit_compress: this failed in the first training batch after a {type(self).__name__} event (changed: "
            f"{', '.join(f'`{n}`' for n in changed[:5]) or 'weights only'}); the model was restored exactly as it "
            "was before the event. Events are checked on example inputs before training goes on when the module "
            "sets `example_input_array` or its forward takes the batch's first element."
        )
        add_note = getattr(exception, "add_note", None)  # Python >= 3.11
        if callable(add_note):
            add_note(note)
        else:
            rank_zero_warn(note)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        _PENDING.pop(self, None)
        if self.event_due(trainer, pl_module, "fit_end"):
            self.run_event(trainer, pl_module, "fit_end")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        # Resuming from a checkpoint taken after the last epoch skips the whole training loop, and
        # with it `on_train_end`: the fit-end event (e.g. LayerMerge's final merge) would be lost.
        if not self._train_loop_started and self.event_due(trainer, pl_module, "fit_end"):
            self.run_event(trainer, pl_module, "fit_end")

    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        checkpoint[LOG_KEY] = log_payload(pl_module)
        mark_not_replayed(checkpoint, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        _PENDING.pop(self, None)  # e.g. after a fit-end event: nothing runs on the changed model here
        remove_one_shot_replay(pl_module)
        if stage != "fit" or not is_spawn_launcher(trainer):
            return
        self._hand_over_to_launcher(pl_module)

    def _hand_over_to_launcher(self, pl_module: L.LightningModule) -> None:
        if not applied_events(pl_module):
            return
        if isinstance(pl_module, CompressMixin):
            _send_events_to_launcher(pl_module)
        else:
            rank_zero_warn(
                "lit_compress: under `ddp_spawn` the model object in the launching process is a copy that "
                "Lightning refreshes with `load_state_dict(strict=False)`, so it keeps its ORIGINAL architecture "
                f"and misses the {len(applied_events(pl_module))} structural event(s) applied in the workers. "
                "Reload the compressed model from a checkpoint with "
                "`lit_compress.load_from_checkpoint(YourModule, path)`, add `lit_compress.CompressMixin` as the "
                "first base class of your LightningModule (then the launching process follows automatically), "
                "or use `strategy='ddp'`."
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        """``events_done``, torch's RNG states (Lightning saves none; they make a resume bit-exact with
        dropout or shuffling) and the subclass's :meth:`extra_state`, as plain Python data (``int``/``float``
        subclasses such as the CLI's ``PositiveInt`` become ``int``/``float``, tuples lists), which
        ``torch.load(weights_only=True)`` accepts."""
        state = {"events_done": self.events_done, "rng": rng_states(), **self.extra_state()}
        plain: dict[str, Any] = to_plain(state)
        plain[_STATE_MARK] = type(self).__name__
        return plain

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.events_done = int(state_dict.get("events_done", 0))
        if state_dict.get("rng") is not None:
            set_rng_states(state_dict["rng"])
        self.load_extra_state(state_dict)


def _runs(trainer: pl.Trainer, pl_module: L.LightningModule, inputs: Any) -> bool:
    """Whether the module runs on ``inputs`` (before an event: else the inputs, not the event, are at fault)."""
    try:
        _check_forward_for(trainer, pl_module, inputs, [])
    except Exception:
        return False
    return True


def _check_forward_for(trainer: pl.Trainer, pl_module: L.LightningModule, inputs: Any, changed: list[str]) -> None:
    """:func:`check_forward` under the Trainer's precision (inputs converted, autocast context)."""
    plugin = trainer.precision_plugin
    with plugin.forward_context(), isolated_rng():
        check_forward(pl_module, plugin.convert_input(inputs), changed)


#: Key marking a lit_compress callback's state in ``checkpoint["callbacks"]``.
_STATE_MARK = "lit_compress_callback"


def target_patterns(targets: str | list[str] | tuple[str, ...] | None) -> list[str] | None:
    """``targets`` as a list of patterns: a single string is one pattern (never split into characters).

    Raises:
        ConfigError: For anything but a string, a list/tuple of strings, or ``None``.
    """
    if targets is None:
        return None
    if isinstance(targets, str):
        return [targets]
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise allowed("targets", targets, "must be a pattern string, a list of pattern strings, or None")
    return list(targets)


def _stable_state_key(trainer: pl.Trainer, pl_module: L.LightningModule, callback: CompressionCallback[Any]) -> str:
    """The class name if ``callback`` is the only instance of its class in the Trainer, else the class
    name and a digest of the layers it resolves to (its ``targets`` as written if it cannot say)."""
    import hashlib

    cls = type(callback)
    same = [cb for cb in _callbacks_of(trainer) if type(cb) is cls and getattr(cb, "name", None) is None]
    if len(same) <= 1:
        return cls.__qualname__
    try:
        layers = callback.claimed_modules(trainer, pl_module)
    except Exception:
        layers = None
    if layers is None:
        layers = list(getattr(callback, "targets", None) or [])
    digest = hashlib.sha256("\n".join(sorted(layers)).encode()).hexdigest()[:12]
    return callback._generate_state_key(layers=digest)


def _check_unclaimed_states(checkpoint: dict[str, Any], methods: list[CompressionCallback[Any]]) -> None:
    """Raise if ``checkpoint["callbacks"]`` holds lit_compress callback state no callback in ``methods`` claims.

    A state of an older checkpoint (keyed by ``targets``) is handed to the one callback of its class
    that has no state of its own in the checkpoint, when that is unambiguous.
    """
    states = checkpoint.get("callbacks")
    if not isinstance(states, dict):
        return
    keys = {cb.state_key for cb in methods}
    unclaimed = [
        k for k, v in states.items() if isinstance(k, str) and k not in keys and _lit_compress_class(k, v) is not None
    ]
    for key in list(unclaimed):
        cls_name = _lit_compress_class(key, states[key])
        candidates = [cb for cb in methods if type(cb).__name__ == cls_name and cb.state_key not in states]
        same_class_left = [k for k in unclaimed if _lit_compress_class(k, states[k]) == cls_name]
        if len(candidates) == 1 and len(same_class_left) == 1 and _STATE_MARK not in states[key]:
            states[candidates[0].state_key] = states.pop(key)  # a pre-`name` checkpoint keyed by `targets`
            unclaimed.remove(key)
    if unclaimed:
        present = ", ".join(f"{type(cb).__name__} (state key {cb.state_key!r})" for cb in methods)
        raise ConfigError(
            f"The checkpoint holds lit_compress callback state under {', '.join(repr(k) for k in unclaimed)} that "
            f"no callback of this Trainer claims; the Trainer has: {present}. Resuming would run that "
            "callback's schedule again from the start. Add the callback that wrote it with the same `name` (or "
            "the same layers), or give the callback meant to continue it `name=` matching that key."
        )


def _lit_compress_class(key: Any, state: Any) -> str | None:
    """The lit_compress callback class name that wrote ``state`` under ``key``, or ``None`` if not ours."""
    if isinstance(state, dict) and isinstance(state.get(_STATE_MARK), str):
        return str(state[_STATE_MARK])
    if not isinstance(key, str):
        return None
    head = key.split("{", 1)[0]
    return head if head in _method_class_names() else None


def _method_class_names() -> set[str]:
    names: set[str] = set()
    todo: list[type[Any]] = [CompressionCallback]
    while todo:
        cls = todo.pop()
        subclasses: list[type[Any]] = cls.__subclasses__()
        for sub in subclasses:
            names.add(sub.__qualname__)
            todo.append(sub)
    return names


def _callbacks_of(trainer: pl.Trainer) -> list[Callback]:
    """``trainer.callbacks`` (Lightning assigns the list at run time without declaring it on the class)."""
    callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
    return callbacks


def _check_claims_once(trainer: pl.Trainer, pl_module: L.LightningModule, caller: CompressionCallback[Any]) -> None:
    """Refuse two lit_compress callbacks that would restructure the same module (first callback only)."""
    methods = [cb for cb in _callbacks_of(trainer) if isinstance(cb, CompressionCallback)]
    if not methods or methods[0] is not caller or applied_events(pl_module):
        return
    owner: dict[str, str] = {}
    clashes: list[str] = []
    for cb in methods:
        claimed = cb.claimed_modules(trainer, pl_module)
        for name in claimed or []:
            label = f"{type(cb).__name__}#{methods.index(cb)}"
            if name in owner and owner[name] != label:
                clashes.append(f"`{name}` ({owner[name]} and {label})")
            owner.setdefault(name, label)
    if clashes:
        raise ConfigError(
            "two lit_compress callbacks claim the same module(s): "
            + ", ".join(clashes[:10])
            + (f" and {len(clashes) - 10} more" if len(clashes) > 10 else "")
            + ". Give each callback disjoint `targets`."
        )


#: Classes (by name, anywhere in the MRO) and attributes that mark a weight-averaging callback.
_AVERAGING_CLASSES = {"WeightAveraging", "StochasticWeightAveraging", "EMAWeightAveraging"}
_AVERAGING_ATTRIBUTES = ("_average_model", "_swa_epoch_start", "average_model")


def is_weight_averaging(callback: object) -> bool:
    """Whether ``callback`` keeps an averaged copy of the model (SWA, EMA, any ``WeightAveraging`` subclass)."""
    if any(cls.__name__ in _AVERAGING_CLASSES for cls in type(callback).__mro__):
        return True
    return any(hasattr(callback, name) for name in _AVERAGING_ATTRIBUTES)


def _refuse_weight_averaging(trainer: pl.Trainer, who: str) -> None:
    """Refuse a weight-averaging callback next to a structural one, before any training.

    Raises:
        ConfigError: Naming both callbacks and why.
    """
    for callback in _callbacks_of(trainer):
        if is_weight_averaging(callback):
            raise ConfigError(
                f"`{type(callback).__name__}` cannot be used together with `{who}`: it keeps an averaged copy of "
                f"the model with the original architecture, while `{who}` changes the model's structure during "
                "training, so the averaged weights no longer fit the model (a size mismatch after the first "
                "event). Remove the weight-averaging callback, or average in a second `fit` on the compressed model."
            )


def _align_new_module_modes(model: nn.Module, old_modules: set[int]) -> None:
    """Give every module created by the surgery the train/eval mode of its parent."""
    for parent in model.modules():
        for child in parent.children():
            if id(child) not in old_modules:
                child.train(parent.training)


def _send_events_to_launcher(module: nn.Module) -> None:
    """Add the event log to the state dict that ``ddp_spawn`` sends back to the launching process."""
    if getattr(module, "_lit_compress_spawn_hook", None) is not None:
        return

    def hook(mod: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        if prefix == "":
            state_dict[SPAWN_EVENTS_KEY] = [to_plain(e) for e in applied_events(mod)]

    module.__dict__["_lit_compress_spawn_hook"] = module.register_state_dict_post_hook(hook)


def _announce_structural_change(trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
    """Tell every callback with a ``before_structural_change(trainer, pl_module)`` method (e.g.
    :class:`~lit_compress.callbacks.Distillation`, which takes its teacher then) that the model is about
    to change; called on every rank, after the plan is known and before anything is modified."""
    for callback in _callbacks_of(trainer):
        announce = getattr(callback, "before_structural_change", None)
        if callable(announce):
            announce(trainer, pl_module)
