"""Every callback under ``precision="bf16-true"`` with the default report (FLOPs counted): the model's
parameters are bfloat16 while example inputs and training batches start as float32."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.callbacks import ALDS, FoldBatchNorm, LayerCollapse, LayerFusion, LayerMerge
from lit_compress.models import ImageClassifier
from lit_compress.surgery import applied_events
from tests._latency import fill_fake_latency_cache
from tests.callbacks._toy import MLPNet


def tiny_cnn() -> ImageClassifier:
    return ImageClassifier(backbone="cifar_resnet20", width_mult=0.25, image_size=12, lr=0.05, weight_decay=0.0)


def image_loader() -> DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 12, 12, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=4)  # bfloat16 convolutions are slow on CPU


def layer_merge(tmp_path: Path) -> LayerMerge:
    cache = tmp_path / "lat.json"
    fill_fake_latency_cache(cache, tiny_cnn(), torch.zeros(1, 1, 12, 12))
    return LayerMerge(
        budget=0.9,
        targets=["net.layer3.*"],  # few candidates: every importance score is a bfloat16 forward pass
        importance_batches=1,
        holdout_batches=1,
        latency_warmup=0,
        latency_repeats=1,
        progress=False,
        latency_cache=str(cache),
        latency_check_plan=False,  # the cache holds cost-model pseudo-ms, not this machine's
        bn_recalibration_batches=2,
    )


CASES: dict[str, Callable[[Path], tuple[Callback, L.LightningModule, DataLoader | None]]] = {
    "LayerFusion": lambda p: (LayerFusion(fraction=0.5, increments=1, every_n_steps=1), tiny_cnn(), image_loader()),
    "FoldBatchNorm": lambda p: (FoldBatchNorm(at_step=0), tiny_cnn(), image_loader()),
    "ALDS": lambda p: (
        ALDS(keep_ratio=0.7, num_seeds=1, alternations=1, progress=False, bn_recalibration_batches=2),
        tiny_cnn(),
        image_loader(),
    ),
    "LayerMerge": lambda p: (layer_merge(p), tiny_cnn(), image_loader()),
    "LayerCollapse": lambda p: (LayerCollapse(lambda_final=50.0, tau=0.99, penalty="loss"), MLPNet(), None),
}


SLOW = {"LayerMerge", "ALDS", "LayerFusion"}  # bfloat16 convolutions on CPU: 10-40 s each on a loaded 2-core machine


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in CASES])
def test_every_callback_runs_its_event_under_bf16_true(tmp_path: Path, seed: int, name: str) -> None:
    callback, model, loader = CASES[name](tmp_path)
    trainer = L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        accelerator="cpu",
        precision="bf16-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback],  # the default CompressionReport is added (FLOPs on)
    )
    trainer.fit(model, loader) if loader is not None else trainer.fit(model)
    events = applied_events(model)
    assert events, f"{name} ran no event"
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert events[0]["before"].get("flops") and events[-1]["after"].get("flops"), events[-1]["after"]


def test_flops_and_trace_cast_float32_inputs_to_a_bfloat16_model() -> None:
    from lit_compress.measure import count_flops
    from lit_compress.surgery.trace import trace_dataflow

    model = MLPNet().to(torch.bfloat16)
    x = torch.zeros(2, 16)  # float32, as example_input_array and the data loader give it
    assert count_flops(model, x) == 2 * 2 * (16 * 32 + 32 * 32 + 32 * 4)
    graph = trace_dataflow(model, x)
    assert len(list(graph.module_calls())) == 6
