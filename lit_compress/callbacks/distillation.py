"""``Distillation``: knowledge distillation from the model as it was before compression.

Recovery after a structural change learns faster with the uncompressed model as a teacher (Hinton et
al. 2015; LayerCollapse's optional loss is ``0.5·CE + 0.5·KL``). The training loss becomes::

    loss = (1 − alpha) · task_loss + alpha · T² · KL(softmax(teacher / T) ‖ softmax(student / T))

with the KL divergence averaged over every prediction (each sample, or each token of a language
model). The teacher is a frozen copy of the module taken **immediately before the first structural
event of the fit** (every lit_compress callback announces its events), or the model of a checkpoint
the user names; the extra loss is applied from then on.

What the module needs: its ``training_step`` calls the module itself (``self(x)``) once, the way
almost every LightningModule does; the callback sees that call's inputs and output (a forward hook),
runs the teacher on the same inputs, and mixes the losses. If ``forward`` returns more than a logits
tensor (a dict, a Hugging Face ``ModelOutput`` without ``.logits``), add
``def distillation_logits(self, output) -> Tensor``. ``training_step`` returns the loss tensor or a
dict with ``"loss"``.

Cost: one more copy of the model's weights in memory (and once in each checkpoint, as this
callback's state: the module's own state dict stays as it is, so strict loading is unaffected), and
one forward pass of the teacher per training step, without gradients.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.nn import functional as F
from typing_extensions import override

from lit_compress.errors import ConfigError, allowed

__all__ = ["Distillation", "distillation_loss"]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, averaged over all predictions.

    Shapes: ``student`` and ``teacher`` ``(..., C)`` logits over the last dimension; the result is a
    scalar. The ``T²`` keeps the gradient's scale independent of ``T`` (Hinton et al. 2015).
    """
    if student.shape != teacher.shape:
        raise ConfigError(
            f"Distillation: the student's logits have shape {list(student.shape)} and the teacher's "
            f"{list(teacher.shape)}; they must match."
        )
    s = F.log_softmax(student.float().reshape(-1, student.shape[-1]) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().reshape(-1, teacher.shape[-1]) / temperature, dim=-1)
    return temperature**2 * F.kl_div(s, t, log_target=True, reduction="batchmean")


class Distillation(Callback):
    """Add a distillation loss from the pre-compression model (see the module docstring).

    Args:
        alpha: Weight of the distillation term in (0, 1]; the task loss gets ``1 − alpha``.
        temperature: Softmax temperature ``T`` > 0 of both teacher and student.
        teacher_checkpoint: A Lightning checkpoint of the student's module class to use as the
            teacher, built from the checkpoint's own hyperparameters (it may be wider than the
            student) with its surgery log replayed. Default: the module itself, just before the
            first structural event of the fit.
    """

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, teacher_checkpoint: str | None = None) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise allowed("alpha", alpha, "a number in (0, 1]: the weight of the distillation term")
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise allowed("temperature", temperature, "a finite number > 0")
        if teacher_checkpoint is not None and not isinstance(teacher_checkpoint, str):
            raise allowed("teacher_checkpoint", teacher_checkpoint, "a path to a checkpoint file, or None")
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.teacher_checkpoint = teacher_checkpoint
        self.teacher: nn.Module | None = None
        self._skeleton: nn.Module | None = None  # the module's architecture at setup, for a resumed teacher
        self._stored: dict[str, Tensor] | None = None
        self._wrapped: L.LightningModule | None = None
        self.last_kd_loss: float | None = None

    # ------------------------------------------------------------------ the teacher
    @override
    def setup(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.teacher_checkpoint is not None:
            self.teacher = _frozen(_teacher_from_checkpoint(pl_module, self.teacher_checkpoint))
        else:
            # Before any checkpoint is restored the module still has its original architecture: a
            # resumed fit loads the saved teacher weights into this copy.
            self._skeleton = _detached_copy(pl_module)

    def before_structural_change(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        """Called by every lit_compress callback before it changes the model: take the teacher now (once)."""
        if self.teacher is None:
            self.teacher = _frozen(_detached_copy(pl_module))
            self._stored = None
            self._skeleton = None
            rank_zero_info("[lit_compress] Distillation: teacher taken before the first structural event.")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        if self.teacher is None and self._stored is not None and self._skeleton is not None:
            self._skeleton.load_state_dict(self._stored, strict=True)
            self.teacher = _frozen(self._skeleton)
        self._skeleton, self._stored = None, None
        self._install(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: L.LightningModule) -> None:
        self._uninstall()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._uninstall()

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.teacher is None or self.teacher_checkpoint is not None:
            return {"teacher": None}
        return {"teacher": {k: v.detach().cpu().clone() for k, v in self.teacher.state_dict().items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        stored = state_dict.get("teacher")
        self._stored = dict(stored) if stored is not None else None

    # ------------------------------------------------------------------ the loss
    def _install(self, pl_module: L.LightningModule) -> None:
        if "training_step" in pl_module.__dict__:
            return
        original: Callable[..., Any] = pl_module.training_step

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if self.teacher is None:
                return original(*args, **kwargs)
            return self._distilled_step(pl_module, original, args, kwargs)

        pl_module.__dict__["training_step"] = training_step
        self._wrapped = pl_module

    def _uninstall(self) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None

    def _distilled_step(
        self, pl_module: L.LightningModule, original: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        calls: list[tuple[tuple[Any, ...], dict[str, Any], Any]] = []

        def hook(module: nn.Module, hargs: tuple[Any, ...], hkwargs: dict[str, Any], output: Any) -> None:
            if not calls:
                calls.append((hargs, hkwargs, output))

        handle = pl_module.register_forward_hook(hook, with_kwargs=True)
        try:
            out = original(*args, **kwargs)
        finally:
            handle.remove()
        if not calls:
            raise ConfigError(
                f"Distillation: `{type(pl_module).__name__}.training_step` never called the module itself, so the "
                "student's logits cannot be seen. Call `self(inputs)` in training_step (instead of a submodule "
                "directly)."
            )
        if out is None:
            return out  # the step was skipped by the module
        hargs, hkwargs, student_out = calls[0]
        student = _logits(pl_module, student_out)
        assert self.teacher is not None
        self.teacher.to(student.device)
        with torch.no_grad():
            teacher = _logits(pl_module, self.teacher(*hargs, **hkwargs))
        kd = distillation_loss(student, teacher.detach(), self.temperature)
        self.last_kd_loss = float(kd.detach())
        pl_module.log("distill/kd_loss", kd.detach(), on_step=True, on_epoch=True, batch_size=student.shape[0])
        if isinstance(out, Tensor):
            return (1 - self.alpha) * out + self.alpha * kd.to(out.dtype)
        if isinstance(out, Mapping) and isinstance(out.get("loss"), Tensor):
            mixed = dict(out)
            mixed["loss"] = (1 - self.alpha) * out["loss"] + self.alpha * kd.to(out["loss"].dtype)
            return mixed
        raise ConfigError(
            f"Distillation: `{type(pl_module).__name__}.training_step` returned {type(out).__name__}; it must return "
            "the loss tensor or a dict with a 'loss' tensor (automatic optimization)."
        )


def _logits(module: L.LightningModule, output: Any) -> Tensor:
    custom = getattr(module, "distillation_logits", None)
    if callable(custom):
        found = custom(output)
    elif isinstance(output, Tensor):
        found = output
    else:
        found = getattr(output, "logits", None)
    if not isinstance(found, Tensor):
        raise ConfigError(
            f"Distillation: `{type(module).__name__}.forward` returned {type(output).__name__}, not a logits tensor. "
            f"Add `def distillation_logits(self, output) -> Tensor` to {type(module).__name__}, returning the "
            "logits (last dimension: classes or vocabulary) from what forward returns."
        )
    return found


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _detached_copy(module: nn.Module) -> nn.Module:
    """A deep copy without the Trainer reference (and without hooks that point back to a callback)."""
    trainer = module.__dict__.get("_trainer")
    step = module.__dict__.pop("training_step", None)
    module.__dict__["_trainer"] = None
    try:
        return copy.deepcopy(module)
    finally:
        module.__dict__["_trainer"] = trainer
        if step is not None:
            module.__dict__["training_step"] = step


def _teacher_from_checkpoint(pl_module: L.LightningModule, path: str) -> nn.Module:
    """The checkpoint's model, built by the student's class from the checkpoint's own hyperparameters
    (so a teacher of another width works), with its surgery log replayed before its weights load."""
    from lit_compress.checkpointing import load_from_checkpoint

    try:
        teacher: nn.Module = load_from_checkpoint(type(pl_module), path, map_location="cpu")
    except (OSError, RuntimeError, KeyError) as err:
        raise allowed(
            "teacher_checkpoint", path, f"a readable Lightning checkpoint of {type(pl_module).__name__} ({err})"
        ) from None
    return teacher
