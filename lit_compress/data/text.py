"""Language modelling on local text: one plain file, or a folder with train/validation/test files.

Folder layouts: WikiText (``wiki.train.tokens``, ``wiki.valid.tokens``, ``wiki.test.tokens``) or
``train.txt``, ``valid.txt``, ``test.txt``. A single file is split 90/5/5 by token position.
"""

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lit_compress.data._lm import UNK, Corpus, Vocabulary, WindowedLMDataModule, compact_ids
from lit_compress.errors import allowed

#: Accepted folder layouts: (train, validation, test) file names.
LAYOUTS = (
    ("wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"),
    ("train.txt", "valid.txt", "test.txt"),
)

_LAYOUT_TEXT = (
    "a text file, or a folder holding wiki.train.tokens, wiki.valid.tokens and wiki.test.tokens "
    "(the WikiText layout) or train.txt, valid.txt and test.txt"
)


def find_split_files(path: str) -> tuple[Path, Path, Path] | None:
    """The (train, valid, test) files of a folder, or None for a single file.

    Raises:
        FileNotFoundError: If ``path`` does not exist, or is a folder in none of the :data:`LAYOUTS`.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return None
    if not p.is_dir():
        raise FileNotFoundError(f"`path`={path!r} does not exist: it must be {_LAYOUT_TEXT}.")
    for train, valid, test in LAYOUTS:
        files = (p / train, p / valid, p / test)
        if all(f.is_file() for f in files):
            return files
    raise FileNotFoundError(
        f"`path`={path!r} is a folder without the expected files: it must be {_LAYOUT_TEXT}. "
        f"Found: {', '.join(sorted(f.name for f in p.iterdir())[:10]) or 'nothing'}."
    )


class TextFileDataModule(WindowedLMDataModule):
    """Character- or word-level language modelling on local text files.

    Args:
        path: A text file (split 90/5/5 by position) or a folder in the WikiText layout
            (``wiki.{train,valid,test}.tokens``) or with ``{train,valid,test}.txt``.
        level: ``"char"``: the vocabulary is every character of the text (all splits).
            ``"word"``: whitespace-separated tokens (line breaks are not tokens), vocabulary from
            the training split plus ``<unk>``, to which unseen tokens map.
        block_size: Context length T (in tokens) of a sample.
        batch_size: Samples per batch.
        samples_per_epoch: Random training windows per epoch (window ``i`` starts at a pure function of
            ``(seed, i)``).
        val_samples: At most this many non-overlapping windows for validation and for test.
        seed: Seed of the training windows.
        num_workers: DataLoader worker processes.
        max_chars: Read only the first ``max_chars`` characters of each file (for fast tests).
        encoding: Text encoding of the files.

    Batches: ``(x, y)``, both ``(batch_size, block_size)`` int64, ``y`` = ``x`` shifted by one.
    ``__init__`` only checks that ``path`` exists: the files are read by ``setup`` or by the first
    use of ``vocab_size``, ``encode``, ``decode`` or a split (then kept).
    """

    def __init__(
        self,
        path: str,
        level: Literal["char", "word"] = "char",
        block_size: int = 128,
        batch_size: int = 64,
        samples_per_epoch: int = 20000,
        val_samples: int = 2000,
        seed: int = 0,
        num_workers: int = 0,
        max_chars: int | None = None,
        encoding: str = "utf-8",
    ) -> None:
        super().__init__(block_size, batch_size, samples_per_epoch, val_samples, seed, num_workers)
        if level not in ("char", "word"):
            raise allowed("level", level, "must be 'char' or 'word'")
        if max_chars is not None and max_chars < 1:
            raise allowed("max_chars", max_chars, "must be None (whole files) or >= 1")
        self.save_hyperparameters()
        self.path = path
        self.level = level
        self.max_chars = max_chars
        self.encoding = encoding
        self.files = find_split_files(path)  # checks that the path exists; nothing is read yet

    def _read(self, file: Path) -> str:
        with open(file, encoding=self.encoding) as fh:
            return fh.read(self.max_chars) if self.max_chars is not None else fh.read()

    def read_corpus(self) -> Corpus:
        """Read the file(s), build the vocabulary (see ``level``) and encode the three splits."""
        if self.files is None:
            text = self._read(Path(self.path).expanduser())
            tokens: Sequence[str] = text if self.level == "char" else text.split()
            a, b = int(0.9 * len(tokens)), int(0.95 * len(tokens))
            splits = [tokens[:a], tokens[a:b], tokens[b:]]
        else:
            texts = [self._read(f) for f in self.files]
            splits = [t if self.level == "char" else t.split() for t in texts]
        if self.level == "char":
            vocab = Vocabulary({c for s in splits for c in s}, level="char")
        else:
            vocab = Vocabulary([*splits[0], UNK], level="word", unk=UNK)
        train, val, test = (compact_ids(vocab.encode_tokens(s), len(vocab)) for s in splits)
        return self.make_corpus(vocab, train, val, test, "path", self.path)


__all__ = ["LAYOUTS", "TextFileDataModule", "find_split_files"]
