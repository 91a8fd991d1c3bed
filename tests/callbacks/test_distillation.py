"""``Distillation``: the loss it adds, the teacher it takes, resume, DDP, bf16, and the errors that lead."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lit_compress.callbacks import CompressionReport, Distillation
from lit_compress.callbacks.distillation import distillation_loss
from lit_compress.errors import ConfigError
from tests.callbacks._toy import HashRecorder, SplitLinear, ToyNet, ToyNetWithMixin, state_hash


def trainer_for(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_val_batches=0,
        callbacks=[*callbacks, CompressionReport(print_report=False)],
    )
    options.update(kwargs)
    return L.Trainer(**options)


def test_the_loss_equals_a_hand_computation() -> None:
    student = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.5, 0.5, 1.0]])
    t = 2.0
    expected = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        ps = [math.exp(v / t) for v in s_row]
        pt = [math.exp(v / t) for v in t_row]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        expected += sum(b * math.log(b / a) for a, b in zip(ps, pt))
    expected = t * t * expected / 2
    assert distillation_loss(student, teacher, t).item() == pytest.approx(expected, rel=1e-6)
    assert distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-7)
    # a language model's (B, T, V) logits: averaged over every token
    lm_s, lm_t = student.reshape(1, 2, 3), teacher.reshape(1, 2, 3)
    assert distillation_loss(lm_s, lm_t, t).item() == pytest.approx(expected, rel=1e-6)


class Recorder(L.Callback):
    """Keeps the loss of every training step and the teacher's logits on a fixed batch."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))


def test_the_step_mixes_task_and_distillation_losses_after_the_first_event(tmp_path: Path, seed: int) -> None:
    model = ToyNet(scheduler="none")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    distill = Distillation(alpha=0.25, temperature=3.0)
    recorder = Recorder()
    trainer_for(tmp_path, [SplitLinear(at_epoch=1, rank=4), distill, recorder], max_epochs=2).fit(model)
    teacher = distill.teacher
    assert teacher is not None and not any(p.requires_grad for p in teacher.parameters())
    # the teacher is the model just before the event: the original architecture, trained for one epoch
    assert isinstance(teacher.mid, nn.Linear) and isinstance(model.mid, nn.Sequential)
    assert any(not torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    per_epoch = len(recorder.losses) // 2
    x, y = next(iter(model.train_dataloader()))
    model.eval()
    with torch.no_grad():
        task = nn.functional.cross_entropy(model(x), y)
        kd = distillation_loss(model(x), teacher(x), 3.0)
    # one more step's loss, recomputed by hand with the callback's formula
    wrapped = Distillation(alpha=0.25, temperature=3.0)
    wrapped.teacher = teacher
    wrapped._install(model)
    model._trainer = None  # outside fit: `self.log` is a no-op
    got = model.training_step((x, y), 0)
    wrapped._uninstall()
    torch.testing.assert_close(got, 0.75 * task + 0.25 * kd)
    assert len(recorder.losses) == 2 * per_epoch and distill.last_kd_loss is not None


def test_resume_with_distillation_is_bit_exact(tmp_path: Path) -> None:
    def run(root: Path, ckpt: str | None = None) -> tuple[ToyNetWithMixin, Distillation]:
        L.seed_everything(0, verbose=False)
        model = ToyNetWithMixin(scheduler="step_epoch")
        distill = Distillation()
        checkpoints = ModelCheckpoint(dirpath=str(root / "ckpt"), save_top_k=-1, every_n_epochs=1)
        trainer_for(
            root, [SplitLinear(at_epoch=1, rank=4), distill, checkpoints], max_epochs=4, enable_checkpointing=True
        ).fit(model, ckpt_path=ckpt)
        return model, distill

    full, full_distill = run(tmp_path / "a")
    ckpt = sorted((tmp_path / "a" / "ckpt").glob("epoch=1*.ckpt"))[0]
    resumed, resumed_distill = run(tmp_path / "b", str(ckpt))
    assert state_hash(resumed) == state_hash(full)
    assert state_hash(resumed_distill.teacher) == state_hash(full_distill.teacher)  # the teacher was restored
    saved = torch.load(ckpt, weights_only=True)
    assert not any("teacher" in k for k in saved["state_dict"])  # not in the module's state dict


def test_distillation_keeps_ranks_identical_under_ddp_spawn(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[SplitLinear(at_step=2), Distillation(), HashRecorder(str(tmp_path))],
    )
    trainer.fit(ToyNetWithMixin())
    after = [(tmp_path / f"after_event_rank{r}.txt").read_text() for r in (0, 1)]
    end = [(tmp_path / f"end_rank{r}.txt").read_text() for r in (0, 1)]
    assert after[0] == after[1] and end[0] == end[1] and end[0] != after[0]


def test_bf16_mixed(tmp_path: Path, seed: int) -> None:
    model = ToyNet(scheduler="none")
    distill = Distillation()
    trainer_for(tmp_path, [SplitLinear(at_epoch=1, rank=4), distill], max_epochs=2, precision="bf16-mixed").fit(model)
    assert distill.last_kd_loss is not None and math.isfinite(distill.last_kd_loss)


class CallsASubmodule(ToyNet):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.head(self.mid(self.fc1(x))), y)


class ReturnsADict(ToyNet):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return {"scores": super().forward(x)}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x)["scores"], y)


class ReturnsADictWithHook(ReturnsADict):
    def distillation_logits(self, output: dict[str, torch.Tensor]) -> torch.Tensor:
        return output["scores"]


@pytest.mark.parametrize(
    ("cls", "message"),
    [(CallsASubmodule, r"Call `self\(inputs\)` in training_step"), (ReturnsADict, "def distillation_logits")],
)
def test_a_module_without_the_hook_gets_an_error_naming_it(tmp_path: Path, seed: int, cls: type, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        trainer_for(tmp_path, [SplitLinear(at_epoch=1, rank=4), Distillation()], max_epochs=2).fit(
            cls(scheduler="none")
        )


def test_the_logits_hook_is_used(tmp_path: Path, seed: int) -> None:
    distill = Distillation()
    trainer_for(tmp_path, [SplitLinear(at_epoch=1, rank=4), distill], max_epochs=2).fit(
        ReturnsADictWithHook(scheduler="none")
    )
    assert distill.last_kd_loss is not None


def test_teacher_from_a_checkpoint(tmp_path: Path, seed: int) -> None:
    teacher_model = ToyNetWithMixin(scheduler="none")
    trainer = trainer_for(tmp_path / "t", [SplitLinear(at_epoch=1, rank=4)], max_epochs=2, enable_checkpointing=True)
    trainer.fit(teacher_model)
    path = trainer.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    distill = Distillation(teacher_checkpoint=path)
    trainer_for(tmp_path / "s", [distill], max_epochs=1).fit(ToyNetWithMixin(scheduler="none"))
    assert distill.teacher is not None and isinstance(distill.teacher.mid, nn.Sequential)  # the log was replayed
    assert state_hash(distill.teacher) == state_hash(teacher_model)
    assert distill.last_kd_loss is not None and distill.last_kd_loss > 0  # distilled from the first step


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"alpha": 0.0}, "alpha"), ({"alpha": 1.5}, "alpha"), ({"temperature": 0}, "temperature"),
     ({"temperature": float("inf")}, "temperature"), ({"temperature": float("nan")}, "temperature")],
)  # fmt: skip
def test_bad_arguments_are_named(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ConfigError, match=f"`{name}`"):
        Distillation(**kwargs)
