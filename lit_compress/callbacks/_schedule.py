"""Does a scheduled event fall inside the fit? The arithmetic behind the schedule checks.

Every lit_compress callback lists the events it still has to run (:class:`ScheduledEvent`: what, and
the epoch or optimizer step it is due at). Before training starts each one is compared with the
fit's length (:class:`FitLength`: ``max_epochs``, ``max_steps`` and the optimizer steps of one
epoch, which ``limit_train_batches`` and ``accumulate_grad_batches`` set); an event the fit never
reaches is a warning that names the length it needs. At fit end an event still pending is a
warning and a line of the compression report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl


@dataclass(frozen=True)
class ScheduledEvent:
    """One event a callback will run: ``what`` it does, at the start of ``epoch`` or after ``step``.

    ``epoch`` is 0-based (the event runs at that epoch's start); ``step`` is ``trainer.global_step``
    (the event runs once that many optimizer steps are done; 0 means after the first). Exactly one is set.
    """

    what: str
    epoch: int | None = None
    step: int | None = None

    def when(self) -> str:
        """``"at the start of epoch 6"`` or ``"after optimizer step 500"``."""
        if self.epoch is not None:
            return f"at the start of epoch {self.epoch}"
        return f"after optimizer step {max(int(self.step or 0), 1)}"


@dataclass(frozen=True)
class FitLength:
    """How far a fit goes: ``None`` means unbounded (or unknown, for ``steps_per_epoch``)."""

    max_epochs: int | None
    max_steps: int | None
    steps_per_epoch: int | None

    @classmethod
    def of(cls, trainer: pl.Trainer) -> FitLength:
        """The length of ``trainer``'s fit; ``steps_per_epoch`` is known once the train dataloader is loaded."""
        max_epochs = getattr(trainer, "max_epochs", None)
        max_steps = getattr(trainer, "max_steps", -1)
        return cls(
            max_epochs=int(max_epochs) if max_epochs is not None and max_epochs >= 0 else None,
            max_steps=int(max_steps) if max_steps is not None and max_steps >= 0 else None,
            steps_per_epoch=steps_per_epoch(trainer),
        )

    def epochs_started(self) -> int | None:
        """How many epochs start (a ``max_steps`` reached mid-run ends the fit before the next one)."""
        bounds = []
        if self.max_epochs is not None:
            bounds.append(self.max_epochs)
        if self.max_steps is not None and self.steps_per_epoch:
            bounds.append(math.ceil(self.max_steps / self.steps_per_epoch))
        return min(bounds) if bounds else None

    def total_steps(self) -> int | None:
        """Optimizer steps the fit runs (``None``: unbounded or unknown)."""
        bounds = []
        if self.max_steps is not None:
            bounds.append(self.max_steps)
        if self.max_epochs is not None and self.steps_per_epoch:
            bounds.append(self.max_epochs * self.steps_per_epoch)
        return min(bounds) if bounds else None

    def describe(self) -> str:
        """E.g. ``"runs 1 epoch of 16 optimizer steps (max_epochs=1)"``, ``"stops after 40 optimizer steps (...)"``."""
        settings = []
        if self.max_epochs is not None:
            settings.append(f"max_epochs={self.max_epochs}")
        if self.max_steps is not None:
            settings.append(f"max_steps={self.max_steps}")
        epochs, steps = self.epochs_started(), self.total_steps()
        if epochs is not None and self.steps_per_epoch:
            text = f"runs {_plural(epochs, 'epoch')} of {_plural(self.steps_per_epoch, 'optimizer step')}"
            if steps is not None and steps < epochs * self.steps_per_epoch:
                text += f", stopping after step {steps}"
        elif epochs is not None:
            text = f"runs {_plural(epochs, 'epoch')}"
        elif steps is not None:
            text = f"stops after {_plural(steps, 'optimizer step')}"
        else:
            text = "has no set length"
        return f"{text} ({', '.join(settings)})" if settings else text

    def misses(self, event: ScheduledEvent) -> str | None:
        """What ``event`` needs that this fit lacks (e.g. ``"max_epochs >= 7"``), or ``None`` if it runs."""
        needs = []
        if event.epoch is not None:
            epoch = int(event.epoch)
            if self.max_epochs is not None and self.max_epochs <= epoch:
                needs.append(f"max_epochs >= {epoch + 1}")
            if self.max_steps is not None and self.steps_per_epoch and self.max_steps <= epoch * self.steps_per_epoch:
                needs.append(f"max_steps >= {epoch * self.steps_per_epoch + 1} (or -1)")
        else:
            step = max(int(event.step or 0), 1)
            if self.max_steps is not None and self.max_steps < step:
                needs.append(f"max_steps >= {step} (or -1)")
            if self.max_epochs is not None and self.steps_per_epoch and self.max_epochs * self.steps_per_epoch < step:
                needs.append(f"max_epochs >= {math.ceil(step / self.steps_per_epoch)}")
        return " and ".join(needs) or None


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def steps_per_epoch(trainer: pl.Trainer) -> int | None:
    """Optimizer steps in one training epoch, or ``None`` before the dataloader is known (or if it has no length)."""
    batches: Any = getattr(trainer, "num_training_batches", None)
    if batches is None or isinstance(batches, bool) or not isinstance(batches, (int, float)):
        return None
    if not math.isfinite(batches) or batches <= 0:
        return None
    accumulate = max(1, int(getattr(trainer, "accumulate_grad_batches", 1) or 1))
    return max(1, math.ceil(int(batches) / accumulate))


def unreachable_warnings(owner: str, events: list[ScheduledEvent], length: FitLength) -> list[str]:
    """The warning (one per callback, or none) about the events of ``events`` that a fit of ``length`` never reaches."""
    missed = [(event, need) for event in events if (need := length.misses(event)) is not None]
    if not missed:
        return []
    if len(missed) == 1:
        event, need = missed[0]
        return [
            f"{owner}: {event.what} is scheduled {event.when()}, but this fit {length.describe()}, so it will "
            f"NOT run. It needs {need}; or schedule it earlier."
        ]
    (first, first_need), (last, last_need) = missed[0], missed[-1]
    return [
        f"{owner}: {len(missed)} of its {len(events)} scheduled events will NOT run: this fit {length.describe()}. "
        f"The first, {first.what} {first.when()}, needs {first_need}; the last, {last.what} {last.when()}, needs "
        f"{last_need}. Lengthen the fit or schedule them earlier."
    ]


def missed_notes(owner: str, events: list[ScheduledEvent], trainer: pl.Trainer) -> list[str]:
    """At fit end: sentences saying which of ``events`` (those still pending) did not happen, and why."""
    epoch, step = int(trainer.current_epoch), int(trainer.global_step)

    def reached(event: ScheduledEvent) -> bool:
        if event.epoch is not None:
            return epoch > event.epoch
        return step >= max(int(event.step or 0), 1)

    out = []
    idle = [e for e in events if reached(e)]
    if idle:
        names = ", ".join(e.what for e in idle[:3]) + (f" and {len(idle) - 3} more" if len(idle) > 3 else "")
        out.append(f"{owner}: {names} came due but made no change to the model.")
    skipped = [e for e in events if not reached(e)]
    if skipped:
        ended = (
            f"the fit ended after {epoch} epoch{'s' if epoch != 1 else ''} "
            f"({step} optimizer step{'s' if step != 1 else ''})"
        )
        if len(skipped) == 1:
            out.append(f"{owner}: {skipped[0].what} (scheduled {skipped[0].when()}) did NOT run: {ended}.")
        else:
            out.append(
                f"{owner}: {len(skipped)} scheduled events did NOT run, from {skipped[0].what} "
                f"({skipped[0].when()}) to {skipped[-1].what} ({skipped[-1].when()}): {ended}."
            )
    return out


__all__ = ["FitLength", "ScheduledEvent", "missed_notes", "steps_per_epoch", "unreachable_warnings"]
