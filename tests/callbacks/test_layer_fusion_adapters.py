"""LayerFusion(adapters=True) in a fit: the count is net of the scales, trained scales survive
``load_from_checkpoint`` and resume, and layers that cannot take one are named."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

import lit_compress
from lit_compress.callbacks import LayerFusion
from lit_compress.measure import count_parameters
from lit_compress.surgery.fusion.adapters import ADAPTER
from tests.callbacks.test_layer_fusion import BASE, UNIT, FusionNet, fusion_events, trainer_for


def scales(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(ADAPTER)}


def _fit(root: Path, model: FusionNet, extra: list[Callback], max_epochs: int, ckpt: str | None = None) -> LayerFusion:
    fusion = LayerFusion(fraction=0.2, increments=1, every_n_epochs=1, adapters=True, min_steps_after_last=0)
    checkpoints = ModelCheckpoint(dirpath=str(root), every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    trainer = trainer_for(root, [fusion, checkpoints, *extra], max_epochs=max_epochs, enable_checkpointing=True)
    trainer.fit(model, ckpt_path=ckpt)
    return fusion


def test_trained_scales_are_counted_and_survive_load_and_resume(tmp_path: Path) -> None:
    model = FusionNet()
    callback = _fit(tmp_path, model, [], max_epochs=2)
    fusion = fusion_events(model)[0]["fusions"][0]
    assert len(fusion["adapters"]) == 2 and fusion["adapter_params"] == 2 * 32
    assert count_parameters(model) == BASE - UNIT + 2 * 32
    assert callback.removed_params == UNIT - 2 * 32
    trained = scales(model)
    assert len(trained) == 2 and all(not torch.equal(s, torch.ones(32)) for s in trained.values())  # they learned

    ckpt = str(tmp_path / "epoch=1.ckpt")
    loaded = lit_compress.load_from_checkpoint(FusionNet, ckpt)
    assert scales(loaded).keys() == trained.keys()
    assert all(torch.equal(scales(loaded)[k], trained[k]) for k in trained)
    x = torch.randn(4, 16)
    torch.testing.assert_close(loaded.eval()(x), model.eval()(x))

    seen: dict[str, torch.Tensor] = {}

    class Probe(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            seen.update(scales(pl_module))

    _fit(tmp_path / "resumed", FusionNet(), [Probe()], max_epochs=3, ckpt=ckpt)
    assert seen.keys() == trained.keys() and all(torch.equal(seen[k], trained[k]) for k in trained)


def test_layers_that_cannot_take_an_adapter_are_named() -> None:
    encoder = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False
    )
    callback = LayerFusion(adapters=True)
    with pytest.warns(UserWarning, match="ties these layers without an adapter") as caught:
        callback._usable_units(encoder, warn=True)  # type: ignore[arg-type]
    text = next(str(w.message) for w in caught if "adapter" in str(w.message))
    assert "`layers.0.linear1` (its parent TransformerEncoderLayer reads its weight without calling it)" in text
    assert "`layers.0.self_attn` (a MultiheadAttention" in text
