"""Loading compressed checkpoints: a failed load leaves the module exactly as it was; validate/test
replay the log; edited or dropped events are refused by name; a plain ``load_from_checkpoint`` that
would load untied fails and says how to load."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lit_compress
from lit_compress.callbacks import LayerFusion
from lit_compress.errors import ReplayError
from lit_compress.measure import count_parameters
from lit_compress.surgery import applied_events
from lit_compress.surgery.integrity import chain_events
from lit_compress.surgery.log import NOT_REPLAYED_KEY
from tests.callbacks._toy import SplitLinear, ToyNet, state_hash
from tests.callbacks.test_layer_fusion import FusionNet


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_train_batches=2,
        limit_val_batches=1,
        default_root_dir=str(tmp_path),
    )
    options.update(kwargs)
    return L.Trainer(callbacks=[*callbacks, ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)], **options)


class ToyNetWithTest(ToyNet):
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def test_dataloader(self) -> Any:
        return self._data(2)


@pytest.fixture
def split_ckpt(tmp_path: Path) -> Path:
    L.seed_everything(0, verbose=False)
    _trainer(tmp_path, [SplitLinear(at_step=1)]).fit(ToyNet())
    return tmp_path / "ckpt" / "last.ckpt"


@pytest.fixture(scope="module")
def fused_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FusionNet after two fusion steps (same state-dict keys as the original: ties only)."""
    tmp_path = tmp_path_factory.mktemp("fused")
    L.seed_everything(0, verbose=False)
    fusion = LayerFusion(fraction=0.4, increments=2, every_n_epochs=1, at_epoch=0, measure="cosine")
    _trainer(tmp_path, [fusion], limit_val_batches=0).fit(FusionNet())
    return tmp_path / "ckpt" / "last.ckpt"


# ---------------------------------------------------------------- a failed load restores the module exactly
def test_failed_resume_restores_the_module_exactly_and_a_retry_fails_the_same(split_ckpt: Path, tmp_path: Path) -> None:
    checkpoint = torch.load(split_ckpt, weights_only=True)
    checkpoint["state_dict"]["mid.1.weight"] = torch.zeros(32, 5)  # weights that do not fit the replayed log
    bad = tmp_path / "bad.ckpt"
    torch.save(checkpoint, bad)

    model = ToyNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    errors = []
    for _ in range(2):
        with pytest.raises(ReplayError, match="restored to exactly its state before the load") as info:
            _trainer(tmp_path / "resume", [SplitLinear(at_step=1)], max_epochs=3).fit(model, ckpt_path=str(bad))
        errors.append(str(info.value))
        after = model.state_dict()
        assert list(after) == list(before)
        assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
        assert applied_events(model) == []
        assert type(model.mid) is torch.nn.Linear and "load_state_dict" not in model.__dict__
    assert errors[0] == errors[1]  # the retry gives the same, true reason
    assert "size mismatch for mid.1.weight" in errors[0]


class _FailingHook(ToyNet):
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        raise RuntimeError("user hook failed")


class _FailingHookWithMixin(lit_compress.CompressMixin, _FailingHook):
    pass


def test_a_failing_user_hook_after_the_replay_restores_the_module(split_ckpt: Path) -> None:
    model = _FailingHookWithMixin()
    digest, names = state_hash(model), list(model.state_dict())
    with pytest.raises(RuntimeError, match="user hook failed"):
        model.on_load_checkpoint(torch.load(split_ckpt, weights_only=True))
    assert state_hash(model) == digest and list(model.state_dict()) == names and applied_events(model) == []


# ---------------------------------------------------------------- validate / test replay the log
def test_validate_and_test_replay_the_log_without_the_mixin(split_ckpt: Path, tmp_path: Path) -> None:
    for stage in ("validate", "test"):
        model = ToyNetWithTest()
        trainer = _trainer(tmp_path / stage, [SplitLinear(at_step=1)])
        results = getattr(trainer, stage)(model, ckpt_path=str(split_ckpt))
        assert results and [e["op"] for e in applied_events(model)] == ["test_split_linear"]
        expected = torch.load(split_ckpt, weights_only=True)["state_dict"]
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items() if k != NOT_REPLAYED_KEY)
        assert "on_load_checkpoint" not in model.__dict__


# ---------------------------------------------------------------- integrity of the log
def _edited(path: Path, tmp_path: Path, edit: Any, rechain: bool = False) -> Path:
    checkpoint = torch.load(path, weights_only=True)
    events = checkpoint["lit_compress"]["events"]
    edit(events)
    if rechain:
        checkpoint["lit_compress"]["events"], checkpoint["lit_compress"]["digest"] = chain_events(events)
    out = tmp_path / "edited.ckpt"
    torch.save(checkpoint, out)
    return out


def _swap_a_fusion_member(events: list[dict[str, Any]]) -> None:
    fusion = events[1]["fusions"][0]
    fusion["a"], fusion["b"] = fusion["b"], fusion["a"]
    others = {"layers.0", "layers.1", "layers.2", "layers.3"} - set(fusion["a"]) - set(fusion["b"])
    fusion["b"] = [sorted(others)[0]]


def test_the_fused_log_loads_and_is_checked(fused_ckpt: Path) -> None:
    events = torch.load(fused_ckpt, weights_only=True)["lit_compress"]["events"]
    assert [e["op"] for e in events] == ["fuse_layers", "fuse_layers"]
    assert all("digest" in e and "structure" in e for e in events)
    loaded = lit_compress.load_from_checkpoint(FusionNet, str(fused_ckpt))
    assert count_parameters(loaded) < count_parameters(FusionNet())


def test_an_edited_event_is_refused_by_name(fused_ckpt: Path, tmp_path: Path) -> None:
    edited = _edited(fused_ckpt, tmp_path, _swap_a_fusion_member)
    with pytest.raises(ReplayError, match=r"does not match its digests at event #1 \(op='fuse_layers'"):
        lit_compress.load_from_checkpoint(FusionNet, str(edited))


def test_a_dropped_event_is_refused_by_name(fused_ckpt: Path, tmp_path: Path) -> None:
    first = _edited(fused_ckpt, tmp_path, lambda events: events.pop(0))
    with pytest.raises(ReplayError, match=r"event #0 \(op='fuse_layers', logged index 1\)"):
        lit_compress.load_from_checkpoint(FusionNet, str(first))
    last = _edited(fused_ckpt, tmp_path, lambda events: events.pop())
    with pytest.raises(ReplayError, match=r"ends after event #0 .* events were dropped"):
        lit_compress.load_from_checkpoint(FusionNet, str(last))


def test_an_edit_with_recomputed_digests_is_caught_by_the_structure(fused_ckpt: Path, tmp_path: Path) -> None:
    edited = _edited(fused_ckpt, tmp_path, _swap_a_fusion_member, rechain=True)
    with pytest.raises(ReplayError, match=r"Replaying event #1 \(op='fuse_layers'\) rebuilt parameters"):
        lit_compress.load_from_checkpoint(FusionNet, str(edited))


# ---------------------------------------------------------------- a plain load_from_checkpoint
def test_a_plain_load_from_checkpoint_does_not_load_untied(fused_ckpt: Path) -> None:
    with pytest.raises(RuntimeError, match=r"NOT replayed.*lit_compress\.load_from_checkpoint"):
        FusionNet.load_from_checkpoint(fused_ckpt)
    with pytest.warns(UserWarning, match="NOT replayed"):
        FusionNet.load_from_checkpoint(fused_ckpt, strict=False)
    # An already compressed module (e.g. the one just trained) loads the checkpoint without complaint.
    loaded = lit_compress.load_from_checkpoint(FusionNet, str(fused_ckpt))
    loaded.load_state_dict(torch.load(fused_ckpt, weights_only=True)["state_dict"])
