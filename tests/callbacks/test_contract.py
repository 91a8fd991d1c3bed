"""The subclass contract of ``CompressionCallback``, checked on every method.

``event_due`` (every rank) and ``plan_event`` (rank 0 only) must leave the callback's state as they
found it: another rank never runs ``plan_event``, so state set there would differ between ranks.
Methods customise the event through public hooks only; the RNG states travel in the base's state.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

import lit_compress.callbacks as callbacks_pkg
from lit_compress.callbacks import (
    ALDS,
    CompressionCallback,
    CompressionReport,
    FoldBatchNorm,
    LayerCollapse,
    LayerFusion,
    LayerMerge,
)
from lit_compress.models import ImageClassifier
from lit_compress.surgery import applied_events
from tests._latency import fill_fake_latency_cache
from tests.callbacks._toy import MLPNet, SplitLinear, ToyNet
from tests.callbacks.test_layer_fusion import FusionNet

METHODS = [ALDS, FoldBatchNorm, LayerCollapse, LayerFusion, LayerMerge]
BASE_PRIVATES = (
    "_last_global_step",
    "_reporter",
    "_train_loop_started",
    "_plan_on_rank_zero",
    "_recalibrate_batchnorm",
)


def snapshot(callback: CompressionCallback[Any]) -> dict[str, Any]:
    """Every data attribute of the callback, deep-copied (left out: the shared report object, the engine's
    pre-event model copy kept until the first batch after an event, and the methods assigned to the
    instance by Lightning or by the spies)."""
    engine = ("_reporter", "_pending_check")
    return copy.deepcopy({k: v for k, v in vars(callback).items() if k not in engine and not callable(v)})


class StateSpy:
    """Wraps ``plan_event`` and ``event_due`` of one callback and records its state around each call."""

    def __init__(self, callback: CompressionCallback[Any]) -> None:
        self.changes: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.calls = {"plan_event": 0, "event_due": 0}
        for name in self.calls:
            setattr(callback, name, self._wrap(callback, name, getattr(callback, name)))

    def _wrap(self, callback: CompressionCallback[Any], name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any) -> Any:
            before = snapshot(callback)
            result = method(*args)
            after = snapshot(callback)
            self.calls[name] += 1
            if after != before:
                self.changes.append((name, before, after))
            return result

        return wrapped


def _merge_model() -> ImageClassifier:
    return ImageClassifier(backbone="vgg_cnn", width_mult=0.125, image_size=12, lr=0.05, weight_decay=0.0)


def _merge_data() -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 12, 12, generator=gen)
    y = (x.mean(dim=(1, 2, 3)) > 0).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _case(method: type, tmp_path: Path) -> tuple[CompressionCallback[Any], L.LightningModule, tuple[Any, ...]]:
    """A callback of ``method`` that makes at least one event on a small model within 2 epochs."""
    if method is ALDS:
        return ALDS(keep_ratio=0.5, at_epoch=1, num_seeds=1, alternations=1, progress=False), MLPNet(), ()
    if method is FoldBatchNorm:
        return FoldBatchNorm(at_epoch=1), ToyNet(), ()
    if method is LayerCollapse:
        return LayerCollapse(lambda_final=20.0, tau=0.3), MLPNet(), ()
    if method is LayerFusion:
        return LayerFusion(fraction=0.2, increments=2, every_n_epochs=1, measure="cosine"), FusionNet(), ()
    model = _merge_model()
    cache = fill_fake_latency_cache(tmp_path / "latency.json", model, next(iter(_merge_data()))[0])
    callback = LayerMerge(
        budget=0.8,
        importance_batches=1,
        holdout_batches=1,
        latency_warmup=0,
        latency_repeats=1,
        latency_cache=str(cache),
        latency_check_plan=False,  # the cache holds cost-model pseudo-ms, not this machine's
        progress=False,
        bn_recalibration_batches=1,
    )
    return callback, model, (_merge_data(),)


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_event_due_and_plan_event_leave_the_callback_state_unchanged(
    tmp_path: Path, seed: int, method: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lit_compress.measure.latency_table as tables

    monkeypatch.setattr(tables, "latency_table", lambda space, cands, **kw: {c.key: 1.0 for c in cands})
    callback, model, data = _case(method, tmp_path)
    spy = StateSpy(callback)
    L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        callbacks=[callback, CompressionReport(print_report=False, measure_flops=False)],
    ).fit(model, *data)
    assert applied_events(model), "no event happened: the check did not run"
    assert spy.calls["plan_event"] >= 1 and spy.calls["event_due"] >= 1
    assert spy.changes == []


@pytest.mark.parametrize("method", METHODS, ids=lambda m: m.__name__)
def test_methods_use_public_hooks_only(method: type) -> None:
    assert "run_event" not in vars(method)
    source = inspect.getsource(inspect.getmodule(method))  # type: ignore[arg-type]
    assert not [name for name in BASE_PRIVATES if name in source]


def test_every_exported_method_is_checked() -> None:
    exported = {getattr(callbacks_pkg, n) for n in callbacks_pkg.__all__}
    methods = {c for c in exported if isinstance(c, type) and issubclass(c, CompressionCallback)}
    assert methods - {CompressionCallback} == set(METHODS)


def test_the_callback_state_carries_the_rng_and_the_report_does_not() -> None:
    callback = SplitLinear()
    state = callback.state_dict()
    expected = torch.rand(4)
    torch.rand(7)  # move the generator on
    callback.load_state_dict(state)
    assert torch.equal(torch.rand(4), expected)
    assert "rng" not in CompressionReport().state_dict()
