"""Weight averaging (SWA, EMA, any ``WeightAveraging``) keeps a copy of the original architecture: next to a
structural callback it is refused at setup, naming both callbacks, before any training step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
from lightning.pytorch import callbacks as pl_callbacks
from lightning.pytorch.callbacks import Callback, StochasticWeightAveraging

from lit_compress.callbacks import ALDS, FoldBatchNorm, LayerFusion
from lit_compress.callbacks.base import is_weight_averaging
from lit_compress.errors import ConfigError
from tests.callbacks._toy import ToyNet


class StepCounter(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, *args: Any) -> None:
        self.steps += 1


def averaging_callbacks() -> list[Any]:
    found: list[Any] = [pytest.param(lambda: StochasticWeightAveraging(swa_lrs=0.01), id="SWA")]
    ema = getattr(pl_callbacks, "EMAWeightAveraging", None)
    marks = [] if ema is not None else [pytest.mark.skip(reason="no EMAWeightAveraging in this Lightning")]
    found.append(pytest.param(lambda: ema(), id="EMA", marks=marks))
    return found


@pytest.mark.parametrize("make_averaging", averaging_callbacks())
@pytest.mark.parametrize(
    "make_method",
    [
        pytest.param(lambda: FoldBatchNorm(at_epoch=1), id="FoldBatchNorm"),
        pytest.param(lambda: ALDS(keep_ratio=0.8, at_epoch=1, progress=False), id="ALDS"),
        pytest.param(lambda: LayerFusion(fraction=0.5, increments=1, at_epoch=1), id="LayerFusion"),
    ],
)
def test_weight_averaging_is_refused_at_setup(tmp_path: Path, make_averaging: Any, make_method: Any) -> None:
    method, averaging, counter = make_method(), make_averaging(), StepCounter()
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[method, averaging, counter],
    )
    with pytest.raises(ConfigError, match=rf"`{type(averaging).__name__}`.*`{type(method).__name__}`.*architecture"):
        trainer.fit(ToyNet())
    assert counter.steps == 0


def test_weight_averaging_is_detected_by_hierarchy_and_behaviour() -> None:
    class MyEMA(Callback):  # not a Lightning averaging class, but keeps an averaged model
        def __init__(self) -> None:
            self._average_model = None

    assert is_weight_averaging(StochasticWeightAveraging(swa_lrs=0.01))
    assert is_weight_averaging(MyEMA())
    assert not is_weight_averaging(StepCounter())
