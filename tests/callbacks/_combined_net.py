"""A small network with a part for each of the four methods (importable by spawned DDP workers).

``features`` (three 3x3 convs with BatchNorm and ReLU: LayerMerge's plain sequential trunk) →
global 4x4 average pool → ``wide`` (Linear 128→64: ALDS) → ReLU → ``fuse_a``, ``fuse_b`` (two
Linear 64→64 with ReLUs: Layer Fusion) → ``mlp`` (Linear 64→64 → ReLU → Linear 64→4: LayerCollapse).
Inputs are 1x12x12 images; the data are 64 fixed random samples whose labels depend on the input.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lit_compress.checkpointing import CompressMixin

#: The claims of each method in this network (module-name patterns for ``targets``).
FUSION_TARGETS = ["fuse_*"]
ALDS_TARGETS = ["wide"]
COLLAPSE_TARGETS = ["mlp.*"]


class FourPartNet(CompressMixin, L.LightningModule):
    """Conv trunk + a classifier head with one part per method; ~23 k parameters."""

    def __init__(self, lr: float = 0.05, samples: int = 64, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
        )
        self.wide = nn.Linear(128, 64)
        self.fuse_a = nn.Linear(64, 64)
        self.fuse_b = nn.Linear(64, 64)
        self.mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
        self.example_input_array = torch.zeros(2, 1, 12, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 1, 12, 12)`` → logits ``(B, 4)``."""
        h = F.adaptive_avg_pool2d(self.features(x), 4).flatten(1)
        h = F.relu(self.wide(h))
        h = F.relu(self.fuse_b(F.relu(self.fuse_a(h))))
        return self.mlp(h)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}

    def _data(self, seed: int) -> DataLoader:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(self.hparams.samples, 1, 12, 12, generator=g)
        y = (x.mean(dim=(1, 2, 3)) > 0).long() + 2 * (x[:, 0, :6].mean(dim=(1, 2)) > 0).long()
        return DataLoader(TensorDataset(x, y), batch_size=self.hparams.batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        return self._data(0)

    def val_dataloader(self) -> DataLoader:
        return self._data(1)
