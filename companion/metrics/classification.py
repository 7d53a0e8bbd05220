r"""Metrics of predicted labels: accuracy, the confusion matrix, precision, recall and
:math:`F_\beta` (book: chapter 5, "Counting the errors of a binary classifier" and
"Many classes: digits").

Every count comes from one ``bincount``: the confusion matrix of ``K`` classes is the
``bincount`` of :math:`K i + j` for true class :math:`i` and predicted class :math:`j`,
and the true positives, supports and predicted counts of all classes are three more.
No Python loop runs over samples or classes. scikit-learn's handling of undefined
ratios and of ``pos_label`` is in ``companion/metrics/_sklearn.py``.
"""

from __future__ import annotations

import math

import torch

from companion._validate import check_label_list, float_dtype

from ._common import (
    bincount,
    classification_inputs,
    encode,
    present_labels,
    select_labels,
    weighted_mean,
)
from ._sklearn import check_fscore_arguments, divide, scored_labels, warn_if_single_label

__all__ = ["accuracy_score", "confusion_matrix", "precision_recall_fscore_support",
           "fbeta_score", "f1_score", "precision_score", "recall_score"]


def accuracy_score(y_true, y_pred, *, normalize=True, sample_weight=None) -> float:
    r"""Fraction (or, with ``normalize=False``, number) of correct predictions.

    .. math:: \mathrm{accuracy} = \frac{1}{n} \sum_{i=1}^{n} [\hat y_i = y_i]

    ``y_true`` and ``y_pred`` are ``(n,)`` class labels.
    """
    y_true, y_pred, weights = classification_inputs(y_true, y_pred, sample_weight)
    return weighted_mean((y_true == y_pred).to(float_dtype(y_true.device)), weights, normalize)


def confusion_matrix(y_true, y_pred, *, labels=None, sample_weight=None,
                     normalize=None) -> torch.Tensor:
    r"""The ``(K, K)`` matrix :math:`C_{ij}` = number of samples of class *i* predicted *j*.

    Rows are true classes, columns predicted ones, in the order of ``labels`` (default:
    every label in ``y_true`` or ``y_pred``, sorted). As in scikit-learn, ``labels`` may
    select a subset: samples whose true or predicted label is not in it are left out.
    For two classes ``[[TN, FP], [FN, TP]]``. One ``bincount`` of :math:`K i + j` fills it.
    ``normalize`` divides by the row sums (``"true"``), column sums (``"pred"``) or the
    total (``"all"``); an empty row or column gives zeros.
    """
    if normalize not in (None, "true", "pred", "all"):
        raise ValueError(f"normalize must be None, 'true', 'pred' or 'all', got {normalize!r}")
    y_true, y_pred, weights = classification_inputs(y_true, y_pred, sample_weight)
    present = present_labels(y_true, y_pred)
    P = len(present)
    t, p = encode(y_true, present), encode(y_pred, present)
    cm = bincount(P * t + p, weights, P * P).reshape(P, P)  # rows: true, columns: predicted
    if labels is not None:
        labels = check_label_list("labels", labels, y_true.device)
        if not torch.isin(labels, y_true).any():
            raise ValueError("at least one label in labels must occur in y_true")
        cm = select_labels(select_labels(cm, present, labels).T, present, labels).T
    if normalize is not None:
        cm = cm.to(float_dtype(cm.device))
        total = {"true": cm.sum(1, keepdim=True), "pred": cm.sum(0, keepdim=True),
                 "all": cm.sum()}[normalize]
        cm = torch.nan_to_num(cm / total)
    warn_if_single_label(cm)
    return cm


def _nan_average(values: torch.Tensor, weights: torch.Tensor | None) -> float:
    """Weighted mean ignoring NaN entries (scikit-learn's ``_nanaverage``)."""
    keep = ~torch.isnan(values)
    if not keep.any():
        return math.nan
    values = values[keep]
    if weights is None or weights[keep].sum() == 0:
        return float(values.mean())
    return weighted_mean(values, weights[keep])


def precision_recall_fscore_support(
    y_true, y_pred, *, beta=1.0, labels=None, pos_label=1, average=None,
    warn_for=("precision", "recall", "f-score"), sample_weight=None, zero_division="warn",
):
    r"""Precision, recall, :math:`F_\beta` and support of each class, or their average.

    With :math:`TP, FP, FN` the true positives, false positives and false negatives of a
    class (one against the rest):

    .. math::
        P = \frac{TP}{TP + FP}, \qquad R = \frac{TP}{TP + FN}, \qquad
        F_\beta = \frac{(1 + \beta^2)\, P R}{\beta^2 P + R}
                = \frac{(1 + \beta^2)\, TP}{(1 + \beta^2)\, TP + \beta^2 FN + FP}.

    :math:`F_1` is the harmonic mean of precision and recall. ``average`` chooses:

    * ``"binary"``: the scores of ``pos_label`` only (targets with at most two labels);
    * ``"micro"``: pool :math:`TP, FP, FN` over classes, then divide (for single-label
      multi-class data, micro :math:`P = R = F` = accuracy);
    * ``"macro"``: the unweighted mean over classes -- every class counts the same;
    * ``"weighted"``: the mean weighted by each class's support (number of true samples);
    * ``None``: per-class tensors in the order of ``labels``, and the supports.

    A zero denominator gives ``zero_division``'s value (``"warn"``: 0.0 and an
    ``UndefinedMetricWarning``). Returns ``(precision, recall, fbeta, support)``:
    floats and ``None`` when averaged, else tensors.
    """
    check_fscore_arguments(beta, average, zero_division)
    y_true, y_pred, weights = classification_inputs(y_true, y_pred, sample_weight)
    present = present_labels(y_true, y_pred)
    labels = scored_labels(present, labels, pos_label, average)  # (L,): the rows reported
    P = len(present)
    t, p = encode(y_true, present), encode(y_pred, present)  # (n,) positions in present
    tp = bincount(torch.where(t == p, t, P), weights, P + 1)[:P]
    true_sum = bincount(t, weights, P)  # support: TP + FN
    pred_sum = bincount(p, weights, P)  # predicted: TP + FP
    tp, true_sum, pred_sum = (select_labels(c, present, labels) for c in (tp, true_sum, pred_sum))
    support = true_sum
    if average == "micro":  # pool the counts of all classes
        tp, true_sum, pred_sum = (c.sum(0, keepdim=True) for c in (tp, true_sum, pred_sum))
    tp, true_sum, pred_sum = (c.to(float_dtype(tp.device)) for c in (tp, true_sum, pred_sum))

    undefined = dict(warn_for=warn_for, zero_division=zero_division)  # scikit-learn's rules
    precision = divide(tp, pred_sum, "precision", "predicted", **undefined)
    recall = divide(tp, true_sum, "recall", "true", **undefined)
    if math.isinf(beta):
        fbeta = recall
    elif beta == 0:
        fbeta = precision
    else:
        b2 = beta**2
        fbeta = divide((1 + b2) * tp, b2 * true_sum + pred_sum, "f-score",
                       "true nor predicted", **undefined)
    if average is None:
        return precision, recall, fbeta, support
    class_weight = true_sum if average == "weighted" else None
    return (_nan_average(precision, class_weight), _nan_average(recall, class_weight),
            _nan_average(fbeta, class_weight), None)


def fbeta_score(y_true, y_pred, *, beta, labels=None, pos_label=1, average="binary",
                sample_weight=None, zero_division="warn"):
    r""":math:`F_\beta = (1 + \beta^2) P R / (\beta^2 P + R)`: recall weighs :math:`\beta`
    times as much as precision. See :func:`precision_recall_fscore_support`."""
    _, _, f, _ = precision_recall_fscore_support(
        y_true, y_pred, beta=beta, labels=labels, pos_label=pos_label, average=average,
        warn_for=("f-score",), sample_weight=sample_weight, zero_division=zero_division)
    return f


def f1_score(y_true, y_pred, *, labels=None, pos_label=1, average="binary",
             sample_weight=None, zero_division="warn"):
    r""":math:`F_1 = 2PR/(P + R) = 2TP / (2TP + FP + FN)`, the harmonic mean of precision
    and recall. See :func:`precision_recall_fscore_support`."""
    return fbeta_score(y_true, y_pred, beta=1.0, labels=labels, pos_label=pos_label,
                       average=average, sample_weight=sample_weight,
                       zero_division=zero_division)


def precision_score(y_true, y_pred, *, labels=None, pos_label=1, average="binary",
                    sample_weight=None, zero_division="warn"):
    r"""Precision :math:`TP / (TP + FP)`: how many predicted positives are positive.
    See :func:`precision_recall_fscore_support`."""
    p, _, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, pos_label=pos_label, average=average,
        warn_for=("precision",), sample_weight=sample_weight, zero_division=zero_division)
    return p


def recall_score(y_true, y_pred, *, labels=None, pos_label=1, average="binary",
                 sample_weight=None, zero_division="warn"):
    r"""Recall (true-positive rate) :math:`TP / (TP + FN)`: how many positives are found.
    See :func:`precision_recall_fscore_support`."""
    _, r, _, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, pos_label=pos_label, average=average,
        warn_for=("recall",), sample_weight=sample_weight, zero_division=zero_division)
    return r
