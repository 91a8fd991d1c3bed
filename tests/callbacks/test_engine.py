"""The structural-change contract, on a tiny model with a test-only event (tests/callbacks/_toy.py)."""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lit_compress
from lit_compress.callbacks import CompressionReport
from lit_compress.errors import ReplayError
from lit_compress.surgery import applied_events
from lit_compress.surgery.log import strip_measurements
from tests.callbacks._toy import SplitLinear, ToyNet, ToyNetWithMixin


def make_trainer(tmp_path: Any, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    defaults: dict[str, Any] = dict(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[*callbacks, CompressionReport(measure_flops=False, print_report=False)],
    )
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class TransplantSpy(Callback):
    """Snapshots optimizer/scheduler state at the batch end of step `at`, checks it at the next batch start."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before: dict[str, Any] = {}
        self.checked = False

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if trainer.global_step == self.at and not self.before:
            opt = trainer.optimizers[0]
            self.before = {
                "opt_id": id(opt),
                "exp_avg": opt.state[pl_module.fc1.weight]["exp_avg"].clone(),
                "step": opt.state[pl_module.fc1.weight]["step"].clone(),
                "lr": opt.param_groups[0]["lr"],
                "last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
            }

    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self.before and not self.checked:
            opt = trainer.optimizers[0]
            assert id(opt) != self.before["opt_id"], "the optimizer was not rebuilt"
            assert torch.equal(opt.state[pl_module.fc1.weight]["exp_avg"], self.before["exp_avg"])
            assert torch.equal(opt.state[pl_module.fc1.weight]["step"], self.before["step"])
            assert opt.param_groups[0]["lr"] == self.before["lr"]
            assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == self.before["last_epoch"]
            new_params = list(pl_module.mid.parameters())
            in_opt = {id(q) for g in opt.param_groups for q in g["params"]}
            assert all(id(p) in in_opt for p in new_params)
            assert all(len(opt.state[p]) == 0 for p in new_params), "new parameters must start fresh"
            self.checked = True


def test_optimizer_transplant_keeps_adam_moments_and_lr_schedule(tmp_path: Any, seed: int) -> None:
    spy = TransplantSpy(at=5)
    model = ToyNet(optimizer="adam", scheduler="lambda_step")
    trainer = make_trainer(tmp_path, [spy, SplitLinear(at_step=5)])
    trainer.fit(model)
    assert spy.checked
    assert isinstance(model.mid, torch.nn.Sequential)
    # The schedule continued: 16 steps in all, lr = lr0 * 0.9**16, exactly as without an event.
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.last_epoch == 16
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.9**16)
    # Surviving parameters kept stepping: Adam's step counts all 16 updates; new ones only 11.
    assert int(trainer.optimizers[0].state[model.fc1.weight]["step"]) == 16
    assert int(trainer.optimizers[0].state[model.mid[0].weight]["step"]) == 11
    record = applied_events(model)[0]
    assert record["optimizer_state_kept"] == 6 and record["optimizer_state_fresh"] == 3


def test_sgd_momentum_and_epoch_scheduler_survive(tmp_path: Any, seed: int) -> None:
    model = ToyNet(optimizer="sgd", scheduler="step_epoch")
    trainer = make_trainer(tmp_path, [SplitLinear(at_epoch=1)], max_epochs=3)
    trainer.fit(model)
    opt = trainer.optimizers[0]
    assert "momentum_buffer" in opt.state[model.fc1.weight]
    # StepLR(gamma=0.5) stepped after epochs 0, 1 and 2: 1e-2 * 0.5**3, no restart at the event.
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5**3)
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == 3


def test_step_events_run_only_at_accumulation_boundaries(tmp_path: Any, seed: int) -> None:
    class StepWatcher(Callback):
        def __init__(self) -> None:
            self.stepped_batches: list[int] = []
            self.last = 0

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step != self.last:
                self.stepped_batches.append((trainer.current_epoch, batch_idx))
                self.last = trainer.global_step

    watcher = StepWatcher()
    event = SplitLinear(at_step=3)
    # 7 batches per epoch, windows of 3: Lightning steps at batches 2, 5 and 6 (the incomplete last window).
    model = ToyNet(samples=56, batch_size=8)
    trainer = make_trainer(tmp_path, [watcher, event], max_epochs=2, accumulate_grad_batches=3)
    trainer.fit(model)
    assert watcher.stepped_batches[:3] == [(0, 2), (0, 5), (0, 6)]
    record = applied_events(model)[0]
    # The 3rd step is the incomplete last window (epoch 0, batch 6), where `(batch_idx + 1) % 3` would say no.
    assert record["global_step"] == 3 and record["epoch"] == 0
    assert event.seen_sanity_checking == [False]


class CrashAt(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def _resume_trainer(tmp_path: Any, extra: list[Callback], precision: str = "32-true") -> L.Trainer:
    ckpt = ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    return make_trainer(
        tmp_path,
        [SplitLinear(at_epoch=1, bn_recalibration_batches=2), ckpt, *extra],
        max_epochs=4,
        deterministic=True,
        enable_checkpointing=True,
        precision=precision,
    )


def test_resume_after_event_matches_uninterrupted_run(tmp_path: Any) -> None:
    L.seed_everything(0, verbose=False)
    model_a = ToyNet(optimizer="adam", scheduler="lambda_step")
    trainer_a = _resume_trainer(tmp_path / "a", [])
    trainer_a.fit(model_a)

    L.seed_everything(0, verbose=False)
    model_b = ToyNet(optimizer="adam", scheduler="lambda_step")
    with pytest.raises(RuntimeError, match="simulated crash"):
        _resume_trainer(tmp_path / "b", [CrashAt(epoch=3)]).fit(model_b)
    ckpt_path = tmp_path / "b" / "epoch=1.ckpt"  # saved after the event of epoch 1
    assert [e["op"] for e in torch.load(ckpt_path, weights_only=True)["lit_compress"]["events"]] == [
        "test_split_linear"
    ]

    fresh = ToyNet(optimizer="adam", scheduler="lambda_step")  # original architecture
    trainer_c = _resume_trainer(tmp_path / "c", [])
    trainer_c.fit(fresh, ckpt_path=str(ckpt_path))

    sd_a, sd_c = model_a.state_dict(), fresh.state_dict()
    assert sd_a.keys() == sd_c.keys()
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_c[key]), key
    opt_a, opt_c = trainer_a.optimizers[0], trainer_c.optimizers[0]
    for (na, pa), (nc, pc) in zip(model_a.named_parameters(), fresh.named_parameters()):
        assert na == nc
        for k in opt_a.state[pa]:
            assert torch.equal(opt_a.state[pa][k], opt_c.state[pc][k]), (na, k)
    assert opt_a.param_groups[0]["lr"] == opt_c.param_groups[0]["lr"]
    assert [strip_measurements(e) for e in applied_events(model_a)] == [
        strip_measurements(e) for e in applied_events(fresh)
    ]
    # The callback's own state was restored too: no second event after the resume.
    assert len(applied_events(fresh)) == 1


def test_checkpoint_loads_weights_only_and_strict(tmp_path: Any, seed: int) -> None:
    model = ToyNet()
    ckpt_cb = ModelCheckpoint(dirpath=str(tmp_path), save_last=True)
    trainer = make_trainer(tmp_path, [SplitLinear(at_step=2), ckpt_cb], enable_checkpointing=True, max_epochs=1)
    trainer.fit(model)
    path = tmp_path / "last.ckpt"
    raw = torch.load(path, weights_only=True)
    assert raw["lit_compress"]["version"] == 1
    assert [e["op"] for e in raw["lit_compress"]["events"]] == ["test_split_linear"]

    with pytest.raises(RuntimeError, match="Missing key"):
        ToyNet.load_from_checkpoint(path)  # a plain class cannot load it on its own...
    loaded = lit_compress.load_from_checkpoint(ToyNet, str(path))  # ...but through lit_compress it can
    mixin = ToyNetWithMixin.load_from_checkpoint(path)  # and so can a class with the mixin, strictly
    assert "on_load_checkpoint" not in ToyNet.__dict__  # the class patch was removed
    x = torch.randn(5, 16)
    model.eval(), loaded.eval(), mixin.eval()
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(mixin(x), model(x), rtol=0, atol=0)


def test_unreplayable_log_names_the_event_and_changes_nothing(tmp_path: Any) -> None:
    model = ToyNet()
    keys_before = list(model.state_dict())
    checkpoint = {
        "lit_compress": {
            "version": 1,
            "events": [
                {"op": "test_split_linear", "target": "mid", "rank": 4},
                {"op": "test_split_linear", "target": "no_such_layer", "rank": 4},
            ],
        }
    }
    with pytest.raises(ReplayError, match=r"event #1 \(op='test_split_linear'\).*no_such_layer"):
        lit_compress.CompressMixin.on_load_checkpoint(model, checkpoint)
    assert list(model.state_dict()) == keys_before  # the first event was rolled back too
    assert applied_events(model) == []
    with pytest.raises(ReplayError, match=r"event #0 \(op='unknown_op'\): no replayer"):
        lit_compress.CompressMixin.on_load_checkpoint(
            model, {"lit_compress": {"version": 1, "events": [{"op": "unknown_op"}]}}
        )
    with pytest.raises(ReplayError, match="format version 99"):
        lit_compress.CompressMixin.on_load_checkpoint(model, {"lit_compress": {"version": 99, "events": []}})


def test_batchnorm_recalibration_runs_on_training_batches_and_keeps_modes(tmp_path: Any, seed: int) -> None:
    class ModeSpy(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
            if applied_events(pl_module):
                assert pl_module.training and pl_module.bn.training and pl_module.mid[0].training

    model = ToyNet()
    trainer = make_trainer(tmp_path, [SplitLinear(at_step=2, bn_recalibration_batches=3), ModeSpy()], max_epochs=1)
    trainer.fit(model)
    record = applied_events(model)[0]
    assert record["bn_recalibrated_batches"] == 3
    assert model.bn.momentum == 0.1  # the cumulative-average momentum was put back


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_event_under_bf16(tmp_path: Any, seed: int, precision: str) -> None:
    model = ToyNet(optimizer="sgd", scheduler="none")
    trainer = make_trainer(
        tmp_path, [SplitLinear(at_step=2, bn_recalibration_batches=2)], max_epochs=1, precision=precision
    )
    before = {}

    class Capture(Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if applied_events(pl_module) and not before:
                before["w"] = pl_module.mid[0].weight.detach().clone()

    trainer.callbacks.append(Capture())
    trainer.fit(model)
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert model.mid[0].weight.dtype == expected
    assert not torch.equal(before["w"], model.mid[0].weight.detach()), "the new layer did not train"
    assert torch.isfinite(model.mid[0].weight.float()).all()
