"""``ImageClassifier``: a LightningModule around one of our CNNs or any torchvision classification model."""

import difflib
import math
from typing import Any, Literal

import lightning as L
import torch
import torchmetrics
import torchvision
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor, nn

from lit_compress.checkpointing import CompressMixin
from lit_compress.errors import ConfigError, allowed
from lit_compress.models.cifar_resnet import cifar_resnet
from lit_compress.models.small_cnn import SmallCNN, VGGStyleCNN

#: Backbones defined in lit_compress (``width_mult`` applies to these only).
OUR_BACKBONES = (
    "small_cnn",
    "vgg_cnn",
    "cifar_resnet20",
    "cifar_resnet32",
    "cifar_resnet44",
    "cifar_resnet56",
    "cifar_resnet110",
    "small_mobilenet_v2",
)

# Extra constructor arguments for torchvision models that need them to return plain logits.
_TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def torchvision_classifiers() -> list[str]:
    """Names of torchvision's classification models (``torchvision.models.list_models``)."""
    return list(torchvision.models.list_models(module=torchvision.models))


def check_backbone_name(backbone: str) -> None:
    """Raise ``ConfigError`` unless ``backbone`` is ours or a torchvision classification model."""
    if backbone in OUR_BACKBONES:
        return
    tv = torchvision_classifiers()
    if backbone in tv:
        return
    close = difflib.get_close_matches(backbone, list(OUR_BACKBONES) + tv, n=3)
    raise ConfigError(
        f"`backbone`={backbone!r} is not allowed: must be one of {', '.join(OUR_BACKBONES)}, or any name in "
        "torchvision.models.list_models(module=torchvision.models) (e.g. resnet18, mobilenet_v2)."
        + (f" Did you mean: {', '.join(close)}?" if close else "")
    )


def _replace_first_conv(model: nn.Module, in_channels: int, name: str) -> None:
    """Swap the first ``nn.Conv2d`` of ``model`` for one reading ``in_channels`` channels (fresh weights)."""
    for qualified, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels:
                return
            if module.groups != 1:
                break
            new = nn.Conv2d(
                in_channels,
                module.out_channels,
                kernel_size=module.kernel_size,  # type: ignore[arg-type]
                stride=module.stride,  # type: ignore[arg-type]
                padding=module.padding,  # type: ignore[arg-type]
                dilation=module.dilation,  # type: ignore[arg-type]
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
            parent_name, _, child = qualified.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            return
    raise ConfigError(
        f"`in_channels`={in_channels!r} is not allowed for backbone {name!r}: its first convolution could not "
        "be adapted; use in_channels=3 or one of our backbones."
    )


def build_backbone(
    backbone: str, num_classes: int = 10, in_channels: int = 1, width_mult: float = 1.0, image_size: int = 28
) -> nn.Module:
    """Build the network named ``backbone`` (ours or torchvision's, no pretrained weights).

    Shapes: the result maps ``(B, in_channels, H, W) -> (B, num_classes)``.

    Raises:
        ConfigError: For an unknown name, or ``width_mult != 1`` with a torchvision model.
    """
    check_backbone_name(backbone)
    if backbone == "small_cnn":
        return SmallCNN(in_channels, num_classes, width_mult)
    if backbone == "vgg_cnn":
        return VGGStyleCNN(in_channels, num_classes, width_mult)
    if backbone == "small_mobilenet_v2":
        from lit_compress.models.small_mobilenet import small_mobilenet_v2

        return small_mobilenet_v2(in_channels, num_classes, width_mult)
    if backbone.startswith("cifar_resnet"):
        return cifar_resnet(int(backbone[len("cifar_resnet") :]), in_channels, num_classes, width_mult)
    if width_mult != 1.0:
        raise allowed("width_mult", width_mult, f"must be 1.0 for the torchvision model {backbone!r}")
    kwargs = dict(_TORCHVISION_KWARGS.get(backbone, {}))
    if backbone.startswith("vit_"):
        kwargs["image_size"] = image_size
    net = torchvision.models.get_model(backbone, weights=None, num_classes=num_classes, **kwargs)
    if in_channels != 3:
        _replace_first_conv(net, in_channels, backbone)
    return net


class ImageClassifier(CompressMixin, L.LightningModule):
    """Image classification with cross-entropy, accuracy metrics and SGD/Adam(W) + an epoch schedule.

    Args:
        backbone: One of ``small_cnn``, ``vgg_cnn``, ``cifar_resnet{20,32,44,56,110}``, or any
            torchvision classification model name (built with ``weights=None``).
        num_classes: Number of classes (in the ``lit_compress`` CLI: the data module's ``num_classes``
            when it has one).
        in_channels: Input channels; a torchvision model's first conv is replaced when not 3 (in the
            ``lit_compress`` CLI: the data module's ``in_channels`` when it has one).
        width_mult: Width multiplier of our backbones (must be 1.0 for torchvision models).
        image_size: Height = width of ``example_input_array`` (and of ViT models).
        optimizer: ``sgd`` (with momentum), ``adamw`` or ``adam``.
        lr: Peak learning rate.
        momentum: SGD momentum.
        weight_decay: Weight decay on weight matrices and kernels (not on biases, norms or scalar slopes).
        scheduler: ``cosine`` (to 0 over ``max_epochs``), ``step`` (x0.1 at 50 % and 75 % of
            ``max_epochs``) or ``none``.
        label_smoothing: Label smoothing of the training loss.
        warmup_epochs: Linear learning-rate warm-up over this many epochs (counted in steps) before the
            schedule; with a warm-up the schedule is applied per step. A recovery fit after a
            structural change re-warms this way instead of jumping to the full learning rate.

    Shapes: ``forward``: ``(B, in_channels, H, W) -> (B, num_classes)`` logits.
    """

    def __init__(
        self,
        backbone: str = "small_cnn",
        num_classes: PositiveInt = 10,
        in_channels: PositiveInt = 1,
        width_mult: PositiveFloat = 1.0,
        image_size: PositiveInt = 28,
        optimizer: Literal["sgd", "adamw", "adam"] = "sgd",
        lr: PositiveFloat = 0.05,
        momentum: NonNegativeFloat = 0.9,
        weight_decay: NonNegativeFloat = 5e-4,
        scheduler: Literal["cosine", "step", "none"] = "cosine",
        label_smoothing: NonNegativeFloat = 0.0,
        warmup_epochs: NonNegativeFloat = 0.0,
    ) -> None:
        super().__init__()
        _check_classifier_args(
            num_classes,
            in_channels,
            width_mult,
            image_size,
            optimizer,
            lr,
            momentum,
            weight_decay,
            scheduler,
            label_smoothing,
        )
        if isinstance(warmup_epochs, bool) or not math.isfinite(warmup_epochs) or warmup_epochs < 0:
            raise allowed("warmup_epochs", warmup_epochs, "a finite number >= 0")
        self.save_hyperparameters()
        self.net = build_backbone(backbone, num_classes, in_channels, width_mult, image_size)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.example_input_array = torch.zeros(2, in_channels, image_size, image_size)

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x)  # (B, num_classes)
        return out.logits if hasattr(out, "logits") else out

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = self.criterion(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True, batch_size=len(y))
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", nn.functional.cross_entropy(logits, y), batch_size=len(y))
        self.log("val_acc", self.val_acc, prog_bar=True, batch_size=len(y))

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", nn.functional.cross_entropy(logits, y), batch_size=len(y))
        self.log("test_acc", self.test_acc, batch_size=len(y))

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Logits ``(B, num_classes)`` for a batch ``x`` or ``(x, y)``."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x)

    def configure_optimizers(self) -> Any:
        """Optimizer over the current parameters (rebuilt on every call, after surgery too) and its schedule.

        The schedule starts at the trainer's current epoch (see :func:`lambda_lr_at`), so a call in the
        middle of training continues it where it was instead of restarting it.
        """
        hp = self.hparams  # read here (not copied in __init__), so that changes to hparams (an LR finder) apply
        optimizer: str = hp["optimizer"]
        lr: float = hp["lr"]
        weight_decay: float = hp["weight_decay"]
        scheduler: str = hp["scheduler"]
        # Weight decay on weight matrices and kernels only: not on biases, norm parameters, or the
        # scalar slopes that LayerCollapse adds (decay would pull them away from 1).
        trainable = [p for p in self.parameters() if p.requires_grad]
        params = [
            {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
        ]
        if optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr, momentum=hp["momentum"])
        elif optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=lr)
        else:
            opt = torch.optim.Adam(params, lr=lr)
        if scheduler == "none":
            return opt
        trainer = self._trainer
        max_epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
        factor = _cosine_factor if scheduler == "cosine" else _step_factor
        warmup_epochs: float = float(hp.get("warmup_epochs", 0.0))
        total_steps = _finite_steps(trainer)
        if warmup_epochs > 0 and total_steps is not None:
            per_epoch = total_steps / max_epochs if max_epochs is not None and max_epochs > 0 else None
            warm = max(1, round(warmup_epochs * per_epoch)) if per_epoch else 1
            rest = max(1, total_steps - warm)
            start = int(getattr(trainer, "global_step", 0) or 0)
            sched = lambda_lr_at(opt, lambda i: (i + 1) / warm if i < warm else factor(i - warm, rest), start)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if max_epochs is None or max_epochs <= 0:
            # No epoch horizon (max_epochs=-1 with max_steps): schedule per step instead.
            horizon = _finite_steps(trainer)
            interval, start = "step", int(getattr(trainer, "global_step", 0) or 0)
        else:
            horizon, interval, start = max_epochs, "epoch", int(getattr(trainer, "current_epoch", 0) or 0)
        sched = lambda_lr_at(opt, lambda i: factor(i, horizon), start)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": interval}}


def lambda_lr_at(optimizer: torch.optim.Optimizer, fn: Any, start: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` whose counter starts at ``start`` (the current epoch or step), not 0.

    A schedule built in the middle of training (``configure_optimizers`` called again after a
    structural change) so continues where it was, and its ``last_epoch`` stays the absolute position,
    which is what a checkpoint saves and restores.
    """
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn, last_epoch=start - 1)


def _finite_steps(trainer: Any | None) -> int | None:
    steps = getattr(trainer, "estimated_stepping_batches", None) if trainer is not None else None
    if steps is None or not math.isfinite(steps) or steps <= 0:
        return None
    return int(steps)


def _cosine_factor(i: int, horizon: int | None) -> float:
    """Cosine from 1 at ``i=0`` to 0 at ``i=horizon`` (constant 1 without a horizon)."""
    if not horizon:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(i, horizon) / horizon))


def _step_factor(i: int, horizon: int | None) -> float:
    """1, then 0.1 from 50 % and 0.01 from 75 % of ``horizon`` (constant 1 without a horizon)."""
    if not horizon:
        return 1.0
    return 0.1 ** sum(i >= m for m in (int(0.5 * horizon), int(0.75 * horizon)))


def _check_classifier_args(
    num_classes: int,
    in_channels: int,
    width_mult: float,
    image_size: int,
    optimizer: str,
    lr: float,
    momentum: float,
    weight_decay: float,
    scheduler: str,
    label_smoothing: float,
) -> None:
    if num_classes < 1:
        raise allowed("num_classes", num_classes, "must be >= 1")
    if in_channels < 1:
        raise allowed("in_channels", in_channels, "must be >= 1")
    if width_mult <= 0:
        raise allowed("width_mult", width_mult, "must be > 0")
    if image_size < 1:
        raise allowed("image_size", image_size, "must be >= 1")
    if optimizer not in ("sgd", "adamw", "adam"):
        raise allowed("optimizer", optimizer, "must be one of 'sgd', 'adamw', 'adam'")
    if not lr > 0:
        raise allowed("lr", lr, "must be > 0")
    if not 0 <= momentum < 1:
        raise allowed("momentum", momentum, "must be in [0, 1)")
    if weight_decay < 0:
        raise allowed("weight_decay", weight_decay, "must be >= 0")
    if scheduler not in ("cosine", "step", "none"):
        raise allowed("scheduler", scheduler, "must be one of 'cosine', 'step', 'none'")
    if not 0 <= label_smoothing < 1:
        raise allowed("label_smoothing", label_smoothing, "must be in [0, 1)")


__all__ = [
    "OUR_BACKBONES",
    "ImageClassifier",
    "build_backbone",
    "check_backbone_name",
    "lambda_lr_at",
    "torchvision_classifiers",
]
