"""A tiny LightningModule and a test-only structural event, importable by spawned DDP workers."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.callbacks import CompressionCallback
from lit_compress.checkpointing import CompressMixin
from lit_compress.surgery import register_replay, replace_submodule
from lit_compress.surgery.log import make_record


class ToyNet(L.LightningModule):
    """fc1 → BatchNorm → ReLU → mid → ReLU → head, on 64 fixed random samples (batch 8)."""

    def __init__(
        self,
        optimizer: Literal["adam", "sgd"] = "adam",
        scheduler: Literal["step_epoch", "lambda_step", "none"] = "lambda_step",
        lr: float = 1e-2,
        samples: int = 64,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.fc1 = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.act1 = nn.ReLU()
        self.mid = nn.Linear(32, 32)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(32, 4)
        self.example_input_array = torch.zeros(2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act2(self.mid(self.act1(self.bn(self.fc1(x))))))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=hp.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=0.9)
        if hp.scheduler == "step_epoch":
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
        if hp.scheduler == "lambda_step":
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.9**s)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt

    def _data(self, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.hparams.samples, 16, generator=g)
        y = torch.randint(0, 4, (self.hparams.samples,), generator=g)
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._data(0)

    def val_dataloader(self) -> DataLoader:
        return self._data(1)


class ToyNetWithMixin(CompressMixin, ToyNet):
    """The same network, with the mixin that makes ``load_from_checkpoint`` and ``ddp_spawn`` follow events."""


@register_replay("test_split_linear")
def _replay_split(model: nn.Module, record: dict[str, Any]) -> None:
    old = model.get_submodule(record["target"])
    rank = record["rank"]
    replace_submodule(
        model,
        record["target"],
        nn.Sequential(nn.Linear(old.in_features, rank, bias=False), nn.Linear(rank, old.out_features)),
    )


@torch.no_grad()
def split_linear_(model: nn.Module, target: str, rank: int) -> list[dict[str, Any]]:
    """Replace ``target`` (a Linear) by its rank-``rank`` SVD factors (exact at full rank)."""
    old: nn.Linear = model.get_submodule(target)
    u, s, vh = torch.linalg.svd(old.weight.double(), full_matrices=False)
    first = nn.Linear(old.in_features, rank, bias=False).to(old.weight.device, old.weight.dtype)
    second = nn.Linear(rank, old.out_features).to(old.weight.device, old.weight.dtype)
    first.weight.copy_((s[:rank, None] * vh[:rank]).to(old.weight.dtype))
    second.weight.copy_(u[:, :rank].to(old.weight.dtype))
    second.bias.copy_(old.bias)
    replace_submodule(model, target, nn.Sequential(first, second))
    return [make_record("test_split_linear", target=target, rank=rank)]


class SplitLinear(CompressionCallback):
    """Test-only event: split ``target`` into two low-rank linears at an epoch start or after a step."""

    def __init__(
        self,
        target: str = "mid",
        rank: int = 8,
        at_epoch: int | None = None,
        at_step: int | None = None,
        bn_recalibration_batches: int = 0,
    ) -> None:
        super().__init__(bn_recalibration_batches=bn_recalibration_batches)
        self.target, self.rank, self.at_epoch, self.at_step = target, rank, at_epoch, at_step
        self.seen_sanity_checking: list[bool] = []

    def event_due(self, trainer: Any, pl_module: Any, moment: str) -> bool:
        if self.events_done:
            return False
        if self.at_epoch is not None:
            return moment == "epoch_start" and trainer.current_epoch >= self.at_epoch
        return moment == "step" and self.at_step is not None and trainer.global_step >= self.at_step

    def plan_event(self, trainer: Any, pl_module: Any) -> dict[str, Any]:
        self.seen_sanity_checking.append(bool(trainer.sanity_checking))
        return {"target": self.target, "rank": self.rank}

    def apply_event(self, pl_module: Any, plan: dict[str, Any]) -> list[dict[str, Any]]:
        return split_linear_(pl_module, plan["target"], plan["rank"])


def state_hash(module: nn.Module) -> str:
    """sha256 over the sorted state dict (names and raw bytes)."""
    digest = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if isinstance(t, torch.Tensor):
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class HashRecorder(L.Callback):
    """Writes each rank's state-dict hash right after the first event and at the end of training."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.after_event_done = False

    def _write(self, trainer: Any, pl_module: nn.Module, tag: str) -> None:
        import os

        path = os.path.join(self.out_dir, f"{tag}_rank{trainer.global_rank}.txt")
        with open(path, "w") as f:
            f.write(state_hash(pl_module))

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        from lit_compress.surgery import applied_events

        if applied_events(pl_module) and not self.after_event_done:
            self.after_event_done = True
            self._write(trainer, pl_module, "after_event")

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._write(trainer, pl_module, "end")


class MLPNet(L.LightningModule):
    """A 3-Linear classifier head (Linear → ReLU → Dropout → Linear → ReLU → Linear) on fixed random data."""

    def __init__(
        self, optimizer: Literal["adam", "sgd"] = "sgd", lr: float = 0.05, samples: int = 64, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.classifier = nn.Sequential(
            nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)
        )
        self.example_input_array = torch.zeros(2, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0.0}]
        if self.hparams.optimizer == "adam":
            return torch.optim.AdamW(groups, lr=self.hparams.lr)
        return torch.optim.SGD(groups, lr=self.hparams.lr, momentum=0.9)

    def _data(self, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.hparams.samples, 16, generator=g)
        y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._data(0)

    def val_dataloader(self) -> DataLoader:
        return self._data(1)
