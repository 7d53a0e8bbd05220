"""companion.interpret: attributions against Captum, SciPy and cases with known answers.

Tolerances. Captum builds its quadrature nodes and weights in float32 (``torch.linspace``
with the default dtype, ``torch.tensor(step_sizes).float()``) and accumulates Shapley
values in float32, so that even on a float64 model its results carry float32 rounding:
we compare with ``atol = 1e-6 * max |attribution|``. Where Captum's nodes are exact
(Riemann rules with ``n_steps`` a power of two and float64 as the default dtype) the two
implementations agree to the last bits. Captum's ``riemann_trapezoid`` weights sum to
``(n - 1) / n`` instead of one; ours are the trapezoid rule, so Captum's result is ours
times ``(n - 1) / n``.
"""

import ast
import copy
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from captum.attr import (  # noqa: E402
    IntegratedGradients,
    LayerIntegratedGradients,
    ShapleyValues,
)
from captum.attr._utils.approximation_methods import approximation_parameters  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from torch import nn  # noqa: E402

from companion.interpret import (  # noqa: E402
    QUADRATURE_METHODS,
    PerturbationCurve,
    attention_rollout,
    cascading_randomization,
    forward_from_layer,
    integrated_gradients,
    path_quadrature,
    perturbation_curve,
    randomizable_layers,
    rank_correlation,
    shapley_values,
)

F64 = torch.float64


def _mlp(n_in=6, n_out=4, seed=0, device="cpu"):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(n_in, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(),
                        nn.Linear(32, n_out))
    return net.to(device=device, dtype=F64).eval()


def _data(batch, n_in=6, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (2 * torch.randn(batch, n_in, generator=g, dtype=F64)).to(device)


def _captum_ig(net, x, baselines, target, n_steps, method):
    return IntegratedGradients(net).attribute(x, baselines, target=target, n_steps=n_steps,
                                              method=method, return_convergence_delta=True)


def _captum_scale(method, n_steps):
    """Captum's riemann_trapezoid is ours times (n - 1) / n; the other rules are ours."""
    return (n_steps - 1) / n_steps if method == "riemann_trapezoid" else 1.0


@pytest.fixture
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- quadrature


@pytest.mark.parametrize("method", QUADRATURE_METHODS)
@pytest.mark.parametrize("n_steps", [2, 7, 50])
def test_quadrature_nodes_and_weights(method, n_steps):
    alphas, weights = path_quadrature(method, n_steps)
    assert alphas.shape == weights.shape == (n_steps,) and alphas.dtype == F64
    assert bool((alphas >= 0).all() and (alphas <= 1).all() and (weights > 0).all())
    assert abs(weights.sum().item() - 1.0) < 1e-14
    # Captum's nodes are ours rounded to float32; its weights are ours (trapezoid: scaled).
    captum_steps, captum_alphas = (f(n_steps) for f in approximation_parameters(method))
    torch.testing.assert_close(torch.tensor(captum_alphas, dtype=torch.float32),
                               alphas.float(), rtol=0, atol=1.2e-7)
    torch.testing.assert_close(torch.tensor(captum_steps, dtype=F64),
                               weights * _captum_scale(method, n_steps), rtol=1e-14, atol=0)


def test_quadrature_integrates_what_it_should():
    # Gauss-Legendre with n nodes is exact for degree 2n - 1; midpoint and trapezoid for lines.
    alphas, weights = path_quadrature("gausslegendre", 4)
    assert abs((weights * alphas**7).sum().item() - 1 / 8) < 1e-15
    for method in ("riemann_middle", "riemann_trapezoid"):
        alphas, weights = path_quadrature(method, 5)
        assert abs((weights * (3 * alphas + 1)).sum().item() - 2.5) < 1e-15


def test_quadrature_dtype_and_device(device):
    alphas, weights = path_quadrature("riemann_middle", 8, dtype=torch.float32, device=device)
    assert alphas.dtype == weights.dtype == torch.float32
    assert alphas.device.type == weights.device.type == device.type


# --------------------------------------------------------------------------- IG against Captum

CASES = [  # (batch size, target, baselines): every kind of target and baseline
    (1, 0, None),
    (3, 2, 0.5),
    (5, [0, 3, 1, 2, 2], "one"),
    (8, "tensor", "batch"),
    (4, 3, "batch"),
]


def _case(batch, target, baselines, device):
    x = _data(batch, device=device)
    if isinstance(baselines, str):
        rows = 1 if baselines == "one" else batch
        baselines = _data(rows, seed=2, device=device)
    if isinstance(target, str):
        target = torch.arange(batch, device=device) % 4
    return x, baselines, target


@pytest.mark.parametrize("method", QUADRATURE_METHODS)
@pytest.mark.parametrize("batch, target, baselines", CASES)
def test_ig_matches_captum(method, batch, target, baselines, device):
    net = _mlp(device=device)
    x, baselines, target = _case(batch, target, baselines, device)
    n_steps = 50
    ours, delta = integrated_gradients(net, x, baselines, target, n_steps, method,
                                       return_convergence_delta=True)
    theirs, their_delta = _captum_ig(net, x, baselines, target, n_steps, method)
    assert ours.shape == x.shape and ours.dtype == F64 and delta.shape == (batch,)
    scale = ours.abs().max().item()
    torch.testing.assert_close(ours * _captum_scale(method, n_steps), theirs,
                               rtol=0, atol=1e-6 * scale)
    # Captum's delta is computed the same way, from its own attributions.
    ours_sum = ours.sum(1) * _captum_scale(method, n_steps)
    torch.testing.assert_close(their_delta - theirs.sum(1), delta - ours.sum(1),
                               rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(theirs.sum(1), ours_sum, rtol=0, atol=1e-6 * scale)


def _random_mlp(seed):
    """A random MLP (depth, widths, activation, input and output sizes drawn from seed)."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda low, high: int(torch.randint(low, high, (1,), generator=g))  # noqa: E731
    sizes = [draw(2, 12)] + [draw(4, 48) for _ in range(draw(1, 4))] + [draw(2, 7)]
    activation = [nn.Tanh, nn.GELU, nn.Softplus, nn.ReLU, nn.SiLU][seed % 5]
    layers = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(n_in, n_out), activation()]
    torch.manual_seed(seed)
    net = nn.Sequential(*layers[:-1]).to(F64).eval()
    batch = draw(1, 9)
    x = 3 * torch.randn(batch, sizes[0], generator=g, dtype=F64)
    baselines = torch.randn(batch, sizes[0], generator=g, dtype=F64)
    target = torch.randint(sizes[-1], (batch,), generator=g)
    return net, x, baselines, target


@pytest.mark.parametrize("method", QUADRATURE_METHODS)
@pytest.mark.parametrize("seed", range(10))
def test_ig_matches_captum_on_random_mlps(method, seed):
    net, x, baselines, target = _random_mlp(seed)
    n_steps = 20 + 7 * seed
    ours = integrated_gradients(net, x, baselines, target, n_steps, method)
    theirs, _ = _captum_ig(net, x, baselines, target, n_steps, method)
    torch.testing.assert_close(ours * _captum_scale(method, n_steps), theirs,
                               rtol=0, atol=1e-6 * ours.abs().max().item())


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle",
                                    "riemann_trapezoid"])
def test_ig_equals_captum_to_the_last_bits_when_its_nodes_are_exact(method, float64_default):
    # n_steps = 64: the Riemann weights 1/64 and 1/128 are exact in float32, and with
    # float64 as the default dtype Captum's nodes are the float64 ones.
    net, x = _mlp(), _data(6)
    ours = integrated_gradients(net, x, 0.25, 1, 64, method) * _captum_scale(method, 64)
    theirs, _ = _captum_ig(net, x, 0.25, 1, 64, method)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- IG on known cases


def _quadratic(A, c):
    """F(x) = x^T A x / 2 + c^T x per row: its gradient A x + c is linear along any path."""
    return lambda x: 0.5 * ((x @ A) * x).sum(1) + x @ c


@pytest.mark.parametrize("method", QUADRATURE_METHODS)
def test_ig_of_a_quadratic_is_known_in_closed_form(method, device):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(5, 5, generator=g, dtype=F64)
    A, c = (M + M.T).to(device), torch.randn(5, generator=g, dtype=F64).to(device)
    x, b = _data(3, 5, device=device), _data(3, 5, seed=3, device=device)
    n = 10
    # Along the path the gradient is g0 + alpha * g1; each rule's weighted sum is known.
    g0, g1 = b @ A + c, (x - b) @ A
    mean_alpha = {"riemann_left": (n - 1) / (2 * n), "riemann_right": (n + 1) / (2 * n)}
    expected = (x - b) * (g0 + mean_alpha.get(method, 0.5) * g1)
    ours, delta = integrated_gradients(_quadratic(A, c), x, b, None, n, method, True)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-13)
    if method not in mean_alpha:  # exact rules: completeness holds to rounding
        assert delta.abs().max().item() < 1e-13


@pytest.mark.parametrize("method", QUADRATURE_METHODS)
def test_ig_of_a_linear_model_is_weight_times_input_minus_baseline(method):
    net = nn.Linear(6, 3).to(F64)
    x, b = _data(4), _data(1, seed=5)
    minimum = 2 if method == "riemann_trapezoid" else 1
    for n_steps in (minimum, 3, 17):
        ours, delta = integrated_gradients(net, x, b, 1, n_steps, method, True)
        torch.testing.assert_close(ours, net.weight[1].detach() * (x - b), rtol=0, atol=1e-14)
        assert delta.abs().max().item() < 1e-14


@pytest.mark.parametrize("method, order", [("riemann_left", 1), ("riemann_right", 1),
                                           ("riemann_middle", 2), ("riemann_trapezoid", 2)])
def test_completeness_error_shrinks_at_the_rate_of_the_rule(method, order):
    net, x = _mlp(), _data(5)
    errors = [integrated_gradients(net, x, None, 2, n, method, True)[1].abs().max().item()
              for n in (16, 32, 64, 128)]
    ratios = np.array(errors[:-1]) / np.array(errors[1:])  # 2**order for a rule of that order
    assert np.all(np.abs(np.log2(ratios) - order) < 0.15), (errors, ratios)


def test_gauss_legendre_converges_to_rounding_error():
    net, x = _mlp(), _data(5)
    errors = [integrated_gradients(net, x, None, 2, n, "gausslegendre", True)[1].abs().max().item()
              for n in (4, 8, 16, 32)]
    # faster than any power of n: each doubling gains more digits than the one before
    assert errors[0] > 100 * errors[1] > 1e6 * errors[2] and errors[3] < 1e-15


def test_ig_accepts_outputs_of_shape_n_and_n_by_1_and_images():
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(12, 1)).to(F64)
    x = torch.randn(2, 1, 4, 4, dtype=F64)
    column = integrated_gradients(net, x, n_steps=20)  # (N, 1) output, target None
    flat = integrated_gradients(lambda z: net(z)[:, 0], x, n_steps=20)  # (N,) output
    assert column.shape == x.shape
    torch.testing.assert_close(column, flat, rtol=0, atol=0)
    theirs = IntegratedGradients(net).attribute(x, n_steps=20, method="riemann_middle")
    ours = integrated_gradients(net, x, n_steps=20, method="riemann_middle")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6 * ours.abs().max().item())


def test_ig_under_no_grad_leaves_parameters_alone():
    net, x = _mlp(), _data(3)
    with torch.no_grad():
        ours = integrated_gradients(net, x, target=0)
    assert ours.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_ig_of_a_function_that_ignores_its_input_is_zero():
    ours = integrated_gradients(lambda x: torch.ones(len(x), 2, dtype=F64), _data(3), target=1)
    assert torch.equal(ours, torch.zeros(3, 6, dtype=F64))


@pytest.mark.parametrize("kw, error, match", [
    (dict(baselines=torch.zeros(2, 6)), ValueError, r"baselines must have shape \(3, 6\)"),
    (dict(baselines=torch.zeros(3, 5)), ValueError, "baselines must have shape"),
    (dict(baselines="zero"), TypeError, "baselines must be"),
    (dict(target=4), ValueError, r"target must be in \[0, 4\)"),
    (dict(target=-1), ValueError, r"target must be in \[0, 4\)"),
    (dict(target=[0, 1, 4]), ValueError, r"target must be in \[0, 4\)"),
    (dict(target=[0, 1]), ValueError, "target has 2 entries but there are 3 examples"),
    (dict(target=1.0), TypeError, "target must be"),
    (dict(target="1"), TypeError, "target must be"),
    (dict(target=None), ValueError, "target is needed"),
    (dict(method="simpson"), ValueError, "method must be one of"),
    (dict(n_steps=0, method="riemann_left"), ValueError, "n_steps must be an int >= 1"),
    (dict(n_steps=1, method="riemann_trapezoid"), ValueError, "n_steps must be an int >= 2"),
    (dict(n_steps=2.0), TypeError, "n_steps must be an int"),
    (dict(n_steps=True), TypeError, "n_steps must be an int"),
    (dict(inputs=[[0.0] * 6]), TypeError, "inputs must be a tensor"),
    (dict(inputs=torch.zeros(3, 6, dtype=torch.long)), TypeError, "floating-point"),
    (dict(inputs=torch.zeros(0, 6, dtype=F64)), ValueError, "batch dimension"),
    (dict(forward_func="net"), TypeError, "forward_func must be callable"),
    (dict(forward_func=lambda x: x.sum()), ValueError, "forward_func must return shape"),
    (dict(forward_func=lambda x: x.sum(1), target=0), ValueError, "target must be None"),
    (dict(forward_func=lambda x: 1.0), TypeError, "forward_func must return a tensor"),
])
def test_ig_bad_input(kw, error, match):
    args = dict(forward_func=_mlp(), inputs=_data(3), target=0) | kw
    with pytest.raises(error, match=match):
        integrated_gradients(**args)


# --------------------------------------------------------------------------- layer attributions


class _TinyLanguageModel(nn.Module):
    """Token embedding -> position embedding -> tanh MLP -> mean over time -> logits."""

    def __init__(self, vocab=7, width=5, length=4):
        super().__init__()
        self.token_embedding = nn.Embedding(vocab, width)
        self.position = nn.Parameter(0.3 * torch.randn(length, width))
        self.mlp = nn.Sequential(nn.Linear(width, 16), nn.Tanh(), nn.Linear(16, vocab))

    def forward(self, ids):  # (B, T) -> (B, vocab)
        return self.mlp(self.token_embedding(ids) + self.position).mean(1)


@pytest.mark.parametrize("method", QUADRATURE_METHODS)
def test_ig_on_a_layer_matches_captum_layer_integrated_gradients(method, device):
    torch.manual_seed(0)
    net = _TinyLanguageModel().to(device=device, dtype=F64).eval()
    ids = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 1], [3, 3, 2, 1]], device=device)
    reference = torch.zeros_like(ids)  # a "padding" token as the baseline
    target = [0, 4, 6]
    forward = forward_from_layer(net, net.token_embedding, ids)
    ours, delta = integrated_gradients(forward, net.token_embedding(ids).detach(),
                                       net.token_embedding(reference).detach(), target, 20,
                                       method, return_convergence_delta=True)
    theirs = LayerIntegratedGradients(net, net.token_embedding).attribute(
        ids, reference, target=target, n_steps=20, method=method)
    assert ours.shape == (3, 4, 5)
    scale = ours.abs().max().item()
    torch.testing.assert_close(ours * _captum_scale(method, 20), theirs, rtol=0,
                               atol=1e-6 * scale)
    gap = (net(ids) - net(reference))[torch.arange(3, device=device), target]
    torch.testing.assert_close(delta, ours.sum((1, 2)) - gap.detach(), rtol=0, atol=1e-13)
    assert not net.token_embedding._forward_hooks  # the hook is gone
    torch.testing.assert_close(forward(net.token_embedding(ids)), net(ids), rtol=0, atol=0)


def test_forward_from_layer_bad_input():
    net = _TinyLanguageModel().to(F64)
    ids = torch.zeros(2, 4, dtype=torch.long)
    forward = forward_from_layer(net, net.token_embedding, ids)
    with pytest.raises(ValueError, match="not a multiple of the 2 rows"):
        forward(torch.zeros(3, 4, 5, dtype=F64))
    assert not net.token_embedding._forward_hooks
    with pytest.raises(TypeError, match="layer must be an nn.Module"):
        forward_from_layer(net, "token_embedding", ids)


# --------------------------------------------------------------------------- Shapley values


@pytest.mark.parametrize("mask, target", [([0, 0, 1, 2, 3, 3], 1), ([2, 1, 0, 1, 2, 0], [0, 3, 2]),
                                          ([0, 1, 1, 1, 1, 0], 3)])
def test_shapley_values_match_captum_and_add_up(mask, target, device):
    net, x, b = _mlp(device=device), _data(3, device=device), _data(1, seed=4, device=device)
    mask = torch.tensor(mask, device=device)
    ours = shapley_values(net, x, b, target, feature_mask=mask)
    # Captum averages over all M! orders (exact, but slow beyond M = 4 or 5) in float32.
    theirs = ShapleyValues(net).attribute(x, b, target=target, feature_mask=mask[None],
                                          perturbations_per_eval=64)
    assert ours.shape == x.shape and ours.dtype == F64
    torch.testing.assert_close(ours, theirs.to(F64), rtol=0, atol=1e-6 * ours.abs().max().item())
    # efficiency: one value per group adds up to F(x) - F(b), exactly
    first = torch.stack([(mask == g).nonzero()[0, 0] for g in range(int(mask.max()) + 1)])
    index = torch.as_tensor(target, device=device).expand(3)[:, None]
    gap = (net(x).gather(1, index) - net(b.expand_as(x)).gather(1, index)).squeeze(1)
    torch.testing.assert_close(ours[:, first].sum(1), gap.detach(), rtol=0, atol=1e-13)


def test_shapley_values_of_an_additive_model_are_its_terms():
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0, 1.5], dtype=F64)
    x, b = _data(2), _data(2, seed=6)
    mask = torch.tensor([0, 0, 1, 1, 2, 3])
    ours = shapley_values(lambda z: (z * w).sum(1) + z[:, 0] ** 2, x, b, feature_mask=mask)
    terms = w * (x - b)
    terms[:, 0] += x[:, 0] ** 2 - b[:, 0] ** 2
    expected = torch.stack([terms[:, mask == g].sum(1) for g in mask], dim=1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("batch_size", [1, 7, 64, 96, 1000])
def test_shapley_values_in_batches_equal_one_batch(batch_size):
    net, x, b = _mlp(), _data(3), _data(1, seed=4)
    mask = torch.tensor([0, 1, 2, 3, 4, 4])  # 2^5 coalitions of 3 examples: 96 rows
    rows = []

    def counted(z):
        rows.append(len(z))
        return net(z)

    one = shapley_values(net, x, b, [0, 3, 2], feature_mask=mask)
    batched = shapley_values(counted, x, b, [0, 3, 2], feature_mask=mask,
                             batch_size=batch_size)
    torch.testing.assert_close(batched, one, rtol=0, atol=1e-13)
    assert sum(rows) == 96 and max(rows) == min(batch_size, 96)


@pytest.mark.parametrize("batch_size, error, match", [
    (0, ValueError, "batch_size must be >= 1"), (2.0, TypeError, "batch_size must be an int"),
])
def test_shapley_values_bad_batch_size(batch_size, error, match):
    with pytest.raises(error, match=match):
        shapley_values(_mlp(), _data(2), target=0, feature_mask=torch.arange(6),
                       batch_size=batch_size)


@pytest.mark.parametrize("mask, error, match", [
    (torch.tensor([0, 1, 2]), ValueError, r"shape of one example, \(6,\)"),
    (torch.tensor([0, 1, 1, 1, 3, 3]), ValueError, "every group id"),
    (torch.arange(6) + 1, ValueError, "every group id"),
    (torch.zeros(6), TypeError, "integer tensor"),
    (torch.arange(6), ValueError, "2\\*\\*6 forward rows"),
])
def test_shapley_values_bad_mask(mask, error, match):
    with pytest.raises(error, match=match):
        shapley_values(_mlp(), _data(2), target=0, feature_mask=mask, max_groups=5)


# --------------------------------------------------------------------------- perturbation curves


def test_deletion_and_insertion_curves_of_a_linear_model(device):
    w = torch.tensor([3.0, -1.0, 2.0, 0.5, 0.0], dtype=F64, device=device)
    x = torch.tensor([[1.0, 2.0, -1.0, 4.0, 1.0], [2.0, 1.0, 1.0, 1.0, 1.0]], dtype=F64,
                     device=device)
    contributions = w * x  # the exact attribution of F(x) = w . x against a zero baseline
    deletion = perturbation_curve(lambda z: z @ w, x, contributions, mode="deletion")
    insertion = perturbation_curve(lambda z: z @ w, x, contributions, mode="insertion")
    ranked = contributions.sort(dim=1, descending=True).values
    removed = torch.cat([torch.zeros(2, 1, dtype=F64, device=device), ranked.cumsum(1)], 1)
    assert isinstance(deletion, PerturbationCurve) and deletion.scores.shape == (2, 6)
    torch.testing.assert_close(deletion.fractions, torch.arange(6, dtype=F64, device=device) / 5)
    torch.testing.assert_close(deletion.scores, (x @ w)[:, None] - removed, rtol=0, atol=1e-14)
    torch.testing.assert_close(insertion.scores, removed, rtol=0, atol=1e-14)
    expected_area = np.trapezoid(deletion.scores.cpu().numpy(), dx=0.2, axis=1)
    np.testing.assert_allclose(deletion.area().cpu().numpy(), expected_area, rtol=1e-14)
    # the best ranking deletes the largest contributions first: no ordering falls faster
    reverse = perturbation_curve(lambda z: z @ w, x, -contributions, mode="deletion")
    assert bool((deletion.area() < reverse.area()).all())


def test_perturbation_curve_ties_targets_points_and_token_ids():
    # Ties are broken by feature order; targets pick the output; ids work as inputs.
    table = torch.arange(10, dtype=F64)[:, None] * torch.tensor([[1.0, -1.0]], dtype=F64)
    ids = torch.tensor([[4, 7, 9, 2]])
    curve = perturbation_curve(lambda z: table[z].sum(1), ids, torch.zeros(1, 4), target=0,
                               baselines=0)
    torch.testing.assert_close(curve.scores, torch.tensor([[22.0, 18.0, 11.0, 2.0, 0.0]],
                                                          dtype=F64))
    coarse = perturbation_curve(lambda z: table[z].sum(1), ids, torch.zeros(1, 4), target=1,
                                baselines=0, n_points=3, mode="insertion")
    torch.testing.assert_close(coarse.fractions, torch.tensor([0.0, 0.5, 1.0], dtype=F64))
    torch.testing.assert_close(coarse.scores, torch.tensor([[0.0, -11.0, -22.0]], dtype=F64))


@pytest.mark.parametrize("kw, error, match", [
    (dict(attributions=torch.zeros(2, 4)), ValueError, "attributions must have the shape"),
    (dict(attributions=torch.zeros(2, 6, dtype=torch.long)), TypeError, "floating-point"),
    (dict(mode="ablation"), ValueError, "mode must be"),
    (dict(n_points=1), ValueError, "n_points"),
    (dict(baselines=torch.zeros(2, 5)), ValueError, "baselines must have shape"),
])
def test_perturbation_curve_bad_input(kw, error, match):
    args = dict(forward_func=_mlp(), inputs=_data(2), attributions=torch.zeros(2, 6),
                target=0) | kw
    with pytest.raises(error, match=match):
        perturbation_curve(**args)


# --------------------------------------------------------------------------- randomisation check


def test_rank_correlation_matches_scipy_with_ties(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 3, 7, generator=g, dtype=F64).round()  # many ties
    b = (a + torch.randn(4, 3, 7, generator=g, dtype=F64)).round()
    ours = rank_correlation(a.to(device), b.to(device)).cpu()
    expected = [spearmanr(a[i].flatten(), b[i].flatten()).statistic for i in range(4)]
    np.testing.assert_allclose(ours.numpy(), expected, rtol=0, atol=1e-14)
    x = torch.arange(10.0)[None]
    assert rank_correlation(x, x.exp()).item() == pytest.approx(1.0, abs=1e-15)
    assert rank_correlation(x, -x).item() == pytest.approx(-1.0, abs=1e-15)
    assert torch.isnan(rank_correlation(x, torch.ones_like(x))).all()


def test_rank_correlation_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        rank_correlation(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TypeError, match="a must be a tensor"):
        rank_correlation([1.0, 2.0], torch.zeros(2))


def test_cascading_randomization_resets_layers_from_the_top(device):
    net = _mlp(device=device)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layers = randomizable_layers(net)
    assert layers == ["0", "2", "4"]
    copies = cascading_randomization(net, seed=3)
    assert [name for name, _ in copies] == ["4", "2", "0"]
    for k, (_, model) in enumerate(copies, start=1):
        reset = set(layers[len(layers) - k:])
        for key, value in model.state_dict().items():
            changed = not torch.equal(value, before[key])
            assert changed == (key.split(".")[0] in reset), (k, key)
    # the original is untouched, the copies are nested and the seed fixes them
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    torch.testing.assert_close(copies[0][1][4].weight, copies[2][1][4].weight, rtol=0, atol=0)
    again = cascading_randomization(net, seed=3)
    torch.testing.assert_close(again[2][1][0].weight, copies[2][1][0].weight, rtol=0, atol=0)
    # as documented: copy k draws the k-th layer from the top once, with seed + k - 1, on
    # the CPU -- the same weights on every device -- and leaves them on the model's device
    for k, layer in enumerate(["4", "2", "0"], start=1):
        fresh = copy.deepcopy(net.get_submodule(layer)).cpu()
        torch.manual_seed(3 + k - 1)
        fresh.reset_parameters()
        drawn = copies[k - 1][1].get_submodule(layer)
        assert drawn.weight.device == net[0].weight.device
        for ours, expected in ((drawn.weight, fresh.weight), (drawn.bias, fresh.bias)):
            torch.testing.assert_close(ours.cpu(), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no layer"):
        cascading_randomization(nn.Sequential(nn.Tanh()))
    with pytest.raises(TypeError, match="seed must be an int"):
        cascading_randomization(net, seed=1.5)


# --------------------------------------------------------------------------- attention rollout


def _attention(batch, heads, T, seed=0, causal=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, heads, T, T, generator=g, dtype=F64)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return scores.softmax(-1).to(device)


def test_attention_rollout_known_cases(device):
    T = 5
    eye = torch.eye(T, dtype=F64, device=device).expand(2, 3, T, T)
    torch.testing.assert_close(attention_rollout([eye, eye]), eye[:, 0])
    first, second = _attention(2, 3, T, 0, device=device), _attention(2, 3, T, 1, device=device)
    torch.testing.assert_close(attention_rollout([first], residual_weight=0.0), first.mean(1))
    # two layers, w = 0.5, by hand: (I + A2) / 2 @ (I + A1) / 2
    mix = [(torch.eye(T, dtype=F64, device=device) + a.mean(1)) / 2 for a in (first, second)]
    rollout = attention_rollout([first, second])
    torch.testing.assert_close(rollout, mix[1] @ mix[0], rtol=0, atol=1e-15)
    assert torch.allclose(rollout.sum(-1), torch.ones(2, T, dtype=F64, device=device))
    assert torch.equal(rollout.triu(1), torch.zeros_like(rollout))  # causal stays causal


@pytest.mark.parametrize("maps, kw, error, match", [
    ([], {}, TypeError, "non-empty list"),
    (torch.ones(1, 1, 2, 2), {}, TypeError, "non-empty list"),
    ([torch.ones(1, 2, 2)], {}, ValueError, r"attention_maps\[0\]"),
    ([torch.ones(1, 1, 2, 2), torch.ones(1, 1, 3, 3)], {}, ValueError, r"attention_maps\[1\]"),
    ([torch.ones(1, 1, 2, 3)], {}, ValueError, r"\(B, n_head, T, T\)"),
    ([torch.ones(1, 1, 2, 2)], dict(residual_weight=1.5), ValueError, "residual_weight"),
    # wrong types are TypeErrors
    ([torch.ones(1, 1, 2, 2), "layer 2"], {}, TypeError, r"attention_maps\[1\] must be a"),
    ([np.ones((1, 1, 2, 2))], {}, TypeError, r"attention_maps\[0\] must be a"),
    ([torch.ones(1, 1, 2, 2, dtype=torch.long)], {}, TypeError, "floating-point"),
    ([torch.ones(1, 1, 2, 2)], dict(residual_weight="0.5"), TypeError, "residual_weight must be"),
    ([torch.ones(1, 1, 2, 2)], dict(residual_weight=True), TypeError, "residual_weight must be"),
    ([torch.ones(1, 1, 2, 2)], dict(residual_weight=torch.tensor(0.5)), TypeError,
     "residual_weight must be"),
])
def test_attention_rollout_bad_input(maps, kw, error, match):
    with pytest.raises(error, match=match):
        attention_rollout(maps, **kw)


# --------------------------------------------------------------------------- input conventions


def test_one_feature_per_example_inputs_of_shape_b():
    # (B,) inputs: one scalar feature per example, F(x) = x^2 returns (N,).
    x, b = torch.tensor([1.0, -2.0, 3.0], dtype=F64), torch.tensor([0.5], dtype=F64)
    square = lambda z: z**2  # noqa: E731
    ours, delta = integrated_gradients(square, x, b, n_steps=8, method="riemann_middle",
                                       return_convergence_delta=True)
    # the gradient 2 z is linear along the path, so the midpoint rule is exact
    torch.testing.assert_close(ours, x**2 - b**2, rtol=0, atol=1e-14)
    assert delta.shape == (3,) and delta.abs().max().item() < 1e-14
    curve = perturbation_curve(square, x, torch.ones(3, dtype=F64), baselines=b)
    torch.testing.assert_close(curve.scores, torch.stack([x**2, (b**2).expand(3)], 1))
    phi = shapley_values(square, x, b, feature_mask=torch.tensor(0))
    torch.testing.assert_close(phi, x**2 - b**2, rtol=0, atol=1e-14)
    # a rank correlation needs at least two features per example: say so, do not crash
    with pytest.raises(ValueError, match=r"a must have shape \(B, D, ...\)"):
        rank_correlation(x, x)


def test_numpy_numbers_and_index_arrays_are_accepted_like_python_ones():
    net, x = _mlp(), _data(3)
    reference = integrated_gradients(net, x, 0.5, [0, 3, 1], n_steps=8)
    numpy_args = integrated_gradients(net, x, np.float32(0.5), np.array([0, 3, 1]),
                                      n_steps=np.int64(8))
    torch.testing.assert_close(numpy_args, reference, rtol=0, atol=0)
    scalar_target = integrated_gradients(net, x, np.int64(0), np.int32(2), n_steps=8)
    torch.testing.assert_close(scalar_target, integrated_gradients(net, x, 0, 2, n_steps=8))
    curve = perturbation_curve(net, x, x, target=np.array([0, 1, 2]),
                               baselines=np.float64(0.0), n_points=np.int64(3))
    assert curve.scores.shape == (3, 3)
    maps = [_attention(1, 2, 4, seed) for seed in (0, 1)]
    torch.testing.assert_close(attention_rollout(maps, np.float32(0.25)),
                               attention_rollout(maps, 0.25))


@pytest.mark.parametrize("call, error, match", [
    (lambda: integrated_gradients(_mlp(), _data(3), target=np.array([0.0, 1.0, 2.0])),
     TypeError, "target must hold integer indices"),
    (lambda: integrated_gradients(_mlp(), _data(3), target=np.array([True, False, True])),
     TypeError, "target must hold integer indices"),
    (lambda: integrated_gradients(_mlp(), _data(3), np.zeros((1, 6)), target=0),
     TypeError, "baselines must be None, a number or a tensor"),
    (lambda: integrated_gradients(_mlp(), _data(3), np.bool_(True), target=0),
     TypeError, "baselines must be None, a number or a tensor"),
    (lambda: perturbation_curve(_mlp(), _data(2), _data(2), 0, n_points=3.0),
     TypeError, "n_points must be None or an int"),
    (lambda: perturbation_curve(_mlp(), _data(2), _data(2), 0, n_points=True),
     TypeError, "n_points must be None or an int"),
    (lambda: integrated_gradients(_mlp(), _data(3), target=0, n_steps=np.float64(8)),
     TypeError, "n_steps must be an int"),
    (lambda: shapley_values(_mlp(), _data(2), target=0, max_groups=5.0,
                            feature_mask=torch.tensor([0, 0, 1, 1, 2, 2])),
     TypeError, "max_groups must be an int"),
])
def test_numpy_and_python_types_are_rejected_consistently(call, error, match):
    with pytest.raises(error, match=match):
        call()


# --------------------------------------------------------------------------- layout


def test_the_algorithm_module_imports_no_figures_and_no_private_names():
    """Figures live in companion.plotting, checks in companion._validate (public names)."""
    import companion.interpret

    tree = ast.parse(Path(companion.interpret.__file__).read_text())
    imported = [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    imported += [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names]
    assert not [name for name in imported
                if name.split(".")[0] in ("matplotlib", "seaborn") or name.endswith("plotting")]
    private = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               for alias in node.names if alias.name.startswith("_")]
    assert not private, private


def test_the_algorithms_are_short():
    """Each function the chapter shows: at most 40 lines of code, docstring aside."""
    import companion.interpret

    long = []
    for node in ast.walk(ast.parse(Path(companion.interpret.__file__).read_text())):
        if isinstance(node, ast.FunctionDef):
            lines = node.end_lineno - node.lineno + 1
            if isinstance(node.body[0], ast.Expr):  # the docstring
                lines -= node.body[0].end_lineno - node.body[0].lineno + 1
            if lines > 40:
                long.append(f"{node.name}: {lines} lines")
    assert not long, long
