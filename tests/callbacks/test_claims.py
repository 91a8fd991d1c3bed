"""Two lit_compress callbacks that would restructure the same module are refused before training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest

from lit_compress.callbacks import CompressionCallback, LayerCollapse
from lit_compress.errors import ConfigError
from tests.callbacks._toy import MLPNet, ToyNet


class Claims(CompressionCallback):
    """Claims fixed module names and counts training steps (to show training never started)."""

    def __init__(self, names: list[str] | None) -> None:
        super().__init__(bn_recalibration_batches=0)
        self.names = names
        self.targets = names or ["unknown"]
        self.steps = 0

    def claimed_modules(self, trainer: Any, pl_module: L.LightningModule) -> list[str] | None:
        return self.names

    def on_train_batch_start(self, *args: Any) -> None:
        self.steps += 1


def _fit(tmp_path: Path, model: L.LightningModule, callbacks: list[Any]) -> None:
    L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
    ).fit(model)


def test_overlapping_claims_fail_before_the_first_step(tmp_path: Path) -> None:
    first, second = Claims(["fc1", "mid"]), Claims(["mid", "head"])
    with pytest.raises(ConfigError, match=r"`mid` \(Claims#0 and Claims#1\)"):
        _fit(tmp_path, ToyNet(), [first, second])
    assert first.steps == 0 and second.steps == 0


def test_disjoint_or_unknown_claims_train(tmp_path: Path) -> None:
    first, second, third = Claims(["fc1"]), Claims(["head"]), Claims(None)
    _fit(tmp_path, ToyNet(), [first, second, third])
    assert first.steps > 0


def test_layer_collapse_claims_the_traced_mlp(tmp_path: Path) -> None:
    model = MLPNet()
    claimed = LayerCollapse().claimed_modules(None, model)
    assert claimed and all(name in dict(model.named_modules()) for name in claimed)
    with pytest.raises(ConfigError, match="claim the same module"):
        _fit(tmp_path, model, [LayerCollapse(), Claims([claimed[0]])])


def test_a_module_left_in_eval_mode_gets_a_warning(tmp_path: Path) -> None:
    model = ToyNet()
    model.eval()
    with pytest.warns(UserWarning, match=r"eval mode at the start of training"):
        _fit(tmp_path, model, [Claims(["fc1"])])
