"""Lightning's own demo classes (``lightning.pytorch.demos``), untouched, compressed as a new user would.

The demo ``LightningTransformer`` has ``forward(inputs, target)`` and reads ``./data/wikitext-2.txt``
(its ``prepare_data`` downloads it; the download is replaced by a small local file here).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.demos import LightningTransformer, WikiText2
from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

import lit_compress
from lit_compress.callbacks import ALDS, CompressionReport
from lit_compress.surgery.alds import LowRankLayer

TEXT = "the cat sat on the mat and the dog ran far away from home . " * 20 + "\n"


@pytest.fixture
def wikitext(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> WikiText2:
    """The demo's dataset on a small local file (no network)."""
    monkeypatch.setattr(WikiText2, "download", staticmethod(lambda destination: None))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "wikitext-2.txt").write_text(TEXT * 3)
    return WikiText2()


def _trainer(tmp_path: Path, callbacks: list, **kw) -> L.Trainer:
    kw.setdefault("enable_checkpointing", False)
    return L.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


def _alds() -> ALDS:
    return ALDS(keep_ratio=0.92, num_seeds=1, alternations=1, progress=False, bn_recalibration_batches=0)


def test_demo_transformer_trains_through_alds_with_flops_from_both_batch_elements(
    tmp_path: Path, wikitext: WikiText2
) -> None:
    """forward(inputs, target) on an (inputs, target) batch: the report calls it with both; ALDS leaves the
    attention's out_proj and the encoder layers' linear1/linear2 dense (their parents read `.weight`); the
    checkpoint loads into the untouched class given the `__init__` argument it does not save."""
    torch.manual_seed(0)
    model = LightningTransformer(vocab_size=wikitext.vocab_size)
    report = CompressionReport()
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    with pytest.warns(UserWarning, match="leaving 10 layer"):
        _trainer(tmp_path, [_alds(), report, checkpoint], enable_checkpointing=True).fit(model)
    decomposed = {n for n, m in model.named_modules() if isinstance(m, LowRankLayer)}
    assert "model.transformer.decoder.layers.0.linear1" in decomposed
    assert not any("out_proj" in n or n.startswith("model.transformer.encoder.layers") for n in decomposed)
    assert report.initial is not None and report.final is not None
    assert report.initial["flops"] > report.final["flops"] > 0
    model.eval()
    with torch.no_grad():  # the inference fast path of nn.TransformerEncoderLayer runs
        x = torch.randint(0, wikitext.vocab_size, (2, 8))
        assert torch.isfinite(model(x, x)).all()
        # LightningTransformer does not call save_hyperparameters: its `vocab_size` is passed to the loader
        loaded = lit_compress.load_from_checkpoint(
            LightningTransformer, checkpoint.best_model_path, vocab_size=wikitext.vocab_size
        ).eval()
        torch.testing.assert_close(loaded(x, x), model(x, x), rtol=0, atol=0)


def test_report_without_determinable_inputs_warns_once_and_fit_completes(tmp_path: Path) -> None:
    """A forward that takes neither batch[0] nor the whole batch: FLOPs/latency skipped, one warning."""

    class TwoInputs(BoringModel):  # the test's own module: forward needs 2 tensors, batches hold 1
        def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
            return self.layer(x) * scale

        def training_step(self, batch, batch_idx):
            return self(batch, torch.ones(())).sum()

    report = CompressionReport(measure_latency=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _trainer(tmp_path, [report]).fit(TwoInputs())
    ours = [w for w in caught if "FLOPs and latency are not measured" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "example_input_array" in str(ours[0].message) and "TwoInputs.forward" in str(ours[0].message)
    assert report.final is not None and report.final["flops"] is None and report.final["params"] > 0


def test_example_input_array_set_on_the_instance_is_used(tmp_path: Path, wikitext: WikiText2) -> None:
    """What the README tells a third-party module to do: set `example_input_array` on the instance."""
    model = LightningTransformer(vocab_size=wikitext.vocab_size)
    x = torch.randint(0, wikitext.vocab_size, (1, 5))
    model.example_input_array = (x, x)
    report = CompressionReport()
    _trainer(tmp_path, [report], max_steps=1).fit(model)
    inputs = report.example_inputs(None, model)
    assert isinstance(inputs, tuple) and inputs[0].shape == (1, 5)
    assert report.initial is not None and report.initial["flops"] > 0


def test_boring_model_and_datamodule_untouched(tmp_path: Path) -> None:
    """The plain demo pair: a callback and the report work with nothing added."""
    model = BoringModel()
    report = CompressionReport()
    # BoringModel's one Linear(32, 2) saves nothing at rank 2 (the default `min_rank`): rank 1, no guard
    _trainer(
        tmp_path,
        [ALDS(keep_ratio=0.8, num_seeds=1, alternations=1, progress=False, min_rank=1, min_saving=0.0), report],
    ).fit(model, datamodule=BoringDataModule())
    assert report.initial is not None and report.initial["flops"] > 0
    assert isinstance(model.layer, LowRankLayer) and report.final is not None
    assert report.final["params"] < report.initial["params"]
