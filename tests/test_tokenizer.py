"""companion.tokenizer against tiktoken: trained ranks, encoded ids, GPT-2's vocabulary."""

import random
import unicodedata

import pytest
import tiktoken
from tiktoken._educational import bpe_train
from tiktoken.load import load_tiktoken_bpe

from companion import tokenizer as tok
from companion.data import load_pydoc_text
from companion.tokenizer import (
    ENDOFTEXT,
    GPT2_ORIGINAL_PATTERN,
    GPT2_PATTERN,
    BPETokenizer,
    bpe_merge,
    bytes_per_token,
    gpt2_tokenizer,
    load_gpt2_ranks,
    train_bpe,
)

ADVERSARIAL = [
    "", " ", "  ", "\n", "\n\n\n", "a\n", "a \n", "a  ", "   a", "\t\t x \r\n y\u00a0z",
    " " * 300 + "x" + "\n" * 50, "hello world", "Hello, World!", "don't I'll we've they're",
    "DON'T 'S 's'", "x'''y", "1234567890 3.14159 -42 1e10 ١٢٣", "   12  345 ",
    "naïve café", "cafe\u0301 n\u0303o\u0308\u0301\u0327",  # combining marks
    "中文分词和字节对编码。大模型的数据清洗、去重与数据污染！", "日本語のテキスト、カタカナ",
    "한국어 텍스트", "العربية", "Ελληνικά", "emoji 😀👍🏽🇨🇳👨‍👩‍👧 ✨",
    "lone \ud800 surrogate", "\udfff", "pair \ud83d\ude00 joined", "a\ud83dz",
    "\x00\x01\x7f\u200b\u2028\u2029\ufeff", "def f(x):\n    return x ** 2  # square\n",
    ENDOFTEXT.replace("|", "¦"), "<|endoftext", "a" * 500, "ab" * 300,
]


def _random_code_point(rng: random.Random, assigned: bool) -> str:
    while True:
        c = chr(rng.randint(0, 0x10FFFF))
        if not assigned or unicodedata.category(c) != "Cn":
            return c


def _random_text(rng: random.Random, assigned: bool = True) -> str:
    """Short strings from ASCII, whitespace, contractions, digits, CJK, emoji, marks,
    surrogates and arbitrary code points (assigned in Unicode 14 unless ``assigned`` is
    false): the cases where the pattern or the bytes matter."""
    pools = [
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789",
        " \t\n\r\x0b\x0c\u00a0\u3000\u2003", "'`\".,;:!?()[]{}<>-_=+*/\\|#@$%^&~",
        "中文分词字节对编码去重数据污染清洗的了是", "😀👍🏽🇨🇳✨🎉", "\u0301\u0308\u0327\u200d",
        "éüßøñçΩЖ", "\ud800\udc00\udbff",
    ]
    out = []
    for _ in range(rng.randint(0, 24)):
        r = rng.random()
        if r < 0.1:
            out.append(_random_code_point(rng, assigned))
        elif r < 0.2:
            out.append(rng.choice(["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", " 's"]))
        else:
            out.append(rng.choice(rng.choice(pools)) * rng.choice([1, 1, 1, 2, 5]))
    return "".join(out)


@pytest.fixture(scope="module")
def corpus():
    return load_pydoc_text()


@pytest.fixture(scope="module")
def trained(corpus):
    return train_bpe(corpus[:60_000], 600)


@pytest.fixture(scope="module")
def gpt2_ranks():
    return load_gpt2_ranks()


@pytest.mark.parametrize("n_chars,vocab_size", [(5_000, 300), (40_000, 420)])
@pytest.mark.parametrize("pattern", [GPT2_PATTERN, GPT2_ORIGINAL_PATTERN])
def test_train_bpe_equals_tiktoken_educational(corpus, n_chars, vocab_size, pattern):
    text = corpus[:n_chars]
    ours = train_bpe(text, vocab_size, pattern)
    theirs = bpe_train(text, vocab_size, pattern, visualise=None)
    assert list(ours.items()) == list(theirs.items())      # same merges in the same order


def test_train_bpe_equals_tiktoken_on_unicode_and_ties():
    text = " ".join(ADVERSARIAL[:-3]).encode("utf-8", "replace").decode("utf-8") * 3
    text = tok._valid_unicode(text)
    ours = train_bpe(text, 400)
    assert list(ours.items()) == list(bpe_train(text, 400, GPT2_PATTERN,
                                                visualise=None).items())
    ties = "ab cd ef gh " * 2                               # all pairs tied at count 2
    assert list(train_bpe(ties, 262).items()) == list(
        bpe_train(ties, 262, GPT2_PATTERN, visualise=None).items())


def test_train_bpe_format_and_prefix_property(corpus):
    ranks = train_bpe(corpus[:20_000], 400)
    assert sorted(ranks.values()) == list(range(400))
    assert all(ranks[bytes([i])] == i for i in range(256))
    small = train_bpe(corpus[:20_000], 300)                # a smaller vocabulary is a prefix
    assert list(small.items()) == list(ranks.items())[:300]


def test_encode_equals_tiktoken_on_random_and_adversarial_text(trained):
    ours = BPETokenizer(trained, GPT2_PATTERN)
    theirs = tiktoken.Encoding("trained", pat_str=GPT2_PATTERN, mergeable_ranks=trained,
                               special_tokens={})
    rng = random.Random(0)
    texts = ADVERSARIAL + [_random_text(rng) for _ in range(10_000)]
    mismatches = [t for t in texts if ours.encode(t) != theirs.encode(t)]
    assert mismatches == []


def test_unassigned_code_points_are_the_only_mismatches(trained):
    """The regex module and tiktoken's Rust regex carry different Unicode versions: some
    code points unassigned in Python 3.11's Unicode 14 (U+3xxxx, later CJK extensions)
    are letters (\\p{L}) for one and not the other, so they split text differently.
    Every mismatch on fully random code points must contain such a code point."""
    ours = BPETokenizer(trained, GPT2_PATTERN)
    theirs = tiktoken.Encoding("trained", pat_str=GPT2_PATTERN, mergeable_ranks=trained,
                               special_tokens={})
    rng = random.Random(3)
    texts = [_random_text(rng, assigned=False) for _ in range(3_000)]
    mismatches = [t for t in texts if ours.encode(t) != theirs.encode(t)]
    assert len(mismatches) < len(texts) // 10
    assert all(any(unicodedata.category(c) == "Cn" for c in t) for t in mismatches)


def test_gpt2_ranks_match_tiktoken_file_format_and_hash(gpt2_ranks, monkeypatch):
    assert len(gpt2_ranks) == 50256 and sorted(gpt2_ranks.values()) == list(range(50256))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")           # read the local file, cache nothing
    loaded = load_tiktoken_bpe(str(tok.GPT2_RANKS_FILE), expected_hash=tok.GPT2_RANKS_SHA256)
    assert loaded == gpt2_ranks
    assert gpt2_ranks[b" the"] == 262 and gpt2_ranks[b"!"] == 0


def test_gpt2_file_is_checked(tmp_path, monkeypatch):
    altered = tmp_path / "gpt2.tiktoken"
    altered.write_bytes(tok.GPT2_RANKS_FILE.read_bytes().replace(b" 262\n", b" 263\n", 1))
    monkeypatch.setattr(tok, "GPT2_RANKS_FILE", altered)
    with pytest.raises(RuntimeError, match="SHA-256"):
        load_gpt2_ranks()


def test_gpt2_encoding_equals_tiktoken(corpus, gpt2_ranks):
    ours = BPETokenizer(gpt2_ranks, GPT2_PATTERN, {ENDOFTEXT: 50256})
    theirs = tiktoken.Encoding("r50k_offline", pat_str=GPT2_PATTERN,
                               mergeable_ranks=gpt2_ranks,
                               special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)
    assert ours.encode(corpus) == theirs.encode(corpus)
    assert ours.encode("hello world") == [31373, 995]     # tiktoken's documented example
    rng = random.Random(1)
    texts = ADVERSARIAL + [_random_text(rng) for _ in range(10_000)]
    assert [t for t in texts if ours.encode(t) != theirs.encode(t)] == []
    assert ours.n_vocab == theirs.n_vocab == 50257


def test_special_tokens_as_tiktoken(gpt2_ranks):
    ours = BPETokenizer(gpt2_ranks, GPT2_PATTERN, {ENDOFTEXT: 50256})
    theirs = tiktoken.Encoding("r50k_offline", pat_str=GPT2_PATTERN,
                               mergeable_ranks=gpt2_ranks, special_tokens={ENDOFTEXT: 50256})
    text = f"first doc  {ENDOFTEXT}second doc\n{ENDOFTEXT}"
    with pytest.raises(ValueError, match="special token"):
        ours.encode(text)
    with pytest.raises(ValueError):
        theirs.encode(text)
    for kwargs in [{"allowed_special": "all"}, {"allowed_special": {ENDOFTEXT}},
                   {"disallowed_special": ()}]:
        assert ours.encode(text, **kwargs) == theirs.encode(text, **kwargs)
    assert ours.encode(ENDOFTEXT, allowed_special="all") == [50256]
    assert ours.decode(ours.encode(text, allowed_special="all")) == text
    with pytest.raises(ValueError, match="allowed_special"):
        ours.encode(text, allowed_special={"<|unknown|>"})
    with pytest.raises(TypeError, match="allowed_special"):
        ours.encode(text, allowed_special="none")


def test_round_trip_is_lossless(trained, gpt2_ranks):
    rng = random.Random(2)
    texts = [tok._valid_unicode(t) for t in ADVERSARIAL + [_random_text(rng)
                                                           for _ in range(2_000)]]
    for ranks in (trained, gpt2_ranks):
        enc = BPETokenizer(ranks)
        assert [t for t in texts if enc.decode(enc.encode(t)) != t] == []
    enc = BPETokenizer(trained)
    assert enc.encode("lone \ud800!") == enc.encode("lone \ufffd!")   # as tiktoken does
    assert enc.decode(enc.encode("a\ud83d\ude00")) == "a\U0001F600"


def test_decode_partial_character_and_bad_ids(gpt2_ranks):
    enc = BPETokenizer(gpt2_ranks)
    ids = enc.encode("龘")                                 # one character, three bytes
    assert len(ids) > 1 and enc.decode(ids[:1]) == "\ufffd"
    assert enc.decode_bytes(ids) == "龘".encode()
    with pytest.raises(ValueError, match="ids"):
        enc.decode([50256])
    with pytest.raises(ValueError, match="ids"):
        enc.decode([-1])


def test_bpe_merge_lowest_rank_first_and_leftmost_on_ties():
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"bc"] = 256
    ranks[b"ab"] = 257
    ranks[b"abc"] = 258
    assert bpe_merge(b"abc", ranks) == [258]               # whole piece is a token
    del ranks[b"abc"]
    assert bpe_merge(b"abcx", ranks) == [ord("a"), 256, ord("x")]  # bc before ab
    ranks[b"aa"] = 259
    assert bpe_merge(b"aaa", ranks) == [259, ord("a")]     # leftmost of equal ranks
    assert bpe_merge(b"", ranks) == []


def test_bytes_per_token(gpt2_ranks):
    enc = gpt2_tokenizer()
    assert bytes_per_token(enc, "hello world") == 11 / 2
    with pytest.raises(ValueError, match="text"):
        bytes_per_token(enc, "")


def test_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe("abc", 255)
    with pytest.raises(TypeError, match="vocab_size"):
        train_bpe("abc", 300.0)
    with pytest.raises(TypeError, match="text"):
        train_bpe(b"abc", 300)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe("ab ab", 300)                           # only one merge possible
    with pytest.raises(TypeError, match="ranks"):
        BPETokenizer([b"a"])
    with pytest.raises(TypeError, match="text"):
        BPETokenizer({bytes([i]): i for i in range(256)}).encode(b"a")
    with pytest.raises(ValueError, match="own id"):
        BPETokenizer({bytes([i]): i for i in range(256)}, special_tokens={"<s>": 5})


def test_parallel_samples_are_checked_and_say_the_same():
    zh, en = tok.load_parallel_sample("zh"), tok.load_parallel_sample("en")
    assert zh.count("\n\n") == en.count("\n\n") == 6        # the same seven paragraphs
    with pytest.raises(ValueError, match="language"):
        tok.load_parallel_sample("fr")
