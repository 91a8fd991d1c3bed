"""``targets`` given as one string, and the key of a callback's state in checkpoints: stable when the
targets are respelt on resume, set by ``name``, and an error when a checkpoint's state is claimed by
no callback of the Trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lit_compress.callbacks import ALDS, FoldBatchNorm, LayerCollapse, LayerFusion, LayerMerge
from lit_compress.callbacks.base import CompressionCallback
from lit_compress.errors import ConfigError
from lit_compress.surgery import applied_events
from tests.callbacks.test_layer_fusion import FusionNet


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    ckpt = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    return L.Trainer(callbacks=[*callbacks, ckpt], **options)


def _fusion(**kwargs: Any) -> LayerFusion:
    options: dict[str, Any] = dict(fraction=0.4, increments=2, every_n_epochs=1, at_epoch=1, measure="cosine")
    options.update(kwargs)
    return LayerFusion(**options)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: LayerFusion(targets=t),
        lambda t: ALDS(keep_ratio=0.5, targets=t),
        lambda t: FoldBatchNorm(targets=t),
        lambda t: LayerCollapse(targets=t),
        lambda t: LayerMerge(targets=t),
    ],
    ids=["LayerFusion", "ALDS", "FoldBatchNorm", "LayerCollapse", "LayerMerge"],
)
def test_a_string_target_is_one_pattern(make: Any) -> None:
    assert make("layers.*").targets == ["layers.*"]
    assert make(("a", "re:b")).targets == ["a", "re:b"]
    with pytest.raises(ConfigError, match="`targets`=5"):
        make(5)


def test_a_string_target_selects_what_it_says() -> None:
    """Split into characters, ``"layers.[01]"`` would select nothing (and ``"x*"`` everything)."""
    fusion = LayerFusion(targets="layers.[01]")
    assert sorted(fusion.claimed_modules(None, FusionNet())) == ["layers.0", "layers.1"]


def test_respelt_targets_on_resume_keep_the_callback_state(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    first = _fusion(targets=["layers.*"])
    _trainer(tmp_path, [first]).fit(FusionNet())
    assert first.increments_done == 1
    last = tmp_path / "ckpt" / "last.ckpt"
    assert "LayerFusion" in torch.load(last, weights_only=True)["callbacks"]  # the class name: one instance

    resumed = _fusion(targets=["re:layers\\.\\d+"])  # the same four layers, written differently
    model = FusionNet()
    _trainer(tmp_path, [resumed], max_epochs=3).fit(model, ckpt_path=str(last))
    assert resumed.increments_done == 2
    assert [e["increment"] for e in applied_events(model)] == [1, 2]  # not the first step again


def test_several_instances_are_keyed_by_the_layers_they_resolve_to(tmp_path: Path) -> None:
    def keys(a: Any, b: Any) -> list[str]:
        cbs = [_fusion(targets=a, at_epoch=5, fraction=0.2), _fusion(targets=b, at_epoch=5, fraction=0.2)]
        _trainer(tmp_path / str(len(str(a))), cbs, max_epochs=1, limit_train_batches=1).fit(FusionNet())
        return [cb.state_key for cb in cbs]

    written = keys(["layers.0", "layers.1"], ["layers.2", "layers.3"])
    respelt = keys("layers.[01]", ["re:layers\\.[23]"])
    assert written == respelt
    assert written[0] != written[1] and all(k.startswith("LayerFusion{'layers'") for k in written)


def test_a_name_keys_the_state() -> None:
    assert LayerFusion(name="encoder").state_key == "LayerFusion{'name': 'encoder'}"
    with pytest.raises(ConfigError, match="`name`=''"):
        LayerFusion(name="")


def test_state_that_no_callback_claims_is_an_error(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path, [_fusion(name="encoder")]).fit(FusionNet())
    last = str(tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(ConfigError, match=r"LayerFusion\{'name': 'encoder'\}.*LayerFusion \(state key \"LayerFusion"):
        _trainer(tmp_path, [_fusion(name="decoder")], max_epochs=3).fit(FusionNet(), ckpt_path=last)


def test_an_older_checkpoint_keyed_by_targets_is_adopted(tmp_path: Path) -> None:
    """State saved under the former key (``LayerFusion{'targets': [...]}``) goes to the one LayerFusion."""
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path, [_fusion(targets=["layers.*"])]).fit(FusionNet())
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    state = checkpoint["callbacks"].pop("LayerFusion")
    state.pop("lit_compress_callback")
    checkpoint["callbacks"]["LayerFusion{'targets': ['layers.*']}"] = state
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    resumed = _fusion(targets=["layers.*"])
    _trainer(tmp_path, [resumed], max_epochs=3).fit(FusionNet(), ckpt_path=str(old))
    assert resumed.increments_done == 2


def test_every_method_takes_a_name() -> None:
    made: list[CompressionCallback[Any]] = [
        LayerFusion(name="n"),
        ALDS(keep_ratio=0.5, name="n"),
        FoldBatchNorm(name="n"),
        LayerCollapse(name="n"),
        LayerMerge(name="n"),
    ]
    assert [cb.state_key for cb in made] == [f"{type(cb).__name__}{{'name': 'n'}}" for cb in made]
