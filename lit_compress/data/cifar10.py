"""CIFAR-10 through ``torchvision.datasets.CIFAR10``, with the standard augmentation for training.

Training: random crop 32 with 4 pixels of zero padding, horizontal flip, then normalisation;
validation and test: normalisation only. The data is downloaded only when ``download=True``.
"""

from typing import Any

import numpy as np
from torch.utils.data import Dataset, Subset
from torchvision import datasets, transforms

from lit_compress.data._splits import SplitDataModule
from lit_compress.data.mnist5k import stratified_split
from lit_compress.errors import allowed

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
NUM_TRAIN = 50_000


def train_transform() -> transforms.Compose:
    """PIL image -> ``(3, 32, 32)`` float: random crop (padding 4), horizontal flip, normalise."""
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )


def eval_transform() -> transforms.Compose:
    """PIL image -> ``(3, 32, 32)`` float: normalise only."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


class CIFAR10DataModule(SplitDataModule):
    """CIFAR-10 (50,000 training / 10,000 test images of 3x32x32, 10 classes).

    Args:
        data_dir: Folder holding (or to receive) ``cifar-10-batches-py``.
        download: Download the data into ``data_dir`` if it is not there (needs the internet).
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        val_size: If > 0, a stratified, seeded validation set of this size is held out of the
            training images (without augmentation); if 0, validation uses the test split.
        seed: Seed of the validation split.

    Batches: ``(x, y)`` with ``x`` ``(B, 3, 32, 32)`` float32 and ``y`` ``(B,)`` int64.
    """

    num_classes = 10
    in_channels = 3
    input_shape = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 128,
        num_workers: int = 2,
        val_size: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise allowed("batch_size", batch_size, "must be >= 1")
        if num_workers < 0:
            raise allowed("num_workers", num_workers, "must be >= 0")
        if not 0 <= val_size < NUM_TRAIN:
            raise allowed("val_size", val_size, f"must be in [0, {NUM_TRAIN}) (held out of the training images)")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.download = download
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_size = val_size
        self.seed = seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def _dataset(self, train: bool, transform: Any, download: bool = False) -> Dataset:
        try:
            return datasets.CIFAR10(root=self.data_dir, train=train, transform=transform, download=download)
        except RuntimeError as err:
            if "not found" not in str(err).lower() and "corrupted" not in str(err).lower():
                raise
            raise FileNotFoundError(
                f"CIFAR-10 was not found in `data_dir`={self.data_dir!r} "
                f"(expected {self.data_dir}/cifar-10-batches-py). "
                "Set `download: true` (needs the internet) or point `data_dir` at an existing copy."
            ) from None

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                self._dataset(train, None, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_aug = self._dataset(True, train_transform())
        test = self._dataset(False, eval_transform())
        if self.val_size > 0:
            train_plain = self._dataset(True, eval_transform())
            targets = getattr(train_aug, "targets", None)
            if targets is not None:
                val_idx, train_idx = stratified_split(np.asarray(targets), self.val_size, self.seed)
            else:
                perm = np.random.default_rng(self.seed).permutation(len(train_aug))  # type: ignore[arg-type]
                val_idx, train_idx = np.sort(perm[: self.val_size]), np.sort(perm[self.val_size :])
            self.train_set = Subset(train_aug, train_idx.tolist())
            self.val_set = Subset(train_plain, val_idx.tolist())
        else:
            self.train_set, self.val_set = train_aug, test
        self.test_set = test


__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "CIFAR10DataModule", "eval_transform", "train_transform"]
