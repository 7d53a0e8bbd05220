"""The corpus before the tokens: cleaning, deduplication, contamination and memorisation
(book: chapter 4, "Tokens and data").

* **Cleaning** (:func:`clean_documents`): Unicode NFKC normalisation, control characters
  removed, whitespace collapsed, then a quality filter dropping documents that are too
  short or mostly not letters; each step counts what it changed or removed.
* **Exact duplicates** (:func:`exact_duplicates`): documents whose normalised text has the
  same SHA-256.
* **Near duplicates** (Broder, 1997): a document is the set of its word ``n``-grams
  (:func:`shingles`); two sets ``A, B`` have Jaccard similarity ``J = |A & B| / |A | B|``.
  A MinHash keeps, for each of ``k`` random permutations ``pi``, ``min pi(A)``; two
  documents agree on one permutation with probability exactly ``J``, so the fraction of
  agreeing entries estimates ``J`` with standard error ``sqrt(J (1 - J) / k)``. LSH
  cuts the ``k = b * r`` entries into ``b`` bands of ``r`` rows and calls two documents
  candidates when any band is identical, which happens with probability
  ``1 - (1 - J**r)**b`` (:func:`collision_probability`, the S-curve). The permutations are
  datasketch's default ("affine32": SHA-1's first 4 bytes, MurmurHash3's finaliser, then
  ``a * h + b mod 2**32`` with odd ``a``), so :class:`MinHasher` gives the same signatures
  as ``datasketch.MinHash`` with the same ``seed``.
* **Contamination** (:func:`ngram_overlap`): the fraction of an evaluation document's
  13-grams of words that occur in the training text, as GPT-3's paper measured it.
* **Memorisation** (:func:`memorization_run`): a small character GPT trained on the
  corpus with some documents repeated, or on the deduplicated corpus, with the same
  compute; a document is *extracted* when greedy decoding from its first characters
  reproduces the next ones exactly (Carlini et al., 2021). Three seeds of each, at each
  learning rate of a small grid, and a deduplicated control with half the steps, are
  recorded in ``assets/dedup_memorization.json`` by ``python -m companion.dedup --record``;
  :func:`best_memorization_runs` picks each configuration's learning rate by its mean
  held-out loss.
"""

from __future__ import annotations

import hashlib
import re
import struct
import unicodedata
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.integrate import quad

from ._validate import check_float, check_int, check_type
from .records import JOBS_OPTION, load_record, record_main, write_record

__all__ = ["split_documents", "normalize", "clean_documents", "CleaningReport",
           "exact_duplicates", "shingles", "jaccard", "MinHasher", "estimate_jaccard",
           "collision_probability", "lsh_params", "lsh_candidate_pairs",
           "near_duplicate_pairs", "distinct_documents", "word_ngrams", "ngram_overlap",
           "MEMORIZATION_SETTINGS", "MEMORIZATION_RECORD", "duplication_corpora",
           "extraction_rate", "memorization_run", "best_memorization_runs",
           "MEMORIZATION_CONFIGS", "record_memorization", "load_memorization_record"]

_WORD = re.compile(r"\w+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def split_documents(text: str) -> list[str]:
    """``text`` cut at blank lines into paragraphs, each stripped, empty ones dropped."""
    check_type("text", text, str)
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


# --------------------------------------------------------------------------- cleaning


def normalize(text: str) -> str:
    """NFKC, lower case, control characters removed, runs of whitespace made one space."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_CONTROL.sub("", text).split())


@dataclass(frozen=True)
class CleaningReport:
    """What each cleaning step did: documents changed or removed, and the survivors."""

    changed_by_nfkc: int
    changed_by_controls: int
    removed_short: int
    removed_not_letters: int
    kept: list[str]


def clean_documents(docs: list[str], min_words: int = 5,
                    min_letter_fraction: float = 0.5) -> CleaningReport:
    """NFKC, drop control characters, then remove documents with fewer than ``min_words``
    words or whose non-space characters are less than ``min_letter_fraction`` letters."""
    check_type("docs", docs, list)
    check_int("min_words", min_words, 0)
    check_float("min_letter_fraction", min_letter_fraction, 0.0, 1.0)
    nfkc = [unicodedata.normalize("NFKC", d) for d in docs]
    plain = [_CONTROL.sub("", d) for d in nfkc]
    long_enough = [d for d in plain if len(_WORD.findall(d)) >= min_words]
    kept = [d for d in long_enough if _letter_fraction(d) >= min_letter_fraction]
    return CleaningReport(sum(a != b for a, b in zip(docs, nfkc)),
                          sum(a != b for a, b in zip(nfkc, plain)),
                          len(plain) - len(long_enough), len(long_enough) - len(kept), kept)


def _letter_fraction(doc: str) -> float:
    chars = [c for c in doc if not c.isspace()]
    return sum(c.isalpha() for c in chars) / max(len(chars), 1)


# --------------------------------------------------------------------------- exact


def exact_duplicates(docs: list[str]) -> list[list[int]]:
    """Groups (of two or more indices, in order) of documents with equal normalised text,
    found by the SHA-256 of :func:`normalize`'s output."""
    check_type("docs", docs, list)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, doc in enumerate(docs):
        groups[hashlib.sha256(normalize(doc).encode("utf-8")).hexdigest()].append(i)
    return [g for g in groups.values() if len(g) > 1]


# --------------------------------------------------------------------------- near


def shingles(doc: str, ngram: int = 5) -> set[bytes]:
    """The set of ``ngram``-word shingles of the normalised ``doc`` (UTF-8 bytes); a
    document shorter than ``ngram`` words is one shingle."""
    check_int("ngram", ngram, 1)
    words = normalize(doc).split(" ")
    n = min(ngram, len(words))
    return {" ".join(words[i:i + n]).encode("utf-8") for i in range(len(words) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """``|a & b| / |a | b|`` (1.0 for two empty sets)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, a bijection that spreads every input bit."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


class MinHasher:
    """``num_perm`` random permutations of 32-bit hashes, drawn as datasketch draws them."""

    def __init__(self, num_perm: int = 128, seed: int = 1):
        self.num_perm = check_int("num_perm", num_perm, 1)
        self.seed = check_int("seed", seed, 0)
        rng = np.random.RandomState(seed)
        self.a = rng.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + 1
        self.b = rng.randint(0, 1 << 32, num_perm, dtype=np.uint32)

    def signature(self, items: set[bytes]) -> np.ndarray:
        """``(num_perm,)`` uint32: for each permutation the smallest permuted hash."""
        if not items:
            return np.full(self.num_perm, 2**32 - 1, dtype=np.uint32)
        hv = np.array([struct.unpack("<I", hashlib.sha1(x).digest()[:4])[0]
                       for x in items], dtype=np.uint32)
        permuted = _fmix32(hv)[:, None] * self.a + self.b   # (items, num_perm), mod 2**32
        return permuted.min(axis=0)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """The fraction of permutations on which two signatures agree."""
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signatures must have the same shape, got {sig_a.shape} "
                         f"and {sig_b.shape}")
    return float(np.mean(sig_a == sig_b))


def collision_probability(s, bands: int, rows: int):
    """``1 - (1 - s**rows)**bands``: the chance that LSH pairs two documents of Jaccard s."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** float(rows)) ** float(bands)


def _miss_probability(s: float, bands: int, rows: int) -> float:
    return 1.0 - collision_probability(s, bands, rows)


def lsh_params(threshold: float, num_perm: int, fp_weight: float = 0.5,
               fn_weight: float = 0.5) -> tuple[int, int]:
    """``(bands, rows)`` with ``bands * rows <= num_perm`` minimising the weighted area of
    false positives (below ``threshold``) and false negatives (above), as datasketch's
    ``MinHashLSH`` chooses them."""
    check_float("threshold", threshold, 0.0, 1.0)
    check_int("num_perm", num_perm, 2)
    best, params = float("inf"), (0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = quad(collision_probability, 0.0, threshold, args=(b, r))[0]
            fn = quad(_miss_probability, threshold, 1.0, args=(b, r))[0]
            if fp * fp_weight + fn * fn_weight < best:
                best, params = fp * fp_weight + fn * fn_weight, (b, r)
    return params


def lsh_candidate_pairs(signatures: np.ndarray, bands: int, rows: int) -> set[tuple[int, int]]:
    """Pairs ``(i, j)``, ``i < j``, of rows of ``signatures`` ``(docs, num_perm)`` that are
    identical on at least one band of ``rows`` consecutive entries."""
    check_int("bands", bands, 1)
    check_int("rows", rows, 1)
    if signatures.ndim != 2 or bands * rows > signatures.shape[1]:
        raise ValueError(f"signatures must be (docs, num_perm) with num_perm >= bands * rows "
                         f"= {bands * rows}, got shape {signatures.shape}")
    pairs = set()
    for band in range(bands):
        buckets = defaultdict(list)
        for i, sig in enumerate(signatures[:, band * rows:(band + 1) * rows]):
            buckets[sig.tobytes()].append(i)
        for members in buckets.values():
            pairs.update((i, j) for k, i in enumerate(members) for j in members[k + 1:])
    return pairs


def near_duplicate_pairs(docs: list[str], threshold: float = 0.8, num_perm: int = 128,
                         ngram: int = 5, seed: int = 1) -> list[tuple[int, int, float]]:
    """``(i, j, estimated Jaccard)`` for the LSH candidates whose MinHash estimate is at
    least ``threshold``, sorted by ``(i, j)``."""
    check_type("docs", docs, list)
    check_float("threshold", threshold, 0.0, 1.0, low_open=True)
    hasher = MinHasher(num_perm, seed)
    sigs = np.stack([hasher.signature(shingles(d, ngram)) for d in docs]) if docs else \
        np.zeros((0, num_perm), dtype=np.uint32)
    bands, rows = lsh_params(threshold, num_perm)
    found = []
    for i, j in sorted(lsh_candidate_pairs(sigs, bands, rows)):
        est = estimate_jaccard(sigs[i], sigs[j])
        if est >= threshold:
            found.append((i, j, est))
    return found


def distinct_documents(docs: list[str], threshold: float = 0.7, num_perm: int = 128,
                       ngram: int = 5, seed: int = 1) -> list[str]:
    """``docs`` without exact duplicates (the first copy kept) and then without near
    duplicates (of each pair found by :func:`near_duplicate_pairs`, the later one goes)."""
    check_type("docs", docs, list)
    first = {}
    for doc in docs:
        first.setdefault(hashlib.sha256(normalize(doc).encode("utf-8")).digest(), doc)
    unique = list(first.values())
    drop = {j for _, j, _ in near_duplicate_pairs(unique, threshold, num_perm, ngram, seed)}
    return [d for k, d in enumerate(unique) if k not in drop]


# --------------------------------------------------------------------------- contamination


def word_ngrams(doc: str, n: int = 13) -> set[tuple[str, ...]]:
    """The set of ``n``-grams of the normalised words of ``doc``."""
    check_int("n", n, 1)
    words = _WORD.findall(normalize(doc))
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def ngram_overlap(train_docs: list[str], eval_docs: list[str], n: int = 13) -> list[float]:
    """For each evaluation document, the fraction of its word ``n``-grams found anywhere in
    the training documents (0.0 for a document shorter than ``n`` words)."""
    check_type("train_docs", train_docs, list)
    check_type("eval_docs", eval_docs, list)
    seen = set().union(*(word_ngrams(d, n) for d in train_docs))
    fractions = []
    for doc in eval_docs:
        grams = word_ngrams(doc, n)
        fractions.append(len(grams & seen) / len(grams) if grams else 0.0)
    return fractions


# --------------------------------------------------------------------------- memorisation

#: The settings of the duplication experiment (chapter 4, "What duplicates do to a model").
#: ``lrs`` is the learning-rate grid every configuration is run at; ``control_steps`` the
#: steps of the deduplicated control (half the compute); ``logged_steps`` how many of
#: each run's first step losses the record keeps (the book re-trains 20 to check it).
MEMORIZATION_SETTINGS = {"train_docs": 400, "n_repeated": 8, "copies": 32, "steps": 1500,
                         "control_steps": 750, "batch_size": 16,
                         "block_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 64,
                         "lrs": [1e-3, 3e-3, 1e-2], "prefix": 32, "suffix": 32,
                         "val_fraction": 0.1, "val_windows": 128, "logged_steps": 100}
#: The ``(corpus, steps)`` pairs that were recorded, each at every learning rate.
MEMORIZATION_CONFIGS = (("duplicated", 1500), ("deduplicated", 1500), ("deduplicated", 750))
#: Where ``python -m companion.dedup --record`` writes the runs.
MEMORIZATION_RECORD = Path(__file__).resolve().parent / "assets" / "dedup_memorization.json"


def duplication_corpora(docs: list[str], n_repeated: int, copies: int, min_chars: int,
                        train_docs: int | None = None, seed: int = 0) -> dict:
    """Training texts with and without repeats, from distinct ``docs``.

    The last ``val_fraction`` of the documents (see :data:`MEMORIZATION_SETTINGS`) are held
    out; the first ``train_docs`` of the rest (all if ``None``) train. Of those,
    ``n_repeated`` documents of at least ``min_chars`` characters are *repeated*: the
    deduplicated text has each training document once; the duplicated text has the
    repeated ones ``copies`` times, at random places. Documents are joined by blank lines.
    Returns both texts, the held-out text, and the repeated documents and as many
    documents seen once (also of ``min_chars`` or more) for comparison.
    """
    check_type("docs", docs, list)
    check_int("n_repeated", n_repeated, 1)
    check_int("copies", copies, 2)
    rng = np.random.default_rng(seed)
    n_train = int(len(docs) * (1 - MEMORIZATION_SETTINGS["val_fraction"]))
    train, held_out = docs[:n_train][:train_docs], docs[n_train:]
    long_enough = [i for i, d in enumerate(train) if len(d) >= min_chars]
    if len(long_enough) < 2 * n_repeated:
        raise ValueError(f"n_repeated={n_repeated} needs {2 * n_repeated} documents of "
                         f"{min_chars} characters or more, got {len(long_enough)}")
    chosen = rng.choice(long_enough, 2 * n_repeated, replace=False)
    repeated, once = chosen[:n_repeated], chosen[n_repeated:]
    extra = [train[i] for i in repeated for _ in range(copies - 1)]
    with_copies = list(train)
    for doc in extra:                                      # random places
        with_copies.insert(int(rng.integers(0, len(with_copies) + 1)), doc)
    return {"deduplicated": "\n\n".join(train), "duplicated": "\n\n".join(with_copies),
            "held_out": "\n\n".join(held_out), "repeated": [train[i] for i in repeated],
            "once": [train[i] for i in once]}


def extraction_rate(model, tokenizer, passages: list[str], prefix: int, suffix: int,
                    per_character: bool = False) -> float:
    """The fraction of ``passages`` whose ``suffix`` characters after the first ``prefix``
    the model reproduces exactly by greedy decoding from that prefix (Carlini et al.'s
    extractable memorisation); with ``per_character``, the fraction of those characters
    reproduced at their place."""
    import torch

    prompts = torch.stack([tokenizer.encode(p[:prefix]) for p in passages])
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model.generate(prompts.to(device), suffix, temperature=0.0)
    made = [tokenizer.decode(row[prefix:].tolist()) for row in out.cpu()]
    true = [p[prefix:prefix + suffix] for p in passages]
    if per_character:
        return float(np.mean([a == b for m, t in zip(made, true) for a, b in zip(m, t)]))
    return float(np.mean([m == t for m, t in zip(made, true)]))


def memorization_run(docs: list[str], corpus: str, seed: int, steps: int | None = None,
                     lr: float = 3e-3, device=None) -> dict:
    """Train :data:`MEMORIZATION_SETTINGS`'s character GPT on ``corpus`` (``"duplicated"``
    or ``"deduplicated"``) for ``steps`` steps at learning rate ``lr`` (one of
    the grid's rates) and measure it: the loss on held-out text, and the extraction
    rate of the repeated documents and of documents seen once."""
    import torch

    from .data import CharTokenizer
    from .device import seed_everything
    from .train import fixed_windows, language_model_loss, train_language_model
    from .transformer import GPT, GPTConfig

    check_type("corpus", corpus, str)
    if corpus not in ("duplicated", "deduplicated"):
        raise ValueError(f"corpus must be 'duplicated' or 'deduplicated', got {corpus!r}")
    cfg = MEMORIZATION_SETTINGS
    steps = cfg["steps"] if steps is None else check_int("steps", steps, 1)
    lr = check_float("lr", lr, 0.0, low_open=True)
    texts = duplication_corpora(docs, cfg["n_repeated"], cfg["copies"],
                                cfg["prefix"] + cfg["suffix"], cfg["train_docs"], seed=0)
    tokenizer = CharTokenizer("\n\n".join(docs))
    ids = tokenizer.encode(texts[corpus])
    val_x, val_y = fixed_windows(tokenizer.encode(texts["held_out"]), cfg["block_size"],
                                 num_windows=cfg["val_windows"])
    seed_everything(seed)
    model = GPT(GPTConfig(tokenizer.vocab_size, cfg["block_size"], cfg["n_layer"],
                          cfg["n_head"], cfg["n_embd"])).to(device or "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    T = cfg["block_size"]

    def get_batch():
        starts = torch.randint(0, len(ids) - T - 1, (cfg["batch_size"],), generator=generator)
        window = ids[starts[:, None] + torch.arange(T + 1)]   # (B, T + 1)
        return window[:, :-1].to(model.lm_head.weight.device), \
            window[:, 1:].to(model.lm_head.weight.device)

    history = train_language_model(model, optimizer, get_batch, steps=steps,
                                   eval_every=steps, eval_batches={"train": (val_x[:8], val_y[:8]),
                                                                   "val": (val_x, val_y)},
                                   autocast_dtype=None)
    return {"corpus": corpus, "seed": seed, "steps": steps, "lr": lr,
            "step_loss": [round(x, 6) for x in history.step_loss[:cfg["logged_steps"]]],
            "held_out_loss": language_model_loss(model, val_x, val_y),
            "extracted_repeated": extraction_rate(model, tokenizer, texts["repeated"],
                                                  cfg["prefix"], cfg["suffix"]),
            "extracted_once": extraction_rate(model, tokenizer, texts["once"],
                                              cfg["prefix"], cfg["suffix"]),
            "chars_repeated": extraction_rate(model, tokenizer, texts["repeated"],
                                              cfg["prefix"], cfg["suffix"], True),
            "chars_once": extraction_rate(model, tokenizer, texts["once"],
                                          cfg["prefix"], cfg["suffix"], True)}


def _memorization_task(task: tuple[str, int, float, int]) -> dict:
    import torch

    from .data import load_pydoc_text

    torch.set_num_threads(1)
    corpus, steps, lr, seed = task
    docs = distinct_documents(split_documents(load_pydoc_text()))
    return memorization_run(docs, corpus, seed, steps=steps, lr=lr)


def record_memorization(seeds=(0, 1, 2), jobs: int = 1, path: Path = MEMORIZATION_RECORD,
                        log=print):
    """Run :func:`memorization_run` for each of :data:`MEMORIZATION_CONFIGS`, learning
    rate of the grid and seed (one CPU thread per run, ``jobs`` runs at a time) and write
    the results to ``path`` as JSON."""
    from concurrent.futures import ProcessPoolExecutor

    tasks = [(corpus, steps, lr, seed) for corpus, steps in MEMORIZATION_CONFIGS
             for lr in MEMORIZATION_SETTINGS["lrs"] for seed in seeds]
    with ProcessPoolExecutor(check_int("jobs", jobs, 1)) as pool:
        runs = list(pool.map(_memorization_task, tasks))
    for run in runs:
        log({k: v for k, v in run.items() if k != "step_loss"})
    return write_record(path, "chapter 4's memorisation runs (companion.dedup.record_memorization)",
                        MEMORIZATION_SETTINGS, indent=1, runs=runs)


def load_memorization_record(path: Path = MEMORIZATION_RECORD) -> dict:
    """The recorded runs as ``{(corpus, steps, lr, seed): run}``; refuses a record made
    with other settings than :data:`MEMORIZATION_SETTINGS`."""
    record = load_record(path, MEMORIZATION_SETTINGS, "`python -m companion.dedup --record`")
    return {(run["corpus"], run["steps"], run["lr"], run["seed"]): run
            for run in record["runs"]}


def best_memorization_runs(record: dict) -> dict:
    """For each ``(corpus, steps)`` of ``record`` (from :func:`load_memorization_record`),
    the learning rate with the lowest held-out loss averaged over the seeds, and its runs:
    ``{(corpus, steps): (lr, [run, ...] in seed order)}``."""
    check_type("record", record, dict)
    grid = defaultdict(lambda: defaultdict(list))       # (corpus, steps) -> lr -> runs
    for (corpus, steps, lr, _seed), run in sorted(record.items()):
        grid[(corpus, steps)][lr].append(run)
    best = {}
    for config, by_lr in grid.items():
        lr = min(by_lr, key=lambda r: float(np.mean([x["held_out_loss"] for x in by_lr[r]])))
        best[config] = (lr, by_lr[lr])
    return best


def main(argv=None) -> int:
    """``python -m companion.dedup --record [--jobs N]``: re-record the duplication
    experiment of chapter 4 (minutes on a CPU)."""
    return record_main("python -m companion.dedup", {"memorization": record_memorization},
                       argv, description=main.__doc__, options={"--jobs": JOBS_OPTION})


if __name__ == "__main__":
    main()
