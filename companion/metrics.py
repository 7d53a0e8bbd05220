"""Evaluation metrics on tensors, matched to scikit-learn (book: chapter 5, "Evaluating models").

Every function here has scikit-learn's name, arguments, defaults and edge-case behaviour
:cite:p:`pedregosa2011scikit`, and ``tests/test_metrics.py`` checks it against
scikit-learn on hundreds of random cases in float64. What differs is the machinery:

* **Inputs** are torch tensors on any device; NumPy arrays and lists are accepted too.
  Class labels are integers (or booleans, or floats with integer values); scores and
  probabilities are real numbers. Work happens on the device of the first tensor given.
* **Outputs** are Python floats for single numbers and float64 tensors on the input's
  device for arrays (integer counts stay int64).
* **Vectorised**: confusion matrices come from one ``bincount`` of ``n_classes * true +
  pred``; ROC and precision-recall curves from one sort and one cumulative sum.
  Python loops run over classes or bootstrap resamples, never over samples.
* **Warnings** follow scikit-learn: where a metric is undefined (a precision with no
  predicted positives, an AUC with one class present) and ``zero_division="warn"``, the
  value is 0.0 (or NaN for curves and AUCs) and an ``UndefinedMetricWarning`` says why
  -- scikit-learn's own class, also importable from here, so existing warning filters
  apply. Pass ``zero_division=0.0``, ``1.0`` or ``np.nan`` to choose the value silently.
* **Bad input** -- lengths that differ, NaN or infinite scores, probabilities outside
  ``[0, 1]``, a label that ``labels`` does not declare (``log_loss``, ``roc_auc_score``),
  an unknown ``pos_label`` -- raises ``ValueError`` or ``TypeError`` naming the argument.
* **Deliberate differences**: class labels are numbers (no strings); multilabel targets
  and ``multi_class="ovo"`` are not implemented; empty inputs, repeated ``labels``,
  negative sample weights and weights that sum to zero raise; probabilities are
  computed in float64 whatever their input type.

Beyond scikit-learn: :func:`calibration_bins` and :func:`expected_calibration_error`
:cite:p:`naeini2015obtaining,guo2017calibration`, :func:`fit_temperature`,
:func:`perplexity` for language models (whose mean cross-entropy on a text
:func:`companion.train.language_model_loss` measures), and :func:`bootstrap_ci`
:cite:p:`efron1979bootstrap` for the uncertainty of any metric.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import UndefinedMetricWarning

__all__ = [
    "accuracy_score", "confusion_matrix",
    "precision_recall_fscore_support", "fbeta_score", "f1_score", "precision_score",
    "recall_score", "roc_curve", "auc", "roc_auc_score", "precision_recall_curve",
    "average_precision_score", "log_loss", "brier_score_loss", "calibration_curve",
    "calibration_bins", "expected_calibration_error", "fit_temperature", "perplexity",
    "BootstrapResult", "bootstrap_ci",
]

# =========================================================================== checking inputs


def _device(*values) -> torch.device:
    """The device of the first tensor among ``values`` (the CPU if there is none)."""
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _float(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64


def _tensor(x, name: str, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    if isinstance(x, (np.ndarray, list, tuple)):
        array = np.asarray(x)
        if array.dtype.kind not in "biuf":
            raise TypeError(f"{name} must hold numbers, got an array of dtype {array.dtype}")
        return torch.as_tensor(array, device=device)
    raise TypeError(f"{name} must be a torch.Tensor, NumPy array or list, "
                    f"got {type(x).__name__}")


def _check_finite(t: torch.Tensor, name: str) -> None:
    # one cheap reduction first: the sum is finite unless some entry is not (or it overflows)
    if not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinity")


def _labels(y, name: str, device: torch.device) -> torch.Tensor:
    """Class labels as a non-empty 1-D int64 tensor."""
    t = _tensor(y, name, device)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D class labels, got shape {tuple(t.shape)} "
                         "(multilabel targets are not supported)")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; at least one sample is needed")
    if t.is_floating_point():
        _check_finite(t, name)
        if (t != t.round()).any():
            bad = t[t != t.round()][0].item()
            raise ValueError(f"{name} must hold class labels, got the non-integer value {bad}")
    elif t.is_complex():
        raise TypeError(f"{name} must hold class labels, got dtype {t.dtype}")
    return t.long()


def _scores(s, name: str, device: torch.device, ndims=(1,), finite=True) -> torch.Tensor:
    """Scores or probabilities as a float64 tensor with ``ndim`` in ``ndims``."""
    t = _tensor(s, name, device)
    if t.is_complex():
        raise TypeError(f"{name} must be real, got dtype {t.dtype}")
    t = t.to(_float(device))
    if t.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimension(s), "
                         f"got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; at least one sample is needed")
    if finite:
        _check_finite(t, name)
    return t


def _weights(w, n: int, device: torch.device) -> torch.Tensor | None:
    if w is None:
        return None
    w = _scores(w, "sample_weight", device)
    if len(w) != n:
        raise ValueError(f"sample_weight has {len(w)} entries for {n} samples")
    if (w < 0).any():
        raise ValueError("sample_weight must be non-negative")
    if w.sum() == 0:
        raise ValueError("sample_weight sums to zero")
    return w


def _same_length(**arrays) -> int:
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError("inputs have different lengths: "
                         + ", ".join(f"{k}={v}" for k, v in lengths.items()))
    return next(iter(lengths.values()))


def _label_list(labels, name: str, device: torch.device) -> torch.Tensor:
    t = _labels(labels, name, device)
    if len(torch.unique(t)) != len(t):
        raise ValueError(f"{name} must not repeat a label, got {t.tolist()}")
    return t


def _unique(y: torch.Tensor) -> torch.Tensor:
    """``torch.unique(y)`` (sorted) for int64 labels; by counting when their range is small."""
    low, high = int(y.min()), int(y.max())
    shift = min(low, 0)
    if high - shift > 4 * len(y) + 1024:
        return torch.unique(y)
    return torch.nonzero(torch.bincount(y - shift if shift else y)).flatten() + shift


def _encode(y: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Position of each label of ``y`` in the sorted ``present``, which holds all of them."""
    if torch.equal(present, torch.arange(len(present), device=present.device)):
        return y  # labels 0, 1, ..., K-1 are their own positions
    return torch.searchsorted(present, y)


def _select(counts: torch.Tensor, present: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rows of ``counts`` (indexed like ``present``) for ``labels``; zeros for absent labels."""
    slot = torch.searchsorted(present, labels).clamp(max=len(present) - 1)
    found = present[slot] == labels
    return counts[slot] * found.reshape(-1, *[1] * (counts.ndim - 1))


def _bincount(index: torch.Tensor, weights: torch.Tensor | None, minlength: int) -> torch.Tensor:
    """Counts (int64) or sums of ``weights`` per index; deterministic on CUDA as well."""
    if weights is None:
        return torch.bincount(index, minlength=minlength)
    out = torch.zeros(minlength, dtype=weights.dtype, device=weights.device)
    return out.index_put_((index,), weights, accumulate=True)


def _mean(values: torch.Tensor, weights: torch.Tensor | None, normalize=True) -> float:
    """``np.average`` (or the weighted sum with ``normalize=False``)."""
    if weights is None:
        return float(values.mean() if normalize else values.sum())
    total = (values * weights).sum()
    return float(total / weights.sum() if normalize else total)


def _classification_inputs(y_true, y_pred, sample_weight):
    device = _device(y_true, y_pred, sample_weight)
    y_true, y_pred = _labels(y_true, "y_true", device), _labels(y_pred, "y_pred", device)
    n = _same_length(y_true=y_true, y_pred=y_pred)
    return y_true, y_pred, _weights(sample_weight, n, device)


def _present(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """The sorted labels that occur in ``y_true`` or ``y_pred``."""
    return torch.unique(torch.cat([_unique(y_true), _unique(y_pred)]))


# =========================================================================== counting

def accuracy_score(y_true, y_pred, *, normalize=True, sample_weight=None) -> float:
    r"""Fraction (or, with ``normalize=False``, number) of correct predictions.

    .. math:: \mathrm{accuracy} = \frac{1}{n} \sum_{i=1}^{n} [\hat y_i = y_i]

    ``y_true`` and ``y_pred`` are ``(n,)`` class labels.
    """
    y_true, y_pred, weights = _classification_inputs(y_true, y_pred, sample_weight)
    return _mean((y_true == y_pred).to(_float(y_true.device)), weights, normalize)


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
    y_true, y_pred, weights = _classification_inputs(y_true, y_pred, sample_weight)
    present = _present(y_true, y_pred)
    P = len(present)
    t, p = _encode(y_true, present), _encode(y_pred, present)
    cm = _bincount(P * t + p, weights, P * P).reshape(P, P)  # rows: true, columns: predicted
    if labels is not None:
        labels = _label_list(labels, "labels", y_true.device)
        if not torch.isin(labels, y_true).any():
            raise ValueError("at least one label in labels must occur in y_true")
        cm = _select(_select(cm, present, labels).T, present, labels).T
    if normalize is not None:
        cm = cm.to(_float(cm.device))
        total = {"true": cm.sum(1, keepdim=True), "pred": cm.sum(0, keepdim=True),
                 "all": cm.sum()}[normalize]
        cm = torch.nan_to_num(cm / total)
    if cm.shape == (1, 1):
        warnings.warn("A single label was found in y_true and y_pred. For the confusion "
                      "matrix to have the correct shape, pass all known labels as labels.",
                      UserWarning, stacklevel=2)
    return cm


# =========================================================================== precision, recall, F

_AVERAGES = (None, "micro", "macro", "weighted", "binary")


def _zero_division_value(zero_division) -> float:
    if isinstance(zero_division, str) and zero_division == "warn":
        return 0.0
    if isinstance(zero_division, (int, float)) and not isinstance(zero_division, bool):
        if zero_division in (0, 1):
            return float(zero_division)
        if math.isnan(zero_division):
            return math.nan
    raise ValueError(f'zero_division must be "warn", 0.0, 1.0 or np.nan, got {zero_division!r}')


def _divide(numerator, denominator, metric, modifier, average, warn_for, zero_division):
    """``numerator / denominator``; where the denominator is 0, ``zero_division``'s value."""
    undefined = denominator == 0
    result = numerator / torch.where(undefined, 1, denominator)
    if undefined.any():
        result = torch.where(undefined, _zero_division_value(zero_division), result)
        if zero_division == "warn" and metric in warn_for:
            where = "due to" if len(result) == 1 else "in labels with"
            warnings.warn(f"{metric.capitalize()} is ill-defined and being set to 0.0 {where} "
                          f"no {modifier} samples. Use `zero_division` parameter to control "
                          "this behavior.", UndefinedMetricWarning, stacklevel=3)
    return result


def _nan_average(values: torch.Tensor, weights: torch.Tensor | None) -> float:
    """Weighted mean ignoring NaN entries (scikit-learn's ``_nanaverage``)."""
    keep = ~torch.isnan(values)
    if not keep.any():
        return math.nan
    values = values[keep]
    if weights is None or weights[keep].sum() == 0:
        return float(values.mean())
    return _mean(values, weights[keep])


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
    _zero_division_value(zero_division)
    if not isinstance(beta, numbers.Real) or not beta >= 0:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    if average not in _AVERAGES:
        raise ValueError(f"average must be one of {_AVERAGES}, got {average!r} "
                         "(multilabel averages such as 'samples' are not supported)")
    y_true, y_pred, weights = _classification_inputs(y_true, y_pred, sample_weight)
    present, device = _present(y_true, y_pred), y_true.device
    if average == "binary":
        if len(present) > 2:
            raise ValueError("Target is multiclass but average='binary'; choose average from "
                             f"{[a for a in _AVERAGES if a != 'binary']}")
        positive = _check_pos_label(pos_label)
        if positive is None or (len(present) == 2 and not (present == positive).any()):
            raise ValueError(f"pos_label={pos_label!r} is not a valid label; the labels "
                             f"present are {present.tolist()}")
        labels = torch.tensor([positive], device=device)
    else:
        if pos_label not in (None, 1):
            warnings.warn(f"pos_label={pos_label!r} is ignored when average={average!r}; use "
                          "labels=[pos_label] to score a single class", UserWarning, stacklevel=2)
        labels = present if labels is None else _label_list(labels, "labels", device)
    P = len(present)
    t, p = _encode(y_true, present), _encode(y_pred, present)
    tp = _bincount(torch.where(t == p, t, P), weights, P + 1)[:P]
    true_sum = _bincount(t, weights, P)  # support: TP + FN
    pred_sum = _bincount(p, weights, P)  # predicted: TP + FP
    tp, true_sum, pred_sum = (_select(c, present, labels) for c in (tp, true_sum, pred_sum))
    support = true_sum
    if average == "micro":  # pool the counts of all classes
        tp, true_sum, pred_sum = (c.sum(0, keepdim=True) for c in (tp, true_sum, pred_sum))
    tp, true_sum, pred_sum = (c.to(_float(device)) for c in (tp, true_sum, pred_sum))

    args = (average, warn_for, zero_division)
    precision = _divide(tp, pred_sum, "precision", "predicted", *args)
    recall = _divide(tp, true_sum, "recall", "true", *args)
    if math.isinf(beta):
        fbeta = recall
    elif beta == 0:
        fbeta = precision
    else:
        b2 = beta**2
        fbeta = _divide((1 + b2) * tp, b2 * true_sum + pred_sum, "f-score",
                        "true nor predicted", *args)
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


# =========================================================================== threshold curves


def _ranking_inputs(y_true, y_score, sample_weight, score_dims=(1,)):
    device = _device(y_true, y_score, sample_weight)
    y_true = _labels(y_true, "y_true", device)
    y_score = _scores(y_score, "y_score", device, score_dims)
    n = _same_length(y_true=y_true, y_score=y_score)
    return y_true, y_score, _weights(sample_weight, n, device)


def _check_pos_label(pos_label) -> int | None:
    if pos_label is None or isinstance(pos_label, (numbers.Integral, np.bool_)):
        return None if pos_label is None else int(pos_label)
    if isinstance(pos_label, numbers.Real) and float(pos_label).is_integer():
        return int(pos_label)
    raise TypeError(f"pos_label must be an integer class label or None, got {pos_label!r}")


def _positive(y_true: torch.Tensor, pos_label) -> torch.Tensor:
    """``y_true == pos_label``; without ``pos_label`` the labels must be {0, 1} or {-1, 1}."""
    classes = _unique(y_true).tolist()
    pos_label = _check_pos_label(pos_label)
    if pos_label is None:
        if len(classes) > 2:
            raise ValueError(f"y_true has {len(classes)} classes; pass pos_label to choose the "
                             "positive one")
        if classes not in ([0, 1], [-1, 1], [0], [-1], [1]):
            raise ValueError(f"y_true takes values {classes} and pos_label is not specified: "
                             "either make y_true take values in {0, 1} or {-1, 1} or pass "
                             "pos_label explicitly")
        pos_label = 1
    return y_true == pos_label


def _counts_at_thresholds(positive, y_score, weights):
    r"""For each distinct score :math:`s`, from the highest down: the (weighted) numbers of
    negatives and positives scored :math:`\ge s` -- the FP and TP of the rule "positive
    if score >= s". One stable sort and one cumulative sum."""
    if weights is not None:  # zero weights must not create thresholds
        keep = weights != 0
        positive, y_score, weights = positive[keep], y_score[keep], weights[keep]
    y_score, order = torch.sort(y_score, descending=True, stable=True)
    positive = positive[order]
    last_of_each_score = torch.cat([torch.nonzero(torch.diff(y_score)).flatten(),
                                    torch.tensor([len(y_score) - 1], device=y_score.device)])
    dtype = _float(y_score.device)
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
    rates = []
    for counts, kind, rate in ((fps, "negative", "false"), (tps, "positive", "true")):
        if counts[-1] <= 0:
            warnings.warn(f"No {kind} samples in y_true, {rate} positive value should be "
                          "meaningless", UndefinedMetricWarning, stacklevel=3)
            rates.append(torch.full_like(counts, math.nan))
        else:
            rates.append(counts / counts[-1])
    return rates[0], rates[1], thresholds


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
    y_true, y_score, weights = _ranking_inputs(y_true, y_score, sample_weight)
    return _roc(_positive(y_true, pos_label), y_score, weights, drop_intermediate)


def auc(x, y) -> float:
    r"""Area under the curve through the points ``(x, y)`` by the trapezoidal rule,
    :math:`\sum_k (x_{k+1} - x_k)(y_k + y_{k+1})/2`; ``x`` must be monotonic."""
    device = _device(x, y)
    x = _scores(x, "x", device, finite=False)
    y = _scores(y, "y", device, finite=False)
    _same_length(x=x, y=y)
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
    counted = positive if weights is None else positive[weights != 0]
    if counted.all() or not counted.any():
        warnings.warn("Only one class is present in y_true. ROC AUC score is not defined "
                      "in that case.", UndefinedMetricWarning, stacklevel=3)
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
        return _mean(torch.where(support == 0, 0.0, per_class), support)
    return float(per_class.mean())


def _check_probability_labels(y_true, labels, n_columns, device):
    """The sorted classes that the columns of a probability matrix stand for."""
    if labels is None:
        classes = _unique(y_true)
        if len(classes) != n_columns:
            raise ValueError(f"y_true has {len(classes)} classes but y_score has {n_columns} "
                             "columns; pass labels to name the columns")
        return classes
    classes = _label_list(labels, "labels", device)
    if not torch.equal(classes, torch.sort(classes).values):
        raise ValueError("labels must be sorted: column k of y_score is the k-th smallest label")
    if len(classes) != n_columns:
        raise ValueError(f"labels has {len(classes)} entries but y_score has {n_columns} columns")
    if not torch.isin(y_true, classes).all():
        raise ValueError("y_true contains labels not in labels: "
                         f"{torch.unique(y_true[~torch.isin(y_true, classes)]).tolist()}")
    return classes


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
    y_true, y_score, weights = _ranking_inputs(y_true, y_score, sample_weight, (1, 2))
    classes = _unique(y_true)
    if len(classes) > 2 or (y_score.ndim == 2 and y_score.shape[1] > 2):
        if max_fpr is not None and max_fpr != 1:
            raise ValueError("max_fpr (a partial AUC) is only available for binary targets")
        if multi_class == "ovo":
            raise NotImplementedError("multi_class='ovo' is not implemented; use 'ovr'")
        if multi_class != "ovr":
            raise ValueError("y_true has more than two classes: pass multi_class='ovr'")
        if average not in ("micro", "macro", "weighted", None):
            raise ValueError(f"average must be 'micro', 'macro', 'weighted' or None for "
                             f"multi-class targets, got {average!r}")
        if y_score.ndim != 2:
            raise ValueError("y_score must be (n_samples, n_classes) probabilities when "
                             f"y_true has more than two classes, got shape {tuple(y_score.shape)}")
        if not torch.allclose(y_score.sum(1), torch.ones_like(y_score[:, 0])):
            raise ValueError("y_score rows must be probabilities that sum to one over classes")
        classes = _check_probability_labels(y_true, labels, y_score.shape[1], y_true.device)
        onehot = y_true[:, None] == classes[None, :]  # (n, K)
        return _one_vs_rest(_binary_roc_auc, onehot, y_score, weights, average)
    if y_score.ndim != 1:
        raise ValueError("for binary y_true, y_score must be (n_samples,): the score of the "
                         f"greater label; got shape {tuple(y_score.shape)}")
    if max_fpr is not None and not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr!r}")
    return _binary_roc_auc(y_true == classes[-1], y_score, weights, max_fpr)


def _precision_recall(positive, y_score, weights, drop_intermediate=False):
    fps, tps, thresholds = _counts_at_thresholds(positive, y_score, weights)
    if drop_intermediate and len(fps) > 2:  # keep the first and last point of each recall
        true = torch.ones(1, dtype=torch.bool, device=fps.device)
        keep = torch.cat([true, (torch.diff(tps[:-1]) != 0) | (torch.diff(tps[1:]) != 0), true])
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    predicted = tps + fps
    precision = torch.where(predicted != 0, tps / predicted, 0.0)  # TP / (TP + FP)
    recall = tps / tps[-1] if tps[-1] != 0 else torch.ones_like(tps)  # TP / P
    if tps[-1] == 0:
        warnings.warn("No positive class found in y_true, recall is set to one for all "
                      "thresholds.", UserWarning, stacklevel=3)
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
    y_true, y_score, weights = _ranking_inputs(y_true, y_score, sample_weight)
    return _precision_recall(_positive(y_true, pos_label), y_score, weights, drop_intermediate)


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
    y_true, y_score, weights = _ranking_inputs(y_true, y_score, sample_weight, (1, 2))
    if average not in ("micro", "macro", "weighted", None):
        raise ValueError(f"average must be 'micro', 'macro', 'weighted' or None, got {average!r}")
    classes = _unique(y_true)
    if len(classes) <= 2:
        pos_label = _check_pos_label(pos_label)
        if len(classes) == 2 and not (classes == pos_label).any():
            raise ValueError(f"pos_label={pos_label!r} is not a valid label; y_true holds "
                             f"{classes.tolist()}")
        if y_score.ndim != 1:
            raise ValueError(f"for binary y_true, y_score must be 1-D, got {tuple(y_score.shape)}")
        return _binary_average_precision(y_true == pos_label, y_score, weights)
    if pos_label != 1:
        raise ValueError("pos_label is fixed to 1 for multi-class y_true; do not set it")
    if y_score.shape != (len(y_true), len(classes)):
        raise ValueError(f"y_score must be (n_samples, n_classes) = {(len(y_true), len(classes))}"
                         f" since y_true has {len(classes)} classes, got {tuple(y_score.shape)}")
    onehot = y_true[:, None] == classes[None, :]
    return _one_vs_rest(_binary_average_precision, onehot, y_score, weights, average)


# =========================================================================== probabilities


def _check_unit_interval(p: torch.Tensor, name: str) -> None:
    if p.max() > 1:
        raise ValueError(f"{name} contains values greater than 1: {p.max().item()}")
    if p.min() < 0:
        raise ValueError(f"{name} contains values lower than 0: {p.min().item()}")


def _input_eps(x) -> float:
    """Machine epsilon of the input's floating type (float64 for anything else)."""
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return torch.finfo(dtype).eps
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def _probability_inputs(y_true, y_proba, sample_weight, labels):
    """``(onehot, proba, weights, eps)``, both ``(n, K)``, for the multi-class losses;
    ``eps`` is the machine epsilon of the probabilities as given."""
    eps = _input_eps(y_proba)
    device = _device(y_true, y_proba, sample_weight)
    y_true = _labels(y_true, "y_true", device)
    proba = _scores(y_proba, "y_proba", device, (1, 2))
    _check_unit_interval(proba, "y_proba")
    n = _same_length(y_true=y_true, y_proba=proba)
    weights = _weights(sample_weight, n, device)
    if labels is None:
        classes = _unique(y_true)
        if len(classes) == 1:
            raise ValueError(f"y_true contains only one label ({classes.item()}); pass all "
                             "expected class labels as labels")
    else:
        given = _label_list(labels, "labels", device)
        classes = torch.sort(given).values
        if not torch.equal(classes, given):
            warnings.warn(f"labels {given.tolist()} are not sorted; the columns of y_proba are "
                          f"taken to be the sorted labels {classes.tolist()}", UserWarning,
                          stacklevel=3)
        if not torch.isin(y_true, classes).all():
            extra = torch.unique(y_true[~torch.isin(y_true, classes)]).tolist()
            raise ValueError(f"y_true contains values {extra} not in labels {given.tolist()}")
        if len(classes) == 1:
            raise ValueError(f"labels must contain at least two labels, got {given.tolist()}")
    if proba.ndim == 1:
        proba = proba[:, None]
    if proba.shape[1] == 1:  # the probability of the positive (greater) class
        proba = torch.cat([1 - proba, proba], dim=1)
    if not torch.all((proba.sum(1) - 1).abs() <= 1e-8 + math.sqrt(eps)):
        warnings.warn("The y_proba values do not sum to one. Make sure to pass probabilities.",
                      UserWarning, stacklevel=3)
    if len(classes) != proba.shape[1]:
        raise ValueError(f"y_true has {len(classes)} classes but y_proba has {proba.shape[1]} "
                         "columns; pass labels to name them")
    return (y_true[:, None] == classes[None, :]).to(proba.dtype), proba, weights, eps


def log_loss(y_true, y_proba, *, normalize=True, sample_weight=None, labels=None) -> float:
    r"""Cross-entropy of predicted probabilities, in nats per sample:

    .. math:: -\frac{1}{n} \sum_{i=1}^{n} \log \hat p_{i, y_i}

    ``y_proba`` is ``(n, K)`` (columns in sorted label order) or ``(n,)``, the probability
    of the greater of two labels. Probabilities are clipped to :math:`[\epsilon, 1 -
    \epsilon]`, the machine epsilon of their floating type, so that a confident mistake
    costs 36 nats in float64 (16 in float32), not infinity.
    """
    onehot, proba, weights, eps = _probability_inputs(y_true, y_proba, sample_weight, labels)
    loss = -torch.xlogy(onehot, proba.clamp(eps, 1 - eps)).sum(1)
    return _mean(loss, weights, normalize)


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
    device = _device(y_true, y_proba, sample_weight)
    proba = _scores(y_proba, "y_proba", device, (1, 2))
    if proba.ndim == 1 or proba.shape[1] == 1:
        y = _labels(y_true, "y_true", device)
        proba = proba.flatten()
        weights = _weights(sample_weight, _same_length(y_true=y, y_proba=proba), device)
        classes = _unique(y)
        if len(classes) > 2:
            raise ValueError(f"y_true has {len(classes)} classes but y_proba is 1-D (binary); "
                             "pass (n_samples, n_classes) probabilities")
        _check_unit_interval(proba, "y_proba")
        pos_label = _check_pos_label(pos_label)
        if pos_label is None:
            known = classes.tolist() in ([0, 1], [-1, 1], [0], [-1], [1])
            pos_label = 1 if known else classes[-1].item()
        positive = (y == pos_label).to(proba.dtype)
        onehot = torch.stack([1 - positive, positive], 1)
        proba = torch.stack([1 - proba, proba], 1)
    else:
        onehot, proba, weights, _ = _probability_inputs(y_true, y_proba, sample_weight, labels)
    score = _mean(((onehot - proba) ** 2).sum(1), weights)
    if scale_by_half == "auto":
        scale_by_half = proba.shape[1] < 3
    return 0.5 * score if scale_by_half else score


def _bin_edges(confidence: torch.Tensor, n_bins: int, strategy: str) -> torch.Tensor:
    """``n_bins + 1`` edges on [0, 1]: equal widths, or equal counts (quantiles)."""
    if not isinstance(n_bins, int) or isinstance(n_bins, bool) or n_bins < 1:
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
    hits = _bincount(bin_id, hit.to(confidence.dtype), n_bins)
    confidence_sum = _bincount(bin_id, confidence, n_bins)
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
    device = _device(y_true, y_prob)
    y_true = _labels(y_true, "y_true", device)
    y_prob = _scores(y_prob, "y_prob", device)
    _same_length(y_true=y_true, y_prob=y_prob)
    if y_prob.min() < 0 or y_prob.max() > 1:
        raise ValueError("y_prob has values outside [0, 1]")
    if len(_unique(y_true)) > 2:
        raise ValueError("calibration_curve supports binary targets only")
    prob_true, prob_pred, _ = _bins(_positive(y_true, pos_label), y_prob, n_bins, strategy)
    return prob_true, prob_pred


def calibration_bins(y_true, y_proba, *, n_bins=15, strategy="uniform"):
    r"""Per-bin accuracy, mean confidence and count, for a reliability diagram.

    ``y_proba`` ``(n, K)``: the *top-label* diagram of :cite:t:`guo2017calibration` --
    confidence :math:`\max_k \hat p_{ik}`, a hit when the arg-max is ``y_true`` (class
    indices ``0..K-1``). ``y_proba`` ``(n,)``: a binary diagram, confidence
    :math:`\hat p_i` and hit :math:`y_i = 1` (as :func:`calibration_curve`).
    Returns ``(accuracy, confidence, count)`` for the non-empty bins.
    """
    device = _device(y_true, y_proba)
    y_true = _labels(y_true, "y_true", device)
    proba = _scores(y_proba, "y_proba", device, (1, 2))
    _same_length(y_true=y_true, y_proba=proba)
    _check_unit_interval(proba, "y_proba")
    if proba.ndim == 1:
        return _bins(_positive(y_true, None), proba, n_bins, strategy)
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
    device = _device(logits, y_true)
    z = _scores(logits, "logits", device, (2,))
    y = _labels(y_true, "y_true", device)
    _same_length(logits=z, y_true=y)
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


# =========================================================================== language models


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


# =========================================================================== uncertainty


@dataclass(frozen=True)
class BootstrapResult:
    """A metric's value and its bootstrap confidence interval (:func:`bootstrap_ci`).

    ``distribution`` holds the metric on each resample, a ``(n_resamples,)`` tensor on
    the inputs' device.
    """

    estimate: float
    low: float
    high: float
    confidence_level: float
    distribution: torch.Tensor

    @property
    def standard_error(self) -> float:
        """Standard deviation of the bootstrap distribution."""
        return float(self.distribution.std())


def bootstrap_ci(metric: Callable[..., float], *arrays, n_resamples: int = 1000,
                 confidence_level: float = 0.95,
                 generator: torch.Generator | None = None) -> BootstrapResult:
    r"""Percentile bootstrap confidence interval of ``metric(*arrays)``.

    Draw ``n_resamples`` samples of the ``n`` rows with replacement -- the same rows from
    every array, so that pairs such as (labels, scores of model A, scores of model B)
    stay together -- evaluate the metric on each, and report the
    :math:`\alpha/2` and :math:`1 - \alpha/2` quantiles of those values
    (:math:`\alpha = 1 -` ``confidence_level``), interpolated as ``np.percentile`` does
    :cite:p:`efron1979bootstrap`.
    For a difference between two models, pass a metric that returns the difference:
    the interval is then *paired* -- both models are scored on the same resampled rows,
    so the correlation between their errors is accounted for. When the two models'
    results are positively correlated (as on a shared test set they usually are), the
    paired interval is narrower than one built from two separate intervals.
    ``generator`` (a CPU ``torch.Generator``) makes the resamples repeatable.
    """
    if not arrays:
        raise ValueError("give at least one array to resample")
    if not isinstance(n_resamples, int) or n_resamples < 2:
        raise ValueError(f"n_resamples must be an int >= 2, got {n_resamples!r}")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level!r}")
    device = _device(*arrays)
    tensors = [_tensor(a, f"arrays[{k}]", device) for k, a in enumerate(arrays)]
    n = _same_length(**{f"arrays[{k}]": t for k, t in enumerate(tensors)})
    if n == 0:
        raise ValueError("the arrays are empty")
    values = []
    for _ in range(n_resamples):
        rows = torch.randint(n, (n,), generator=generator).to(device)
        values.append(float(metric(*(t[rows] for t in tensors))))
    distribution = torch.tensor(values, dtype=torch.float64)
    if torch.isnan(distribution).any():
        raise ValueError(f"metric is undefined (NaN) on {int(torch.isnan(distribution).sum())} "
                         "of the resamples; the sample is too small for this metric")
    alpha = 1 - confidence_level
    low, high = torch.quantile(distribution, torch.tensor([alpha / 2, 1 - alpha / 2],
                                                          dtype=torch.float64))
    return BootstrapResult(float(metric(*tensors)), float(low), float(high), confidence_level,
                           distribution.to(device, _float(device)))
