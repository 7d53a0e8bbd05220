"""companion.active against its oracles: scikit-learn's logistic regression without
intercept, the chapter's Bradley--Terry loss and reward model, hand-made acquisition
orders and labels-to-target edge cases."""

import math

import pytest
import torch
from factories import tiny_gpt

from companion import active, align
from companion.data import CharTokenizer

VOCAB = ("\n !\"#%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_"
         "abcdefghijklmnopqrstuvwxyz{|}~")


def noisy_pairs(n=80, c=5, seed=0, noise=0.2):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, c, generator=g, dtype=torch.float64)
    z = (X @ torch.arange(1.0, c + 1, dtype=torch.float64) > 0).long()
    flip = torch.rand(n, generator=g) < noise
    return X, torch.where(flip, 1 - z, z)


@pytest.mark.parametrize("l2, noise", [(1e-2, 0.2), (1e-1, 0.0), (1.0, 0.4)])
def test_fit_equals_scikit_learn_logistic_regression_without_intercept(l2, noise):
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, z = noisy_pairs(noise=noise)
    w = active.fit_bradley_terry(X, z, l2)
    # scikit-learn minimises C * sum(log-loss) + ||w||^2 / 2: C = 1 / (n * l2)
    ref = linear_model.LogisticRegression(
        fit_intercept=False, C=1.0 / (len(X) * l2), solver="newton-cholesky",
        tol=1e-14, max_iter=200).fit(X.numpy(), z.numpy())
    torch.testing.assert_close(w, torch.from_numpy(ref.coef_[0]), rtol=1e-9, atol=1e-9)


def test_the_fit_is_a_stationary_point_of_the_objective():
    X, z = noisy_pairs(seed=1)
    w = active.fit_bradley_terry(X, z, 1e-2).requires_grad_(True)
    active.bradley_terry_objective(w, X, z, 1e-2).backward()
    assert w.grad.abs().max().item() < 1e-12


def test_objective_is_the_chapters_bradley_terry_loss_of_the_oriented_pairs():
    X, z = noisy_pairs(seed=2)
    w = torch.randn(X.size(1), dtype=torch.float64)
    margins = torch.where(z == 1, X @ w, -(X @ w))  # r(preferred) - r(other)
    want = align.bradley_terry_loss(margins, torch.zeros_like(margins))
    got = active.bradley_terry_objective(w, X, z, 1e-12) - 0.5e-12 * w @ w
    torch.testing.assert_close(got, want, rtol=1e-15, atol=1e-15)


def test_separable_pairs_converge_with_the_penalty():
    X, _ = noisy_pairs(n=6, c=3, noise=0.0)
    z = (X[:, 0] > 0).long()
    w = active.fit_bradley_terry(X, z, 1e-3)
    assert active.pairwise_accuracy(torch.where(z[:, None] == 1, X, -X), w) == 1.0


def test_pair_features_times_a_head_are_the_reward_models_margins():
    tok = CharTokenizer(VOCAB)
    examples = align.make_instructions(["table", "word", "apple", "river"], 6, seed=0)
    pairs = align.preference_pairs(examples, noise=0.0, seed=0)
    gpt = tiny_gpt(vocab_size=len(VOCAB), block_size=64)
    features = active.pair_features(gpt, tok, pairs)  # (6, 16)
    rm = align.RewardModel(gpt)
    torch.nn.init.normal_(rm.head.weight)
    torch.nn.init.normal_(rm.head.bias)
    want = align.pair_margins(rm, tok, pairs)
    torch.testing.assert_close(features @ rm.head.weight[0].detach(), want,
                               rtol=1e-12, atol=1e-12)


def test_uncertainty_asks_for_the_smallest_margins_first_ties_in_candidate_order():
    margins = torch.tensor([0.5, -0.1, 0.3, 0.1, -2.0], dtype=torch.float64)
    assert active.select_uncertain(margins, torch.arange(5), 3).tolist() == [1, 3, 2]
    assert active.select_uncertain(margins, torch.tensor([4, 2, 0]), 2).tolist() == [2, 0]


def test_random_selection_is_a_reproducible_subset_without_repeats():
    candidates = torch.tensor([3, 7, 8, 10, 12])
    a = active.select_random(candidates, 3, torch.Generator().manual_seed(0))
    b = active.select_random(candidates, 3, torch.Generator().manual_seed(0))
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 3
    assert set(a.tolist()) <= set(candidates.tolist())


def test_the_loop_labels_the_whole_pool_and_both_strategies_end_equal():
    X, z = noisy_pairs(n=24)
    test, _ = noisy_pairs(n=30, seed=5, noise=0.0)
    runs = {s: active.active_learning_curve(X, z, test, s, seed=3, l2=0.1, seed_labels=4,
                                            batch=4, rounds=5) for s in active.STRATEGIES}
    for run in runs.values():
        assert run["labels"] == [4, 8, 12, 16, 20, 24]
        assert sorted(run["queried"]) == list(range(24))
    u, r = runs["uncertainty"], runs["random"]
    assert u["queried"][:4] == r["queried"][:4]  # the same random seed set
    assert u["accuracy"][0] == r["accuracy"][0] and u["accuracy"][-1] == r["accuracy"][-1]


def test_the_seed_set_is_drawn_independently_of_the_labellers_flips():
    # With one seed for both draws, every noisy run's seed set was flipped pairs only.
    g = torch.Generator().manual_seed(0)
    features = {"pool": torch.randn(256, 4, generator=g, dtype=torch.float64),
                "heldout": torch.randn(16, 4, generator=g, dtype=torch.float64)}
    k, flipped = active.SETTINGS["seed_labels"], []
    for seed in active.SETTINGS["seeds"]:
        z, curve = active.run_curve(features, 0.3, seed, "random", 0.1, rounds=0)
        assert z.tolist() == active.pool_labels(256, 0.3, seed).tolist()
        flipped.append(active.flipped_fraction(curve["queried"], z, 0, k))
    assert 0.0 < sum(flipped) / len(flipped) < 0.6, flipped  # 0.3 expected, was 1.0
    record = active.load_runs()["runs"]
    seed_sets = [active.flipped_fraction(r["queried"], active.pool_labels(
        256, r["noise"], r["seed"]), 0, k) for r in record if r["noise"] > 0]
    assert sum(seed_sets) / len(seed_sets) < 0.6, seed_sets


def test_labels_to_target_edge_cases():
    labels = [8, 16, 24]
    assert active.labels_to_target(labels, [0.5, 0.7, 0.9], 0.7) == 16.0
    assert active.labels_to_target(labels, [0.8, 0.6, 0.9], 0.7) == 8.0  # first round
    assert active.labels_to_target(labels, [0.5, 0.6, 0.65], 0.7) == math.inf
    with pytest.raises(ValueError, match="accuracies"):
        active.labels_to_target(labels, [0.5, math.nan, 0.9], 0.7)
    with pytest.raises(ValueError, match="target"):
        active.labels_to_target(labels, [0.5, 0.6, 0.9], math.nan)
    with pytest.raises(ValueError, match="labels"):
        active.labels_to_target([8, 8, 24], [0.5, 0.6, 0.9], 0.7)
    with pytest.raises(ValueError, match="labels and accuracies"):
        active.labels_to_target(labels, [0.5, 0.6], 0.7)


def test_labels_needed_uses_the_fraction_of_the_last_accuracy():
    run = {"labels": [8, 16, 24], "accuracy": [0.5, 0.76, 0.8]}
    assert active.labels_needed(run, 0.95) == 16.0
    assert active.labels_needed(run, 1.0) == 24.0
    with pytest.raises(ValueError, match="fraction"):
        active.labels_needed(run, 1.5)


def test_flipped_fraction_and_pool_labels():
    z = torch.tensor([1, 0, 1, 0, 1, 1])
    assert active.flipped_fraction([5, 1, 3, 0, 2], z, 1, 4) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="queried"):
        active.flipped_fraction([5, 1], z, 2, 4)
    labels = active.pool_labels(40, 0.3, seed=1)
    assert (labels == 0).sum().item() == 12
    assert labels.tolist() == (~align.flip_labels(40, 0.3, 1)).long().tolist()


def test_bad_input_names_the_argument():
    X, z = noisy_pairs(n=10)
    with pytest.raises(TypeError, match="X"):
        active.fit_bradley_terry(X.float(), z, 0.1)
    with pytest.raises(ValueError, match="z"):
        active.fit_bradley_terry(X, z + 1, 0.1)
    with pytest.raises(ValueError, match="z"):
        active.fit_bradley_terry(X, z[:5], 0.1)
    with pytest.raises(ValueError, match="X"):
        active.fit_bradley_terry(X.clone().fill_(math.nan), z, 0.1)
    with pytest.raises(ValueError, match="l2"):
        active.fit_bradley_terry(X, z, 0.0)
    with pytest.raises(ValueError, match="k"):
        active.select_uncertain(X[:, 0], torch.arange(3), 4)
    with pytest.raises(ValueError, match="candidates"):
        active.select_uncertain(X[:, 0], torch.tensor([0, 10]), 1)
    with pytest.raises(ValueError, match="strategy"):
        active.active_learning_curve(X, z, X, "greedy", 0, 0.1, 2, 2, 2)
    with pytest.raises(ValueError, match="seed_labels"):
        active.active_learning_curve(X, z, X, "random", 0, 0.1, 4, 4, 2)


def test_the_record_holds_every_run_and_refuses_other_settings(tmp_path, monkeypatch):
    record = active.load_runs()
    s = active.SETTINGS
    assert len(record["runs"]) == len(s["noise"]) * len(s["seeds"]) * 2
    for run in record["runs"]:
        assert run["labels"][-1] == len(run["queried"]) == 256
        assert sorted(run["queried"]) == list(range(256))
    assert record["l2"] in s["l2_grid"]
    monkeypatch.setitem(active.SETTINGS, "batch", 16)
    with pytest.raises(ValueError, match="companion.active --record"):
        active.load_runs()


def test_the_recorded_full_reward_models_are_the_chapters():
    models = active.recorded_reward_models()
    assert {(m["seed"], m["noise"]) for m in models} == {
        (seed, noise) for seed in align.SEEDS for noise in align.PREF_SETTINGS["noise"]}
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in models)
