"""TextFileDataModule: single files split 90/5/5, folder layouts, char and word level, errors."""

import pytest
import torch

from lit_compress.data import text as text_module
from lit_compress.data._lm import ConsecutiveWindowDataset, RandomWindowDataset
from lit_compress.data.text import TextFileDataModule
from lit_compress.errors import ConfigError

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(100))


def write_wikitext(folder, names=("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")):
    folder.mkdir(exist_ok=True)
    train = " = Title = \n the cat sat on the mat . \n" * 20
    valid = " the dog sat on the cat . \n" * 5
    test = " a zebra sat on the mat . \n" * 5
    for name, text in zip(names, (train, valid, test), strict=True):
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def test_single_file_char_level_is_split_90_5_5_by_position(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT, encoding="utf-8")
    dm = TextFileDataModule(str(f), block_size=16, batch_size=4, samples_per_epoch=12, val_samples=5)
    n = len(TEXT)
    a, b = int(0.9 * n), int(0.95 * n)
    assert dm.train_ids.numel() == a and dm.val_ids.numel() == b - a and dm.test_ids.numel() == n - b
    assert dm.decode(dm.train_ids) + dm.decode(dm.val_ids) + dm.decode(dm.test_ids) == TEXT
    assert dm.vocab_size == len(set(TEXT)) and dm.vocab.itos == sorted(set(TEXT))
    assert dm.decode(dm.encode("the lazy fox")) == "the lazy fox"
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == y.shape == (4, 16) and torch.equal(x[:, 1:], y[:, :-1])
    # The windowing code is the one shared with ShakespeareDataModule.
    assert isinstance(dm.train_dataloader().dataset, RandomWindowDataset)
    assert isinstance(dm.val_dataloader().dataset, ConsecutiveWindowDataset)
    tx, _ = dm.test_dataloader().dataset[0]
    assert torch.equal(tx, dm.test_ids[:16].long())


def test_wikitext_folder_word_level_uses_training_vocab_and_unk(tmp_path):
    folder = write_wikitext(tmp_path / "wikitext-2")
    dm = TextFileDataModule(str(folder), level="word", block_size=4, batch_size=2, samples_per_epoch=6)
    train_words = set((folder / "wiki.train.tokens").read_text().split())
    assert dm.vocab.itos == sorted(train_words | {"<unk>"})
    assert "dog" not in dm.vocab.stoi and "zebra" not in dm.vocab.stoi
    unk = dm.vocab.stoi["<unk>"]
    assert dm.val_ids[1].item() == unk  # "the dog ..." -> dog is unseen
    assert dm.decode(dm.encode("the zebra sat")) == "the <unk> sat"
    assert dm.train_ids.numel() == len((folder / "wiki.train.tokens").read_text().split())
    assert dm.decode(dm.test_ids[:3]) == "<unk> <unk> sat"  # "a zebra sat": neither word is in training
    x, _y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 4) and int(x.max()) < dm.vocab_size


def test_plain_txt_folder_layout_char_level(tmp_path):
    folder = write_wikitext(tmp_path / "data", names=("train.txt", "valid.txt", "test.txt"))
    dm = TextFileDataModule(str(folder), block_size=8)
    assert dm.decode(dm.val_ids) == (folder / "valid.txt").read_text()
    assert "z" in dm.vocab.stoi  # char vocabulary covers all splits


def test_max_chars_truncates_each_file(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text(TEXT, encoding="utf-8")
    dm = TextFileDataModule(str(f), block_size=8, max_chars=1000)
    assert dm.train_ids.numel() + dm.val_ids.numel() + dm.test_ids.numel() == 1000


def test_missing_path_names_the_argument_and_layout(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=r"`path`=.*nope.* does not exist.*wiki\.train\.tokens.*train\.txt"):
        TextFileDataModule(str(missing))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "readme.md").write_text("hi")
    with pytest.raises(FileNotFoundError, match=r"folder without the expected files.*Found: readme\.md"):
        TextFileDataModule(str(tmp_path / "other"))


def test_invalid_arguments_raise_config_error(tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("abc" * 100)
    with pytest.raises(ConfigError, match=r"`level`='byte' is not allowed: must be 'char' or 'word'"):
        TextFileDataModule(str(f), level="byte")
    with pytest.raises(ConfigError, match=r"`path`=.*tiny\.txt.* the validation split has 15 tokens"):
        TextFileDataModule(str(f), block_size=64).setup("fit")  # found when the file is read
    with pytest.raises(ConfigError, match=r"`val_samples`=0"):
        TextFileDataModule(str(f), val_samples=0)


def test_files_are_read_once_on_first_use_not_in_init(tmp_path, monkeypatch):
    folder = write_wikitext(tmp_path / "wikitext-2")
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(text_module, "open", spy, raising=False)
    dm = TextFileDataModule(str(folder), level="word", block_size=4)
    assert opened == []  # __init__ only checks that the folder and its files exist
    assert dm.vocab_size == len(set((folder / "wiki.train.tokens").read_text().split()) | {"<unk>"})
    assert sorted(opened) == sorted(
        str(folder / n) for n in ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens")
    )
    dm.setup("fit")
    dm.train_dataloader()
    assert len(opened) == 3  # setup and the loaders reuse what the first use read
