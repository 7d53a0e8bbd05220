"""companion.sampling against transformers' logits warpers and processors.

Oracles: ``TemperatureLogitsWarper`` -> ``TopKLogitsWarper`` -> ``TopPLogitsWarper`` ->
``MinPLogitsWarper`` applied in that order, and ``RepetitionPenaltyLogitsProcessor``, on
random logits with ties, edge values of each knob and batches; exact equality.
"""

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from companion.decoder import Decoder, DecoderConfig
from companion.sampling import (
    apply_repetition_penalty,
    distinct_n,
    entropy,
    filter_logits,
    generate,
    sample,
)
from companion.transformer import GPT, GPTConfig


def hf_filter(logits, temperature=1.0, top_k=None, top_p=None, min_p=None):
    ids = torch.zeros(logits.size(0), 1, dtype=torch.long)
    z = TemperatureLogitsWarper(float(temperature))(ids, logits)
    if top_k is not None:
        z = TopKLogitsWarper(top_k)(ids, z)
    if top_p is not None:
        z = TopPLogitsWarper(top_p)(ids, z)
    if min_p is not None:
        z = MinPLogitsWarper(min_p)(ids, z)
    return z


def random_logits(seed, B=4, V=50, ties=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, V, generator=g, dtype=dtype) * 3
    return z.round() if ties else z  # rounding to integers makes many exact ties


KNOBS = [
    {},
    {"temperature": 0.7},
    {"temperature": 1e-4},
    {"temperature": 3.0, "top_k": 5},
    {"top_k": 1},
    {"top_k": 50},
    {"top_k": 500},
    {"top_p": 0.9},
    {"top_p": 1.0},
    {"top_p": 1e-6},
    {"top_p": 0.999999},
    {"min_p": 0.1},
    {"min_p": 0.0},
    {"min_p": 1.0},
    {"temperature": 0.8, "top_k": 20, "top_p": 0.8, "min_p": 0.05},
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: ",".join(f"{a}={b}" for a, b in
                                                                  k.items()) or "none")
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_filter_logits_equals_hugging_face(knobs, ties, dtype):
    for seed in range(3):
        logits = random_logits(seed, ties=ties, dtype=dtype)
        ours, ref = filter_logits(logits, **knobs), hf_filter(logits, **knobs)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)
        assert torch.isfinite(ours).any(dim=-1).all()  # every row keeps a token


def test_filters_keep_what_they_promise():
    logits = random_logits(0, B=1, V=100)
    kept = torch.isfinite(filter_logits(logits, top_k=7)).sum()
    assert kept == 7
    z = filter_logits(logits, top_p=0.5)
    probs = torch.softmax(logits, -1)
    mass = probs[torch.isfinite(z)].sum()
    smallest = probs[torch.isfinite(z)].min()
    assert mass >= 0.5 and mass - smallest < 0.5  # the smallest set reaching 0.5
    z = filter_logits(logits, min_p=0.2)
    assert (probs[torch.isfinite(z)] >= 0.2 * probs.max()).all()
    # all-tied row: top-k keeps every tied token
    assert torch.isfinite(filter_logits(torch.zeros(1, 9), top_k=2)).all()


def test_repetition_penalty_equals_hugging_face():
    logits = random_logits(1, B=3, V=30)
    ids = torch.randint(0, 30, (3, 12), generator=torch.Generator().manual_seed(0))
    for penalty in (1.0, 1.3, 0.7):
        ref = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, ids, penalty), ref,
                                   rtol=0, atol=0)
    with pytest.raises(ValueError, match="batch size"):
        apply_repetition_penalty(logits, ids[:2], 1.2)


def test_sample_greedy_seeded_and_per_request_generators():
    logits = random_logits(2, B=3, V=40)
    assert torch.equal(sample(logits, temperature=0), logits.argmax(-1, keepdim=True))
    # a tiny top_p leaves only the arg-max
    assert torch.equal(sample(logits, top_p=1e-9), logits.argmax(-1, keepdim=True))
    a = sample(logits, generator=torch.Generator().manual_seed(7))
    b = sample(logits, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (3, 1)
    # per-request generators: row i depends on its own seed only
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    rows = sample(logits, generator=gens)
    alone = sample(logits[1:2], generator=torch.Generator().manual_seed(2))
    assert rows[1] == alone[0]
    with pytest.raises(ValueError, match="one generator per row"):
        sample(logits, generator=gens[:2])


def test_tiny_temperature_overflows_so_zero_is_greedy():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    z = logits / 1e-45  # float32: the division overflows to inf
    assert torch.isnan(torch.softmax(z, -1)).all()
    assert sample(logits, temperature=0).item() == 2


def test_bad_knobs_raise_naming_the_argument():
    z = random_logits(0)
    for kwargs, name in (({"temperature": 0.0}, "temperature"),
                         ({"temperature": -1}, "temperature"),
                         ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
                         ({"top_p": 1.5}, "top_p"), ({"min_p": -0.1}, "min_p"),
                         ({"temperature": math.inf}, "temperature")):
        with pytest.raises(ValueError, match=name):
            filter_logits(z, **kwargs)
    with pytest.raises(TypeError, match="top_k"):
        filter_logits(z, top_k=2.5)
    with pytest.raises(ValueError, match="logits must have 2"):
        filter_logits(z[0])
    with pytest.raises(TypeError, match="logits must be a floating"):
        filter_logits(z.long())


def test_entropy_and_distinct_n():
    torch.testing.assert_close(entropy(torch.zeros(2, 8, dtype=torch.float64)),
                               torch.full((2,), math.log(8), dtype=torch.float64))
    z = torch.tensor([[0.0, 0.0, float("-inf")]], dtype=torch.float64)
    torch.testing.assert_close(entropy(z), torch.tensor([math.log(2)], dtype=torch.float64))
    assert distinct_n([1, 2, 1, 2, 1, 2], 2) == pytest.approx(2 / 5)
    assert distinct_n(torch.arange(10), 3) == 1.0
    with pytest.raises(ValueError, match="at least n=3"):
        distinct_n([1, 2], 3)


@pytest.mark.parametrize("kind", ["gpt", "decoder"])
def test_generate_with_cache_equals_greedy_without(kind):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=1, n_head=2, n_embd=16))
    else:
        model = Decoder(DecoderConfig(vocab_size=20, dim=16, n_layers=1, n_heads=2,
                                      n_kv_heads=1, hidden_dim=24, max_seq_len=16))
    model = model.double()
    prompt = torch.randint(0, 20, (2, 4), generator=torch.Generator().manual_seed(1))
    out = generate(model, prompt, 8, temperature=0)
    ids = prompt
    with torch.no_grad():
        for _ in range(8):
            o = model(ids)
            logits = o[0] if isinstance(o, tuple) else o
            ids = torch.cat((ids, logits[:, -1].argmax(-1, keepdim=True)), 1)
    assert torch.equal(out, ids)
    seeded = [generate(model, prompt, 6, generator=torch.Generator().manual_seed(3),
                       top_p=0.9, repetition_penalty=1.2) for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    with pytest.raises(ValueError, match="exceed"):
        generate(model, prompt, 13)


def test_filter_logits_with_masked_entries_equals_hugging_face():
    logits = random_logits(4, B=3, V=30)
    logits[:, ::3] = float("-inf")  # a vocabulary mask applied before sampling
    for knobs in ({"top_k": 25}, {"top_p": 0.95}, {"min_p": 0.05}, {"temperature": 0.5}):
        torch.testing.assert_close(filter_logits(logits, **knobs), hf_filter(logits, **knobs),
                                   rtol=0, atol=0)
