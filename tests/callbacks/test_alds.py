"""ALDS callback: one-shot and cascade events, LR rewinding, baselines, DDP, bf16 and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.callbacks import ALDS, CompressionReport
from lit_compress.errors import ConfigError
from lit_compress.surgery import applied_events
from lit_compress.surgery.alds.low_rank import LowRankLayer
from lit_compress.surgery.log import strip_measurements
from tests.callbacks._toy import HashRecorder, ToyNet


def trainer_for(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        limit_train_batches=3,
        limit_val_batches=2,
        callbacks=[*callbacks, CompressionReport(print_report=False)],
    )
    options.update(kwargs)
    return L.Trainer(**options)


def ops(model: nn.Module) -> list[str]:
    return [e["op"] for e in applied_events(model)]


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ConvToy(L.LightningModule):
    """conv → BN → ReLU → strided conv (one depthwise) → BN → ReLU → pool → Linear, on random 1×8×8 images."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, groups=16),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(32, 4),
        )
        self.example_input_array = torch.zeros(2, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        return DataLoader(
            TensorDataset(torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g)), batch_size=8
        )


def test_one_shot_decomposes_convs_and_linear_at_the_epoch(tmp_path: Path, seed: int) -> None:
    model = ConvToy()
    dense = n_params(model)
    with pytest.warns(UserWarning, match=r"skipping `net.3`: it is a depthwise conv"):
        trainer_for(tmp_path, [ALDS(keep_ratio=0.5, at_epoch=1, progress=False)], max_epochs=2).fit(model)
    assert ops(model) == ["low_rank_decompose"]
    record = applied_events(model)[0]
    assert record["epoch"] == 1 and record["keep_ratio"] == 0.5 and record["method"] == "alds"
    assert record["after"]["params"] == n_params(model) <= 0.5 * dense
    decomposed = {n for n, m in model.named_modules() if isinstance(m, LowRankLayer)}
    assert decomposed == {spec["name"] for spec in record["layers"]} and decomposed
    assert "net.3" not in decomposed
    layer = model.get_submodule(next(iter(decomposed)))
    assert layer.encoder.bias is None and layer.decoder.bias is not None


def _weights_timer(*_args: Any) -> Any:
    """A deterministic stand-in for the device timing: ms = weights / 1000 (+20 % per extra group)."""

    def timer(modules: Any, shape: Any) -> list[float]:
        out = []
        for m in modules:
            ms = sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight")) / 1000
            out.append(ms * (1 + 0.2 * (m.groups - 1)) if isinstance(m, LowRankLayer) else ms)
        return out

    return timer


def test_latency_budget_decomposes_within_the_measured_table(tmp_path: Path, seed: int, monkeypatch: Any) -> None:
    import lit_compress.measure.alds_latency as alds_latency

    monkeypatch.setattr(alds_latency, "_default_timer", _weights_timer)
    model = ConvToy()
    cb = ALDS(budget="latency", latency_ratio=0.6, at_epoch=1, progress=False, latency_groups=[1, 2, 4])
    with pytest.warns(UserWarning, match=r"skipping `net.3`"):
        trainer_for(tmp_path, [cb], max_epochs=2).fit(model)
    record = applied_events(model)[0]
    assert record["budget"] == "latency" and record["epoch"] == 1
    dense_ms, after_ms = record["table_ms"]
    assert 0 < after_ms <= 0.6 * dense_ms
    decomposed = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLayer)}
    assert decomposed and set(decomposed) == {spec["name"] for spec in record["layers"]}
    assert all(m.groups in (1, 2, 4) and m.rank >= 2 for m in decomposed.values())
    assert (tmp_path / "alds_latency.json").exists()
    assert cb.allocations[-1]["latency_ms_after"] == after_ms


def _stem_slow_timer(*_args: Any) -> Any:
    """As :func:`_weights_timer`, but every decomposition of the 1-channel stem is 3x its dense time."""
    base = _weights_timer()

    def timer(modules: Any, shape: Any) -> list[float]:
        out = base(modules, shape)
        return [out[0]] + [3 * out[0] for _ in out[1:]] if shape[0] == 1 else out

    return timer


def test_params_budget_with_latency_guard_keeps_a_slow_layer_dense(tmp_path: Path, seed: int, monkeypatch: Any) -> None:
    import lit_compress.measure.alds_latency as alds_latency
    from lit_compress.surgery.alds.allocate import allocate

    monkeypatch.setattr(alds_latency, "_default_timer", _stem_slow_timer)
    model = ConvToy()
    assert "net.0" in allocate(model, ["net.0", "net.4", "net.9"], 0.5, progress=False).plan  # unguarded
    cb = ALDS(keep_ratio=0.5, at_epoch=1, progress=False, latency_guard=True, latency_groups=[1, 2])
    with pytest.warns(UserWarning, match=r"skipping `net.3`"):
        trainer_for(tmp_path, [cb], max_epochs=2).fit(model)
    record = applied_events(model)[0]
    assert "net.0" in record["kept_dense"] and "net.0" not in {spec["name"] for spec in record["layers"]}
    assert record["layers"] and all(spec["groups"] in (1, 2) for spec in record["layers"])
    assert n_params(model) <= 0.5 * cb.allocations[-1]["params_dense"]
    assert (tmp_path / "alds_latency.json").exists()


class LRProbe(Callback):
    """Records the first param group's lr at every epoch start (after the ALDS event of that epoch)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [0.1, 0.05, 0.1, 0.05]),  # r = 4 − 2 epochs: rewound to epoch 0
        ({"retrain_epochs": 1}, [0.1, 0.05, 0.05, 0.025]),  # rewound by one epoch
        ({"rewind_lr": False}, [0.1, 0.05, 0.025, 0.0125]),  # the schedule continues
    ],
)
def test_lr_rewinding_reuses_the_learning_rates_of_the_epochs_before(
    tmp_path: Path, seed: int, kwargs: dict, expected: list
) -> None:
    model = ToyNet(optimizer="sgd", scheduler="step_epoch", lr=0.1)
    probe = LRProbe()
    callback = ALDS(keep_ratio=0.6, at_epoch=2, progress=False, **kwargs)
    trainer_for(tmp_path, [callback, probe], max_epochs=4).fit(model)
    assert probe.lrs == pytest.approx(expected)
    if kwargs.get("rewind_lr", True):
        assert applied_events(model)[0]["lr_rewound_to"] == [0 if not kwargs else 1]


def test_cascade_recomposes_then_recompresses_at_each_step(tmp_path: Path, seed: int) -> None:
    model = ToyNet(optimizer="sgd", scheduler="none")
    dense = n_params(model)
    callback = ALDS(cascade=[[1, 0.7], [2, 0.4]], progress=False, num_seeds=4)
    trainer_for(tmp_path, [callback], max_epochs=3).fit(model)
    assert ops(model) == ["low_rank_decompose", "low_rank_recompose", "low_rank_decompose"]
    first, _, second = applied_events(model)
    assert first["epoch"] == 1 and second["epoch"] == 2
    assert first["after"]["params"] <= 0.7 * dense and second["after"]["params"] <= 0.4 * dense
    assert [a["keep_ratio"] for a in callback.allocations] == [0.7, 0.4]


@pytest.mark.parametrize("method", ["uniform", "energy"])
def test_baselines_use_plain_svd(tmp_path: Path, seed: int, method: str) -> None:
    model = ToyNet(optimizer="sgd", scheduler="none")
    dense = n_params(model)
    trainer_for(tmp_path, [ALDS(keep_ratio=0.5, at_epoch=1, method=method, progress=False)], max_epochs=2).fit(model)
    record = applied_events(model)[0]
    assert record["method"] == method and all(spec["groups"] == 1 for spec in record["layers"])
    assert n_params(model) <= 0.5 * dense


def test_bad_input_names_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`keep_ratio`=0 is not allowed: must be in \(0, 1\]"):
        ALDS(keep_ratio=0)
    with pytest.raises(ConfigError, match=r"`keep_ratio`=1.5"):
        ALDS(keep_ratio=1.5)
    with pytest.raises(ConfigError, match=r"`keep_ratio`=None .* or a `cascade`"):
        ALDS()
    with pytest.raises(ConfigError, match=r"`cascade`=.*not both"):
        ALDS(keep_ratio=0.5, cascade=[[1, 0.5]])
    with pytest.raises(ConfigError, match=r"`cascade`=.*strictly increasing"):
        ALDS(cascade=[[2, 0.5], [2, 0.3]])
    with pytest.raises(ConfigError, match=r"`cascade`=.*keep ratios must be in \(0, 1\]"):
        ALDS(cascade=[[1, 0.5], [2, 0.0]])
    with pytest.raises(ConfigError, match=r"`num_seeds`=0"):
        ALDS(keep_ratio=0.5, num_seeds=0)
    with pytest.raises(ConfigError, match=r"`budget`='flops' is not allowed: must be 'params' or 'latency'"):
        ALDS(keep_ratio=0.5, budget="flops")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`latency_ratio`=None is not allowed: must be in \(0, 1\] with budget"):
        ALDS(budget="latency")
    for bad in (0, 1.5):
        with pytest.raises(ConfigError, match=rf"`latency_ratio`={bad} is not allowed"):
            ALDS(budget="latency", latency_ratio=bad)
    with pytest.raises(ConfigError, match=r"`keep_ratio`=0.5 is not allowed: None with budget='latency'"):
        ALDS(budget="latency", latency_ratio=0.5, keep_ratio=0.5)
    with pytest.raises(ConfigError, match=r"`method`='uniform' is not allowed: 'alds' with budget='latency'"):
        ALDS(budget="latency", latency_ratio=0.5, method="uniform")
    with pytest.raises(ConfigError, match=r"`latency_groups`=\[0, 2\] is not allowed"):
        ALDS(budget="latency", latency_ratio=0.5, latency_groups=[0, 2])
    with pytest.raises(ConfigError, match=r"`latency_guard`=True is not allowed: False unless budget='params'"):
        ALDS(keep_ratio=0.5, method="uniform", latency_guard=True)
    with pytest.raises(ConfigError, match=r"`latency_ratio`=0.5 is not allowed: None unless budget='latency'"):
        ALDS(keep_ratio=0.5, latency_ratio=0.5)
    with pytest.raises(ConfigError, match=r"`min_saving`=1.2 is not allowed"):
        ALDS(keep_ratio=0.5, min_saving=1.2)
    with (
        pytest.raises(ConfigError, match=r"`targets`=\['net.3'\] is not allowed: .*depthwise"),
        pytest.warns(UserWarning),
    ):
        trainer_for(tmp_path, [ALDS(keep_ratio=0.5, targets=["net.3"], progress=False)], max_epochs=1).fit(ConvToy())
    with pytest.raises(ConfigError, match=r"`targets`=\['encoder.\*'\] matches no module"):
        trainer_for(tmp_path, [ALDS(keep_ratio=0.5, targets=["encoder.*"], progress=False)], max_epochs=1).fit(ToyNet())
    with pytest.raises(ConfigError, match=r"`keep_ratio`=0.01 is not allowed: even rank 2 .* at least 0\.2"):
        trainer_for(tmp_path, [ALDS(keep_ratio=0.01, progress=False)], max_epochs=1).fit(ToyNet())


def test_alds_under_bf16_mixed(tmp_path: Path, seed: int) -> None:
    model = ToyNet(optimizer="sgd", scheduler="none")
    trainer_for(tmp_path, [ALDS(keep_ratio=0.5, at_epoch=1, progress=False)], max_epochs=2, precision="bf16-mixed").fit(
        model
    )
    assert ops(model) == ["low_rank_decompose"]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


def test_resume_after_a_decomposition_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    def run(root: Path, extra: list[Callback], model: ToyNet, ckpt: str | None = None) -> None:
        checkpoints = ModelCheckpoint(dirpath=str(root), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
        callbacks = [ALDS(cascade=[[1, 0.7], [3, 0.4]], progress=False, num_seeds=4), checkpoints, *extra]
        trainer = trainer_for(root, callbacks, max_epochs=5, deterministic=True, enable_checkpointing=True)
        trainer.fit(model, ckpt_path=ckpt)

    class CrashAt(Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 2:
                raise RuntimeError("simulated crash")

    L.seed_everything(0, verbose=False)
    model_a = ToyNet(optimizer="sgd", scheduler="step_epoch")
    run(tmp_path / "a", [], model_a)
    L.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "b", [CrashAt()], ToyNet(optimizer="sgd", scheduler="step_epoch"))
    ckpt = tmp_path / "b" / "epoch=1.ckpt"
    saved = torch.load(ckpt, weights_only=True)["lit_compress"]["events"]
    assert [e["op"] for e in saved] == ["low_rank_decompose"]  # taken after the first decomposition
    model_c = ToyNet(optimizer="sgd", scheduler="step_epoch")
    run(tmp_path / "c", [], model_c, ckpt=str(ckpt))
    assert ops(model_c) == ["low_rank_decompose", "low_rank_recompose", "low_rank_decompose"]
    assert [strip_measurements(e) for e in applied_events(model_a)] == [
        strip_measurements(e) for e in applied_events(model_c)
    ]
    sd_a, sd_c = model_a.state_dict(), model_c.state_dict()
    assert sd_a.keys() == sd_c.keys()
    assert all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)


def test_alds_under_ddp_spawn_keeps_ranks_identical(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    trainer = trainer_for(
        tmp_path,
        [ALDS(keep_ratio=0.5, at_epoch=1, progress=False, num_seeds=4), HashRecorder(str(tmp_path))],
        max_epochs=2,
        devices=2,
        strategy="ddp_spawn",
    )
    trainer.fit(ToyNet(optimizer="sgd", scheduler="step_epoch"))
    after = [(tmp_path / f"after_event_rank{r}.txt").read_text() for r in (0, 1)]
    end = [(tmp_path / f"end_rank{r}.txt").read_text() for r in (0, 1)]
    assert after[0] == after[1] and end[0] == end[1]
    assert end[0] != after[0]


def test_rewinding_replays_chainable_schedulers_by_epoch_or_step() -> None:
    from types import SimpleNamespace

    from lit_compress.callbacks.alds import rewind_schedulers

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.1)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
    cfg = SimpleNamespace(scheduler=sched, interval="epoch")
    trainer = SimpleNamespace(
        lr_scheduler_configs=[cfg], num_training_batches=2, accumulate_grad_batches=1, max_steps=-1, global_step=10
    )
    assert rewind_schedulers(trainer, 2) == [3]  # epoch 5 -> 3: after the first milestone only
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1) and sched.last_epoch == 3
    cfg.interval = "step"  # one epoch = 2 steps
    assert rewind_schedulers(trainer, 1) == [1]
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
