"""companion.robustness against its oracles: the Adversarial Robustness Toolbox's
FastGradientMethod and ProjectedGradientDescent (PyTorchClassifier, norm=inf, no random
start) on chapter 2's digits MLP, in float64 (ART's working dtype patched) and float32."""

from __future__ import annotations

import copy
import functools
import json

import art.attacks.evasion.fast_gradient as art_fast_gradient
import art.attacks.evasion.projected_gradient_descent.projected_gradient_descent_pytorch as art_pgd
import numpy as np
import pytest
import torch
from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
from art.estimators.classification import PyTorchClassifier
from factories import digits_split
from torch import nn

from companion import backprop as bp
from companion.robustness import (
    BOOK_SETTINGS,
    QuantizeInput,
    add_trigger,
    adversarial_train,
    attack_success_rate,
    best_lr,
    detect_backdoor,
    fgsm,
    flag_top,
    load_experiments,
    pgd,
    poison,
    robust_accuracy,
    spectral_scores,
)
from companion.train import accuracy, train_classifier


@functools.cache
def _digits_model(dtype=torch.float64):
    """Chapter 2's MLP (64-128-64-10, ReLU, SGD lr 0.2, batch 32), trained 2 epochs."""
    data = digits_split(dtype)
    torch.manual_seed(0)
    model = bp.MLP([64, 128, 64, 10], "relu", dtype=torch.float64).to_torch().to(dtype)
    train_classifier(model, torch.optim.SGD(model.parameters(), lr=0.2), data.X_train,
                     data.y_train, epochs=2, batch_size=32,
                     generator=torch.Generator().manual_seed(0))
    return model.eval()


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def setting(request, monkeypatch):
    dtype = request.param
    numpy_dtype = np.float64 if dtype == torch.float64 else np.float32
    monkeypatch.setattr(art_pgd, "ART_NUMPY_DTYPE", numpy_dtype)
    monkeypatch.setattr(art_fast_gradient, "ART_NUMPY_DTYPE", numpy_dtype)
    model = _digits_model(dtype)
    data = digits_split(dtype)
    return model, data.X_test[:200], data.y_test[:200]


def _classifier(model, clip):
    return PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=(64,),
                             nb_classes=10, clip_values=clip)


@pytest.mark.parametrize("clip", [(0.0, 1.0), None])
@pytest.mark.parametrize("eps", [0.0, 0.03, 0.2])
def test_fgsm_equals_art(setting, eps, clip):
    model, x, y = setting
    # ART's batch is ours (all rows): a mean over another batch rounds differently, and a
    # gradient within rounding of zero could change its sign
    attack = FastGradientMethod(_classifier(model, clip), norm=np.inf, eps=eps,
                                batch_size=len(x))
    theirs = attack.generate(x.numpy(), y.numpy())
    ours = fgsm(model, x, y, eps, clip=clip)
    assert ours.dtype == x.dtype
    np.testing.assert_array_equal(ours.numpy(), theirs)


@pytest.mark.parametrize("clip", [(0.0, 1.0), None])
@pytest.mark.parametrize(("eps", "alpha", "steps"), [(0.1, 0.025, 10), (0.2, 0.07, 7),
                                                     (0.05, 0.1, 3), (0.3, 0.01, 1)])
def test_pgd_equals_art(setting, eps, alpha, steps, clip):
    model, x, y = setting
    attack = ProjectedGradientDescent(_classifier(model, clip), norm=np.inf, eps=eps,
                                      eps_step=alpha, max_iter=steps, batch_size=len(x),
                                      num_random_init=0, verbose=False)
    theirs = attack.generate(x.numpy(), y.numpy())
    ours = pgd(model, x, y, eps, alpha, steps, clip=clip)
    np.testing.assert_array_equal(ours.numpy(), theirs)


def test_attacks_stay_in_the_ball_and_the_box():
    model, data = _digits_model(), digits_split(torch.float64)
    x, y = data.X_test[:100], data.y_test[:100]
    for x_adv in (fgsm(model, x, y, 0.1), pgd(model, x, y, 0.1, 0.03, 5),
                  pgd(model, x, y, 0.1, 0.03, 5, random_start=True, seed=3)):
        assert (x_adv - x).abs().max() <= 0.1 + 1e-15
        assert x_adv.min() >= 0 and x_adv.max() <= 1
    unclipped = fgsm(model, x, y, 0.1, clip=None)
    assert unclipped.min() < 0  # the background pixels (0) are pushed below the box


def test_attacks_lower_accuracy_and_pgd_beats_fgsm():
    model, data = _digits_model(), digits_split(torch.float64)
    x, y = data.X_test, data.y_test
    clean = accuracy(model, x, y)
    one = accuracy(model, fgsm(model, x, y, 0.1), y)
    many = accuracy(model, pgd(model, x, y, 0.1, 0.025, 10), y)
    assert many < one < clean


def test_random_start_is_seeded():
    model, data = _digits_model(), digits_split(torch.float64)
    x, y = data.X_test[:50], data.y_test[:50]
    a = pgd(model, x, y, 0.1, 0.03, 2, random_start=True, seed=1)
    b = pgd(model, x, y, 0.1, 0.03, 2, random_start=True, seed=1)
    c = pgd(model, x, y, 0.1, 0.03, 2, random_start=True, seed=2)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)


def test_attack_restores_training_mode():
    model = nn.Sequential(nn.Linear(4, 3)).double().train()
    x, y = torch.rand(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    pgd(model, x, y, 0.1, 0.05, 2)
    assert model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(eps=-0.1), ValueError, "eps"),
    (dict(eps=float("nan")), ValueError, "eps"),
    (dict(alpha=0.0), ValueError, "alpha"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.0), TypeError, "steps"),
    (dict(clip=(1.0, 0.0)), ValueError, "clip"),
    (dict(clip=0.5), TypeError, "clip"),
    (dict(random_start=1), TypeError, "random_start"),
    (dict(y=torch.zeros(3, dtype=torch.long)), ValueError, "y"),
    (dict(x=torch.zeros(4, 4, dtype=torch.long)), TypeError, "x"),
    (dict(model=lambda x: x), TypeError, "model"),
])
def test_bad_input(kwargs, error, match):
    args = dict(model=nn.Linear(4, 3).double(), x=torch.rand(4, 4, dtype=torch.float64),
                y=torch.tensor([0, 1, 2, 0]), eps=0.1, alpha=0.05, steps=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        pgd(**args)


def test_quantize_masks_the_gradient_and_bpda_restores_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.rand(6, 4, dtype=torch.float64) * 0.8 + 0.1, torch.tensor([0, 1, 2] * 2)
    masked = nn.Sequential(QuantizeInput(2), net)
    through = nn.Sequential(QuantizeInput(2, bpda=True), net)
    torch.testing.assert_close(masked(x), through(x), rtol=0, atol=0)
    assert torch.equal(fgsm(masked, x, y, 0.05), x)  # sign(0) = 0: no step at all
    x_q = QuantizeInput(2)(x).requires_grad_(True)
    grad_net = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x_q), y), x_q)[0]
    expected = (x + 0.05 * grad_net.sign()).clamp(0, 1)
    torch.testing.assert_close(fgsm(through, x, y, 0.05), expected, rtol=0, atol=1e-15)
    levels = QuantizeInput(5)(torch.linspace(0, 1, 101, dtype=torch.float64))
    assert set(levels.tolist()) == {0.0, 0.25, 0.5, 0.75, 1.0}


def test_trigger_and_poison():
    x = torch.zeros(3, 64)
    stamped = add_trigger(x, size=2).reshape(3, 8, 8)
    assert stamped.sum() == 3 * 4 and stamped[:, 6:, 6:].eq(1).all()
    assert x.sum() == 0  # not modified in place
    data = digits_split(torch.float64)
    X, y, index = poison(data.X_train, data.y_train, 0.05, 7,
                         generator=torch.Generator().manual_seed(0))
    assert len(index) == int(0.05 * len(X)) and (data.y_train[index] != 7).all()
    assert (y[index] == 7).all() and X[index].reshape(-1, 8, 8)[:, 6:, 6:].eq(1).all()
    others = torch.ones(len(X), dtype=torch.bool)
    others[index] = False
    assert torch.equal(X[others], data.X_train[others])
    assert torch.equal(y[others], data.y_train[others])
    with pytest.raises(ValueError, match="fraction"):
        poison(data.X_train, data.y_train, 1.5, 7)
    with pytest.raises(ValueError, match="x must have shape"):
        add_trigger(torch.zeros(2, 10))


def test_spectral_scores_equal_the_top_principal_component():
    torch.manual_seed(0)
    features = torch.randn(40, 5, dtype=torch.float64) @ torch.diag(
        torch.tensor([3.0, 1, 1, 1, 1], dtype=torch.float64))
    from sklearn.decomposition import PCA

    projection = PCA(n_components=1).fit_transform(features.numpy())[:, 0]
    torch.testing.assert_close(spectral_scores(features),
                               torch.from_numpy(projection**2), rtol=1e-12, atol=1e-12)
    outliers = features.clone()
    outliers[:4] += torch.tensor([0, 0, 0, 0, 20.0], dtype=torch.float64)
    flagged = flag_top(spectral_scores(outliers), 0.1)
    assert flagged.sum() == 4 and flagged[:4].all()


def test_adversarial_training_is_seeded_and_raises_robust_accuracy():
    data = digits_split(torch.float64)

    def linear():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).double()

    def robust(seed):
        model = linear()
        adversarial_train(model, torch.optim.Adam(model.parameters(), lr=3e-3),
                          data.X_train, data.y_train, epochs=3, batch_size=64, eps=0.1,
                          alpha=0.05, steps=3, generator=torch.Generator().manual_seed(seed))
        return model

    a, b = robust(0), robust(0)
    torch.testing.assert_close(a[2].weight, b[2].weight, rtol=0, atol=0)
    standard = linear()
    train_classifier(standard, torch.optim.Adam(standard.parameters(), lr=3e-3),
                     data.X_train, data.y_train, epochs=3, batch_size=64,
                     generator=torch.Generator().manual_seed(0))
    x, y = data.X_test, data.y_test
    robust_acc, standard_acc = (accuracy(m, pgd(m, x, y, 0.1, 0.025, 10), y)
                                for m in (a, standard))
    assert robust_acc > standard_acc + 0.03  # measured: 0.613 vs 0.556


def test_detect_backdoor_counts_against_a_hand_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    X = torch.rand(60, 64, dtype=torch.float64)
    y = torch.arange(60) % 3
    poisoned = torch.tensor([0, 3, 6, 9])  # four rows of class 0
    X[poisoned] += 3.0  # far from the rest: the top direction of the features
    result = detect_backdoor(model, X, y, poisoned, 0, 4 / 60)
    rows = (y == 0).nonzero().flatten()
    scores = spectral_scores(model[:-1](X[rows]).detach())
    flagged = rows[scores.argsort(descending=True)[:6]]  # 1.5 * 4 of the 20 rows
    hits = torch.isin(flagged, poisoned).sum().item()
    assert result["detection_rate"] == hits / 4
    assert result["false_alarm_rate"] == (6 - hits) / 16
    assert result["detection_rate"] == 1.0 and result["tpr_at_low_fpr"] == 1.0


def test_attack_success_and_robust_accuracy():
    model = nn.Sequential(nn.Linear(64, 3)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
        model[0].weight[0, 63] = 10.0  # the trigger's corner pixel votes for class 0
    X = torch.zeros(6, 64, dtype=torch.float64)
    y = torch.tensor([0, 1, 1, 2, 1, 0])
    assert attack_success_rate(model, X, y, 0) == 1.0
    assert attack_success_rate(model, X, y, 2) == 0.0
    assert robust_accuracy(model, X, y, 0.0) == accuracy(model, X, y) == 0.5


def test_best_lr_and_record_settings(tmp_path):
    runs = [{"adversarial": a, "lr": lr, "val_clean": c, "val_robust": r}
            for a, lr, c, r in [(False, 0.1, 0.9, 0.1), (False, 0.2, 0.8, 0.5),
                                (True, 0.1, 0.9, 0.3), (True, 0.2, 0.8, 0.6)]]
    assert best_lr(runs, adversarial=False) == 0.1
    assert best_lr(runs, adversarial=True) == 0.2
    record = load_experiments()
    assert record["settings"] == BOOK_SETTINGS
    path = tmp_path / "other.json"
    path.write_text(json.dumps({**record, "settings": {**BOOK_SETTINGS, "epochs": 1}}))
    with pytest.raises(ValueError, match="re-record"):
        load_experiments(path)


def test_detect_backdoor_rates_against_numpy():
    # hidden features = the inputs (an identity layer before the last linear one), all
    # of class 0 along one axis: the spectral score is the squared deviation from the mean
    model = nn.Sequential(nn.Identity(), nn.Linear(64, 3)).double()
    values = np.concatenate([[5.0, 4.0, -0.1, 0.05], np.linspace(-2, 2, 16)])
    X = torch.zeros(60, 64, dtype=torch.float64)
    y = torch.cat([torch.zeros(20, dtype=torch.long), torch.arange(40) % 2 + 1])
    X[:20, 0] = torch.from_numpy(values)
    X[20:] = torch.rand(40, 64, dtype=torch.float64)
    poisoned = torch.arange(4)
    scores = (values - values.mean()) ** 2
    top6 = np.argsort(-scores)[:6]  # 1.5 * 4 poisoned rows of 60
    hits = int((top6 < 4).sum())
    clean = np.sort(scores[4:])[::-1]
    for low_fpr in (0.05, 0.2, 0.5):
        result = detect_backdoor(model, X, y, poisoned, 0, 4 / 60, low_fpr=low_fpr)
        threshold = clean[int(np.floor(low_fpr * 16))]
        assert result["tpr_at_low_fpr"] == (scores[:4] > threshold).mean()
        assert result["detection_rate"] == hits / 4 == 0.5
        assert result["false_alarm_rate"] == (6 - hits) / 16
    with pytest.raises(ValueError, match="low_fpr"):
        detect_backdoor(model, X, y, poisoned, 0, 4 / 60, low_fpr=1.0)
    with pytest.raises(ValueError, match="poisoned and clean"):
        detect_backdoor(model, X, y, torch.tensor([], dtype=torch.long), 0, 4 / 60)


def test_flag_top_counts():
    scores = torch.arange(20, dtype=torch.float64)
    assert flag_top(scores, 0.0).sum() == 0 and flag_top(scores, 1.0).all()
    fraction = 1.5 * (4 / 60) * 60 / 20  # 0.30000000000000004: still 6 of 20
    assert flag_top(scores, fraction).nonzero().flatten().tolist() == list(range(14, 20))
    with pytest.raises(ValueError, match="scores"):
        flag_top(scores[None], 0.5)
    with pytest.raises(ValueError, match="fraction"):
        flag_top(scores, 1.5)


def test_bad_input_of_training_and_poisoning():
    X, y = torch.rand(8, 64), torch.arange(8) % 3
    model = nn.Linear(64, 3)
    with pytest.raises(TypeError, match="optimizer"):
        adversarial_train(model, "adam", X, y, epochs=1, batch_size=4, eps=0.1,
                          alpha=0.05, steps=1)
    with pytest.raises(TypeError, match="y"):
        poison(X, y.double(), 0.25, 0)
    with pytest.raises(ValueError, match="rows"):
        poison(X, y[:5], 0.25, 0)
    with pytest.raises(ValueError, match="eps"):
        robust_accuracy(model, X, y, -0.1)


def test_random_start_is_the_same_on_every_device(device):
    model = _digits_model()
    data = digits_split(torch.float64)
    x, y = data.X_test[:50], data.y_test[:50]
    # a step far below the start's scale: the start alone decides the result
    here = pgd(model, x, y, 0.1, 1e-9, 1, random_start=True, seed=4)
    there = pgd(copy.deepcopy(model).to(device), x.to(device), y.to(device), 0.1, 1e-9, 1,
                random_start=True, seed=4)
    assert there.device.type == device.type and there.dtype == x.dtype
    torch.testing.assert_close(there.cpu(), here, rtol=0, atol=2.5e-9)
    assert (here - x).abs().max() > 0.09  # the start did move


def test_attack_success_rate_passes_the_trigger_on():
    model = nn.Sequential(nn.Linear(64, 3)).double()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
        model[0].weight[0, 54] = 10.0  # pixel (6, 6): inside a 2x2 trigger, not a 1x1
    X, y = torch.zeros(4, 64, dtype=torch.float64), torch.tensor([1, 2, 1, 0])
    assert attack_success_rate(model, X, y, 0) == 1.0
    assert attack_success_rate(model, X, y, 0, size=1) == 0.0
