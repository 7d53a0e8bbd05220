r"""Metrics of scores: ROC and precision-recall curves and the areas under them
(book: chapter 5, "ROC and precision-recall curves").

Every curve comes from one sort of the scores and one cumulative sum of the
labels (``_counts_at_thresholds``): after sorting, the rule "positive if score
:math:`\ge t`" at each distinct score has as many true positives as there are
positives up to that score. No Python loop runs over samples. scikit-learn's warnings
for undefined curves and its label conventions are in ``companion/metrics/_sklearn.py``.
"""

from __future__ import annotations

import math

import torch

from companion._validate import check_real, check_same_length, device_of, float_dtype

from ._common import ranking_inputs, unique, weighted_mean
from ._sklearn import (
    binary_positive_class,
    check_binary_auc_arguments,
    check_ovr_average,
    multiclass_ap_classes,
    multiclass_auc_classes,
    one_class_only,
    positive_class,
    rate,
    recall_without_positives,
)

__all__ = ["roc_curve", "auc", "roc_auc_score", "precision_recall_curve",
           "average_precision_score"]


def _counts_at_thresholds(positive, y_score, weights):
    r"""For each distinct score :math:`s`, from the highest down: the (weighted) numbers of
    negatives and positives scored :math:`\ge s` -- the FP and TP of the rule "positive
    if score >= s". One sort and one cumulative sum."""
    if weights is not None:  # zero weights must not create thresholds
        keep = weights != 0
        positive, y_score, weights = positive[keep], y_score[keep], weights[keep]
    # Tied scores end at the same place, so the counts there do not depend on the order
    # inside a tie; weighted sums keep NumPy's (stable) order, which fixes their rounding.
    y_score, order = torch.sort(y_score, descending=True, stable=weights is not None)
    positive = positive[order]
    last_of_each_score = torch.cat([torch.nonzero(torch.diff(y_score)).flatten(),
                                    torch.tensor([len(y_score) - 1], device=y_score.device)])
    dtype = float_dtype(y_score.device)
    if weights is None:  # exact integer counts: deterministic and fast on CUDA too
        tps = torch.cumsum(positive.long(), 0)[last_of_each_score]
        fps = last_of_each_score + 1 - tps
        return fps.to(dtype), tps.to(dtype), y_score[last_of_each_score]
    weights = weights[order]
    tps = _sequential_cumsum(positive * weights)[last_of_each_score]
    fps = _sequential_cumsum(~positive * weights)[last_of_each_score]
    return fps, tps, y_score[last_of_each_score]


def _sequential_cumsum(x: torch.Tensor) -> torch.Tensor:
    """Running sums added left to right, as NumPy does, on the device of ``x``.

    A GPU's parallel scan associates the additions differently, so two running totals
    that differ by an added zero can differ in their last bit -- and a curve then gains
    thresholds that a sequential sum does not have. The CPU's cumsum is sequential.
    """
    return torch.cumsum(x.cpu(), 0).to(x.device)


def _roc(positive, y_score, weights, drop_intermediate=True):
    fps, tps, thresholds = _counts_at_thresholds(positive, y_score, weights)
    if drop_intermediate and len(fps) > 2:  # drop points on straight segments (no corner)
        corner = (torch.diff(fps, 2) != 0) | (torch.diff(tps, 2) != 0)
        true = torch.ones(1, dtype=torch.bool, device=fps.device)
        keep = torch.cat([true, corner, true])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    zero = torch.zeros(1, dtype=fps.dtype, device=fps.device)
    fps, tps = torch.cat([zero, fps]), torch.cat([zero, tps])
    thresholds = torch.cat([zero + math.inf, thresholds])
    fpr, tpr = rate(fps, "negative", "false"), rate(tps, "positive", "true")  # FP/N, TP/P
    return fpr, tpr, thresholds


def roc_curve(y_true, y_score, *, pos_label=None, sample_weight=None, drop_intermediate=True):
    r"""The ROC curve: true-positive rate against false-positive rate over all thresholds.

    For the rule "positive if score :math:`\ge t`", as :math:`t` falls from :math:`+\infty`
    past each distinct score :cite:p:`fawcett2006introduction`:

    .. math:: \mathrm{TPR}(t) = \frac{TP(t)}{P}, \qquad \mathrm{FPR}(t) = \frac{FP(t)}{N}

    with :math:`P` and :math:`N` the numbers of positives and negatives. Tied scores form
    one point. ``drop_intermediate`` removes points that lie on a straight segment between
    their neighbours; they change neither the plotted curve nor its area. Returns
    ``(fpr, tpr, thresholds)``, each ``(m,)``, with ``thresholds[0] = inf`` for the point
    (0, 0). A class that does not occur gives a NaN rate and an
    ``UndefinedMetricWarning``.
    """
    y_true, y_score, weights = ranking_inputs(y_true, y_score, sample_weight)
    return _roc(positive_class(y_true, pos_label), y_score, weights, drop_intermediate)


def auc(x, y) -> float:
    r"""Area under the curve through the points ``(x, y)`` by the trapezoidal rule,
    :math:`\sum_k (x_{k+1} - x_k)(y_k + y_{k+1})/2`; ``x`` must be monotonic."""
    device = device_of(x, y)
    x = check_real("x", x, device, finite=False)
    y = check_real("y", y, device, finite=False)
    check_same_length(x=x, y=y)
    if len(x) < 2:
        raise ValueError(f"at least 2 points are needed to compute an area, got {len(x)}")
    dx = torch.diff(x)
    direction = 1.0
    if (dx < 0).any():
        if not (dx <= 0).all():
            raise ValueError("x is neither increasing nor decreasing")
        direction = -1.0
    return direction * float(torch.trapezoid(y, x))


def _binary_roc_auc(positive, y_score, weights, max_fpr=None):
    if one_class_only(positive, weights):  # undefined: NaN, as scikit-learn
        return math.nan
    fpr, tpr, _ = _roc(positive, y_score, weights)
    if max_fpr is None or max_fpr == 1:
        return auc(fpr, tpr)
    # partial AUC up to max_fpr, standardised by McClish's correction (0.5 chance, 1 best)
    stop = int(torch.searchsorted(fpr, fpr.new_tensor([max_fpr]), right=True)[0])
    x0, x1, y0, y1 = fpr[stop - 1], fpr[stop], tpr[stop - 1], tpr[stop]
    y_at_max = (y1 - y0) / (x1 - x0) * (max_fpr - x0) + y0  # linear interpolation
    partial = auc(torch.cat([fpr[:stop], fpr.new_tensor([max_fpr])]),
                  torch.cat([tpr[:stop], y_at_max.reshape(1)]))
    min_area, max_area = 0.5 * max_fpr**2, max_fpr
    return 0.5 * (1 + (partial - min_area) / (max_area - min_area))


def _one_vs_rest(binary_metric, onehot, y_score, weights, average):
    """Average ``binary_metric`` over classes, each against the rest (scikit-learn's
    ``_average_binary_score``). ``onehot`` and ``y_score`` are ``(n, K)``."""
    if average == "micro":
        w = None if weights is None else weights.repeat_interleave(onehot.shape[1])
        return binary_metric(onehot.flatten(), y_score.flatten(), w)
    per_class = torch.tensor([binary_metric(onehot[:, k], y_score[:, k], weights)
                              for k in range(onehot.shape[1])],
                             dtype=y_score.dtype, device=y_score.device)
    if average is None:
        return per_class
    if average == "weighted":
        support = (onehot.to(y_score.dtype) * (1 if weights is None else weights[:, None])).sum(0)
        if math.isclose(float(support.sum()), 0.0, abs_tol=1e-8):
            return 0.0
        return weighted_mean(torch.where(support == 0, 0.0, per_class), support)
    return float(per_class.mean())


def roc_auc_score(y_true, y_score, *, average="macro", sample_weight=None, max_fpr=None,
                  multi_class="raise", labels=None):
    r"""Area under the ROC curve.

    It equals the probability that a random positive is scored above a random negative
    (ties count one half) :cite:p:`hanley1982meaning`:

    .. math:: \mathrm{AUC} = \frac{1}{PN} \sum_{i: y_i = 1} \sum_{j: y_j = 0}
              \left([s_i > s_j] + \tfrac12 [s_i = s_j]\right).

    Binary: ``y_score`` is ``(n,)``, the score of the greater label. ``max_fpr`` gives the
    standardised partial AUC over :math:`\mathrm{FPR} \le` ``max_fpr``. Multi-class:
    ``y_score`` is ``(n, K)`` probabilities (rows sum to one) with ``multi_class="ovr"``:
    each class against the rest, averaged by ``average`` (``"macro"``, ``"weighted"``,
    ``"micro"`` or ``None``). One class only (among samples of non-zero weight): NaN with
    an ``UndefinedMetricWarning``.
    """
    y_true, y_score, weights = ranking_inputs(y_true, y_score, sample_weight, (1, 2))
    classes = unique(y_true)
    if len(classes) > 2 or (y_score.ndim == 2 and y_score.shape[1] > 2):
        classes = multiclass_auc_classes(y_true, y_score, average=average, max_fpr=max_fpr,
                                         multi_class=multi_class, labels=labels)
        onehot = y_true[:, None] == classes[None, :]  # (n, K)
        return _one_vs_rest(_binary_roc_auc, onehot, y_score, weights, average)
    check_binary_auc_arguments(y_score, max_fpr)
    return _binary_roc_auc(y_true == classes[-1], y_score, weights, max_fpr)


def _precision_recall(positive, y_score, weights, drop_intermediate=False):
    fps, tps, thresholds = _counts_at_thresholds(positive, y_score, weights)
    if drop_intermediate and len(fps) > 2:  # keep the first and last point of each recall
        true = torch.ones(1, dtype=torch.bool, device=fps.device)
        keep = torch.cat([true, (torch.diff(tps[:-1]) != 0) | (torch.diff(tps[1:]) != 0), true])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    predicted = tps + fps
    precision = torch.where(predicted != 0, tps / predicted, 0.0)  # TP / (TP + FP)
    recall = tps / tps[-1] if tps[-1] != 0 else recall_without_positives(tps)  # TP / P
    one, zero = precision.new_ones(1), precision.new_zeros(1)
    return (torch.cat([precision.flip(0), one]), torch.cat([recall.flip(0), zero]),
            thresholds.flip(0))


def precision_recall_curve(y_true, y_score, *, pos_label=None, sample_weight=None,
                           drop_intermediate=False):
    r"""Precision and recall of "positive if score :math:`\ge t`" for every distinct score.

    Returns ``(precision, recall, thresholds)``: ``thresholds`` increasing, ``(m,)``;
    ``precision`` and ``recall`` ``(m + 1,)`` with a last point (1, 0) that has no
    threshold. Recall falls as the threshold rises; precision need not rise.
    """
    y_true, y_score, weights = ranking_inputs(y_true, y_score, sample_weight)
    return _precision_recall(positive_class(y_true, pos_label), y_score, weights,
                             drop_intermediate)


def _binary_average_precision(positive, y_score, weights) -> float:
    precision, recall, _ = _precision_recall(positive, y_score, weights)
    return max(0.0, -float(torch.sum(torch.diff(recall) * precision[:-1])))


def average_precision_score(y_true, y_score, *, average="macro", pos_label=1,
                            sample_weight=None) -> float:
    r"""Average precision: precision averaged over the recall steps, without interpolation,

    .. math:: \mathrm{AP} = \sum_k (R_k - R_{k-1})\, P_k,

    a step-function area under the precision-recall curve :cite:p:`davis2006relationship`.
    Multi-class ``y_true`` needs ``(n, K)`` scores and is averaged one-vs-rest.
    """
    y_true, y_score, weights = ranking_inputs(y_true, y_score, sample_weight, (1, 2))
    check_ovr_average(average)
    if len(unique(y_true)) <= 2:
        positive = binary_positive_class(y_true, pos_label, y_score)
        return _binary_average_precision(positive, y_score, weights)
    classes = multiclass_ap_classes(y_true, y_score, pos_label)
    onehot = y_true[:, None] == classes[None, :]  # (n, K)
    return _one_vs_rest(_binary_average_precision, onehot, y_score, weights, average)
