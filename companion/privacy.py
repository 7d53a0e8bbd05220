"""Privacy of training data: measuring the leak, DP-SGD, and its privacy accounting.

Chapter 9 of the book. Four ideas, in the order the chapter uses them:

* **Membership inference** (:func:`membership_scores`, :func:`membership_auc`): a model
  has lower loss on its training examples than on unseen ones; an attacker who
  thresholds the loss tells members from non-members better than chance
  (Yeom et al. 2018). The attack's strength is the ROC AUC of the score.
* **Per-example gradients** (:func:`per_sample_gradients`): one gradient per example,
  computed in one vectorised pass with :mod:`torch.func` (``vmap`` over ``grad``).
* **DP-SGD** (:func:`privatize_gradients`, :func:`dp_sgd_step`,
  :func:`poisson_batches`): clip each example's gradient to norm :math:`C`, sum, add
  Gaussian noise of standard deviation :math:`\\sigma C`, divide by the expected batch
  size (Abadi et al. 2016). The same arithmetic as Opacus's ``DPOptimizer``, with
  Opacus's names (``max_grad_norm``, ``noise_multiplier``, ``expected_batch_size``).
* **Accounting** (:func:`rdp_sampled_gaussian`, :func:`rdp_epsilon`,
  :func:`tpr_bound`): the Rényi-DP of the sampled Gaussian mechanism (Mironov et al.
  2019), converted to :math:`(\\varepsilon, \\delta)`-DP, and what that pair allows an
  attacker (the hypothesis-testing bound).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
from scipy import special
from torch import nn

from companion._validate import check_float, check_int, check_tensor, check_type
from companion.gradnoise import per_example_gradients
from companion.metrics import BootstrapResult, bootstrap_ci, roc_auc_score

__all__ = [
    "DEFAULT_ORDERS",
    "dp_sgd_step",
    "membership_auc",
    "membership_scores",
    "per_sample_gradients",
    "poisson_batches",
    "privatize_gradients",
    "rdp_epsilon",
    "rdp_sampled_gaussian",
    "tpr_bound",
    "train_dp_sgd",
]

#: Rényi orders searched by :func:`rdp_epsilon` (the same list as Opacus's RDP accountant).
DEFAULT_ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)]
                                          + [float(a) for a in range(12, 64)])

# Opacus adds this to each per-example norm before dividing (it avoids 0 / 0); kept for parity.
_NORM_EPS = 1e-6


# =========================================================================== membership inference


@torch.no_grad()
def membership_scores(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                      loss_fn: Callable = nn.functional.cross_entropy) -> torch.Tensor:
    r"""Loss-threshold membership score of each example: :math:`s_i = -\ell(f(x_i), y_i)`.

    The higher the score, the more the attacker believes the example was in the
    training set (Yeom et al. 2018). ``loss_fn`` must accept ``reduction="none"``.
    Returns a ``(B,)`` tensor on the model's device.
    """
    check_type("model", model, nn.Module)
    check_tensor("x", x)
    check_tensor("y", y)
    was_training = model.training
    model.eval()
    try:
        losses = loss_fn(model(x), y, reduction="none")  # (B,)
    finally:
        model.train(was_training)
    return -losses.detach()


def membership_auc(member_scores: torch.Tensor, nonmember_scores: torch.Tensor, *,
                   n_resamples: int = 1000,
                   generator: torch.Generator | None = None) -> BootstrapResult:
    """ROC AUC of a membership attack (members are positives), with a bootstrap interval.

    0.5 is chance: the attacker learns nothing; 1.0 separates members from non-members
    perfectly. Uses chapter 5's :func:`companion.metrics.roc_auc_score` and
    :func:`companion.metrics.bootstrap_ci` (members and non-members resampled together).
    """
    check_tensor("member_scores", member_scores, ndim=1)
    check_tensor("nonmember_scores", nonmember_scores, ndim=1)
    if len(member_scores) == 0 or len(nonmember_scores) == 0:
        raise ValueError("member_scores and nonmember_scores must both be non-empty")
    scores = torch.cat([member_scores, nonmember_scores.to(member_scores.device)])
    labels = torch.cat([torch.ones(len(member_scores), dtype=torch.long),
                        torch.zeros(len(nonmember_scores), dtype=torch.long)])
    return bootstrap_ci(roc_auc_score, labels.to(scores.device), scores,
                        n_resamples=n_resamples, generator=generator)


# =========================================================================== per-example gradients


def per_sample_gradients(model: nn.Module, loss_fn: Callable, x: torch.Tensor,
                         y: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""Gradient of each example's loss, :math:`g_i = \nabla_\theta \ell(f_\theta(x_i), y_i)`.

    ``{name: (B, *param.shape)}`` for every parameter that requires a gradient: chapter
    3's :func:`companion.gradnoise.per_example_gradients` (one ``vmap`` of ``torch.func.grad``)
    in Opacus's argument order, unflattened. ``loss_fn(output, target)`` is called on a
    batch of one, so a mean-reduced loss is the example's own loss. Models whose forward
    pass mixes examples (batch norm or dropout in training mode) raise ``ValueError``.
    """
    check_tensor("x", x)
    check_tensor("y", y)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    return per_example_gradients(model, x, y, loss_fn, flatten=False)


# =========================================================================== DP-SGD


def privatize_gradients(grads: dict[str, torch.Tensor], max_grad_norm: float,
                        noise_multiplier: float, expected_batch_size: int, *,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    r"""The DP-SGD gradient from per-example gradients (Abadi et al. 2016):

    .. math::
        \tilde g = \frac{1}{L}\Big(\sum_{i \in B} g_i \min\big(1, \tfrac{C}{\|g_i\| + 10^{-6}}\big)
        + \mathcal N(0, \sigma^2 C^2 I)\Big)

    where :math:`\|g_i\|` is the norm of example :math:`i`'s gradient over *all*
    parameters together, :math:`C` = ``max_grad_norm``, :math:`\sigma` =
    ``noise_multiplier`` and :math:`L` = ``expected_batch_size`` (the *expected* size of
    a Poisson-sampled batch, not its actual size, which would itself leak). The
    :math:`10^{-6}` is Opacus's guard against dividing by zero. Noise is drawn with
    ``torch.normal`` from ``generator``, one parameter after the other in ``grads``'
    order, as Opacus draws it, so a shared seed gives Opacus's noise (the tests check the
    whole step against ``opacus.optimizers.DPOptimizer`` to 1e-12 in float64).
    An empty batch (``B = 0``) yields pure noise.
    """
    check_float("max_grad_norm", max_grad_norm, 0, low_open=True)
    check_float("noise_multiplier", noise_multiplier, 0)
    check_int("expected_batch_size", expected_batch_size, 1)
    if not grads:
        raise ValueError("grads is empty: no parameter requires a gradient")
    norms = torch.stack([g.flatten(1).norm(2, dim=-1) for g in grads.values()],
                        dim=1).norm(2, dim=1)  # (B,)
    factor = (max_grad_norm / (norms + _NORM_EPS)).clamp(max=1.0)  # (B,)
    std = noise_multiplier * max_grad_norm
    out = {}
    for name, g in grads.items():  # g: (B, *shape)
        summed = torch.einsum("i,i...", factor.to(g.dtype), g)  # (*shape)
        if std > 0:
            where = summed.device if generator is None else generator.device
            noise = torch.normal(0, std, size=summed.shape, device=where, generator=generator,
                                 dtype=summed.dtype)  # drawn where the generator lives
            summed = summed + noise.to(summed.device)
        out[name] = summed / expected_batch_size
    return out


def dp_sgd_step(model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable,
                x: torch.Tensor, y: torch.Tensor, *, max_grad_norm: float,
                noise_multiplier: float, expected_batch_size: int,
                generator: torch.Generator | None = None) -> None:
    """One differentially private step: per-example gradients, clip, sum, noise, average,
    then ``optimizer.step()`` with those gradients in ``p.grad``.

    Any optimizer works (SGD gives DP-SGD, Adam gives DP-Adam): privacy comes from the
    gradient, and what the optimizer does with it afterwards is post-processing.
    """
    check_type("optimizer", optimizer, torch.optim.Optimizer)
    if len(x) == 0:
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = {n: p.detach().new_zeros((0, *p.shape)) for n, p in named.items()}
    else:
        grads = per_sample_gradients(model, loss_fn, x, y)
    noisy = privatize_gradients(grads, max_grad_norm, noise_multiplier, expected_batch_size,
                                generator=generator)
    for name, p in model.named_parameters():
        if name in noisy:
            p.grad = noisy[name].to(p.dtype)
    optimizer.step()


def poisson_batches(num_samples: int, sample_rate: float, steps: int, *,
                    generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Indices of ``steps`` Poisson-sampled batches: each example joins each batch
    independently with probability ``sample_rate``.

    This is the sampling the accountant assumes (and Opacus's
    ``UniformWithReplacementSampler`` does; one ``torch.rand(num_samples)`` per batch, so
    the same generator state gives the same batches). Batch sizes vary around
    ``sample_rate * num_samples``, and a batch can be empty.
    """
    check_int("num_samples", num_samples, 1)
    check_float("sample_rate", sample_rate, 0, 1, low_open=True)
    check_int("steps", steps, 0)
    return [(torch.rand(num_samples, generator=generator) < sample_rate).nonzero().reshape(-1)
            for _ in range(steps)]


# =========================================================================== accounting


def _check_privacy_args(noise_multiplier, sample_rate, steps=None, delta=None):
    check_float("noise_multiplier", noise_multiplier, 0)
    check_float("sample_rate", sample_rate, 0, 1, low_open=True)
    if steps is not None:
        check_int("steps", steps, 0)
    if delta is not None:
        check_float("delta", delta, 0, 1, low_open=True, high_open=True)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    # A_alpha = sum_{i=0}^{alpha} C(alpha, i) q^i (1-q)^(alpha-i) exp((i^2 - i) / (2 sigma^2))
    terms = torch.tensor([math.log(special.binom(alpha, i)) + i * math.log(q)
                          + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
                          for i in range(alpha + 1)], dtype=torch.float64)
    return float(torch.logsumexp(terms, 0))


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    # The integral of Mironov et al. (2019), Section 3.3, split at z0 where the two
    # Gaussians' densities cross; each half is a series in binom(alpha, i) (signs alternate
    # once i > alpha), summed until its terms are below e^-30.
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    signs, logs = [], []
    i = 0
    while True:
        coef = special.binom(alpha, i)
        j = alpha - i
        log_c = math.log(abs(coef))
        log_e0 = special.log_ndtr((z0 - i) / sigma)  # log P(N(0, 1) < (z0 - i) / sigma)
        log_e1 = special.log_ndtr((j - z0) / sigma)
        log_s0 = log_c + i * math.log(q) + j * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
        log_s1 = log_c + j * math.log(q) + i * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
        signs += [math.copysign(1.0, coef)] * 2
        logs += [log_s0 + log_e0, log_s1 + log_e1]
        i += 1
        if max(logs[-2:]) < -30:
            break
    top = max(logs)
    return top + math.log(sum(s * math.exp(v - top) for s, v in zip(signs, logs)))


def rdp_sampled_gaussian(noise_multiplier: float, sample_rate: float, order: float) -> float:
    r"""Rényi DP at order :math:`\alpha` of one step of the sampled Gaussian mechanism.

    Each example is included with probability :math:`q` (``sample_rate``) and Gaussian
    noise of standard deviation :math:`\sigma` (``noise_multiplier``, in units of the
    sensitivity) is added. Mironov et al. (2019) show
    :math:`\varepsilon(\alpha) = \frac{1}{\alpha - 1}\log A_\alpha` with

    .. math::
        A_\alpha = \mathbb E_{z \sim \mu_0}\big[(1 - q + q\,\mu_1(z)/\mu_0(z))^\alpha\big]
        = \sum_{i=0}^{\alpha} \binom{\alpha}{i} q^i (1-q)^{\alpha-i} e^{(i^2 - i)/(2\sigma^2)}

    (the sum for integer :math:`\alpha`; fractional orders use their series of the same
    integral). Without sampling (:math:`q = 1`) it is the Gaussian mechanism's
    :math:`\alpha / (2\sigma^2)`; without noise it is infinite.
    """
    _check_privacy_args(noise_multiplier, sample_rate)
    check_float("order", order, 1, low_open=True)
    q, sigma, alpha = float(sample_rate), float(noise_multiplier), float(order)
    if sigma == 0:
        return math.inf
    if q == 1.0:
        return alpha / (2 * sigma**2)
    if alpha.is_integer():
        return _log_a_integer(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_fractional(q, sigma, alpha) / (alpha - 1)


@functools.lru_cache(maxsize=1024)
def _rdp_one_step(noise_multiplier: float, sample_rate: float,
                  orders: tuple[float, ...]) -> tuple[float, ...]:
    # One step's RDP at every order. It depends on neither the steps nor delta, so a sweep
    # over those (or a plot of epsilon against the steps) computes it once.
    return tuple(rdp_sampled_gaussian(noise_multiplier, sample_rate, a) for a in orders)


def rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                orders: Sequence[float] | None = None) -> float:
    r""":math:`\varepsilon` of ``steps`` DP-SGD steps at a given :math:`\delta`.

    RDP composes by addition, so ``steps`` steps have :math:`T\,\varepsilon(\alpha)` at
    every order. The conversion to :math:`(\varepsilon, \delta)`-DP (Balle et al. 2020,
    Theorem 21) is

    .. math::
        \varepsilon = \min_\alpha\; T\varepsilon(\alpha) + \log\frac{\alpha - 1}{\alpha}
        - \frac{\log\delta + \log\alpha}{\alpha - 1}.

    ``orders`` defaults to :data:`DEFAULT_ORDERS`. Zero steps spend nothing (0.0).
    """
    _check_privacy_args(noise_multiplier, sample_rate, steps, delta)
    orders = DEFAULT_ORDERS if orders is None else tuple(float(a) for a in orders)
    if not orders or min(orders) <= 1:
        raise ValueError(f"orders must be a non-empty list of numbers > 1, got {orders!r}")
    if steps == 0:
        return 0.0
    one_step = _rdp_one_step(float(noise_multiplier), float(sample_rate), orders)
    best = math.inf
    for alpha, rdp1 in zip(orders, one_step):
        rdp = steps * rdp1
        eps = (rdp + math.log((alpha - 1) / alpha)
               - (math.log(delta) + math.log(alpha)) / (alpha - 1))
        best = min(best, eps)
    return float(best)


def tpr_bound(epsilon: float, delta: float, fpr: float) -> float:
    r"""Highest true-positive rate any membership test can reach at false-positive rate
    ``fpr`` against an :math:`(\varepsilon, \delta)`-DP algorithm (Kairouz et al. 2015):

    .. math::
        \mathrm{TPR} \le \min\big(e^\varepsilon\,\mathrm{FPR} + \delta,\;
        1 - e^{-\varepsilon}(1 - \delta - \mathrm{FPR}),\; 1\big).
    """
    check_float("epsilon", epsilon, 0)
    check_float("delta", delta, 0, 1, high_open=True)
    check_float("fpr", fpr, 0, 1)
    return min(math.exp(epsilon) * fpr + delta,
               1 - math.exp(-epsilon) * (1 - delta - fpr), 1.0)



def train_dp_sgd(model: nn.Module, optimizer: torch.optim.Optimizer, X: torch.Tensor,
                 y: torch.Tensor, *, sample_rate: float, steps: int, max_grad_norm: float,
                 noise_multiplier: float, loss_fn: Callable = nn.functional.cross_entropy,
                 generator: torch.Generator | None = None) -> None:
    """Train with DP-SGD: ``steps`` Poisson-sampled batches (:func:`poisson_batches`),
    each through :func:`dp_sgd_step` with expected batch size ``round(sample_rate * N)``.
    Batches and noise are drawn from ``generator`` (a CPU generator; noise for a model
    on another device is drawn on the CPU and moved). The privacy spent is
    ``rdp_epsilon(noise_multiplier, sample_rate, steps, delta)``.
    """
    check_tensor("X", X)
    check_tensor("y", y)
    batch = max(1, round(sample_rate * len(X)))
    for rows in poisson_batches(len(X), sample_rate, steps, generator=generator):
        rows = rows.to(X.device)
        dp_sgd_step(model, optimizer, loss_fn, X[rows], y[rows], max_grad_norm=max_grad_norm,
                    noise_multiplier=noise_multiplier, expected_batch_size=batch,
                    generator=generator)
