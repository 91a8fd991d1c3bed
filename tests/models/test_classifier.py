"""ImageClassifier: backbones by name (ours and torchvision's), argument checks, optimizers, a short fit."""

import itertools
import math
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.checkpointing import CompressMixin
from lit_compress.errors import ConfigError
from lit_compress.models import OUR_BACKBONES, ImageClassifier, SmallCNN, VGGStyleCNN
from lit_compress.models.classifier import build_backbone


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("backbone", OUR_BACKBONES)
def test_our_backbones(backbone):
    model = ImageClassifier(backbone=backbone, width_mult=0.25, num_classes=7, in_channels=1)
    assert model.example_input_array.shape == (2, 1, 28, 28)
    if backbone.startswith("cifar_resnet"):
        depth = int(backbone[len("cifar_resnet") :])
        assert len(model.net.layer1) == (depth - 2) // 6 and model.net.fc.out_features == 7
        if depth > 20:
            return  # deeper ones: structure only, to keep the test fast (forward is covered in test_cifar_resnet)
    with torch.no_grad():
        assert model(model.example_input_array).shape == (2, 7)


def test_vgg_cnn_matches_the_benchmark_parameter_counts():
    assert n_params(VGGStyleCNN()) == 936_618
    assert n_params(VGGStyleCNN(width_mult=0.5)) == 235_098
    vgg = VGGStyleCNN()
    kinds = [type(m) for m in vgg.classifier]
    assert kinds == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert vgg(torch.zeros(2, 1, 32, 32)).shape == (2, 10)  # adaptive pooling: any size
    small = SmallCNN(width_mult=0.5)
    assert [type(m) for m in small.classifier] == [nn.Linear, nn.ReLU, nn.Linear]
    assert small(torch.zeros(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_backbone_with_one_input_channel(name):
    model = ImageClassifier(backbone=name, in_channels=1, image_size=32).eval()
    first_conv = next(m for m in model.net.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.in_channels == 1
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_unknown_backbone_lists_ours_torchvision_and_close_matches():
    with pytest.raises(ConfigError, match=r"`backbone`='resnet81' is not allowed") as info:
        ImageClassifier(backbone="resnet81")
    msg = str(info.value)
    assert "small_cnn" in msg and "cifar_resnet110" in msg
    assert "torchvision.models.list_models(module=torchvision.models)" in msg
    assert re.search(r"Did you mean: .*resnet18", msg)
    with pytest.raises(ConfigError, match=r"Did you mean: cifar_resnet20"):
        build_backbone("cifar_resnet_20")


def test_width_mult_is_for_our_backbones_only():
    with pytest.raises(ConfigError, match=r"`width_mult`=0.5 is not allowed: must be 1.0 for the torchvision model"):
        ImageClassifier(backbone="resnet18", width_mult=0.5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "`lr`=-1.0 is not allowed: must be > 0."),
        ({"momentum": 1.0}, "`momentum`=1.0 is not allowed: must be in [0, 1)."),
        ({"weight_decay": -0.1}, "`weight_decay`=-0.1 is not allowed: must be >= 0."),
        ({"optimizer": "lamb"}, "`optimizer`='lamb' is not allowed: must be one of 'sgd', 'adamw', 'adam'."),
        ({"scheduler": "poly"}, "`scheduler`='poly' is not allowed"),
        ({"num_classes": 0}, "`num_classes`=0 is not allowed: must be >= 1."),
        ({"label_smoothing": 1.5}, "`label_smoothing`=1.5 is not allowed"),
        ({"image_size": 0}, "`image_size`=0 is not allowed"),
    ],
)
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        ImageClassifier(**kwargs)


def test_hparams_and_mixin_first():
    model = ImageClassifier(backbone="small_cnn", lr=0.1, width_mult=0.5)
    assert ImageClassifier.__mro__[1] is CompressMixin
    assert model.hparams.lr == 0.1 and model.hparams.backbone == "small_cnn" and model.hparams.width_mult == 0.5


@pytest.mark.parametrize(
    ("name", "cls"), [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam)]
)
def test_configure_optimizers_uses_the_current_parameters(name, cls):
    model = ImageClassifier(width_mult=0.25, optimizer=name, scheduler="none")
    opt = model.configure_optimizers()
    assert isinstance(opt, cls)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    model.net.classifier[-1] = nn.Linear(32, 10)  # a structural change
    new_ids = {id(p) for g in model.configure_optimizers().param_groups for p in g["params"]}
    assert id(model.net.classifier[-1].weight) in new_ids and new_ids == {id(p) for p in model.parameters()}


def test_schedules_continue_from_the_current_epoch_when_rebuilt():
    model = ImageClassifier(width_mult=0.25, lr=0.1)
    config = model.configure_optimizers()  # no trainer: no horizon, constant
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1)
    model._trainer = SimpleNamespace(max_epochs=10, current_epoch=5, global_step=50)
    try:
        config = model.configure_optimizers()
        assert config["lr_scheduler"]["interval"] == "epoch"
        assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 2)))
        assert config["lr_scheduler"]["scheduler"].last_epoch == 5
        step = ImageClassifier(width_mult=0.25, lr=0.1, scheduler="step")
        step._trainer = SimpleNamespace(max_epochs=8, current_epoch=6, global_step=0)
        assert step.configure_optimizers()["optimizer"].param_groups[0]["lr"] == pytest.approx(0.001)
    finally:
        model._trainer = None


def test_warmup_epochs_rewarm_then_follow_the_schedule_per_step():
    model = ImageClassifier(width_mult=0.25, lr=0.1, warmup_epochs=1.0)
    # 10 epochs of 4 steps: 4 warm-up steps, then cosine over the other 36
    model._trainer = SimpleNamespace(max_epochs=10, current_epoch=0, global_step=0, estimated_stepping_batches=40)
    try:
        config = model.configure_optimizers()
        sched, opt = config["lr_scheduler"]["scheduler"], config["optimizer"]
        assert config["lr_scheduler"]["interval"] == "step"
        lrs = []
        for _ in range(40):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
        assert lrs[4] == pytest.approx(0.1) and lrs[22] == pytest.approx(0.05)
        assert lrs[39] < 0.001 and all(a >= b for a, b in itertools.pairwise(lrs[3:]))
        # rebuilt in the middle of the fit (after a structural event): continues at the current step
        model._trainer = SimpleNamespace(max_epochs=10, current_epoch=5, global_step=22, estimated_stepping_batches=40)
        assert model.configure_optimizers()["optimizer"].param_groups[0]["lr"] == pytest.approx(0.05)
    finally:
        model._trainer = None
    with pytest.raises(ConfigError, match="warmup_epochs"):
        ImageClassifier(warmup_epochs=float("nan"))


def random_loader(n=16, size=28, channels=1, batch_size=8):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, channels, size, size, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(data, batch_size=batch_size)


def test_short_fit_logs_metrics_and_reloads_from_checkpoint(tmp_path):
    model = ImageClassifier(backbone="small_cnn", width_mult=0.25, label_smoothing=0.1)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, train_dataloaders=random_loader(), val_dataloaders=random_loader())
    metrics = trainer.callback_metrics
    assert {"train_loss", "train_acc", "val_loss", "val_acc"} <= set(metrics)
    assert 0.0 <= metrics["val_acc"].item() <= 1.0
    trainer.test(model, dataloaders=random_loader(), verbose=False)
    assert "test_acc" in trainer.callback_metrics
    preds = trainer.predict(model, dataloaders=random_loader())
    assert preds[0].shape == (8, 10)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert loaded.hparams.width_mult == 0.25
    x = torch.randn(2, 1, 28, 28)
    assert torch.allclose(loaded.eval()(x), model.eval()(x))
