"""Every event is all or nothing: a failure after the surgery (in the event, or in the first training
batch after it) leaves the model exactly as it was, byte for byte, with an error naming the layer."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.callbacks import ALDS
from lit_compress.errors import SurgeryError
from lit_compress.surgery.alds import LowRankLayer
from lit_compress.surgery.replay import applied_events

allocate_mod = importlib.import_module("lit_compress.surgery.alds.allocate")
low_rank_mod = importlib.import_module("lit_compress.surgery.alds.low_rank")


class AttentionNet(L.LightningModule):
    """Embedding → nn.MultiheadAttention → Linear head over tokens (batch: ``(tokens,)``)."""

    def __init__(self, with_example: bool = True) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.ffn = nn.Linear(16, 16)
        self.head = nn.Linear(16, 20)
        if with_example:
            self.example_input_array = torch.zeros(2, 6, dtype=torch.long)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.ffn(h)))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return nn.functional.cross_entropy(self(tokens).flatten(0, 1), tokens.flatten())

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randint(0, 20, (8, 6), generator=g)), batch_size=4)


class FlagNet(AttentionNet):
    """Its forward needs a second argument the batch does not hold: events cannot be checked beforehand."""

    def forward(self, tokens: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        return super().forward(tokens) * scale

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (tokens,) = batch
        return nn.functional.cross_entropy(self(tokens, 1.0).flatten(0, 1), tokens.flatten())


def _bytes(model: nn.Module) -> list[tuple[str, str, bytes]]:
    return [(k, str(v.dtype), v.detach().cpu().numpy().tobytes()) for k, v in model.state_dict().items()]


def _trainer(tmp_path: Path, **kw: Any) -> L.Trainer:
    kw.setdefault("max_epochs", 1)
    return L.Trainer(
        limit_train_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def _alds(**kw: Any) -> ALDS:
    return ALDS(keep_ratio=0.85, num_seeds=1, alternations=1, progress=False, **kw)


@pytest.fixture
def out_proj_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The old structure check: `out_proj` of nn.MultiheadAttention counted as decomposable."""
    monkeypatch.setattr(low_rank_mod, "read_by_parent_reason", lambda model, name: None)
    monkeypatch.setattr(allocate_mod, "read_by_parent_reason", lambda model, name: None)


def test_failing_forward_after_the_surgery_restores_the_model_and_names_the_layer(
    tmp_path: Path, out_proj_allowed: None
) -> None:
    torch.manual_seed(0)
    model = AttentionNet()
    before = _bytes(model)
    modules = [id(m) for m in model.modules()]
    with pytest.raises(SurgeryError) as info:
        _trainer(tmp_path, callbacks=[_alds()]).fit(model)
    text = str(info.value)
    assert "`attn` (MultiheadAttention)" in text and "`attn.out_proj`" in text and "weight" in text
    assert "restored exactly" in text
    assert _bytes(model) == before
    assert [id(m) for m in model.modules()] == modules
    assert not any(isinstance(m, LowRankLayer) for m in model.modules()) and applied_events(model) == []


class FailingALDS(ALDS):
    """ALDS whose event raises after the surgery is done (a stand-in for any later failure)."""

    def apply_event(self, pl_module: L.LightningModule, plan: Any) -> Any:
        super().apply_event(pl_module, plan)
        with torch.no_grad():  # an in-place change too, which no undo journal sees
            pl_module.embed.weight.mul_(2)
        raise RuntimeError("injected failure after the surgery")


def test_injected_failure_after_the_surgery_restores_weights_modules_and_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AttentionNet()
    trainer = _trainer(
        tmp_path,
        max_epochs=2,
        callbacks=[FailingALDS(keep_ratio=0.85, at_epoch=1, num_seeds=1, alternations=1, progress=False)],
    )
    with pytest.raises(SurgeryError, match="injected failure after the surgery") as info:
        trainer.fit(model)
    assert "restored exactly" in str(info.value)
    after_epoch_0 = _bytes(model)
    assert not any(isinstance(m, LowRankLayer) for m in model.modules())
    params = {id(p) for p in model.parameters()}
    assert {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]} == params
    # the restored model is the one that trained for an epoch, byte for byte (the x2 is undone)
    torch.manual_seed(0)
    reference = AttentionNet()
    _trainer(tmp_path / "ref", max_epochs=1).fit(reference)
    assert _bytes(reference) == after_epoch_0


def test_failure_in_the_first_batch_after_an_unchecked_event_restores_the_model(
    tmp_path: Path, out_proj_allowed: None
) -> None:
    torch.manual_seed(0)
    model = FlagNet(with_example=False)
    before = _bytes(model)
    with pytest.raises(AttributeError, match="weight") as info:
        _trainer(tmp_path, callbacks=[_alds()]).fit(model)
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert "first training batch after a ALDS event" in notes and "restored exactly" in notes
    assert "`attn.out_proj`" in notes
    assert _bytes(model) == before
    assert not any(isinstance(m, LowRankLayer) for m in model.modules()) and applied_events(model) == []


def test_a_correct_event_is_kept_and_training_goes_on(tmp_path: Path) -> None:
    """The control: without the injected fault the same event passes its check and stays applied."""
    torch.manual_seed(0)
    model = AttentionNet()
    with pytest.warns(UserWarning, match="attn.out_proj"):
        _trainer(tmp_path, callbacks=[_alds()]).fit(model)
    assert isinstance(model.ffn, LowRankLayer) or isinstance(model.head, LowRankLayer)
    assert isinstance(model.attn.out_proj, nn.Linear) and len(applied_events(model)) == 1
