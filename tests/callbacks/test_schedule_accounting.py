"""Every scheduled event is accounted for (issue 19, case 1 and 2).

An event that the fit never reaches is a warning before training starts, naming the event and the
length it needs; at fit end an event still pending, or a LayerCollapse slope left short of ``tau``,
is a warning and a line of the report; a fit without any event says "no structural change".
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.callbacks import ALDS, CompressionReport, FoldBatchNorm, LayerCollapse, LayerFusion, LayerMerge
from lit_compress.callbacks._schedule import FitLength, ScheduledEvent, unreachable_warnings
from tests.callbacks._toy import MLPNet, ToyNet


def trainer_for(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        **kwargs,
    )


def report(tmp_path: Path) -> CompressionReport:
    return CompressionReport(output_dir=str(tmp_path / "report"), print_report=False)


def fit_recording(trainer: L.Trainer, model: L.LightningModule) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return [str(w.message) for w in caught]


class TiedNet(L.LightningModule):
    """Three same-shape Linear(16, 16) layers and a head: something for Layer Fusion to tie."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.example_input_array = torch.zeros(2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)), 8)


def test_a_fold_after_the_last_epoch_is_warned_before_training_and_reported_at_the_end(tmp_path: Path) -> None:
    # the quickstart with --trainer.max_epochs 1: the fold is scheduled for epoch 6
    trainer = trainer_for(tmp_path, [FoldBatchNorm(at_epoch=6), report(tmp_path)], max_epochs=1)
    with pytest.warns(
        UserWarning, match=r"FoldBatchNorm: the BatchNorm fold is scheduled at the start of epoch 6"
    ) as w:
        trainer.fit(ToyNet())
    messages = [str(m.message) for m in w]
    before = next(m for m in messages if "will NOT run" in m)
    assert "runs 1 epoch of 8 optimizer steps (max_epochs=1)" in before and "It needs max_epochs >= 7" in before
    assert any("the BatchNorm fold (scheduled at the start of epoch 6) did NOT run" in m for m in messages)
    doc = json.loads((tmp_path / "report" / "compression_report.json").read_text())
    assert doc["summary"]["structural_change"] is False and doc["summary"]["latency_verdict"] is None
    assert len(doc["notes"]) == 1 and "did NOT run: the fit ended after 1 epoch (8 optimizer steps)" in doc["notes"][0]
    markdown = (tmp_path / "report" / "compression_report.md").read_text()
    assert "**no structural change**" in markdown and "**Did not happen:**" in markdown


def test_a_fusion_series_that_starts_after_the_fit_names_the_first_and_last_step(tmp_path: Path) -> None:
    # layer_fusion.yaml with max_epochs 2 and at_epoch 5
    fusion = LayerFusion(fraction=0.2, increments=4, every_n_epochs=1, at_epoch=5, bn_recalibration_batches=0)
    trainer = trainer_for(tmp_path, [fusion, report(tmp_path)], max_epochs=2)
    with pytest.warns(UserWarning, match=r"LayerFusion: 4 of its 4 scheduled events will NOT run") as w:
        trainer.fit(TiedNet())
    text = next(str(m.message) for m in w if "will NOT run" in str(m.message))
    assert "fusion step 1 of 4 at the start of epoch 5, needs max_epochs >= 6" in text
    assert "fusion step 4 of 4 at the start of epoch 8, needs max_epochs >= 9" in text
    notes = json.loads((tmp_path / "report" / "compression_report.json").read_text())["notes"]
    assert notes == [
        "LayerFusion: 4 scheduled events did NOT run, from fusion step 1 of 4 (at the start of epoch 5) to fusion "
        "step 4 of 4 (at the start of epoch 8): the fit ended after 2 epochs (8 optimizer steps)."
    ]


@pytest.mark.parametrize(
    ("fold", "limits", "needs"),
    [
        ({"at_step": 30}, {"max_epochs": 2, "limit_train_batches": 4}, "It needs max_epochs >= 8"),
        ({"at_step": 10}, {"max_steps": 5}, "It needs max_steps >= 10 (or -1)"),
        ({"at_epoch": 2}, {"max_epochs": 10, "max_steps": 10}, "It needs max_steps >= 17 (or -1)"),
    ],
)
def test_step_schedules_and_step_limits_are_checked(
    tmp_path: Path, fold: dict[str, int], limits: dict[str, int], needs: str
) -> None:
    trainer = trainer_for(tmp_path, [FoldBatchNorm(**fold), report(tmp_path)], **limits)
    with pytest.warns(UserWarning, match="will NOT run") as w:
        trainer.fit(ToyNet())
    assert any(needs in str(m.message) for m in w), [str(m.message) for m in w]


def test_a_schedule_that_fits_is_silent_and_the_report_has_no_notes(tmp_path: Path) -> None:
    trainer = trainer_for(tmp_path, [FoldBatchNorm(at_epoch=1), report(tmp_path)], max_epochs=2, limit_train_batches=2)
    messages = fit_recording(trainer, ToyNet())
    assert not [m for m in messages if "NOT run" in m or "no change" in m]
    doc = json.loads((tmp_path / "report" / "compression_report.json").read_text())
    assert doc["notes"] == [] and doc["summary"]["structural_change"] is True
    assert "no structural change" not in (tmp_path / "report" / "compression_report.md").read_text()


def test_a_layer_collapse_slope_short_of_tau_is_a_warning_and_a_report_line(tmp_path: Path) -> None:
    # λ = 0: nothing pulls the slopes towards 1, so neither MLP can collapse
    trainer = trainer_for(tmp_path, [LayerCollapse(lambda_final=0.0, tau=0.05), report(tmp_path)], max_epochs=1)
    with pytest.warns(UserWarning, match=r"LayerCollapse: the MLP `classifier.0` → `classifier.3` ended with slope"):
        trainer.fit(MLPNet(optimizer="sgd", lr=0.01))
    notes = json.loads((tmp_path / "report" / "compression_report.json").read_text())["notes"]
    assert len(notes) == 2 and all("short of tau" in n and "NOT collapsed" in n for n in notes)
    assert "at `classifier.1`" in notes[0] and "at `classifier.4`" in notes[1]


def test_fit_length_arithmetic() -> None:
    eight = FitLength(max_epochs=3, max_steps=None, steps_per_epoch=8)
    assert eight.epochs_started() == 3 and eight.total_steps() == 24
    assert eight.misses(ScheduledEvent("x", epoch=2)) is None
    assert eight.misses(ScheduledEvent("x", epoch=3)) == "max_epochs >= 4"
    assert eight.misses(ScheduledEvent("x", step=24)) is None
    assert eight.misses(ScheduledEvent("x", step=25)) == "max_epochs >= 4"
    capped = FitLength(max_epochs=None, max_steps=20, steps_per_epoch=8)  # epochs 0, 1, 2 start
    assert capped.epochs_started() == 3 and capped.misses(ScheduledEvent("x", epoch=3)) == "max_steps >= 25 (or -1)"
    assert capped.describe() == "runs 3 epochs of 8 optimizer steps, stopping after step 20 (max_steps=20)"
    assert FitLength(None, 20, None).describe() == "stops after 20 optimizer steps (max_steps=20)"
    unbounded = FitLength(max_epochs=None, max_steps=None, steps_per_epoch=None)
    assert unbounded.misses(ScheduledEvent("x", epoch=10**6)) is None
    assert unbounded.misses(ScheduledEvent("x", step=0)) is None
    assert (
        FitLength(None, 0, 8).misses(ScheduledEvent("x", step=0)) == "max_steps >= 1 (or -1)"
    )  # step 0: after the first


def test_alds_and_layer_merge_list_their_pending_events() -> None:
    alds = ALDS(cascade=[[1, 0.6], [4, 0.3]])
    events = alds.scheduled_events(None)  # type: ignore[arg-type]
    assert [(e.epoch, e.what) for e in events] == [
        (1, "the compression to keep_ratio 0.6 (cascade step 1 of 2)"),
        (4, "the compression to keep_ratio 0.3 (cascade step 2 of 2)"),
    ]
    alds.events_done = 1
    assert [e.epoch for e in alds.scheduled_events(None)] == [4]  # type: ignore[arg-type]
    (warning,) = unreachable_warnings("ALDS", events, FitLength(2, None, 8))  # epoch 1 runs, epoch 4 does not
    assert warning.startswith("ALDS: the compression to keep_ratio 0.3 (cascade step 2 of 2) is scheduled at the start")
    assert "It needs max_epochs >= 5" in warning
    (warning,) = unreachable_warnings("ALDS", events, FitLength(1, None, 8))
    assert "2 of its 2 scheduled events" in warning and "the last, the compression to keep_ratio 0.3" in warning
    merge = LayerMerge(budget=0.5, at_epoch=3)
    assert merge.scheduled_events(None) == [  # type: ignore[arg-type]
        ScheduledEvent("the plan for budget 0.5 (and with it the merge at fit end)", epoch=3)
    ]
    assert LayerMerge(at_epoch=0).scheduled_events(None) == []  # type: ignore[arg-type]
