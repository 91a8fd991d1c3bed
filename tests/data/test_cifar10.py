"""CIFAR10DataModule with a stand-in for torchvision's CIFAR10 (no download, no real data)."""

from typing import ClassVar

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from lit_compress.data.cifar10 import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule
from lit_compress.errors import ConfigError


class FakeCIFAR10(torch.utils.data.Dataset):
    """Same interface as torchvision's CIFAR10: ``data`` (N, 32, 32, 3) uint8, ``targets``, PIL + transform."""

    calls: ClassVar[list[dict]] = []

    def __init__(self, root, train=True, transform=None, target_transform=None, download=False):
        FakeCIFAR10.calls.append({"root": root, "train": train, "download": download})
        n = 100 if train else 30
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
        self.targets = [i % 10 for i in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        img = Image.fromarray(self.data[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


@pytest.fixture
def fake_cifar(monkeypatch):
    FakeCIFAR10.calls = []
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    return FakeCIFAR10


def test_val_size_zero_validates_on_the_test_split(fake_cifar, tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), batch_size=16, num_workers=0)
    dm.prepare_data()
    assert fake_cifar.calls == []  # download=False: prepare_data does nothing
    dm.setup("fit")
    assert len(dm.train_set) == 100 and dm.val_set is dm.test_set and len(dm.test_set) == 30
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert dm.num_classes == 10 and dm.in_channels == 3 and dm.input_shape == (3, 32, 32)
    assert {c["download"] for c in fake_cifar.calls} == {False}


def test_val_size_holds_out_a_stratified_seeded_split_without_augmentation(fake_cifar, tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=20, num_workers=0, seed=1)
    dm.setup("fit")
    train_idx, val_idx = dm.train_set.indices, dm.val_set.indices
    assert len(train_idx) == 80 and len(val_idx) == 20 and not set(train_idx) & set(val_idx)
    targets = np.array(dm.val_set.dataset.targets)
    assert np.bincount(targets[val_idx], minlength=10).tolist() == [2] * 10
    same = CIFAR10DataModule(data_dir=str(tmp_path), val_size=20, seed=1)
    same.setup()
    assert same.val_set.indices == val_idx
    other = CIFAR10DataModule(data_dir=str(tmp_path), val_size=20, seed=2)
    other.setup()
    assert other.val_set.indices != val_idx
    # Validation images are not augmented: the same item twice is identical.
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def test_transforms_augment_training_and_normalise_everything(fake_cifar, tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), val_size=10, num_workers=0)
    dm.setup()
    train_tf = dm.train_set.dataset.transform.transforms
    kinds = [type(t) for t in train_tf]
    assert kinds == [transforms.RandomCrop, transforms.RandomHorizontalFlip, transforms.ToTensor, transforms.Normalize]
    assert train_tf[0].padding == 4 and train_tf[0].size == (32, 32)
    eval_tf = dm.test_set.transform
    assert [type(t) for t in eval_tf.transforms] == [transforms.ToTensor, transforms.Normalize]
    black = eval_tf(Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)))
    expected = -torch.tensor(CIFAR10_MEAN) / torch.tensor(CIFAR10_STD)
    assert torch.allclose(black[:, 0, 0], expected, atol=1e-5)
    torch.manual_seed(0)
    augmented = [dm.train_set[0][0] for _ in range(8)]
    assert any(not torch.equal(augmented[0], a) for a in augmented[1:])


def test_download_true_downloads_both_splits_in_prepare_data(fake_cifar, tmp_path):
    CIFAR10DataModule(data_dir=str(tmp_path), download=True).prepare_data()
    assert [(c["train"], c["download"]) for c in fake_cifar.calls] == [(True, True), (False, True)]


def test_absent_data_without_download_says_how_to_fix(tmp_path):
    dm = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(FileNotFoundError, match=r"Set `download: true`.*point `data_dir` at an existing copy"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_size": -1}, r"`val_size`=-1 is not allowed"),
        ({"val_size": 50_000}, r"`val_size`=50000"),
        ({"batch_size": 0}, r"`batch_size`=0"),
        ({"num_workers": -1}, r"`num_workers`=-1"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CIFAR10DataModule(**kwargs)
