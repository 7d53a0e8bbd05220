r"""Metrics of probabilities: log loss, the Brier score, reliability diagrams, the
expected calibration error, temperature scaling and perplexity (book: chapter 5,
"Calibration: do the probabilities mean what they say?" and "Language models:
perplexity").

Bins are filled by one ``bincount`` of each sample's bin index. scikit-learn's label
bookkeeping for probability matrices is in ``companion/metrics/_sklearn.py``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from companion._validate import (
    check_labels,
    check_real,
    check_same_length,
    check_unit_interval,
    device_of,
    is_integer,
)

from ._common import bincount, unique, weighted_mean
from ._sklearn import binary_probability_inputs, positive_class, probability_inputs

__all__ = ["log_loss", "brier_score_loss", "calibration_curve", "calibration_bins",
           "expected_calibration_error", "fit_temperature", "perplexity"]


def log_loss(y_true, y_proba, *, normalize=True, sample_weight=None, labels=None) -> float:
    r"""Cross-entropy of predicted probabilities, in nats per sample:

    .. math:: -\frac{1}{n} \sum_{i=1}^{n} \log \hat p_{i, y_i}

    ``y_proba`` is ``(n, K)`` (columns in sorted label order) or ``(n,)``, the probability
    of the greater of two labels. Probabilities are clipped to :math:`[\epsilon, 1 -
    \epsilon]`, the machine epsilon of their floating type, so that a confident mistake
    costs 36 nats in float64 (16 in float32), not infinity.
    """
    onehot, proba, weights, eps = probability_inputs(y_true, y_proba, sample_weight, labels)
    loss = -torch.xlogy(onehot, proba.clamp(eps, 1 - eps)).sum(1)  # (n,)
    return weighted_mean(loss, weights, normalize)


def brier_score_loss(y_true, y_proba, *, sample_weight=None, pos_label=None, labels=None,
                     scale_by_half="auto") -> float:
    r"""Mean squared difference between predicted probabilities and outcomes
    :cite:p:`brier1950verification`:

    .. math:: \frac{1}{n} \sum_{i=1}^{n} \sum_{k=1}^{K} (\hat p_{ik} - [y_i = k])^2,

    halved for binary problems (``scale_by_half="auto"``), where it becomes
    :math:`\frac1n \sum_i (\hat p_i - y_i)^2`. ``y_proba`` is ``(n,)``, the probability of
    ``pos_label`` (default: 1, or the greater label), or ``(n, K)``.
    """
    if scale_by_half not in (True, False, "auto"):
        raise ValueError(f"scale_by_half must be True, False or 'auto', got {scale_by_half!r}")
    device = device_of(y_true, y_proba, sample_weight)
    proba = check_real("y_proba", y_proba, device, (1, 2))
    if proba.ndim == 1 or proba.shape[1] == 1:
        onehot, proba, weights = binary_probability_inputs(y_true, proba, sample_weight,
                                                           pos_label, device)
    else:
        onehot, proba, weights, _ = probability_inputs(y_true, y_proba, sample_weight, labels)
    score = weighted_mean(((onehot - proba) ** 2).sum(1), weights)  # onehot, proba: (n, K)
    if scale_by_half == "auto":
        scale_by_half = proba.shape[1] < 3
    return 0.5 * score if scale_by_half else score


def _bin_edges(confidence: torch.Tensor, n_bins: int, strategy: str) -> torch.Tensor:
    """``n_bins + 1`` edges on [0, 1]: equal widths, or equal counts (quantiles)."""
    if not is_integer(n_bins) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    levels = torch.arange(n_bins + 1, dtype=confidence.dtype, device=confidence.device)
    levels = levels * (1.0 / n_bins)  # the same floats as np.linspace(0, 1, n_bins + 1)
    levels[-1] = 1.0
    if strategy == "uniform":
        return levels
    if strategy == "quantile":
        return torch.quantile(confidence, levels * 100 / 100)  # as np.percentile
    raise ValueError(f"strategy must be 'uniform' or 'quantile', got {strategy!r}")


def _bins(hit, confidence, n_bins, strategy):
    confidence = confidence.contiguous()
    edges = _bin_edges(confidence, n_bins, strategy)
    bin_id = torch.searchsorted(edges[1:-1], confidence)  # bin b holds (e_b, e_b+1]
    count = torch.bincount(bin_id, minlength=n_bins)
    hits = bincount(bin_id, hit.to(confidence.dtype), n_bins)
    confidence_sum = bincount(bin_id, confidence, n_bins)
    full = count > 0
    return hits[full] / count[full], confidence_sum[full] / count[full], count[full]


def calibration_curve(y_true, y_prob, *, pos_label=None, n_bins=5, strategy="uniform"):
    r"""The points of a reliability diagram for a binary classifier.

    The predicted probabilities are cut into ``n_bins`` bins (``"uniform"``: equal widths
    on [0, 1]; ``"quantile"``: equal numbers of samples); in each non-empty bin ``prob_true``
    is the fraction of positives and ``prob_pred`` the mean predicted probability.
    A calibrated model has ``prob_true`` :math:`\approx` ``prob_pred``.
    Returns ``(prob_true, prob_pred)``.
    """
    device = device_of(y_true, y_prob)
    y_true = check_labels("y_true", y_true, device)
    y_prob = check_real("y_prob", y_prob, device)
    check_same_length(y_true=y_true, y_prob=y_prob)
    if y_prob.min() < 0 or y_prob.max() > 1:
        raise ValueError("y_prob has values outside [0, 1]")
    if len(unique(y_true)) > 2:
        raise ValueError("calibration_curve supports binary targets only")
    prob_true, prob_pred, _ = _bins(positive_class(y_true, pos_label), y_prob, n_bins, strategy)
    return prob_true, prob_pred


def calibration_bins(y_true, y_proba, *, n_bins=15, strategy="uniform"):
    r"""Per-bin accuracy, mean confidence and count, for a reliability diagram.

    ``y_proba`` ``(n, K)``: the *top-label* diagram of :cite:t:`guo2017calibration` --
    confidence :math:`\max_k \hat p_{ik}`, a hit when the arg-max is ``y_true`` (class
    indices ``0..K-1``). ``y_proba`` ``(n,)``: a binary diagram, confidence
    :math:`\hat p_i` and hit :math:`y_i = 1` (as :func:`calibration_curve`).
    Returns ``(accuracy, confidence, count)`` for the non-empty bins.
    """
    device = device_of(y_true, y_proba)
    y_true = check_labels("y_true", y_true, device)
    proba = check_real("y_proba", y_proba, device, (1, 2))
    check_same_length(y_true=y_true, y_proba=proba)
    check_unit_interval("y_proba", proba)
    if proba.ndim == 1:
        return _bins(positive_class(y_true, None), proba, n_bins, strategy)
    if y_true.min() < 0 or y_true.max() >= proba.shape[1]:
        raise ValueError(f"y_true must hold class indices in [0, {proba.shape[1]}) to match "
                         f"the columns of y_proba, got values in "
                         f"[{y_true.min().item()}, {y_true.max().item()}]")
    confidence, predicted = proba.max(dim=1)
    return _bins(predicted == y_true, confidence, n_bins, strategy)


def expected_calibration_error(y_true, y_proba, *, n_bins=15, strategy="uniform") -> float:
    r"""Expected calibration error :cite:p:`naeini2015obtaining,guo2017calibration`:

    .. math:: \mathrm{ECE} = \sum_{b=1}^{B} \frac{n_b}{n}\,
              \bigl|\mathrm{acc}(b) - \mathrm{conf}(b)\bigr|,

    the gap of the reliability diagram (:func:`calibration_bins`), weighted by how many
    samples each bin holds. 0 for perfect calibration; it depends on the bins chosen.
    """
    accuracy, confidence, count = calibration_bins(y_true, y_proba, n_bins=n_bins,
                                                   strategy=strategy)
    return float(((accuracy - confidence).abs() * count).sum() / count.sum())


def fit_temperature(logits, y_true, *, max_iter=100) -> float:
    r"""The temperature :math:`T > 0` that minimises the cross-entropy of
    :math:`\operatorname{softmax}(z / T)` on held-out ``logits`` ``(n, K)`` and labels ``(n,)``.

    Temperature scaling :cite:p:`guo2017calibration` divides every logit by one number fit
    on a validation set: predictions (the arg-max) do not change, confidences do.
    :math:`T > 1` softens an over-confident model. L-BFGS on :math:`\log T`, in float64.
    """
    device = device_of(logits, y_true)
    z = check_real("logits", logits, device, (2,))
    y = check_labels("y_true", y_true, device)
    check_same_length(logits=z, y_true=y)
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"y_true must hold class indices in [0, {z.shape[1]})")
    log_t = torch.zeros((), dtype=z.dtype, device=device, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter,
                                  tolerance_grad=1e-12, tolerance_change=1e-15,
                                  line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def perplexity(mean_cross_entropy, *, base=math.e) -> float:
    r"""Perplexity :math:`b^{H}` of a mean cross-entropy :math:`H` per token (in nats for
    ``base=e``, bits for ``base=2``).

    It is the size of a uniform choice that would be as uncertain: a model that spreads
    its probability evenly over a vocabulary of :math:`V` tokens has :math:`H = \log V`
    and perplexity :math:`V`.
    """
    h = float(mean_cross_entropy)
    if not math.isfinite(h) or h < 0:
        raise ValueError(f"mean_cross_entropy must be finite and >= 0, got {h}")
    if not base > 1:
        raise ValueError(f"base must be > 1, got {base}")
    return base**h
