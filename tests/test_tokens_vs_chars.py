"""Tests for companion.tokens_vs_chars: bits per byte against a float64 loop, FLOP counts
against the output layer's closed form, equal-compute steps and the learning-rate pick."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from factories import tiny_gpt

from companion import tokens_vs_chars as tv
from companion.data import CharTokenizer
from companion.tokenizer import BPETokenizer, train_bpe
from companion.train import fixed_windows, language_model_loss


class ZeroLogits(torch.nn.Module):
    """A model that gives every token the same score: -log2 p = log2(V) per token."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.dummy = vocab, torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return (torch.zeros(*x.shape, self.vocab),)


def test_token_byte_lengths_char_and_bpe():
    char = CharTokenizer("aé€😀")
    assert tv.token_byte_lengths(char).tolist() == [1, 2, 3, 4]
    text = "héllo wörld, 你好 😀 hello world " * 5
    bpe = BPETokenizer(train_bpe(text, 280))
    lengths = tv.token_byte_lengths(bpe)
    assert lengths.shape == (280,) and lengths[:256].eq(1).all()
    assert int(lengths[bpe.encode(text)].sum()) == len(text.encode("utf-8"))
    with pytest.raises(TypeError, match="tokenizer"):
        tv.token_byte_lengths("abc")


def test_bits_per_byte_uniform_model_closed_form():
    ids = torch.arange(1 + 4 * 8) % 5                     # 4 windows of 8 targets
    lengths = torch.tensor([1, 2, 3, 1, 1])
    targets = fixed_windows(ids, 8)[1]
    expected = targets.numel() * math.log2(5) / int(lengths[targets].sum())
    got = tv.bits_per_byte(ZeroLogits(5), ids, lengths, 8, batch_size=3)
    assert abs(got - expected) < 1e-12


def test_bits_per_byte_matches_float64_loop():
    model = tiny_gpt(vocab_size=11, block_size=16)          # float64
    ids = torch.randint(11, (16 * 7 + 5,), generator=torch.Generator().manual_seed(0))
    lengths = torch.randint(1, 5, (11,), generator=torch.Generator().manual_seed(1))
    x, y = fixed_windows(ids, 16)
    nats = sum(-F.log_softmax(model(x[i:i + 1])[0][0], -1)[range(16), y[i]].sum().item()
               for i in range(len(x)))
    expected = nats / math.log(2) / int(lengths[y].sum())
    assert abs(tv.bits_per_byte(model, ids, lengths, 16, batch_size=2) - expected) < 1e-12


def test_bits_per_byte_of_one_byte_tokens_is_loss_in_bits():
    model = tiny_gpt(vocab_size=7, block_size=8)
    ids = torch.randint(7, (8 * 9 + 1,), generator=torch.Generator().manual_seed(2))
    bpb = tv.bits_per_byte(model, ids, torch.ones(7, dtype=torch.long), 8)
    assert abs(bpb - language_model_loss(model, *fixed_windows(ids, 8)) / math.log(2)) < 1e-12


def test_bits_per_byte_bad_input():
    model = tiny_gpt(vocab_size=5, block_size=4)
    with pytest.raises(TypeError, match="ids"):
        tv.bits_per_byte(model, [1, 2, 3], torch.ones(5), 4)
    with pytest.raises(ValueError, match="byte_lengths"):
        tv.bits_per_byte(model, torch.arange(9) % 5, torch.ones(5, 1), 4)
    with pytest.raises(ValueError, match="block"):
        tv.bits_per_byte(model, torch.arange(9) % 5, torch.ones(5), 0)
    with pytest.raises(ValueError, match="byte_lengths"):              # id 4 uncovered
        tv.bits_per_byte(model, torch.arange(9) % 5, torch.ones(4), 4)
    with pytest.raises(ValueError, match="byte_lengths"):              # a 0-byte token
        tv.bits_per_byte(model, torch.arange(9) % 5, torch.tensor([1, 1, 0, 1, 1]), 4)


def test_flops_grow_by_the_output_layer_only():
    # the head's product (B T d V), forward and two backward products, 2 FLOPs per MAC
    small = tiny_gpt(vocab_size=13, block_size=8, dtype=torch.float32)
    large = tiny_gpt(vocab_size=40, block_size=8, dtype=torch.float32)
    gap = tv.train_flops_per_step(large, 3, 8) - tv.train_flops_per_step(small, 3, 8)
    assert gap == 6 * 3 * 8 * 16 * (40 - 13)
    assert all(p.grad is None for p in large.parameters())


def test_equal_compute_steps():
    assert tv.equal_compute_steps(1500, 644481024, 805306368) == 1200
    assert tv.equal_compute_steps(10, 3, 7) == 4                      # 4.29 -> 4
    assert tv.equal_compute_steps(1, 1, 10**9) == 1
    with pytest.raises(ValueError, match="flops"):
        tv.equal_compute_steps(10, 3, 0)
    with pytest.raises(TypeError, match="reference_steps"):
        tv.equal_compute_steps(1.5, 3, 7)


def _run(kind, lr, seed, dev):
    return {"kind": kind, "lr": lr, "seed": seed, "dev": [9.0, dev]}


def test_best_learning_rates_use_seed_zero_and_skip_diverged():
    runs = [_run("char", 1e-3, 0, 2.0), _run("char", 1e-2, 0, 1.5),
            _run("char", 1e-1, 0, float("nan")), _run("char", 1e-3, 1, 1.0),
            _run("bpe", 1e-3, 0, 4.0), _run("bpe", 1e-2, 0, float("inf"))]
    assert tv.best_learning_rates(runs) == {"char": 1e-2, "bpe": 1e-3}
    with pytest.raises(TypeError, match="runs"):
        tv.best_learning_rates({"char": 1})


def test_both_kinds_cover_the_same_validation_bytes():
    char, bpe = tv.tokenization_data("char"), tv.tokenization_data("bpe512")
    assert char[0].decode(char[4]) == bpe[0].decode(bpe[4].tolist())
    n_bytes = [int(tv.token_byte_lengths(d[0])[d[4]].sum()) for d in (char, bpe)]
    assert n_bytes[0] == n_bytes[1] == len(char[0].decode(char[4]).encode("utf-8"))
    assert len(bpe[4]) < len(char[4]) / 2                  # BPE: over 2 bytes per token
    with pytest.raises(ValueError, match="kind"):
        tv.tokenization_data("words")


def test_record_refuses_other_settings(tmp_path):
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"settings": {**tv.TOKENS_VS_CHARS, "char_steps": 1}}))
    with pytest.raises(ValueError, match="re-record"):
        tv.load_tokens_vs_chars(path)
    assert tv.load_tokens_vs_chars()["settings"] == tv.TOKENS_VS_CHARS


def test_record_holds_the_grid_and_the_seeds_at_interior_best_rates():
    record, c = tv.load_tokens_vs_chars(), tv.TOKENS_VS_CHARS
    keys = sorted((r["kind"], r["lr"], r["seed"]) for r in record["runs"])
    best = tv.best_learning_rates(record["runs"])
    assert keys == sorted([(k, lr, c["seeds"][0]) for k in c["kinds"] for lr in c["lr_grid"]]
                          + [(k, best[k], s) for k in c["kinds"] for s in c["seeds"][1:]])
    assert all(min(c["lr_grid"]) < lr < max(c["lr_grid"]) for lr in best.values())
