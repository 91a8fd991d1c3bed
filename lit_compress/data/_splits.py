"""A DataModule base whose ``setup`` fills ``train_set`` / ``val_set`` / ``test_set``."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


class SplitDataModule(L.LightningDataModule):
    """Dataloaders follow from the three datasets that a subclass's ``setup`` builds.

    Subclasses set ``batch_size`` and ``num_workers`` in ``__init__`` and fill ``train_set``,
    ``val_set`` and ``test_set`` in an idempotent ``setup``; ``predict`` uses the test split.
    """

    batch_size: int
    num_workers: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        """Build ``train_set``, ``val_set`` and ``test_set`` (idempotent: a second call does nothing)."""
        raise NotImplementedError

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        assert dataset is not None, "setup() must build the split first"
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set, shuffle=False)
