"""companion.privacy against its oracles: a loop of single-example backward passes and
Opacus (GradSampleModule, DPOptimizer, UniformWithReplacementSampler, RDPAccountant)."""

from __future__ import annotations

import copy
import itertools
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch import nn

from companion import metrics
from companion.privacy import (
    DEFAULT_ORDERS,
    dp_sgd_step,
    membership_auc,
    membership_scores,
    per_sample_gradients,
    poisson_batches,
    privatize_gradients,
    rdp_epsilon,
    rdp_sampled_gaussian,
    tpr_bound,
    train_dp_sgd,
)


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3)).double()


def _data(model_kind, n=7, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shape = (n, 6) if model_kind == "mlp" else (n, 1, 6, 6)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return x.to(device), y.to(device)


def _make(kind, device):
    return (_mlp() if kind == "mlp" else _cnn()).to(device)


# Opacus's hooks warn that the inputs do not require gradients (they need not)
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


def _loop_gradients(model, x, y):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = {n: [] for n, _ in named}
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for n, p in named:
            grads[n].append(p.grad.clone())
    return {n: torch.stack(g) for n, g in grads.items()}


def _opacus_gradients(model, x, y):
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
    F.cross_entropy(gsm(x), y).backward()
    return {n.removeprefix("_module."): p.grad_sample for n, p in gsm.named_parameters()}


# --------------------------------------------------------------------------- per-sample grads


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_sample_gradients_equal_a_loop_and_opacus(kind, device):
    model = _make(kind, device)
    x, y = _data(kind, device=device)
    ours = per_sample_gradients(model, F.cross_entropy, x, y)
    loop = _loop_gradients(model, x, y)
    opacus = _opacus_gradients(model, x, y)
    assert list(ours) == [n for n, _ in model.named_parameters()]
    for name, g in ours.items():
        assert g.shape == (len(x), *dict(model.named_parameters())[name].shape)
        assert (g - loop[name]).abs().max() < 1e-12, name
        assert (g - opacus[name]).abs().max() < 1e-12, name


def test_per_sample_gradients_skip_frozen_parameters_and_read_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    model[0].weight.requires_grad_(False)
    x, y = _data("mlp", n=16)
    model.train()
    model(x)  # move the running statistics away from their initial values
    model.eval()
    ours = per_sample_gradients(model, F.cross_entropy, x, y)
    assert "0.weight" not in ours and "0.bias" in ours
    loop = _loop_gradients(model, x, y)
    for name, g in ours.items():
        assert (g - loop[name]).abs().max() < 1e-12, name


def test_per_sample_gradients_bad_input():
    model = _mlp()
    x, y = _data("mlp")
    with pytest.raises(ValueError, match="same length"):
        per_sample_gradients(model, F.cross_entropy, x, y[:-1])
    with pytest.raises(TypeError, match="model"):
        per_sample_gradients("model", F.cross_entropy, x, y)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        per_sample_gradients(model, F.cross_entropy, x.tolist(), y)


# --------------------------------------------------------------------------- DP-SGD


def _opacus_step(model, x, y, *, sigma, clip, batch, seed, optimizer=torch.optim.SGD, **kw):
    gsm = GradSampleModule(copy.deepcopy(model), loss_reduction="mean")
    opt = DPOptimizer(optimizer(gsm.parameters(), **kw), noise_multiplier=sigma,
                      max_grad_norm=clip, expected_batch_size=batch,
                      generator=torch.Generator(x.device).manual_seed(seed))
    F.cross_entropy(gsm(x), y).backward()
    opt.step()
    return gsm._module


def _our_step(model, x, y, *, sigma, clip, batch, seed, optimizer=torch.optim.SGD, **kw):
    model = copy.deepcopy(model)
    dp_sgd_step(model, optimizer(model.parameters(), **kw), F.cross_entropy, x, y,
                max_grad_norm=clip, noise_multiplier=sigma, expected_batch_size=batch,
                generator=torch.Generator(x.device).manual_seed(seed))
    return model


@pytest.mark.parametrize("kind,clip,sigma", [("mlp", 0.1, 0.0), ("mlp", 100.0, 0.0),
                                             ("cnn", 0.5, 0.0), ("mlp", 0.3, 1.3),
                                             ("cnn", 0.5, 0.7)])
def test_dp_sgd_step_equals_opacus_dp_optimizer(kind, clip, sigma, device):
    model = _make(kind, device)
    x, y = _data(kind, n=9, device=device)
    args = dict(sigma=sigma, clip=clip, batch=10, seed=3, lr=0.5)
    theirs = _opacus_step(model, x, y, **args)
    ours = _our_step(model, x, y, **args)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert (a - b).abs().max() < 1e-12, name
        # and the step moved the parameters
        assert (a - dict(model.named_parameters())[name]).abs().max() > 1e-6, name


def test_dp_adam_step_equals_opacus():
    model = _mlp()
    x, y = _data("mlp", n=9)
    args = dict(sigma=0.0, clip=0.2, batch=9, seed=0, optimizer=torch.optim.Adam, lr=0.01)
    for a, b in zip(_our_step(model, x, y, **args).parameters(),
                    _opacus_step(model, x, y, **args).parameters()):
        assert (a - b).abs().max() < 1e-12


def test_clipping_bounds_each_example_and_leaves_small_gradients_alone():
    g = torch.Generator().manual_seed(0)
    grads = {"w": torch.randn(5, 3, 4, generator=g, dtype=torch.float64),
             "b": torch.randn(5, 3, generator=g, dtype=torch.float64)}
    norms = torch.sqrt((grads["w"] ** 2).sum((1, 2)) + (grads["b"] ** 2).sum(1))
    # a large C leaves the mean unchanged (up to Opacus's 1e-6 guard: factor 1 exactly)
    big = privatize_gradients(grads, float(norms.max()) * 2, 0.0, 5)
    assert (big["w"] - grads["w"].mean(0)).abs().max() < 1e-15
    # each example contributes at most C: one example alone, clipped, has norm C
    one = {k: v[:1] for k, v in grads.items()}
    c = float(norms[0]) / 4
    clipped = privatize_gradients(one, c, 0.0, 1)
    total = math.sqrt(sum(float((v ** 2).sum()) for v in clipped.values()))
    assert abs(total - c * float(norms[0]) / (float(norms[0]) + 1e-6)) < 1e-12


def test_noise_standard_deviation_is_sigma_c_over_batch():
    # zero gradients: what remains is the noise, N(0, (sigma C / L)^2) in every coordinate
    sigma, clip, batch = 1.7, 0.4, 32
    grads = {"w": torch.zeros(batch, 200_000, dtype=torch.float64)}
    noisy = privatize_gradients(grads, clip, sigma, batch,
                                generator=torch.Generator().manual_seed(0))
    std = float(noisy["w"].std())
    # sampling error of a standard deviation from n draws is about std / sqrt(2 n)
    assert abs(std / (sigma * clip / batch) - 1) < 4 / math.sqrt(2 * 200_000)
    assert abs(float(noisy["w"].mean())) < 4 * sigma * clip / batch / math.sqrt(200_000)


def test_empty_batch_gives_noise_only():
    model = _mlp()
    before = copy.deepcopy(model)
    dp_sgd_step(model, torch.optim.SGD(model.parameters(), lr=1.0), F.cross_entropy,
                torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long),
                max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=4,
                generator=torch.Generator().manual_seed(0))
    moved = [float((a - b).detach().abs().max())
             for a, b in zip(model.parameters(), before.parameters())]
    assert min(moved) > 0


@pytest.mark.parametrize("bad,err", [(dict(max_grad_norm=0.0), "max_grad_norm"),
                                     (dict(max_grad_norm=-1.0), "max_grad_norm"),
                                     (dict(noise_multiplier=-0.1), "noise_multiplier"),
                                     (dict(expected_batch_size=0), "expected_batch_size")])
def test_privatize_gradients_bad_input(bad, err):
    args = dict(max_grad_norm=1.0, noise_multiplier=1.0, expected_batch_size=2)
    args.update(bad)
    with pytest.raises(ValueError, match=err):
        privatize_gradients({"w": torch.zeros(2, 3)}, **args)


def test_poisson_batches_equal_opacus_sampler():
    n, q, steps = 50, 0.1, 20
    ours = poisson_batches(n, q, steps, generator=torch.Generator().manual_seed(5))
    sampler = UniformWithReplacementSampler(num_samples=n, sample_rate=q, steps=steps,
                                            generator=torch.Generator().manual_seed(5))
    theirs = list(sampler)
    assert [b.tolist() for b in ours] == theirs
    assert len({len(b) for b in ours}) > 1  # the batch size varies
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_batches(n, 0.0, steps)
    with pytest.raises(ValueError, match="sample_rate"):
        poisson_batches(n, 1.5, steps)


# --------------------------------------------------------------------------- accounting


def _opacus_epsilon(sigma, q, steps, delta, orders=None):
    acc = RDPAccountant()
    acc.history = [(sigma, q, steps)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha"
        return acc.get_epsilon(delta, alphas=orders)


def test_rdp_epsilon_equals_opacus_on_a_grid():
    worst = 0.0
    for sigma, q, steps, delta in itertools.product([0.5, 0.8, 1.1, 2.0, 6.0],
                                                    [1e-3, 0.01, 0.05, 0.3, 1.0],
                                                    [1, 30, 1000, 20000], [1e-5, 1e-3]):
        ours = rdp_epsilon(sigma, q, steps, delta)
        theirs = _opacus_epsilon(sigma, q, steps, delta)
        assert math.isfinite(ours) and ours > 0
        worst = max(worst, abs(ours - theirs) / theirs)
    assert worst < 1e-9


def test_rdp_single_orders_equal_opacus_and_known_limits():
    from opacus.accountants.analysis.rdp import compute_rdp
    for sigma, q in [(0.7, 0.02), (1.5, 0.2), (4.0, 0.5)]:
        theirs = compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(DEFAULT_ORDERS))
        for alpha, t in zip(DEFAULT_ORDERS, theirs):
            assert abs(rdp_sampled_gaussian(sigma, q, alpha) - t) <= 1e-9 * t
    # q = 1 is the Gaussian mechanism, alpha / (2 sigma^2); sigma = 0 is no privacy
    assert rdp_sampled_gaussian(2.0, 1.0, 5.0) == 5.0 / 8.0
    assert rdp_sampled_gaussian(0.0, 0.1, 5.0) == math.inf
    assert rdp_epsilon(0.0, 0.1, 10, 1e-5) == math.inf
    assert rdp_epsilon(1.0, 0.1, 0, 1e-5) == 0.0
    # custom orders agree too
    assert abs(rdp_epsilon(1.0, 0.01, 100, 1e-5, orders=[2, 4.5, 8, 16])
               / _opacus_epsilon(1.0, 0.01, 100, 1e-5, orders=[2, 4.5, 8, 16]) - 1) < 1e-12


def test_epsilon_grows_with_steps_and_falls_with_noise():
    eps_steps = [rdp_epsilon(1.0, 0.01, t, 1e-5) for t in (10, 100, 1000, 10000)]
    eps_sigma = [rdp_epsilon(s, 0.01, 1000, 1e-5) for s in (0.6, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(eps_steps, eps_steps[1:]))
    assert all(a > b for a, b in zip(eps_sigma, eps_sigma[1:]))


@pytest.mark.parametrize("args,err", [((-1.0, 0.1, 10, 1e-5), "noise_multiplier"),
                                      ((1.0, 0.0, 10, 1e-5), "sample_rate"),
                                      ((1.0, 1.01, 10, 1e-5), "sample_rate"),
                                      ((1.0, 0.1, -1, 1e-5), "steps"),
                                      ((1.0, 0.1, 10, 0.0), "delta"),
                                      ((1.0, 0.1, 10, 1.0), "delta")])
def test_rdp_epsilon_bad_input(args, err):
    with pytest.raises(ValueError, match=err):
        rdp_epsilon(*args)
    with pytest.raises(ValueError, match="orders"):
        rdp_epsilon(1.0, 0.1, 10, 1e-5, orders=[1.0, 2.0])


def test_tpr_bound():
    # epsilon = 0, delta = 0: no test beats chance
    for fpr in (0.0, 0.1, 0.5, 1.0):
        assert abs(tpr_bound(0.0, 0.0, fpr) - fpr) < 1e-15
    # large epsilon: the bound reaches 1
    assert tpr_bound(50.0, 1e-5, 0.01) == 1.0
    # small epsilon, small fpr: e^eps fpr + delta
    assert abs(tpr_bound(1.0, 1e-5, 0.01) - (math.e * 0.01 + 1e-5)) < 1e-15
    with pytest.raises(ValueError, match="fpr"):
        tpr_bound(1.0, 1e-5, 1.5)


# --------------------------------------------------------------------------- membership inference


def test_membership_scores_and_auc_match_roc_auc_score():
    model = _mlp()
    x, y = _data("mlp", n=40)
    scores = membership_scores(model, x, y)
    assert torch.allclose(scores, -F.cross_entropy(model(x), y, reduction="none").detach())
    result = membership_auc(scores[:20], scores[20:], n_resamples=50,
                            generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1] * 20 + [0] * 20)
    assert result.estimate == metrics.roc_auc_score(labels, scores)
    assert result.low <= result.estimate <= result.high
    # a perfect separation has AUC 1
    assert membership_auc(torch.ones(3), torch.zeros(4), n_resamples=10).estimate == 1.0
    with pytest.raises(ValueError, match="non-empty"):
        membership_auc(torch.ones(3), torch.zeros(0))


def test_train_dp_sgd_without_noise_or_clipping_is_full_batch_sgd():
    # q = 1: every example in every batch; a huge C: nothing clipped; sigma = 0: no noise
    x, y = _data("mlp", n=12)
    ours, reference = _mlp(), _mlp()
    train_dp_sgd(ours, torch.optim.SGD(ours.parameters(), lr=0.3), x, y, sample_rate=1.0,
                 steps=5, max_grad_norm=1e6, noise_multiplier=0.0)
    opt = torch.optim.SGD(reference.parameters(), lr=0.3)
    for _ in range(5):
        opt.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        opt.step()
    for a, b in zip(ours.parameters(), reference.parameters()):
        assert (a - b).detach().abs().max() < 1e-12
