"""Byte-level byte-pair encoding (BPE), trained and applied (book: chapter 4, "Tokens and
data").

Text becomes tokens in three steps (Sennrich et al., 2016; Radford et al., 2019):

1. **pre-tokenise**: a regular expression (:data:`GPT2_PATTERN`) cuts the text into
   pieces -- words with their leading space, runs of digits, punctuation, whitespace --
   so that no token ever spans two words;
2. **bytes**: each piece becomes its UTF-8 bytes, so any Unicode text has a spelling in
   the 256 single-byte tokens and nothing is ever "unknown";
3. **merge**: training repeatedly makes the most frequent adjacent pair of tokens
   a new token; encoding replays those merges, always the earliest-learned (lowest-rank)
   pair present, until none applies.

The vocabulary is tiktoken's *mergeable ranks*: ``dict[bytes, int]`` with the 256 single
bytes at ranks 0-255, then each merge's bytes at the rank it was learned. A token's id is
its rank. :func:`train_bpe` gives the same ranks as ``tiktoken._educational.bpe_train``;
:class:`BPETokenizer` gives the same ids as ``tiktoken.Encoding`` built from the same ranks,
and :func:`load_gpt2_ranks` loads GPT-2's real 50,000 merges (r50k_base), frozen in
``assets/gpt2_r50k.tiktoken`` and checked against its SHA-256.
"""

from __future__ import annotations

import base64
from collections import Counter, defaultdict
from pathlib import Path

from ._optional import require
from ._validate import check_int, check_type
from .data import read_frozen_bytes

regex = require("regex")    # the `tokens` extra: GPT-2's pattern needs \p{L} and `++`

__all__ = ["GPT2_PATTERN", "GPT2_ORIGINAL_PATTERN", "ENDOFTEXT", "GPT2_RANKS_FILE",
           "GPT2_RANKS_SHA256", "train_bpe", "bpe_merge", "BPETokenizer",
           "load_gpt2_ranks", "gpt2_tokenizer", "bytes_per_token", "PARALLEL_SAMPLES",
           "load_parallel_sample"]

#: GPT-2's pre-tokenisation pattern in the form tiktoken runs it (``r50k_pat_str``):
#: English contractions, an optional space + letters, an optional space + digits, an
#: optional space + other symbols, then whitespace (a run at the end of the text; a run
#: not followed by a non-space, i.e. all but the space that starts the next word; a
#: single whitespace character).
GPT2_PATTERN = (r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++"""
                r"""|\s++$|\s+(?!\S)|\s""")
#: The pattern as GPT-2's original release wrote it (tiktoken's educational trainer uses
#: this one); it splits text the same way as :data:`GPT2_PATTERN`, only slower.
GPT2_ORIGINAL_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?[\p{L}]+| ?[\p{N}]+"""
                         r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
#: GPT-2's one special token (id 50256), which separates documents in training.
ENDOFTEXT = "<|endoftext|>"

#: GPT-2's mergeable ranks (tiktoken's ``r50k_base``), from the ``openai-whisper`` sdist
#: (``whisper/assets/gpt2.tiktoken``, MIT licence, (c) 2022 OpenAI; see ``assets/README.md``).
GPT2_RANKS_FILE = Path(__file__).resolve().parent / "assets" / "gpt2_r50k.tiktoken"
#: SHA-256 of :data:`GPT2_RANKS_FILE`: the ``expected_hash`` tiktoken itself checks for
#: ``r50k_base`` (``tiktoken_ext/openai_public.py``).
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"

_ASSETS = Path(__file__).resolve().parent / "assets"
#: The same text about tokens and data, written for this book in Chinese and in English
#: (MIT licence): file name and SHA-256 per language.
PARALLEL_SAMPLES = {
    "zh": ("chinese_sample.txt",
           "c02b099f92f4572514cb1e5d5c954870f6a3a118f44f6223f1c914e5920e251a"),
    "en": ("english_sample.txt",
           "2120171f00c05c9835a8c186a497d4d0ba6c33cb23e297595985f28c2f5eea31"),
}


# --------------------------------------------------------------------------- training


def _merge_pair(word: list[bytes], pair: tuple[bytes, bytes]) -> list[bytes]:
    """``word`` with every occurrence of ``pair`` (left to right) made one token."""
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _first_seen(pair, words: list[list[bytes]], where: dict) -> tuple[int, int]:
    """(word index, position) of ``pair``'s first occurrence in the current words."""
    for i in sorted(where[pair]):
        positions = [k for k, p in enumerate(zip(words[i], words[i][1:])) if p == pair]
        if positions:
            return i, positions[0]
    raise AssertionError(f"pair {pair} counted but absent")


def train_bpe(text: str, vocab_size: int, pattern: str = GPT2_PATTERN) -> dict[bytes, int]:
    """Learn ``vocab_size - 256`` merges from ``text``; tiktoken's mergeable ranks.

    Each step makes the most frequent adjacent pair one token everywhere and gives it the
    next rank; a tie goes to the pair seen first in the text. Each distinct piece is
    kept once with its count, and after a merge only the pieces that contained the pair
    are re-counted: the same merges as re-counting everything, far faster.
    """
    check_type("text", text, str)
    check_int("vocab_size", vocab_size, 256)
    pieces = Counter(regex.findall(pattern, text))           # distinct, first-seen order
    words = [[bytes([b]) for b in p.encode("utf-8")] for p in pieces]
    counts = list(pieces.values())
    stats: Counter = Counter()                               # pair -> occurrences
    where: dict = defaultdict(set)                           # pair -> words holding it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            stats[pair] += counts[i]
            where[pair].add(i)
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        if not stats:
            raise ValueError(f"vocab_size={vocab_size} needs more merges than text allows "
                             f"(no pair left after {len(ranks) - 256} merges)")
        top = max(stats.values())
        pair = min((p for p, c in stats.items() if c == top),
                   key=lambda p: _first_seen(p, words, where))
        ranks[pair[0] + pair[1]] = len(ranks)
        for i in where.pop(pair):
            old, words[i] = words[i], _merge_pair(words[i], pair)
            for p in zip(old, old[1:]):
                stats[p] -= counts[i]
            for p in zip(words[i], words[i][1:]):
                stats[p] += counts[i]
                where[p].add(i)
        stats = +stats                                       # drop pairs now absent
    return ranks


# --------------------------------------------------------------------------- encoding


def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """The ids of one pre-tokenised ``piece``: replay merges, lowest rank first.

    Start from single bytes; while some adjacent pair is itself a token, merge the pair
    of lowest rank (the leftmost on a tie). A piece that is one token is that token.
    """
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i:i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        pair_ranks = [ranks.get(a + b) for a, b in zip(parts, parts[1:])]
        known = [(r, i) for i, r in enumerate(pair_ranks) if r is not None]
        if not known:
            break
        _, i = min(known)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return [ranks[p] for p in parts]


class BPETokenizer:
    """Encode text to ids and back with mergeable ``ranks`` and a pre-tokenising ``pattern``.

    ``special_tokens`` maps strings such as ``"<|endoftext|>"`` to ids outside the ranks.
    As in tiktoken, :meth:`encode` refuses text containing a special token unless it is
    in ``allowed_special`` (then it becomes its id) or exempted by ``disallowed_special``
    (then it is ordinary text).
    """

    def __init__(self, ranks: dict[bytes, int], pattern: str = GPT2_PATTERN,
                 special_tokens: dict[str, int] | None = None):
        check_type("ranks", ranks, dict)
        check_type("pattern", pattern, str)
        self.ranks = ranks
        self.pattern = pattern
        self.special_tokens = dict(special_tokens or {})
        self._regex = regex.compile(pattern)
        self._decoder = {i: b for b, i in ranks.items()}
        self._decoder.update({i: s.encode("utf-8") for s, i in self.special_tokens.items()})
        if len(self._decoder) != len(ranks) + len(self.special_tokens):
            raise ValueError("ranks and special_tokens must give every token its own id")
        self._cache: dict[str, list[int]] = {}

    @property
    def n_vocab(self) -> int:
        """One more than the largest id."""
        return max(self._decoder) + 1

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with no special tokens: pre-tokenise, then merge each piece."""
        ids: list[int] = []
        for piece in self._regex.findall(_valid_unicode(text)):
            if piece not in self._cache:
                self._cache[piece] = bpe_merge(piece.encode("utf-8"), self.ranks)
            ids.extend(self._cache[piece])
        return ids

    def encode(self, text: str, *, allowed_special=frozenset(),
               disallowed_special="all") -> list[int]:
        """Ids of ``text``; special tokens as tiktoken's ``Encoding.encode`` treats them."""
        check_type("text", text, str)
        allowed = self._special_set("allowed_special", allowed_special)
        disallowed = (set(self.special_tokens) - allowed if disallowed_special == "all"
                      else self._special_set("disallowed_special", disallowed_special))
        for token in disallowed:
            if token in text:
                raise ValueError(f"text contains the special token {token!r}; pass it in "
                                 f"allowed_special to encode it as a special token, or in "
                                 f"disallowed_special=() to encode it as ordinary text")
        if not allowed:
            return self.encode_ordinary(text)
        splitter = "(" + "|".join(regex.escape(t) for t in sorted(allowed)) + ")"
        ids: list[int] = []
        for k, segment in enumerate(regex.split(splitter, text)):
            ids += [self.special_tokens[segment]] if k % 2 else self.encode_ordinary(segment)
        return ids

    def _special_set(self, name: str, value) -> set[str]:
        if value == "all":
            return set(self.special_tokens)
        if isinstance(value, str):
            raise TypeError(f"{name} must be 'all' or a collection of strings, got {value!r}")
        chosen = set(value)
        unknown = chosen - set(self.special_tokens)
        if unknown:
            raise ValueError(f"{name} names unknown special tokens {sorted(unknown)}")
        return chosen

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The bytes the ids stand for, concatenated."""
        try:
            return b"".join(self._decoder[i] for i in ids)
        except (KeyError, TypeError):
            bad = [i for i in ids if not isinstance(i, int) or i not in self._decoder]
            raise ValueError(f"ids must be token ids of this vocabulary, got {bad[:5]}") from None

    def decode(self, ids: list[int]) -> str:
        """The text; bytes that are not valid UTF-8 (a cut-off character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")


def _valid_unicode(text: str) -> str:
    """``text``, with lone surrogates replaced by U+FFFD and surrogate pairs joined, as
    tiktoken does before encoding (a Python string may hold them; UTF-8 cannot)."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


# --------------------------------------------------------------------------- GPT-2


def load_gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's 50,256 mergeable ranks (r50k_base), offline, checked against their SHA-256.

    The file has one token a line: its bytes in base64, a space, its rank. Raises
    ``RuntimeError`` if the file was altered.
    """
    data = read_frozen_bytes(GPT2_RANKS_FILE, GPT2_RANKS_SHA256)
    ranks = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def load_parallel_sample(language: str) -> str:
    """The book's parallel sample text, ``"en"`` or ``"zh"``: the same paragraphs in both
    languages, for comparing how many tokens one content costs (checked by SHA-256)."""
    if language not in PARALLEL_SAMPLES:
        raise ValueError(f"language must be one of {sorted(PARALLEL_SAMPLES)}, got {language!r}")
    name, sha256 = PARALLEL_SAMPLES[language]
    return read_frozen_bytes(_ASSETS / name, sha256).decode("utf-8")


def gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's tokenizer: its ranks, its pattern and ``<|endoftext|>`` = 50256."""
    return BPETokenizer(load_gpt2_ranks(), GPT2_PATTERN, {ENDOFTEXT: 50256})


def bytes_per_token(tokenizer: BPETokenizer, text: str) -> float:
    """UTF-8 bytes of ``text`` divided by its number of tokens (higher: more compression)."""
    check_type("text", text, str)
    if not text:
        raise ValueError("text must not be empty")
    return len(text.encode("utf-8")) / len(tokenizer.encode_ordinary(text))
