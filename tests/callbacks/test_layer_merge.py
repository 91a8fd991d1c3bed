"""The ``LayerMerge`` callback: plan at fit start, fine-tune unmerged, exact merge at fit end; DDP, bf16, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.callbacks import CompressionReport, LayerMerge
from lit_compress.errors import ConfigError
from lit_compress.models import ImageClassifier
from lit_compress.surgery import applied_events
from lit_compress.surgery.log import strip_measurements
from tests._latency import fill_fake_latency_cache
from tests.callbacks._toy import HashRecorder, MLPNet


def tiny_model(backbone: str = "cifar_resnet20") -> ImageClassifier:
    return ImageClassifier(backbone=backbone, width_mult=0.25, image_size=12, lr=0.05, weight_decay=0.0)


def loaders(n: int = 64, batch: int = 16) -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 12, 12, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def trainer_for(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=2,
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


def lm(tmp_path: Path, **kwargs: Any) -> LayerMerge:
    """A small LayerMerge; its latency cache is pre-filled from a cost model (see ``tests/_latency.py``)."""
    cache = tmp_path / "lat.json"
    if not cache.exists() and "load_plan" not in kwargs:  # a loaded plan must time nothing
        example = torch.zeros(1, 1, 12, 12)
        for backbone in ("cifar_resnet20", "small_mobilenet_v2"):
            fill_fake_latency_cache(cache, tiny_model(backbone), example)
    options: dict[str, Any] = dict(
        budget=0.6,
        importance_batches=1,
        holdout_batches=1,
        latency_warmup=0,
        latency_repeats=2,
        progress=False,
        latency_cache=str(tmp_path / "lat.json"),
        latency_check_plan=False,  # the cache holds cost-model pseudo-ms: a real timing of the plan would disagree
        bn_recalibration_batches=2,
    )
    options.update(kwargs)
    return LayerMerge(**options)


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One searched plan for the tiny cifar_resnet20, reused by the tests that do not test the search."""
    root = tmp_path_factory.mktemp("plan")
    L.seed_everything(0, verbose=False)
    trainer_for(root, [lm(root, save_plan=str(root / "plan.json"))], max_epochs=1, limit_train_batches=1).fit(
        tiny_model(), loaders()
    )
    return str(root / "plan.json")


def ops(model: Any) -> list[str]:
    return [e["op"] for e in applied_events(model)]


def test_fine_tuned_network_equals_the_merged_one(tmp_path: Path, seed: int) -> None:
    model = tiny_model()
    cb = lm(tmp_path, merge_at_end=False, save_plan=str(tmp_path / "plan.json"))
    trainer_for(tmp_path, [cb], limit_train_batches=2).fit(model, loaders())
    assert ops(model) == ["layer_merge_plan"] and cb.planned and not cb.merged
    summary = cb.summary
    blocks = applied_events(model)[0]["blocks"]
    # times are floored to the unit, so the table sum may exceed the budget by < 1 unit per block
    assert summary["planned_table_ms"] <= 0.6 * summary["original_table_ms"] + len(blocks) * summary["time_unit_ms"]
    assert any(e - s > 1 for s, e, _ in applied_events(model)[0]["blocks"])
    x = torch.randn(4, 1, 12, 12, dtype=torch.float64)
    model.double().eval()  # the equality is exact up to float64 round-off
    with torch.no_grad():
        expected = model(x)
    convs_before = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    cb.merge_now(model)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert ops(model) == ["layer_merge_plan", "layer_merge_final"]
    # Each block keeping k >= 2 convs becomes one conv; the plan comes from measured latencies, so
    # whether it has such a block depends on the machine (a plan of only pruned/single convs merges none).
    convs_after = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    composed = sum(len(kept) - 1 for _, _, kept in blocks if len(kept) >= 2)
    assert convs_after <= convs_before - composed
    assert json.loads((tmp_path / "plan.json").read_text())["blocks"] == applied_events(model)[0]["blocks"]


@pytest.mark.slow
def test_merge_at_fit_end_is_in_the_export(tmp_path: Path, seed: int) -> None:
    from lit_compress.export import export_compressed, load_compressed

    model = tiny_model("small_mobilenet_v2")
    cb = lm(tmp_path, importance="finetune", importance_steps=1, budget=0.4)
    trainer_for(tmp_path, [cb], max_epochs=1, limit_train_batches=2).fit(model, loaders())
    assert ops(model) == ["layer_merge_plan", "layer_merge_final"]
    export_compressed(model, tmp_path / "m.pt", torch_export=False)
    loaded = load_compressed(tmp_path / "m.pt")
    x = torch.randn(3, 1, 12, 12)
    torch.testing.assert_close(loaded(x), model.eval()(x))


def test_load_plan_skips_the_search(tmp_path: Path, seed: int, plan_file: str) -> None:
    again = tiny_model()
    cb = lm(tmp_path, load_plan=plan_file)
    trainer_for(tmp_path / "b", [cb], max_epochs=1).fit(again, loaders())
    assert applied_events(again)[0]["blocks"] == json.loads(Path(plan_file).read_text())["blocks"]
    assert "loaded_from" in cb.summary and not (tmp_path / "lat.json").exists()
    other = ImageClassifier(backbone="cifar_resnet32", width_mult=0.25, image_size=12)
    with pytest.raises(ConfigError, match="load_plan"):
        trainer_for(tmp_path / "c", [lm(tmp_path, load_plan=plan_file)], max_epochs=1).fit(other, loaders())


def test_bad_input_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for budget in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ConfigError, match="budget"):
            LayerMerge(budget=budget)
    with pytest.raises(ConfigError, match="importance"):
        LayerMerge(importance="magic")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="load_plan"):
        LayerMerge(load_plan=str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="does not support"):
        trainer_for(tmp_path, [lm(tmp_path)], max_epochs=1).fit(MLPNet())
    # an infeasible budget fails in the DP, after the tables (small model; every entry "takes" 1 ms, so the
    # fastest plan of the 4-conv VGG takes 2 ms = 50 % of the original, whatever the machine's load)
    import lit_compress.measure.latency_table as tables

    monkeypatch.setattr(tables, "latency_table", lambda space, cands, **kw: {c.key: 1.0 for c in cands})
    with pytest.raises(ConfigError, match="no merge plan meets the latency budget"):
        trainer_for(tmp_path, [lm(tmp_path, budget=0.3, importance_steps=1)], max_epochs=1).fit(
            ImageClassifier(backbone="vgg_cnn", width_mult=0.125, image_size=12), loaders()
        )


def test_importance_choices_reach_the_table_and_uniform_builds_none(
    tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``importance="uniform"`` plans without any importance table (every block worth 1: the DP keeps as many
    blocks as the budget allows); ``reset_layers`` reaches the table with ``importance="finetune"``."""
    import lit_compress.surgery.layermerge.importance as importance

    real = importance.importance_table
    calls: list[dict[str, Any]] = []

    def spy(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(importance, "importance_table", spy)
    uniform = lm(tmp_path, importance="uniform", merge_at_end=False)
    model = tiny_model()
    trainer_for(tmp_path, [uniform], max_epochs=1, limit_train_batches=1).fit(model, loaders())
    blocks = applied_events(model)[0]["blocks"]
    assert calls == [] and uniform.summary["importance"] == "uniform"
    assert uniform.summary["dp_importance"] == len(blocks) < 18  # a value of 1 per block; some blocks merged
    reset = lm(tmp_path, importance="finetune", reset_layers=True, importance_steps=1, merge_at_end=False)
    reset.budget, reset.targets = 0.97, ["net.layer3.2.*"]  # one unit: a few fine-tunes only
    trainer_for(tmp_path, [reset], max_epochs=1, limit_train_batches=1).fit(tiny_model(), loaders())
    assert [(c["method"], c["reset_layers"]) for c in calls] == [("finetune", True)]
    assert reset.summary["reset_layers"] is True


def test_layer_merge_under_bf16_mixed(tmp_path: Path, seed: int, plan_file: str) -> None:
    model = tiny_model()
    trainer_for(tmp_path, [lm(tmp_path, load_plan=plan_file)], max_epochs=1, precision="bf16-mixed").fit(
        model, loaders()
    )
    assert ops(model) == ["layer_merge_plan", "layer_merge_final"]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_resume_matches_an_uninterrupted_run(tmp_path: Path, plan_file: str) -> None:
    def run(root: Path, extra: list[Callback], ckpt: str | None = None) -> ImageClassifier:
        L.seed_everything(0, verbose=False)
        model = tiny_model()
        checkpoints = ModelCheckpoint(dirpath=str(root), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        trainer = trainer_for(
            root,
            [lm(tmp_path, load_plan=plan_file), checkpoints, *extra],
            max_epochs=3,
            deterministic=True,
            enable_checkpointing=True,
            limit_train_batches=2,
        )
        trainer.fit(model, loaders(), ckpt_path=ckpt)
        return model

    class CrashAt(Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 2:
                raise RuntimeError("simulated crash")

    model_a = run(tmp_path / "a", [])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", [CrashAt()])
    ckpt = tmp_path / "b" / "epoch=0.ckpt"
    assert [e["op"] for e in torch.load(ckpt, weights_only=True)["lit_compress"]["events"]] == ["layer_merge_plan"]
    model_c = run(tmp_path / "c", [], ckpt=str(ckpt))
    assert [strip_measurements(e)["op"] for e in applied_events(model_c)] == ["layer_merge_plan", "layer_merge_final"]
    sd_a, sd_c = model_a.state_dict(), model_c.state_dict()
    assert sd_a.keys() == sd_c.keys()
    assert all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)
    # the final checkpoint loads for inference with the merged structure
    from lit_compress import load_from_checkpoint

    final = tmp_path / "c" / "epoch=2.ckpt"
    if final.exists():
        loaded = load_from_checkpoint(ImageClassifier, str(final))
        assert ops(loaded)[0] == "layer_merge_plan"


def test_layer_merge_under_ddp_spawn_keeps_ranks_identical(tmp_path: Path, plan_file: str) -> None:
    L.seed_everything(0, verbose=False)
    trainer = trainer_for(
        tmp_path,
        [lm(tmp_path, load_plan=plan_file), HashRecorder(str(tmp_path))],
        max_epochs=1,
        devices=2,
        strategy="ddp_spawn",
    )
    trainer.fit(tiny_model(), loaders())
    after = [(tmp_path / f"after_event_rank{r}.txt").read_text() for r in (0, 1)]
    end = [(tmp_path / f"end_rank{r}.txt").read_text() for r in (0, 1)]
    assert after[0] == after[1] and end[0] == end[1]


def test_at_epoch_pretrains_first(tmp_path: Path, plan_file: str) -> None:
    model = tiny_model()
    cb = lm(tmp_path, load_plan=plan_file, at_epoch=1)
    trainer_for(tmp_path, [cb], max_epochs=2, limit_train_batches=1).fit(model, loaders())
    plan, final = applied_events(model)
    assert (plan["op"], plan["epoch"], plan["moment"]) == ("layer_merge_plan", 1, "epoch_start")
    assert final["op"] == "layer_merge_final" and final["moment"] == "fit_end"
    with pytest.raises(ConfigError, match="at_epoch"):
        LayerMerge(at_epoch=-1)


def test_targets_leave_the_other_convs_unchanged(tmp_path: Path, seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import lit_compress.measure.latency_table as tables

    # Every table entry "takes" 1 ms: the 4-conv VGG (pooling after sites 2 and 4) costs 4 ms; a budget of
    # 80 % needs one merged block, and with `targets` only (2, 4] may merge.
    monkeypatch.setattr(tables, "latency_table", lambda space, cands, **kw: {c.key: 1.0 for c in cands})
    model = ImageClassifier(backbone="vgg_cnn", width_mult=0.125, image_size=12)
    outside = ["net.features.0", "net.features.1", "net.features.2", "net.features.3", "net.features.4"]
    modules = {name: model.get_submodule(name) for name in outside}
    callback = lm(tmp_path, budget=0.8, targets=["net.features.7", "re:net\\.features\\.1[0-9]"])
    assert callback.claimed_modules(None, model) == [f"net.features.{i}" for i in (10, 11, 12, 7, 8, 9)]
    trainer_for(tmp_path, [callback], max_epochs=1, limit_train_batches=2).fit(model, loaders())
    plan, final = applied_events(model)
    assert plan["blocks"][:2] == [[0, 1, [1]], [1, 2, [2]]] and plan["blocks"][2][:2] == [2, 4]
    assert plan["targeted_sites"] == [3, 4]
    # the plan and the merge left the untargeted convs, BatchNorms and activations in place (BN not folded)
    assert all(model.get_submodule(name) is module for name, module in modules.items())
    assert isinstance(model.get_submodule("net.features.7"), torch.nn.Conv2d)
    assert isinstance(model.get_submodule("net.features.8"), torch.nn.Identity)  # the targeted BN was folded
    # the exact merge re-estimates no statistics; the plan did
    assert (plan["bn_recalibrated_batches"], final["bn_recalibrated_batches"]) == (2, 0)
    with pytest.raises(ConfigError, match=r"`targets`=\['classifier\.\*'\].*at least one conv"):
        trainer_for(tmp_path, [lm(tmp_path, targets=["classifier.*"])], max_epochs=1).fit(tiny_model(), loaders())
