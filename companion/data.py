"""Data the book trains on, all available offline (book: Introduction, "Data").

* :func:`load_digits_split` -- scikit-learn's bundled 8x8 handwritten digits
  (1,797 images, 10 classes), scaled to ``[0, 1]``.
* :func:`load_breast_cancer_split` -- scikit-learn's bundled breast-cancer data
  (569 samples, 30 features, binary), standardised on the training part.
* :func:`load_pydoc_text`, :class:`CharTokenizer`, :class:`CharCorpus` -- the
  text of Python's own documentation topics (``pydoc_data.topics`` of CPython
  3.11.7, 465,048 characters of real English), frozen in ``assets/pydoc_topics.txt``
  and checked against its SHA-256 on every load, tokenised character by character for
  the language models of chapters 4 to 6. The running Python's own copy is never read:
  it is regenerated for every Python release, and another release would mean another
  corpus and a checkpoint that no longer fits its vocabulary.
* :func:`load_stdlib_source`, :func:`map_to_vocabulary` -- chapter 10's second domain:
  the source code of 15 standard-library modules of CPython 3.11.7, frozen in
  ``assets/stdlib_source.txt`` and checked the same way, and its mapping onto the
  pretrained model's character vocabulary.

Everything returns tensors; pass ``device=`` to put them on a GPU.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from companion._validate import check_int

# --------------------------------------------------------------------------- tabular data


@dataclass(frozen=True)
class Split:
    """A train/test split as tensors: ``X_*`` is ``(n, features)``, ``y_*`` is ``(n,)``."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor

    def to(self, device) -> Split:
        """The same split on ``device``."""
        tensors = (self.X_train, self.y_train, self.X_test, self.y_test)
        return Split(*(t.to(device) for t in tensors))


def _split(X, y, test_size, seed, device, dtype) -> Split:
    if not 0.0 < test_size < 1.0:
        raise ValueError(f"test_size must be in (0, 1), got {test_size}")
    from sklearn.model_selection import train_test_split  # here: the text sets need no sklearn

    X_tr, X_te, y_tr, y_te = train_test_split(
        X, y, test_size=test_size, random_state=seed, stratify=y
    )

    def features(a):
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=device)

    def labels(a):
        return torch.as_tensor(a, dtype=torch.long, device=device)

    return Split(features(X_tr), labels(y_tr), features(X_te), labels(y_te))


def load_digits_split(test_size: float = 0.25, seed: int = 0, device=None,
                      dtype: torch.dtype = torch.float32) -> Split:
    """The 8x8 digits, pixels scaled from ``0..16`` to ``[0, 1]``, split stratified.

    ``X_*`` has shape ``(n, 64)``; reshape to ``(n, 8, 8)`` to draw an image.
    With the defaults: 1,347 training and 450 test images.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _split(digits.data / 16.0, digits.target, test_size, seed, device, dtype)


def load_breast_cancer_split(test_size: float = 0.25, seed: int = 0, device=None,
                             dtype: torch.dtype = torch.float32) -> Split:
    """Breast-cancer features standardised with the training part's mean and std.

    Labels follow scikit-learn: 1 = benign, 0 = malignant. Statistics come
    from the training rows only, so nothing of the test rows leaks into them.
    """
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    split = _split(data.data, data.target, test_size, seed, device, torch.float64)
    mean, std = split.X_train.mean(0), split.X_train.std(0)
    return Split(((split.X_train - mean) / std).to(dtype), split.y_train,
                 ((split.X_test - mean) / std).to(dtype), split.y_test)


# --------------------------------------------------------------------------- text


#: Path of the frozen corpus, CPython 3.11.7's ``pydoc_data.topics`` with its values joined
#: by newlines in key order (PSF licence; see ``assets/README.md``).
PYDOC_TEXT_FILE = Path(__file__).resolve().parent / "assets" / "pydoc_topics.txt"
#: SHA-256 of :data:`PYDOC_TEXT_FILE`'s bytes (UTF-8).
PYDOC_TEXT_SHA256 = "2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4"


def read_frozen_bytes(path: Path, expected_sha256: str) -> bytes:
    """The bytes of an asset file, which must have SHA-256 ``expected_sha256``
    (``RuntimeError`` otherwise: the frozen file was altered)."""
    data = Path(path).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise RuntimeError(f"{Path(path).name} has SHA-256 {digest}, expected "
                           f"{expected_sha256}: the frozen file was altered")
    return data


def _read_frozen_text(path: Path, expected_sha256: str) -> str:
    """The UTF-8 text of an asset file whose bytes must have SHA-256 ``expected_sha256``."""
    return read_frozen_bytes(path, expected_sha256).decode("utf-8")


def load_pydoc_text() -> str:
    """Python's help topics (``pydoc_data.topics`` of CPython 3.11.7), the same bytes everywhere.

    Read from the package's asset file and checked against :data:`PYDOC_TEXT_SHA256`, so
    every reader trains and evaluates on the same text whatever Python runs the book.
    Raises ``RuntimeError`` if the file was altered.
    """
    return _read_frozen_text(PYDOC_TEXT_FILE, PYDOC_TEXT_SHA256)


#: Chapter 10's second domain, Python source code -- the standard-library modules of
#: :data:`STDLIB_MODULES` from CPython 3.11.7 (PSF licence), each preceded by a line
#: ``# ===== Lib/NAME.py =====``.
STDLIB_SOURCE_FILE = Path(__file__).resolve().parent / "assets" / "stdlib_source.txt"
#: SHA-256 of :data:`STDLIB_SOURCE_FILE`'s bytes (UTF-8).
STDLIB_SOURCE_SHA256 = "ede63ccb86b36910afb251f4c20461292ca7e460b0c6492eb320879386017922"
#: The modules in :data:`STDLIB_SOURCE_FILE`, in file order.
STDLIB_MODULES = ("abc", "bisect", "colorsys", "copy", "fnmatch", "functools", "heapq",
                  "keyword", "queue", "random", "shlex", "statistics", "string", "textwrap",
                  "tokenize")


def load_stdlib_source() -> str:
    """The source code of :data:`STDLIB_MODULES` as CPython 3.11.7 ships them (253,978
    characters), read from the package's asset file and checked against
    :data:`STDLIB_SOURCE_SHA256`, never from the running Python (book: chapter 10).
    Raises ``RuntimeError`` if the file was altered.
    """
    return _read_frozen_text(STDLIB_SOURCE_FILE, STDLIB_SOURCE_SHA256)


def map_to_vocabulary(text: str, vocabulary, replacement: str = "?") -> tuple[str, int]:
    """``text`` with every character outside ``vocabulary`` replaced by ``replacement``.

    Returns the mapped text and the number of characters replaced. A character-level
    model has no input for a character it never saw: its embedding row does not exist.
    Replacing it by one known character keeps the text's length and every other
    character; the model is then scored on predicting the replacement there.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    known = set(vocabulary)
    if not isinstance(replacement, str) or len(replacement) != 1 or replacement not in known:
        raise ValueError(f"replacement must be one character of the vocabulary, "
                         f"got {replacement!r}")
    mapped = "".join(ch if ch in known else replacement for ch in text)
    return mapped, sum(ch not in known for ch in text)


class CharTokenizer:
    """Characters <-> integer ids; the vocabulary is the sorted set of characters seen.

    >>> tok = CharTokenizer("hello")
    >>> tok.encode("hell").tolist()
    [1, 0, 2, 2]
    >>> tok.decode([3, 1])
    'oh'
    """

    def __init__(self, text: str):
        if not isinstance(text, str) or not text:
            raise ValueError("text must be a non-empty str to build a vocabulary from")
        self.itos: list[str] = sorted(set(text))
        self.stoi: dict[str, int] = {ch: i for i, ch in enumerate(self.itos)}

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> torch.Tensor:
        """A ``(len(text),)`` tensor of ids; unknown characters raise ``ValueError``."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            return torch.tensor([self.stoi[ch] for ch in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(
                f"text contains {err.args[0]!r}, which is not in the vocabulary") from None

    def decode(self, ids) -> str:
        """The string for a sequence (list or 1-D tensor) of ids."""
        ids = torch.as_tensor(ids).flatten().tolist()
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return "".join(self.itos[i] for i in ids)


class CharCorpus:
    """A character-level corpus split into a training and a validation part.

    The split is contiguous -- the first ``1 - val_fraction`` of the text trains,
    the rest validates -- so that no validation window overlaps a training one.

    Parameters
    ----------
    text:
        The corpus; defaults to :func:`load_pydoc_text`.
    val_fraction:
        Fraction of characters held out for validation.
    tokenizer:
        The vocabulary to encode with (e.g. a pretrained model's, for a new domain mapped
        with :func:`map_to_vocabulary`); by default, the text's own characters.
    """

    def __init__(self, text: str | None = None, val_fraction: float = 0.1,
                 tokenizer: CharTokenizer | None = None):
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if tokenizer is not None and not isinstance(tokenizer, CharTokenizer):
            raise TypeError(f"tokenizer must be a CharTokenizer, got {type(tokenizer).__name__}")
        self.text = load_pydoc_text() if text is None else text
        self.tokenizer = CharTokenizer(self.text) if tokenizer is None else tokenizer
        ids = self.tokenizer.encode(self.text)
        n_train = int(len(ids) * (1.0 - val_fraction))
        self.train_ids, self.val_ids = ids[:n_train], ids[n_train:]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def ids(self, split: str) -> torch.Tensor:
        """All ids of ``split`` (``"train"`` or ``"val"``)."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self.train_ids if split == "train" else self.val_ids

    def get_batch(self, split: str, batch_size: int, block_size: int,
                  generator: torch.Generator | None = None, device=None):
        """Random windows of the corpus: inputs ``x`` and next-character targets ``y``.

        Returns two ``(batch_size, block_size)`` long tensors with
        ``y[:, t] == x[:, t + 1]`` inside a window: the target at each position
        is the character that follows it.
        """
        data = self.ids(split)
        if batch_size < 1 or block_size < 1:
            raise ValueError(
                f"batch_size and block_size must be >= 1, got {batch_size}, {block_size}")
        if block_size >= len(data):
            raise ValueError(f"block_size={block_size} must be < the {split} length {len(data)}")
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
        index = starts[:, None] + torch.arange(block_size + 1)  # (B, T+1)
        windows = data[index]
        x, y = windows[:, :-1], windows[:, 1:]
        return x.to(device), y.to(device)


# --------------------------------------------------------------------------- a synthetic task
# Chapter 4: a sequence task with one exact answer, to measure exact-match accuracy.


class SortingTask:
    """Sort ``length`` digits: ``3 1 4 1 5 | 1 1 3 4 5``, a task with one right answer.

    A sequence is ``length`` random symbols in ``0 .. num_values - 1``, the separator
    (id ``num_values``) and the same symbols sorted. A language model reads it left
    to right; only its predictions after the separator are scored, so the targets
    of the first ``length`` positions are ``-1`` (ignored by the loss).

    >>> task = SortingTask(length=4)
    >>> x, y = task.sample(1, generator=torch.Generator().manual_seed(0))
    >>> task.decode(torch.cat((x[0], y[0, -1:])))
    '4 9 3 0 | 0 3 4 9'
    """

    def __init__(self, length: int = 8, num_values: int = 10):
        check_int("length", length, low=1)
        check_int("num_values", num_values, low=1)
        self.length, self.num_values = length, num_values

    @property
    def separator(self) -> int:
        return self.num_values

    @property
    def vocab_size(self) -> int:
        return self.num_values + 1

    @property
    def block_size(self) -> int:
        """The length of the model's input (digits, separator, all answer digits but the last)."""
        return 2 * self.length

    def sequences(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` complete sequences ``(n, 2 * length + 1)``: digits, separator, sorted."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        digits = torch.randint(self.num_values, (n, self.length), generator=generator)
        separator = torch.full((n, 1), self.separator)
        return torch.cat((digits, separator, digits.sort(dim=1).values), dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None, device=None):
        """A batch ``(x, y)`` of shape ``(n, 2 * length)`` for next-token training.

        ``y[:, t] == x[:, t + 1]`` where scored, ``-1`` before the separator.
        """
        seq = self.sequences(n, generator)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, :self.length] = -1  # the unsorted digits cannot be predicted: not scored
        return x.to(device), y.to(device)

    def split(self, sequences: torch.Tensor):
        """``(prompts, answers)``: the digits and separator ``(n, length + 1)`` and the
        sorted digits ``(n, length)`` of complete ``sequences``."""
        return sequences[:, :self.length + 1], sequences[:, self.length + 1:]

    def decode(self, ids) -> str:
        """A readable string of one sequence, the separator shown as ``|``."""
        symbols = ["|" if i == self.separator else str(i) for i in torch.as_tensor(ids).tolist()]
        return " ".join(symbols)
