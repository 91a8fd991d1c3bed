"""LayerFusion callback: schedule, real ties, optimizer state, bad input, resume, load_from_checkpoint,
DDP (ddp_spawn, 2 CPU processes), bf16-mixed, and the model families it must work on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lit_compress
from lit_compress.callbacks import CompressionReport, LayerFusion
from lit_compress.callbacks.layer_fusion import merge_fused_optimizer_state_
from lit_compress.errors import ConfigError
from lit_compress.measure import count_parameters
from lit_compress.surgery import applied_events
from lit_compress.surgery.fusion.tie import fuse_layers_, tied_groups
from lit_compress.surgery.log import strip_measurements
from tests.callbacks._toy import HashRecorder

BASE = 16 * 32 + 32 + 4 * (32 * 32 + 32) + 32 * 4 + 4  # 4,900
UNIT = 32 * 32 + 32  # 1,056


class FusionNet(L.LightningModule):
    """stem Linear(16, 32) → four Linear(32, 32) + ReLU → head Linear(32, 4), Adam, 64 fixed samples."""

    def __init__(self, lr: float = 1e-2, optimizer: str = "adam") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.stem = nn.Linear(16, 32)
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)])
        self.head = nn.Linear(32, 4)
        self.example_input_array = torch.zeros(2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)

    def _data(self, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(64, 16, generator=g)
        y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._data(0)

    def val_dataloader(self) -> DataLoader:
        return self._data(1)


def trainer_for(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = dict(
        max_epochs=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=4,
        callbacks=[*callbacks, CompressionReport(print_report=False)],
    )
    options.update(kwargs)
    return L.Trainer(**options)


def fusion_events(model: nn.Module) -> list[dict[str, Any]]:
    return [e for e in applied_events(model) if e["op"] == "fuse_layers"]


def test_fusion_steps_tie_layers_for_real_and_reach_the_target(tmp_path: Path, seed: int) -> None:
    model = FusionNet()
    callback = LayerFusion(fraction=0.4, increments=2, every_n_epochs=1, measure="cosine")
    trainer_for(tmp_path, [callback], max_epochs=3).fit(model)
    events = fusion_events(model)
    assert [e["epoch"] for e in events] == [0, 1] and [e["increment"] for e in events] == [1, 2]
    assert count_parameters(model) == BASE - 2 * UNIT  # ceil(0.4 * 4900) = 1960 needs two ties
    assert events[-1]["after"]["params"] == BASE - 2 * UNIT
    groups = tied_groups(model)
    assert groups and all(name.startswith("layers.") for g in groups for name in g)
    for g in groups:  # one storage: every use is the same Parameter object
        params = [model.get_submodule(n.rsplit(".", 1)[0])._parameters[n.rsplit(".", 1)[1]] for n in g]
        assert all(p is params[0] for p in params)
    assert len(list(model.parameters())) == 12 - 4


def test_auto_spread_and_step_schedules(tmp_path: Path, seed: int) -> None:
    model = FusionNet()
    trainer_for(tmp_path, [LayerFusion(fraction=0.4, increments=2)], max_epochs=6).fit(model)
    assert [e["epoch"] for e in fusion_events(model)] == [0, 2]  # interval = 6 // (2 + 1)
    model = FusionNet()
    trainer_for(tmp_path, [LayerFusion(fraction=0.4, increments=2, every_n_steps=3, at_step=2)], max_epochs=2).fit(
        model
    )
    assert [e["global_step"] for e in fusion_events(model)] == [2, 5]


@pytest.mark.parametrize("mode", ["reset", "average"])
def test_optimizer_state_of_a_tied_parameter(mode: str) -> None:
    torch.manual_seed(0)
    model = FusionNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()
    names = {id(p): n for n, p in model.named_parameters()}
    before = [{names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}]
    records = fuse_layers_(
        model, [{"a": ["layers.0"], "b": ["layers.2"], "params": ["weight", "bias"], "seed": 0}], "mean"
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)  # what the engine's rebuild does
    opt.state[model.layers[0].weight] = dict(before[0]["layers.0.weight"])  # ... and it restores by first name
    merge_fused_optimizer_state_([opt], model, records, before, mode)
    shared = model.layers[0].weight
    if mode == "reset":
        assert shared not in opt.state or not opt.state[shared]
    else:
        a, b = before[0]["layers.0.weight"], before[0]["layers.2.weight"]
        torch.testing.assert_close(opt.state[shared]["exp_avg"], (a["exp_avg"] + b["exp_avg"]) / 2)
        torch.testing.assert_close(opt.state[shared]["exp_avg_sq"], (a["exp_avg_sq"] + b["exp_avg_sq"]) / 2)
    model(torch.randn(8, 16)).sum().backward()
    opt.step()  # the optimizer steps with the merged state and saves its state dict
    opt.state_dict()


def test_optimizer_state_is_reset_inside_fit(tmp_path: Path, seed: int) -> None:
    seen: dict[str, Any] = {}

    class Probe(Callback):  # runs after LayerFusion in the same hook
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 1:
                opt = trainer.optimizers[0]
                tied = {id(p) for g in tied_groups(pl_module) for p in [pl_module.get_parameter(g[0])]}
                seen["tied_state"] = [opt.state.get(p) for p in pl_module.parameters() if id(p) in tied]
                seen["other_state"] = opt.state.get(pl_module.stem.weight)

    model = FusionNet()
    callbacks = [LayerFusion(fraction=0.2, increments=1, every_n_epochs=1, at_epoch=1), Probe()]
    trainer_for(tmp_path, callbacks, max_epochs=2).fit(model)
    assert seen["tied_state"] and all(not s for s in seen["tied_state"])
    assert seen["other_state"] and "exp_avg" in seen["other_state"]  # untouched layers keep their moments


def test_bad_input_names_the_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`measure`='l2' is not allowed: must be one of 'cosine'.*'wasserstein'"):
        LayerFusion(measure="l2")
    with pytest.raises(ConfigError, match=r"`policy`='average' is not allowed: must be one of 'mean', 'mix', 'freeze'"):
        LayerFusion(policy="average")
    for bad in (0, 1, 1.5, -0.1):
        with pytest.raises(
            ConfigError, match=rf"`fraction`={bad!r} is not allowed: must be in the open interval \(0, 1\)"
        ):
            LayerFusion(fraction=bad)
    with pytest.raises(ConfigError, match="`every_n_steps`"):
        LayerFusion(every_n_epochs=1, every_n_steps=1)
    with pytest.raises(
        ConfigError, match=r"`targets`=\['stem', 'head'\] selects no two layers of the same role and shape"
    ):
        trainer_for(tmp_path, [LayerFusion(targets=["stem", "head"])], max_epochs=1).fit(FusionNet())
    with pytest.raises(
        ConfigError, match=r"`fraction`=0.9 is not allowed: tying the selected layers can remove at most 3,168"
    ):
        trainer_for(tmp_path, [LayerFusion(fraction=0.9)], max_epochs=1).fit(FusionNet())


def _run(
    root: Path, extra: list[Callback], model: FusionNet, ckpt: str | None = None, policy: str = "mix"
) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=str(root), save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    fusion = LayerFusion(fraction=0.6, increments=3, every_n_epochs=1, policy=policy, measure="wasserstein")
    trainer = trainer_for(
        root, [fusion, checkpoints, *extra], max_epochs=4, deterministic=True, enable_checkpointing=True
    )
    trainer.fit(model, ckpt_path=ckpt)
    return trainer


@pytest.mark.parametrize("policy", ["mix", "freeze"])
def test_resume_mid_schedule_matches_an_uninterrupted_run(tmp_path: Path, policy: str) -> None:
    class CrashAt(Callback):
        def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.current_epoch == 3:
                raise RuntimeError("simulated crash")

    L.seed_everything(0, verbose=False)
    model_a = FusionNet()
    _run(tmp_path / "a", [], model_a, policy=policy)
    L.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(tmp_path / "b", [CrashAt()], FusionNet(), policy=policy)
    ckpt = tmp_path / "b" / "epoch=1.ckpt"  # after fusion steps 1 and 2, before step 3
    saved = torch.load(ckpt, weights_only=True)["lit_compress"]["events"]
    assert [e["op"] for e in saved] == ["fuse_layers", "fuse_layers"]
    model_c = FusionNet()
    _run(tmp_path / "c", [], model_c, ckpt=str(ckpt), policy=policy)
    assert [strip_measurements(e) for e in applied_events(model_a)] == [
        strip_measurements(e) for e in applied_events(model_c)
    ]
    assert sorted(map(sorted, tied_groups(model_a))) == sorted(map(sorted, tied_groups(model_c)))
    sd_a, sd_c = model_a.state_dict(), model_c.state_dict()
    assert sd_a.keys() == sd_c.keys() and all(torch.equal(sd_a[k], sd_c[k]) for k in sd_a)

    loaded = lit_compress.load_from_checkpoint(FusionNet, str(tmp_path / "a" / "epoch=3.ckpt"))
    assert count_parameters(loaded) == count_parameters(model_a) == BASE - 3 * UNIT
    assert sorted(map(sorted, tied_groups(loaded))) == sorted(map(sorted, tied_groups(model_a)))
    x = torch.randn(4, 16)
    torch.testing.assert_close(loaded.eval()(x), model_a.eval()(x))


def test_fusion_under_ddp_spawn_ties_the_same_pairs_on_every_rank(tmp_path: Path) -> None:
    L.seed_everything(0, verbose=False)
    fusion = LayerFusion(fraction=0.4, increments=2, every_n_epochs=1, policy="mix")
    trainer = trainer_for(
        tmp_path,
        [fusion, HashRecorder(str(tmp_path))],
        max_epochs=3,
        devices=2,
        strategy="ddp_spawn",
        enable_checkpointing=True,
    )
    trainer.fit(FusionNet())
    after = [(tmp_path / f"after_event_rank{r}.txt").read_text() for r in (0, 1)]
    end = [(tmp_path / f"end_rank{r}.txt").read_text() for r in (0, 1)]
    assert after[0] == after[1] and end[0] == end[1] and end[0] != after[0]
    ckpt = next(tmp_path.rglob("*.ckpt"))
    loaded = lit_compress.load_from_checkpoint(FusionNet, str(ckpt))
    assert count_parameters(loaded) == BASE - 2 * UNIT  # the ties went into the checkpoint


def test_fusion_under_bf16_mixed(tmp_path: Path, seed: int) -> None:
    model = FusionNet()
    trainer_for(tmp_path, [LayerFusion(fraction=0.4, increments=2, every_n_epochs=1)], precision="bf16-mixed").fit(
        model
    )
    assert count_parameters(model) == BASE - 2 * UNIT
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("architecture", ["transformer", "gpt2", "bert"])
def test_language_models_fuse_by_role(tmp_path: Path, seed: int, architecture: str) -> None:
    if architecture != "transformer":
        pytest.importorskip("transformers")
    from lit_compress.models import CausalLanguageModel

    model = CausalLanguageModel(
        vocab_size=30, block_size=16, n_layer=3, n_head=2, d_model=16, architecture=architecture, warmup_steps=1
    )
    tokens = torch.randint(0, 30, (32, 17))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    base = count_parameters(model)
    tied_before = [sorted(g) for g in tied_groups(model)]  # GPT-2 ties lm_head to wte by itself
    callback = LayerFusion(fraction=0.3, increments=2, every_n_steps=2, measure="cka", policy="mean")
    trainer_for(tmp_path, [callback], max_epochs=2).fit(model, loader)
    assert count_parameters(model) <= base - int(0.3 * base)
    new = [g for g in tied_groups(model) if sorted(g) not in tied_before]
    assert new
    for group in new:  # every tie joins the same position (role) in different blocks
        leaves = {".".join(n.split(".")[-3:]) for n in group}
        assert len(leaves) == 1, group


def test_torchvision_resnet_trains_with_fusion(tmp_path: Path, seed: int) -> None:
    from lit_compress.models import ImageClassifier

    model = ImageClassifier(backbone="resnet18", num_classes=4, in_channels=3, image_size=32)
    data = TensorDataset(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    loader = DataLoader(data, batch_size=4)
    base = count_parameters(model)
    callback = LayerFusion(fraction=0.25, increments=1, every_n_steps=1, bn_recalibration_batches=1)
    trainer_for(tmp_path, [callback], max_epochs=1, limit_val_batches=0).fit(model, loader)
    assert count_parameters(model) <= base * 0.75
    assert all("conv" in n or "downsample" in n for g in tied_groups(model) for n in g)


@pytest.mark.slow
def test_torchvision_vgg_fuses(seed: int) -> None:
    import torchvision

    from lit_compress.surgery import fusion_units, plan_fusions
    from lit_compress.surgery.fusion.groups import max_removable

    model = torchvision.models.vgg11(num_classes=10)
    units = fusion_units(model)
    base, most = count_parameters(model), max_removable(model, units)
    assert most == 2 * (512 * 512 * 9 + 512)  # the three 512→512 convs tie into one
    plan = plan_fusions(model, units, "wasserstein", remove=most, policy="mean")
    fuse_layers_(model, plan, "mean")
    assert count_parameters(model) == base - most
    model(torch.randn(1, 3, 64, 64))


def test_schedule_arguments_follow_the_shared_vocabulary(tmp_path: Path, seed: int) -> None:
    with pytest.raises(ConfigError, match=r"`at_step`=2 is not allowed: give `at_epoch` or `at_step`, not both"):
        LayerFusion(at_epoch=1, at_step=2)
    with pytest.raises(ConfigError, match=r"`at_epoch`=1 is not allowed: a series `every_n_steps` starts `at_step`"):
        LayerFusion(every_n_steps=3, at_epoch=1)
    with pytest.raises(ConfigError, match=r"`at_step`=1 is not allowed: a series `every_n_epochs` starts `at_epoch`"):
        LayerFusion(every_n_epochs=3, at_step=1)
    # `at_step` without a period: the steps are spread over `max_steps` (interval (11 - 2) // 3 = 3).
    model = FusionNet()
    trainer_for(tmp_path, [LayerFusion(fraction=0.4, increments=2, at_step=2)], max_steps=11).fit(model)
    assert [e["global_step"] for e in fusion_events(model)] == [2, 5]


def test_layers_per_group_budget_fuses_floor_p_n_layers_in_even_steps(tmp_path: Path, seed: int) -> None:
    model = FusionNet()
    callback = LayerFusion(fraction=0.7, budget="layers_per_group", increments=2, every_n_epochs=1)
    trainer_for(tmp_path, [callback], max_epochs=3).fit(model)
    events = fusion_events(model)
    # the group of four Linear(32, 32): floor(0.7 * 4) = 2 layers fused, one per step
    assert [len(e["fusions"]) for e in events] == [1, 1] and {e["budget"] for e in events} == {"layers_per_group"}
    assert count_parameters(model) == BASE - 2 * UNIT
    assert callback.achieved_reduction == pytest.approx(2 * UNIT / BASE)
    assert len({id(layer.weight) for layer in model.layers}) == 2


def test_layers_per_group_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"`budget`='layers' is not allowed: must be one of 'layers_per_group'"):
        LayerFusion(budget="layers")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"`fraction`=0.2 is not allowed: .* use fraction >= 0.250"):
        trainer_for(tmp_path, [LayerFusion(fraction=0.2, budget="layers_per_group")], max_epochs=1).fit(FusionNet())
    callback = LayerFusion(fraction=0.5, budget="layers_per_group", targets=["stem", "layers.*"], increments=1)
    with pytest.warns(UserWarning, match=r"no other layer of the same role and shape.*`stem`"):
        trainer_for(tmp_path, [callback], max_epochs=1).fit(FusionNet())


def test_aligned_fusion_in_fit_warns_about_layers_it_cannot_permute(tmp_path: Path, seed: int) -> None:
    from lit_compress.models import CausalLanguageModel

    model = CausalLanguageModel(vocab_size=30, block_size=16, n_layer=3, n_head=2, d_model=16, warmup_steps=1)
    tokens = torch.randint(0, 30, (32, 17))
    loader = DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=8)
    callback = LayerFusion(fraction=0.5, budget="layers_per_group", increments=1, every_n_steps=2, align=True)
    with pytest.warns(UserWarning, match=r"align=True\) cannot permute the hidden units of .*q_proj"):
        trainer_for(tmp_path, [callback], max_epochs=1).fit(model, loader)
    fusions = [f for e in fusion_events(model) for f in e["fusions"]]
    assert len(fusions) == 6  # q, k, v, out, ffn_in, ffn_out: floor(0.5 * 3) = 1 layer each
    ffn = [f for f in fusions if "mlp" in f["a"][0]]
    assert ffn and all("align_skipped" not in f for f in ffn)
    assert all("align_skipped" in f for f in fusions if "attn" in f["a"][0])


def test_a_layer_sharing_a_parameter_with_another_groups_layer_is_named_and_left_out() -> None:
    model = FusionNet()
    model.stem2 = nn.Linear(16, 32)  # a second stem: the two form a group
    model.layers[0].bias = model.stem2.bias  # a bias shared across two groups
    callback = LayerFusion(fraction=0.5, budget="layers_per_group")
    with pytest.warns(UserWarning, match=r"`layers.0` \(shares a parameter with `stem2.bias`\)"):
        units = callback._usable_units(model, warn=True)
    assert {u.name for u in units} == {"stem", "head", "layers.1", "layers.2", "layers.3"}
