"""companion.reward_opt: the sampled KL against exhaustive enumeration, best-of-n against
all subsets, and their edge cases (float64 throughout)."""

import itertools
import math

import pytest
import torch
from factories import tiny_gpt

from companion import align
from companion import reward_opt as ro
from companion.data import CharTokenizer

V, L = 3, 3  # a vocabulary of 3 tokens, responses of 3 tokens: 27 sequences


def _all_sequences(prompt=(1,)):
    """``(V**L, 1 + L)``: every response after ``prompt``."""
    rows = [list(prompt) + list(y) for y in itertools.product(range(V), repeat=L)]
    return torch.tensor(rows)


def _pair():
    return tiny_gpt(vocab_size=V, block_size=8, seed=0), tiny_gpt(vocab_size=V,
                                                                  block_size=8, seed=1)


def _masked_logps(model, ids, mask):
    return align.sequence_logps(model, ids, mask)  # float64 model: float64 sums


@pytest.mark.parametrize("stop", [None, [0], [2, 1]])
def test_sampled_kl_is_unbiased_for_the_exact_kl(stop):
    """E_{y ~ pi}[sum of per-token KLs] equals sum_y pi(y) log(pi(y) / ref(y)) over the
    (stopped) responses, both by exhaustive enumeration."""
    policy, reference = _pair()
    ids = _all_sequences()
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 1:] = True
    if stop is not None:
        mask = ro.until_mask(ids, 1, stop)
    logp, logq = _masked_logps(policy, ids, mask), _masked_logps(reference, ids, mask)
    # responses that stopped early appear several times: count each stopped one once
    seen, exact = set(), torch.zeros((), dtype=torch.float64)
    for row, m, p, q in zip(ids.tolist(), mask.tolist(), logp, logq):
        key = tuple(t for t, keep in zip(row, m) if keep)
        if key not in seen:
            seen.add(key)
            exact += p.exp() * (p - q)
    estimate = ro.sampled_kl(policy, reference, ids, mask)  # (27,)
    expected = (logp.exp() * estimate).sum() / logp.exp().sum() \
        if stop is None else _stopped_mean(ids, mask, logp, estimate)
    assert exact.item() > 1e-3
    torch.testing.assert_close(expected, exact, rtol=1e-12, atol=1e-14)


def _stopped_mean(ids, mask, logp, values):
    """The mean of ``values`` over the distinct stopped responses, each weighted by its
    probability (duplicates share one value: the estimate reads only the kept tokens)."""
    seen, total = {}, torch.zeros((), dtype=torch.float64)
    for row, m, p, v in zip(ids.tolist(), mask.tolist(), logp, values):
        key = tuple(t for t, keep in zip(row, m) if keep)
        if key in seen:
            assert abs(seen[key] - v.item()) < 1e-15  # the stopped tail is ignored
            continue
        seen[key] = v.item()
        total += p.exp() * v
    return total


def test_full_enumeration_probabilities_sum_to_one():
    policy, _ = _pair()
    ids = _all_sequences()
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    total = _masked_logps(policy, ids, mask).exp().sum()
    torch.testing.assert_close(total, torch.tensor(1.0, dtype=torch.float64),
                               rtol=0, atol=1e-14)


def test_token_kls_match_a_direct_formula():
    policy, reference = _pair()
    ids = _all_sequences()[:5]
    p = policy(ids)[0][:, :-1].softmax(-1)
    q = reference(ids)[0][:, :-1].softmax(-1)
    direct = (p * (p / q).log()).sum(-1)
    torch.testing.assert_close(ro.token_kls(policy, reference, ids), direct,
                               rtol=1e-12, atol=1e-15)


def test_identical_models_give_exactly_zero():
    policy, _ = _pair()
    ids = _all_sequences()
    mask = ro.until_mask(ids, 1, [0])
    assert ro.sampled_kl(policy, policy, ids, mask).abs().max().item() == 0.0


def test_monte_carlo_estimate_converges():
    """Sampled from the policy, the estimate's mean is within 4 standard errors of the
    exact KL, and its variance is below the log-ratio estimator's."""
    policy, reference = _pair()
    ids = policy.generate(torch.ones(4000, 1, dtype=torch.long), L,
                          generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    kl = ro.sampled_kl(policy, reference, ids, mask)
    ratio = _masked_logps(policy, ids, mask) - _masked_logps(reference, ids, mask)
    full = _all_sequences()
    logp, logq = _masked_logps(policy, full, mask[:27]), _masked_logps(reference, full,
                                                                       mask[:27])
    exact = (logp.exp() * (logp - logq)).sum().item()
    assert abs(kl.mean().item() - exact) < 4 * kl.std().item() / math.sqrt(len(kl))
    assert kl.var().item() < ratio.var().item()


def test_until_mask_stops_after_the_stop_sequence():
    ids = torch.tensor([[5, 1, 2, 0, 1, 2, 2], [5, 5, 1, 0, 0, 0, 0], [1, 2, 0, 0, 0, 0, 0]])
    mask = ro.until_mask(ids, 2, [1, 2])
    expected = [[0, 0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]]
    assert mask.int().tolist() == expected  # row 3: the stop sequence precedes start


def test_bad_inputs_raise():
    policy, reference = _pair()
    ids = _all_sequences()
    mask = torch.ones_like(ids, dtype=torch.bool)
    with pytest.raises(ValueError, match="mask"):
        ro.sampled_kl(policy, reference, ids, mask)  # position 0
    with pytest.raises(ValueError, match="mask"):
        ro.sampled_kl(policy, reference, ids, mask[:, 1:])
    with pytest.raises(TypeError, match="mask"):
        ro.sampled_kl(policy, reference, ids, mask.int())
    with pytest.raises(ValueError, match="ids"):
        ro.token_kls(policy, reference, ids[0])
    with pytest.raises(ValueError, match="stop"):
        ro.until_mask(ids, 1, [])
    with pytest.raises(ValueError, match="start"):
        ro.until_mask(ids, 0, [1])
    with pytest.raises(ValueError, match="n"):
        ro.best_of_n(torch.zeros(4, dtype=torch.float64), torch.zeros(4), 5)
    with pytest.raises(ValueError, match="proxy and score"):
        ro.best_of_n(torch.zeros(4, dtype=torch.float64), torch.zeros(3), 2)
    with pytest.raises(TypeError, match="proxy"):
        ro.best_of_n(torch.zeros(4, dtype=torch.long), torch.zeros(4), 2)
    with pytest.raises(ValueError, match="n"):
        ro.best_of_n_kl(0)


def _brute_force(proxy, score, n):
    """The mean score of the best-by-proxy of every n-subset (ties: the later sample)."""
    picks = [max(subset, key=lambda i: (proxy[i], i))
             for subset in itertools.combinations(range(len(proxy)), n)]
    return sum(score[i] for i in picks) / len(picks)


@pytest.mark.parametrize("ties", [False, True])
def test_best_of_n_equals_all_subsets(ties):
    gen = torch.Generator().manual_seed(0)
    N = 10
    proxy = torch.randn(N, generator=gen, dtype=torch.float64)
    if ties:
        proxy = proxy.round()  # several equal proxy rewards
    score = torch.randn(N, generator=gen, dtype=torch.float64)
    for n in range(1, N + 1):
        brute = _brute_force(proxy.tolist(), score.tolist(), n)
        assert abs(ro.best_of_n(proxy, score, n).item() - brute) < 1e-13


def test_best_of_n_batched_and_extremes():
    gen = torch.Generator().manual_seed(1)
    proxy = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    score = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    rows = torch.stack([ro.best_of_n(p, s, 3) for p, s in zip(proxy, score)])
    torch.testing.assert_close(ro.best_of_n(proxy, score, 3), rows, rtol=0, atol=0)
    torch.testing.assert_close(ro.best_of_n(proxy, score, 1), score.mean(-1),
                               rtol=1e-14, atol=1e-15)  # n = 1: the plain mean
    top = score.gather(-1, proxy.argmax(-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(ro.best_of_n(proxy, score, 7), top, rtol=0, atol=1e-15)


def test_best_of_n_kl_formula():
    assert ro.best_of_n_kl(1) == 0.0
    assert abs(ro.best_of_n_kl(4) - (math.log(4) - 0.75)) < 1e-15
    # against the exact KL of best-of-n over N equally likely, distinct outcomes
    N, n = 1000, 8
    p_pick = [(i / N) ** n - ((i - 1) / N) ** n for i in range(1, N + 1)]
    exact = sum(p * math.log(p * N) for p in p_pick if p > 0)
    assert abs(exact - ro.best_of_n_kl(n)) < 0.01  # continuous limit as N grows


def test_reward_scores_match_pair_margins():
    """``reward_scores`` reads the answer as the chapter's reward model does."""
    tok = CharTokenizer("\n#: abcdefghijklmnopqrstuvwxyzAU")
    rm = align.RewardModel(tiny_gpt(vocab_size=tok.vocab_size, block_size=64))
    torch.nn.init.normal_(rm.head.weight, generator=torch.Generator().manual_seed(0))
    msgs = [{"role": "user", "content": "copy cat"}]
    pair = {"prompt": msgs, "chosen": "cat", "rejected": "ca"}
    scores = ro.reward_scores(rm, tok, msgs, ["cat", "ca"])
    margin = align.pair_margins(rm, tok, [pair])
    torch.testing.assert_close(scores[0] - scores[1], margin[0], rtol=1e-12, atol=1e-12)


def test_the_record_loads_and_refuses_other_settings(tmp_path):
    """The stored record matches today's settings; a changed setting is refused with the
    command that re-records it."""
    import json
    record = ro.load_record()
    assert {r["kind"] for r in record["runs"]} == {"start", "dpo", "samples", "reward"}
    changed = json.loads(ro.RECORD.read_text(encoding="utf-8"))
    changed["beta"]["lr"] *= 10
    path = tmp_path / "record.json"
    path.write_text(json.dumps(changed), encoding="utf-8")
    with pytest.raises(ValueError, match="--record beta_bon"):
        ro.load_record(path)
