"""companion.data: splits, the character tokenizer and corpus batches."""

import pytest
import torch
from sklearn.datasets import load_digits

from companion.data import (
    CharCorpus,
    CharTokenizer,
    load_breast_cancer_split,
    load_digits_split,
    load_pydoc_text,
)


def test_digits_split_shapes_range_and_stratification():
    s = load_digits_split()
    assert s.X_train.shape == (1347, 64) and s.X_test.shape == (450, 64)
    assert s.X_train.dtype == torch.float32 and s.y_train.dtype == torch.long
    assert s.X_train.min() == 0 and s.X_train.max() == 1
    train_frac = torch.bincount(s.y_train, minlength=10) / len(s.y_train)
    test_frac = torch.bincount(s.y_test, minlength=10) / len(s.y_test)
    assert (train_frac - test_frac).abs().max() < 0.01
    # every image is one of sklearn's, scaled by 1/16
    original = torch.as_tensor(load_digits().data, dtype=torch.float32) / 16
    assert torch.cdist(s.X_test[:5], original).min(dim=1).values.max() == 0


def test_splits_are_repeatable_and_seed_dependent():
    a, b, c = load_digits_split(seed=1), load_digits_split(seed=1), load_digits_split(seed=2)
    assert torch.equal(a.X_train, b.X_train)
    assert not torch.equal(a.X_train, c.X_train)


def test_breast_cancer_is_standardised_on_train_only():
    s = load_breast_cancer_split(dtype=torch.float64)
    assert s.X_train.shape[1] == 30 and len(s.X_train) + len(s.X_test) == 569
    assert torch.allclose(s.X_train.mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s.X_train.std(0), torch.ones(30, dtype=torch.float64), atol=1e-12)
    assert s.X_test.mean(0).abs().max() > 1e-3  # test rows are not re-centred
    assert set(s.y_train.tolist()) == {0, 1}


def test_split_to_device_and_bad_test_size():
    s = load_digits_split(test_size=0.5).to("cpu")
    assert len(s.X_train) in (898, 899)
    with pytest.raises(ValueError, match="test_size"):
        load_digits_split(test_size=1.0)


def test_pydoc_text_is_the_bundled_corpus():
    text = load_pydoc_text()
    assert 400_000 < len(text) < 600_000
    assert "lambda" in text and "\n" in text


def test_tokenizer_round_trip_on_the_whole_corpus():
    text = load_pydoc_text()
    tok = CharTokenizer(text)
    assert tok.itos == sorted(set(text))
    ids = tok.encode(text)
    assert ids.dtype == torch.long and ids.shape == (len(text),)
    assert tok.decode(ids) == text


def test_tokenizer_errors():
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="'z'"):
        tok.encode("abz")
    with pytest.raises(TypeError, match="text"):
        tok.encode(["a"])
    with pytest.raises(ValueError, match="ids"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="text"):
        CharTokenizer("")


def test_corpus_split_is_contiguous():
    corpus = CharCorpus("abcdefghij" * 10, val_fraction=0.2)
    assert len(corpus.train_ids) == 80 and len(corpus.val_ids) == 20
    assert corpus.tokenizer.decode(torch.cat([corpus.train_ids, corpus.val_ids])) == corpus.text


def test_batches_are_shifted_windows_of_the_split():
    corpus = CharCorpus(val_fraction=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = corpus.get_batch("val", batch_size=8, block_size=32, generator=g)
    assert x.shape == y.shape == (8, 32) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    val_text = corpus.tokenizer.decode(corpus.val_ids)
    for row_x, row_y in zip(x, y, strict=True):
        window = corpus.tokenizer.decode(row_x) + corpus.tokenizer.decode(row_y[-1:])
        assert window in val_text


def test_batches_repeat_with_the_same_generator(device):
    corpus = CharCorpus("the quick brown fox jumps over the lazy dog " * 20)
    a = corpus.get_batch("train", 4, 16, torch.Generator().manual_seed(3), device=device)
    b = corpus.get_batch("train", 4, 16, torch.Generator().manual_seed(3), device=device)
    assert a[0].device.type == device.type
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("kw, match", [
    (dict(split="test"), "split"),
    (dict(block_size=0), "block_size"),
    (dict(block_size=10_000), "block_size"),
])
def test_batch_errors(kw, match):
    corpus = CharCorpus("hello world " * 100)
    args = dict(split="train", batch_size=2, block_size=8) | kw
    with pytest.raises(ValueError, match=match):
        corpus.get_batch(**args)


def test_corpus_val_fraction_must_be_a_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        CharCorpus("abc", val_fraction=0)


def test_pydoc_text_is_frozen_and_checked(monkeypatch, tmp_path):
    import hashlib

    import companion.data as data

    raw = data.PYDOC_TEXT_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == data.PYDOC_TEXT_SHA256
    text = load_pydoc_text()
    assert len(text) == 465_048 and len(set(text)) == 103
    altered = tmp_path / "pydoc_topics.txt"
    altered.write_bytes(raw[:-1] + b"!")
    monkeypatch.setattr(data, "PYDOC_TEXT_FILE", altered)
    with pytest.raises(RuntimeError, match="SHA-256"):
        load_pydoc_text()


def test_no_module_reads_the_running_pythons_files():
    import re
    from pathlib import Path

    import companion

    for module in Path(companion.__file__).parent.glob("*.py"):
        source = module.read_text(encoding="utf-8")
        assert not re.search(r"(from|import)\s+pydoc_data", source), module.name


def test_stdlib_source_is_frozen_checked_and_complete(monkeypatch, tmp_path):
    import hashlib

    import companion.data as data

    raw = data.STDLIB_SOURCE_FILE.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == data.STDLIB_SOURCE_SHA256
    text = data.load_stdlib_source()
    assert len(text) == 253_978
    headers = [line for line in text.splitlines() if line.startswith("# ===== Lib/")]
    assert headers == [f"# ===== Lib/{m}.py =====" for m in data.STDLIB_MODULES]
    assert text.startswith(headers[0]) and "def bisect_left(" in text
    altered = tmp_path / "stdlib_source.txt"
    altered.write_bytes(raw.replace(b"def ", b"def  ", 1))
    monkeypatch.setattr(data, "STDLIB_SOURCE_FILE", altered)
    with pytest.raises(RuntimeError, match="SHA-256"):
        data.load_stdlib_source()


def test_map_to_vocabulary_replaces_only_unknown_characters():
    from companion.data import load_stdlib_source, map_to_vocabulary

    assert map_to_vocabulary("a$b`c", "abc?") == ("a?b?c", 2)
    assert map_to_vocabulary("", "a", "a") == ("", 0)
    vocabulary = set(load_pydoc_text())
    source = load_stdlib_source()
    mapped, replaced = map_to_vocabulary(source, vocabulary)
    assert len(mapped) == len(source) and set(mapped) <= vocabulary
    assert replaced == sum(a != b for a, b in zip(source, mapped)) == 165
    with pytest.raises(ValueError, match="replacement"):
        map_to_vocabulary("abc", "abc", "$")
    with pytest.raises(TypeError, match="text"):
        map_to_vocabulary(b"abc", "abc")


def test_corpus_with_a_given_tokenizer_keeps_its_ids():
    tokenizer = CharTokenizer("abcdef")
    corpus = CharCorpus("face" * 10, tokenizer=tokenizer)
    assert corpus.vocab_size == 6
    assert corpus.train_ids[:4].tolist() == [5, 0, 2, 4]
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CharCorpus("xyz", tokenizer=tokenizer)
    with pytest.raises(TypeError, match="tokenizer"):
        CharCorpus("abc", tokenizer="abc")
