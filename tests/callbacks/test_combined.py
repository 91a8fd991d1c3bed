"""All four methods in one ``Trainer``: one event log, one report, DDP, bf16-mixed, resume between events.

The schedule (``schedule()``), on :class:`FourPartNet` with 2 batches per epoch and 6 epochs:

===========  ==================================================  ===========================
moment       event                                               method
===========  ==================================================  ===========================
fit start    ``make_collapsible`` (mlp's ReLU → slope a)          LayerCollapse
epoch 1      ``fuse_layers`` (fuse_a, fuse_b → one Parameter)    LayerFusion
epoch 2      ``low_rank_decompose`` (wide)                       ALDS
epoch 3      ``layer_merge_plan`` (conv trunk)                   LayerMerge
epoch 4      ``collapse`` (mlp → one Linear: |a − 1| < τ)         LayerCollapse
fit end      ``layer_merge_final``                               LayerMerge
===========  ==================================================  ===========================

Every epoch-end checkpoint (epochs 0–5) therefore lies between two consecutive events. (The
collapse epoch follows from λ = 5 on this data; the reference run asserts it.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_compress import load_from_checkpoint
from lit_compress.callbacks import ALDS, CompressionReport, LayerCollapse, LayerFusion, LayerMerge
from lit_compress.errors import ConfigError
from lit_compress.surgery import applied_events
from tests._latency import fill_fake_latency_cache
from tests.callbacks._combined_net import ALDS_TARGETS, COLLAPSE_TARGETS, FUSION_TARGETS, FourPartNet
from tests.callbacks._toy import HashRecorder

EPOCHS = 6
ORDER = ["make_collapsible", "fuse_layers", "low_rank_decompose", "layer_merge_plan", "collapse", "layer_merge_final"]
EPOCH_OF = {
    "make_collapsible": 0,
    "fuse_layers": 1,
    "low_rank_decompose": 2,
    "layer_merge_plan": 3,
    "collapse": 4,
    "layer_merge_final": EPOCHS,
}


def schedule(latency_cache: Path) -> list[Callback]:
    """The four methods, each on its own part of :class:`FourPartNet`, in the documented order."""
    return [
        LayerFusion(
            fraction=0.15,
            increments=1,
            every_n_epochs=1,
            at_epoch=1,
            targets=FUSION_TARGETS,
            measure="cosine",
            bn_recalibration_batches=0,
        ),
        ALDS(
            keep_ratio=0.7,
            at_epoch=2,
            targets=ALDS_TARGETS,
            num_seeds=2,
            alternations=1,
            rewind_lr=False,
            progress=False,
        ),
        LayerMerge(
            budget=0.7,
            at_epoch=3,
            importance="loss_proxy",
            importance_batches=1,
            holdout_batches=1,
            latency_warmup=0,
            latency_repeats=2,
            latency_cache=str(latency_cache),
            latency_check_plan=False,  # the cache holds cost-model pseudo-ms, not this machine's
            progress=False,
            bn_recalibration_batches=2,
        ),
        LayerCollapse(targets=COLLAPSE_TARGETS, lambda_start=5.0, lambda_final=5.0, tau=0.05, penalty="decoupled"),
    ]


def trainer_for(root: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(root),
        limit_train_batches=2,
        limit_val_batches=1,
        callbacks=[*callbacks, CompressionReport(print_report=False, output_dir=str(root))],
    )
    options.update(kwargs)
    return L.Trainer(**options)


def ops(model: torch.nn.Module) -> list[str]:
    return [e["op"] for e in applied_events(model)]


def assert_every_method_acted(model: FourPartNet) -> None:
    assert ops(model) == ORDER
    assert model.fuse_a.weight is model.fuse_b.weight  # a real tie
    assert sum(isinstance(m, torch.nn.Linear) for m in model.mlp.modules()) == 1  # collapsed
    assert not isinstance(model.wide, torch.nn.Linear)  # decomposed
    convs = [m for m in model.features.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.features.modules())  # merged: BN folded
    assert 1 <= len(convs) <= 3


@pytest.fixture(scope="module")
def latency_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One latency table (a cost model, see ``tests/_latency.py``) shared by every run, so that all plan alike."""
    path = tmp_path_factory.mktemp("latency") / "lat.json"
    model = FourPartNet()
    return fill_fake_latency_cache(path, model, model.example_input_array)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, latency_cache: Path) -> tuple[FourPartNet, Path]:
    """One uninterrupted run with a checkpoint at every epoch end."""
    root = tmp_path_factory.mktemp("uninterrupted")
    L.seed_everything(0, verbose=False)
    model = FourPartNet()
    checkpoints = ModelCheckpoint(dirpath=str(root), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer = trainer_for(root, [*schedule(latency_cache), checkpoints], enable_checkpointing=True, deterministic=True)
    trainer.fit(model)
    return model, root


def test_every_method_acts_in_one_fit_with_one_log_and_one_report(reference: tuple[FourPartNet, Path]) -> None:
    model, root = reference
    assert_every_method_acted(model)
    assert {e["op"]: e["epoch"] for e in applied_events(model)} == EPOCH_OF  # one event per moment
    report = json.loads((root / "compression_report.json").read_text())
    assert [e["op"] for e in report["events"]] == ops(model)
    for event in report["events"]:  # every event's effect on params and FLOPs is in the report
        assert event["before"]["params"] > 0 and event["after"]["params"] > 0
        assert event["before"]["flops"] > 0 and event["after"]["flops"] > 0
    assert report["final"]["params"] < report["initial"]["params"]
    assert (root / "compression_report.md").is_file() and (root / "compression_report.png").is_file()


@pytest.mark.parametrize("epoch", range(EPOCHS))
def test_resume_between_any_two_events_matches_the_uninterrupted_run(
    tmp_path: Path, latency_cache: Path, reference: tuple[FourPartNet, Path], epoch: int
) -> None:
    model_a, root = reference
    ckpt = root / f"epoch={epoch}.ckpt"
    saved = [e["op"] for e in torch.load(ckpt, weights_only=True)["lit_compress"]["events"]]
    assert saved == ops(model_a)[: len(saved)]  # the checkpoint lies between two events
    L.seed_everything(0, verbose=False)
    model_b = FourPartNet()
    trainer_for(tmp_path, schedule(latency_cache), deterministic=True).fit(model_b, ckpt_path=str(ckpt))
    assert ops(model_b) == ops(model_a)
    sd_a, sd_b = model_a.state_dict(), model_b.state_dict()
    assert sd_a.keys() == sd_b.keys()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a), [k for k in sd_a if not torch.equal(sd_a[k], sd_b[k])]


def test_final_checkpoint_loads_into_the_users_class(reference: tuple[FourPartNet, Path]) -> None:
    model, root = reference
    loaded = load_from_checkpoint(FourPartNet, str(root / f"epoch={EPOCHS - 1}.ckpt")).eval()
    x = torch.randn(5, 1, 12, 12, generator=torch.Generator().manual_seed(3))
    model.eval()
    assert ops(loaded) == ops(model)[:-1]  # the fit-end merge comes after the last checkpoint
    torch.testing.assert_close(loaded(x), model(x), rtol=1e-4, atol=1e-5)  # merge is exact up to float32 rounding


def test_combined_schedule_under_bf16_mixed(tmp_path: Path, latency_cache: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = FourPartNet()
    trainer_for(tmp_path, schedule(latency_cache), precision="bf16-mixed").fit(model)
    assert_every_method_acted(model)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_combined_schedule_under_ddp_spawn_keeps_ranks_identical(tmp_path: Path, latency_cache: Path) -> None:
    L.seed_everything(0, verbose=False)
    model = FourPartNet()
    trainer = trainer_for(
        tmp_path, [*schedule(latency_cache), HashRecorder(str(tmp_path))], devices=2, strategy="ddp_spawn"
    )
    trainer.fit(model)
    after = [(tmp_path / f"after_event_rank{r}.txt").read_text() for r in (0, 1)]
    end = [(tmp_path / f"end_rank{r}.txt").read_text() for r in (0, 1)]
    assert after[0] == after[1] and end[0] == end[1]
    assert_every_method_acted(model)  # CompressMixin: the launching process follows the workers


def test_two_methods_claiming_one_layer_fail_before_training(tmp_path: Path, latency_cache: Path) -> None:
    callbacks = [LayerFusion(fraction=0.15, increments=1, targets=["fuse_*"]), ALDS(keep_ratio=0.9, targets=["fuse_a"])]
    model = FourPartNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="fuse_a"):
        trainer_for(tmp_path, callbacks).fit(model)
    assert not applied_events(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # not one step was taken


def test_fusion_counts_only_its_own_ties_after_another_method_shrank_the_model(tmp_path: Path) -> None:
    # The collapse at epoch 1 removes 4,160 of 22,292 parameters (18.7 %), more than Layer Fusion's
    # 15 % target: fusion at epoch 2 must still tie its layers instead of counting that as its own.
    callbacks = [
        LayerCollapse(targets=COLLAPSE_TARGETS, lambda_final=20.0, warmup=1, tau=0.05, penalty="decoupled"),
        LayerFusion(
            fraction=0.15,
            increments=1,
            every_n_epochs=1,
            at_epoch=2,
            targets=FUSION_TARGETS,
            bn_recalibration_batches=0,
        ),
    ]
    L.seed_everything(0, verbose=False)
    model = FourPartNet()
    trainer_for(tmp_path, callbacks, max_epochs=3).fit(model)
    epochs = {e["op"]: e["epoch"] for e in applied_events(model)}
    assert epochs["collapse"] < epochs["fuse_layers"] == 2
    assert model.fuse_a.weight is model.fuse_b.weight
    assert callbacks[1].removed_params == 64 * 64 + 64
