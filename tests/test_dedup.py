"""companion.dedup against datasketch (MinHash, MinHashLSH) and exact set arithmetic."""

import math
import random

import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from companion import dedup
from companion.data import load_pydoc_text
from companion.dedup import (
    MinHasher,
    clean_documents,
    collision_probability,
    estimate_jaccard,
    exact_duplicates,
    jaccard,
    lsh_candidate_pairs,
    lsh_params,
    near_duplicate_pairs,
    ngram_overlap,
    normalize,
    shingles,
    split_documents,
    word_ngrams,
)


@pytest.fixture(scope="module")
def docs():
    return [d for d in split_documents(load_pydoc_text()) if len(d.split()) >= 20][:400]


def _datasketch_minhash(items, num_perm, seed):
    m = MinHash(num_perm=num_perm, seed=seed)
    m.update_batch(list(items))
    return m


@pytest.mark.parametrize("num_perm,seed", [(16, 0), (128, 1), (256, 7)])
def test_signatures_equal_datasketch(docs, num_perm, seed):
    hasher = MinHasher(num_perm, seed)
    for doc in docs[:60]:
        items = shingles(doc, 5)
        ours = hasher.signature(items)
        theirs = _datasketch_minhash(items, num_perm, seed)
        assert ours.dtype == theirs.hashvalues.dtype
        np.testing.assert_array_equal(ours, theirs.hashvalues)
    empty = _datasketch_minhash(set(), num_perm, seed).hashvalues
    np.testing.assert_array_equal(hasher.signature(set()), empty)


def test_jaccard_estimates_within_binomial_error(docs):
    """Each estimate is a mean of k Bernoulli(J) draws: |estimate - J| <= 4 sigma with
    sigma = sqrt(J (1 - J) / k), on pairs spread over J (a false failure has p < 1e-4 each).
    Across many pairs the standardised errors have mean ~0 and variance ~1."""
    k, rng = 256, random.Random(0)
    hasher = MinHasher(k, seed=3)
    z = []
    for doc in docs[:150]:
        words = doc.split()
        for keep in (0.95, 0.8, 0.5):
            edited = " ".join(w if rng.random() < keep else "EDIT" for w in words)
            a, b = shingles(doc, 3), shingles(edited, 3)
            J = jaccard(a, b)
            est = estimate_jaccard(hasher.signature(a), hasher.signature(b))
            if 0 < J < 1:
                sigma = math.sqrt(J * (1 - J) / k)
                assert abs(est - J) <= 4 * sigma + 1e-12, (J, est)
                z.append((est - J) / sigma)
    z = np.array(z)
    assert len(z) > 300
    assert abs(z.mean()) < 4 / math.sqrt(len(z))           # unbiased
    assert 0.7 < z.var() < 1.3                              # variance J (1 - J) / k


def test_lsh_params_equal_datasketch():
    for threshold, num_perm in [(0.5, 64), (0.8, 128), (0.9, 128), (0.7, 32)]:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert lsh_params(threshold, num_perm) == (lsh.b, lsh.r)


def test_candidate_pairs_equal_datasketch(docs):
    rng = random.Random(1)
    corpus = list(docs[:200])
    for doc in docs[:40]:                                   # plant near-duplicates
        words = doc.split()
        corpus.append(" ".join(w for w in words if rng.random() > 0.03))
    num_perm, threshold = 128, 0.6
    hasher = MinHasher(num_perm, seed=1)
    sigs = np.stack([hasher.signature(shingles(d, 5)) for d in corpus])
    bands, rows = lsh_params(threshold, num_perm)
    ours = lsh_candidate_pairs(sigs, bands, rows)
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    minhashes = [_datasketch_minhash(shingles(d, 5), num_perm, 1) for d in corpus]
    for i, m in enumerate(minhashes):
        lsh.insert(i, m)
    theirs = {(min(i, j), max(i, j)) for i, m in enumerate(minhashes)
              for j in lsh.query(m) if j != i}
    assert len(ours) >= 25 and ours == theirs


def test_near_duplicates_recall_and_precision_on_planted_pairs(docs):
    rng = random.Random(2)
    base = list(docs[:150])
    planted = []
    for i in range(0, 150, 3):                              # 50 copies with 2 % words dropped
        base.append(" ".join(w for w in docs[i].split() if rng.random() > 0.02))
        planted.append((i, len(base) - 1))
    found = near_duplicate_pairs(base, threshold=0.5, num_perm=128, ngram=5, seed=1)
    truth = {(i, j) for i in range(len(base)) for j in range(i + 1, len(base))
             if jaccard(shingles(base[i], 5), shingles(base[j], 5)) >= 0.5}
    got = {(i, j) for i, j, _ in found}
    assert len(set(planted) & truth) >= 40
    recall = len(got & truth) / len(truth)
    precision = len(got & truth) / len(got)
    assert recall >= 0.95 and precision >= 0.9, (recall, precision)


def test_collision_probability_matches_simulation():
    rng = np.random.default_rng(0)
    bands, rows, trials = 20, 5, 20_000
    for s in (0.3, 0.5, 0.6, 0.8):
        agree = rng.random((trials, bands, rows)) < s       # each row agrees w.p. s
        simulated = agree.all(axis=2).any(axis=1).mean()
        p = float(collision_probability(s, bands, rows))
        sigma = math.sqrt(p * (1 - p) / trials)  # binomial standard error
        assert sigma > 0 and abs(simulated - p) <= 4 * sigma, (s, simulated, p)


def test_exact_duplicates_and_normalize():
    docs = ["Hello  World", "hello world", "Ｈｅｌｌｏ world\x07", "other", "other", "x"]
    assert exact_duplicates(docs) == [[0, 1, 2], [3, 4]]
    assert normalize("  A\u00a0b\tC\n") == "a b c"


def test_clean_documents_counts_each_step():
    docs = ["ﬁne text with ligature and enough words", "bell\x07 inside a long sentence here",
            "too short", "1 2 3 4 5 6 7 8 9 10 11 12", "an ordinary sentence with six words"]
    report = clean_documents(docs, min_words=5, min_letter_fraction=0.5)
    assert (report.changed_by_nfkc, report.changed_by_controls) == (1, 1)
    assert (report.removed_short, report.removed_not_letters) == (1, 1)
    assert report.kept[0].startswith("fine") and "\x07" not in report.kept[1]


def test_ngram_overlap_finds_a_planted_leak():
    train = ["the quick brown fox jumps over the lazy dog " * 3, "another training text"]
    leak = "preface " + "the quick brown fox jumps over the lazy dog " * 2
    clean = "completely different words that never appear in the training set at all ok"
    overlap = ngram_overlap(train, [leak, clean, "short"], n=13)
    assert overlap[0] > 0.8 and overlap[1] == 0.0 and overlap[2] == 0.0
    assert len(word_ngrams("a b c d", 2)) == 3


def test_shingles_short_document_and_jaccard_edges():
    assert shingles("one two", 5) == {b"one two"}
    assert jaccard(set(), set()) == 1.0 and jaccard({1}, {2}) == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_perm"):
        MinHasher(0)
    with pytest.raises(TypeError, match="docs"):
        near_duplicate_pairs("not a list")
    with pytest.raises(ValueError, match="threshold"):
        near_duplicate_pairs(["a"], threshold=1.5)
    with pytest.raises(ValueError, match="signatures"):
        lsh_candidate_pairs(np.zeros((3, 8), dtype=np.uint32), bands=4, rows=4)
    with pytest.raises(ValueError, match="same shape"):
        estimate_jaccard(np.zeros(4), np.zeros(5))
    with pytest.raises(ValueError, match="ngram"):
        shingles("a b", 0)
    with pytest.raises(ValueError, match="min_letter_fraction"):
        clean_documents(["a"], min_letter_fraction=2.0)
    assert near_duplicate_pairs([]) == []
    assert dedup.split_documents("a\n\n\n b \n\nc") == ["a", "b", "c"]


def test_distinct_documents_removes_exact_and_near_copies(docs):
    assert len(dedup.distinct_documents(docs)) < len(docs)  # the corpus repeats itself
    base = dedup.distinct_documents(docs[:60])
    near_copy = " ".join(base[3].split()[:-1])               # one word shorter
    result = dedup.distinct_documents(base + [base[0].upper(), near_copy, base[1]])
    assert result == base


def test_duplication_corpora_repeats_only_the_chosen_documents(docs):
    texts = dedup.duplication_corpora(docs, n_repeated=3, copies=4, min_chars=64,
                                      train_docs=100, seed=0)
    assert len(texts["repeated"]) == len(texts["once"]) == 3
    assert not set(texts["repeated"]) & set(texts["once"])
    for doc in texts["repeated"]:
        assert texts["duplicated"].count(doc) >= 4 and texts["deduplicated"].count(doc) >= 1
    extra = sum(len(d) + 2 for d in texts["repeated"]) * 3
    assert len(texts["duplicated"]) == len(texts["deduplicated"]) + extra
    assert texts["held_out"] and texts["held_out"] not in texts["deduplicated"]
    with pytest.raises(ValueError, match="n_repeated"):
        dedup.duplication_corpora(docs[:20], n_repeated=50, copies=2, min_chars=64)


def test_extraction_rate_of_a_model_that_knows_the_text():
    import torch

    from companion.data import CharTokenizer

    passage = "abcdefghij" * 4
    tok = CharTokenizer(passage)

    class Oracle(torch.nn.Module):                          # predicts the next letter
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def generate(self, idx, n, temperature):
            assert temperature == 0.0
            for _ in range(n):
                idx = torch.cat([idx, (idx[:, -1:] + 1) % 10], dim=1)
            return idx

    model = Oracle()
    assert dedup.extraction_rate(model, tok, [passage], 10, 20) == 1.0
    wrong = passage[:10] + "j" * 30
    assert dedup.extraction_rate(model, tok, [wrong], 10, 20) == 0.0
    assert dedup.extraction_rate(model, tok, [wrong], 10, 20, per_character=True) == 0.1


def test_memorization_record_refuses_other_settings(tmp_path):
    import json

    path = tmp_path / "record.json"
    path.write_text(json.dumps({"settings": {"steps": 1}, "runs": []}))
    with pytest.raises(ValueError, match="settings"):
        dedup.load_memorization_record(path)
    with pytest.raises(ValueError, match="corpus"):
        dedup.memorization_run(["a"], "both", seed=0)
    with pytest.raises(ValueError, match="lr"):
        dedup.memorization_run(["a"], "duplicated", seed=0, lr=-1e-3)


def test_best_memorization_runs_picks_the_lowest_mean_held_out_loss():
    losses = {("dup", 10, 1e-3): [2.0, 2.2], ("dup", 10, 3e-3): [1.9, 2.4],  # means 2.1, 2.15
              ("dedup", 5, 1e-3): [1.5, 1.5], ("dedup", 5, 3e-3): [1.4, 1.6000001]}
    record = {(c, n, lr, seed): {"held_out_loss": x, "seed": seed}
              for (c, n, lr), xs in losses.items() for seed, x in enumerate(xs)}
    best = dedup.best_memorization_runs(record)
    assert best.keys() == {("dup", 10), ("dedup", 5)}
    assert best[("dup", 10)][0] == 1e-3
    assert [r["seed"] for r in best[("dup", 10)][1]] == [0, 1]
    assert best[("dedup", 5)][0] == 1e-3
    with pytest.raises(TypeError, match="record"):
        dedup.best_memorization_runs([1])


def test_record_command_needs_a_flag():
    with pytest.raises(SystemExit):
        dedup.main([])
