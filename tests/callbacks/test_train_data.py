"""Training batches drawn by the callbacks (BatchNorm re-estimation, example inputs) never touch the
training loop's own DataLoader iterator: with ``persistent_workers=True`` iterating the Trainer's loader
resets the iterator the loop is consuming, which used to cut every epoch short without a warning."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler, SequentialSampler

from lit_compress.callbacks import LayerFusion
from lit_compress.callbacks._inputs import separate_loader

SAMPLES, BATCH = 64, 8


class IndexedData(Dataset):
    """64 fixed random samples; each item carries its index so the test can count what was seen."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(SAMPLES, 16, generator=g)
        self.y = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


class BNNet(L.LightningModule):
    """stem → BatchNorm → four Linear(32, 32) + ReLU → head; records the sample indices it trains on."""

    def __init__(self, num_workers: int = 1) -> None:
        super().__init__()
        self.num_workers = num_workers
        self.stem = nn.Linear(16, 32)
        self.bn = nn.BatchNorm1d(32)
        self.layers = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)])
        self.head = nn.Linear(32, 2)
        self.example_input_array = torch.zeros(2, 16)
        self.seen: dict[int, list[int]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x))
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y, idx = batch
        self.seen.setdefault(self.current_epoch, []).extend(int(i) for i in idx)
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            IndexedData(),
            batch_size=BATCH,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def test_step_events_with_persistent_workers_train_every_batch_once(tmp_path: Path) -> None:
    model = BNNet(num_workers=1)
    fusion = LayerFusion(fraction=0.5, increments=3, every_n_steps=2, at_step=1, bn_recalibration_batches=3)
    trainer = L.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        callbacks=[fusion],
    )
    trainer.fit(model)
    assert fusion.increments_done >= 2  # the events ran (with BatchNorm re-estimation) inside epoch 0
    assert trainer.global_step == 2 * SAMPLES // BATCH
    for epoch in (0, 1):
        assert Counter(model.seen[epoch]) == Counter(range(SAMPLES)), f"epoch {epoch}"


def test_separate_loader_keeps_batches_and_draws_no_global_rng() -> None:
    data = IndexedData()
    loader = DataLoader(data, batch_size=BATCH, shuffle=True, num_workers=1, persistent_workers=True, drop_last=True)
    copy = separate_loader(loader)
    assert copy is not loader and copy.num_workers == 0 and not copy.persistent_workers
    assert copy.batch_size == BATCH and copy.drop_last and copy.collate_fn is loader.collate_fn
    assert isinstance(copy.sampler, RandomSampler)
    state = torch.get_rng_state()
    first = [b[2].tolist() for b in copy]
    assert torch.equal(state, torch.get_rng_state())
    assert sorted(i for batch in first for i in batch) == list(range(SAMPLES))
    plain = separate_loader(DataLoader(data, batch_size=5))
    assert isinstance(plain.sampler, SequentialSampler)
    assert next(iter(plain))[2].tolist() == [0, 1, 2, 3, 4]
