"""Shared parts of the language-modelling DataModules: vocabulary, windowed datasets, the base class.

A corpus is held as one 1-D tensor of token ids per split. Training samples are random windows of
``block_size + 1`` tokens whose start is a pure function of ``(seed, index)``; evaluation samples are
non-overlapping consecutive windows. Each sample is ``(x, y)`` with ``y`` = ``x`` shifted by one.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lit_compress.errors import allowed

UNK = "<unk>"


class Vocabulary:
    """A sorted token list with ``encode``/``decode``.

    Args:
        tokens: The distinct tokens (sorted here).
        level: ``"char"`` (tokens are characters, decode joins with ``""``) or ``"word"``
            (whitespace-separated tokens, decode joins with ``" "``).
        unk: Token that unseen tokens map to (must be in ``tokens``); None raises on unseen tokens.
    """

    def __init__(self, tokens: Iterable[str], level: str = "char", unk: str | None = None) -> None:
        self.itos: list[str] = sorted(set(tokens))
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        self.level = level
        self.unk = unk
        if unk is not None and unk not in self.stoi:
            raise ValueError(f"The unknown token {unk!r} is not in the vocabulary.")

    def __len__(self) -> int:
        return len(self.itos)

    def tokenize(self, text: str) -> Sequence[str]:
        """Split ``text`` into tokens (characters, or whitespace-separated words)."""
        return text if self.level == "char" else text.split()

    def encode_tokens(self, tokens: Sequence[str]) -> np.ndarray:
        """Token ids of ``tokens`` as a 1-D ``int64`` array."""
        if self.level == "char" and isinstance(tokens, str):
            return self._encode_chars(tokens)
        unk_id = self.stoi[self.unk] if self.unk is not None else None
        ids = np.empty(len(tokens), dtype=np.int64)
        for i, tok in enumerate(tokens):
            j = self.stoi.get(tok, unk_id)
            if j is None:
                raise ValueError(f"Token {tok!r} is not in the vocabulary ({len(self)} tokens).")
            ids[i] = j
        return ids

    def _encode_chars(self, text: str) -> np.ndarray:
        # Vectorised: code points -> ids through a lookup table (-1 = not in the vocabulary).
        codes = np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
        if codes.size == 0:
            return np.empty(0, dtype=np.int64)
        table_size = max(int(codes.max()), max(ord(c) for c in self.itos)) + 1
        table = np.full(table_size, -1, dtype=np.int64)
        table[[ord(c) for c in self.itos]] = np.arange(len(self.itos))
        ids = table[codes]
        if (ids < 0).any():
            if self.unk is not None:
                ids[ids < 0] = self.stoi[self.unk]
            else:
                bad = chr(int(codes[np.argmax(ids < 0)]))
                raise ValueError(f"Character {bad!r} is not in the vocabulary ({len(self)} characters).")
        return ids

    def encode(self, text: str) -> Tensor:
        """``str`` -> ``(N,)`` int64 token ids."""
        return torch.from_numpy(self.encode_tokens(self.tokenize(text)))

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """``(N,)`` token ids -> ``str``."""
        values = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        sep = "" if self.level == "char" else " "
        return sep.join(self.itos[int(i)] for i in values)


def compact_ids(ids: np.ndarray, vocab_size: int) -> Tensor:
    """Store token ids in the smallest integer dtype that holds them (``uint8``/``int16``/``int32``)."""
    dtype = np.uint8 if vocab_size <= 256 else np.int16 if vocab_size <= 32767 else np.int32
    return torch.from_numpy(np.ascontiguousarray(ids, dtype=dtype))


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def window_start(seed: int, index: int, num_starts: int) -> int:
    """Start of random window ``index`` in ``[0, num_starts)``: a pure function of ``(seed, index)``.

    A SplitMix64 hash of the pair, so it needs no generator state and is the same in every worker
    process, on every platform and in every epoch.
    """
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (index & _MASK64)) % num_starts


class RandomWindowDataset(Dataset):
    """``num_samples`` random windows of ``block_size + 1`` tokens; sample ``i`` depends only on ``(seed, i)``.

    Items: ``x`` ``(block_size,)`` int64 and ``y`` ``(block_size,)`` int64, ``y[t] = x[t + 1]``.
    """

    def __init__(self, data: Tensor, block_size: int, num_samples: int, seed: int = 0) -> None:
        if data.numel() < block_size + 1:
            raise ValueError(f"A split of {data.numel()} tokens is shorter than one window of {block_size + 1}.")
        self.data = data
        self.block_size = block_size
        self.num_samples = num_samples
        self.seed = seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        start = window_start(self.seed, index, self.data.numel() - self.block_size)
        chunk = self.data[start : start + self.block_size + 1].long()  # (block_size + 1,)
        return chunk[:-1], chunk[1:]


class ConsecutiveWindowDataset(Dataset):
    """Non-overlapping windows ``[k * block_size, (k + 1) * block_size + 1)`` of a split, at most ``max_samples``.

    Items: ``x`` ``(block_size,)`` int64 and ``y`` ``(block_size,)`` int64, ``y[t] = x[t + 1]``.
    """

    def __init__(self, data: Tensor, block_size: int, max_samples: int | None = None) -> None:
        self.data = data
        self.block_size = block_size
        n = max(0, (data.numel() - 1) // block_size)
        self.num_samples = n if max_samples is None else min(n, max_samples)

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        start = index * self.block_size
        chunk = self.data[start : start + self.block_size + 1].long()  # (block_size + 1,)
        return chunk[:-1], chunk[1:]


def check_window_args(
    block_size: int, batch_size: int, samples_per_epoch: int, val_samples: int, num_workers: int
) -> None:
    """Raise ``ConfigError`` for the first invalid windowing argument."""
    for name, value in (
        ("block_size", block_size),
        ("batch_size", batch_size),
        ("samples_per_epoch", samples_per_epoch),
        ("val_samples", val_samples),
    ):
        if value < 1:
            raise allowed(name, value, "must be >= 1")
    if num_workers < 0:
        raise allowed("num_workers", num_workers, "must be >= 0")


@dataclass(frozen=True)
class Corpus:
    """A tokenised corpus: the vocabulary and the 1-D token-id tensor of each split (``test`` may be None)."""

    vocab: Vocabulary
    train: Tensor
    val: Tensor
    test: Tensor | None


class WindowedLMDataModule(L.LightningDataModule):
    """Base of the language-modelling DataModules: the corpus is read once, when first needed.

    Subclasses implement :meth:`read_corpus`; ``__init__`` reads nothing. The corpus is read (and
    kept) by ``setup`` or by the first use of ``vocab``, ``vocab_size``, ``encode``, ``decode`` or a
    split, whichever comes first: the CLI asks for ``vocab_size`` before building the model.

    Attributes:
        vocab: The :class:`Vocabulary`.
        train_ids, val_ids, test_ids: 1-D token-id tensors of the splits (``test_ids`` may be None,
            then the test loader uses the validation split).
    """

    def __init__(
        self,
        block_size: int,
        batch_size: int,
        samples_per_epoch: int,
        val_samples: int,
        seed: int,
        num_workers: int,
    ) -> None:
        super().__init__()
        check_window_args(block_size, batch_size, samples_per_epoch, val_samples, num_workers)
        self.block_size = block_size
        self.batch_size = batch_size
        self.samples_per_epoch = samples_per_epoch
        self.val_samples = val_samples
        self.seed = seed
        self.num_workers = num_workers
        self._corpus: Corpus | None = None

    def read_corpus(self) -> Corpus:
        """Read and tokenise the corpus; called once, by the first use (see :meth:`make_corpus`)."""
        raise NotImplementedError

    def make_corpus(
        self, vocab: Vocabulary, train: Tensor, val: Tensor, test: Tensor | None, name: str, value: object
    ) -> Corpus:
        """The :class:`Corpus` of the splits; ``ConfigError`` naming ``name``=``value`` if one holds no full window."""
        need = self.block_size + 1
        for split, ids in (("training", train), ("validation", val), ("test", test)):
            if ids is not None and ids.numel() < need:
                raise allowed(
                    name,
                    value,
                    f"the {split} split has {ids.numel()} tokens, fewer than one window of block_size + 1 = "
                    f"{need}; use a larger corpus or a smaller `block_size`",
                )
        return Corpus(vocab, train, val, test)

    def _read_once(self) -> Corpus:
        if self._corpus is None:
            self._corpus = self.read_corpus()
        return self._corpus

    def setup(self, stage: str | None = None) -> None:
        """Read the corpus (once; later calls and uses reuse it)."""
        self._read_once()

    @property
    def corpus(self) -> Corpus:
        """The corpus (read on first use)."""
        return self._read_once()

    @property
    def vocab(self) -> Vocabulary:
        """The vocabulary (reads the corpus on first use)."""
        return self.corpus.vocab

    @property
    def train_ids(self) -> Tensor:
        """Token ids of the training split."""
        return self.corpus.train

    @property
    def val_ids(self) -> Tensor:
        """Token ids of the validation split."""
        return self.corpus.val

    @property
    def test_ids(self) -> Tensor | None:
        """Token ids of the test split (None: the test loader uses the validation split)."""
        return self.corpus.test

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens (reads the corpus on first use)."""
        return len(self.vocab)

    def encode(self, text: str) -> Tensor:
        """``str`` -> ``(N,)`` int64 token ids."""
        return self.vocab.encode(text)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        """``(N,)`` token ids -> ``str``."""
        return self.vocab.decode(ids)

    def _loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = RandomWindowDataset(self.train_ids, self.block_size, self.samples_per_epoch, self.seed)
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(ConsecutiveWindowDataset(self.val_ids, self.block_size, self.val_samples), False)

    def test_dataloader(self) -> DataLoader:
        ids = self.test_ids if self.test_ids is not None else self.val_ids
        return self._loader(ConsecutiveWindowDataset(ids, self.block_size, self.val_samples), False)


__all__ = [
    "UNK",
    "ConsecutiveWindowDataset",
    "Corpus",
    "RandomWindowDataset",
    "Vocabulary",
    "WindowedLMDataModule",
    "check_window_args",
    "compact_ids",
    "window_start",
]
