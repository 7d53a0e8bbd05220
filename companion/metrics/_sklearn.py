"""scikit-learn's edge cases, in one place apart from the formulas (private module).

The metric modules compute the formulas of chapter 5; this module makes them behave as
:mod:`sklearn.metrics` does where a formula is undefined or an argument is ambiguous:
the value returned for a zero denominator (``zero_division``), the wording and class of
every warning (``UndefinedMetricWarning``, scikit-learn's own class, so that existing
warning filters apply), which label is positive, and which label sets each average
accepts. ``tests/test_metrics.py`` checks every branch against scikit-learn.
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from companion._validate import (
    check_label_list,
    check_labels,
    check_real,
    check_same_length,
    check_sample_weight,
    check_unit_interval,
    device_of,
    is_real,
)

from ._common import unique


def undefined_metric_warning() -> type[Warning]:
    """scikit-learn's ``UndefinedMetricWarning``, imported on first use: importing
    scikit-learn takes about a second, which a caller that never warns need not pay."""
    from sklearn.exceptions import UndefinedMetricWarning

    return UndefinedMetricWarning


AVERAGES = (None, "micro", "macro", "weighted", "binary")
#: Label sets for which the positive class is 1 without a ``pos_label``.
_DEFAULT_POSITIVE = ([0, 1], [-1, 1], [0], [-1], [1])


# --------------------------------------------------------------------------- precision, recall, F


def zero_division_value(zero_division) -> float:
    """The value of an undefined ratio: 0.0 for ``"warn"``, else 0.0, 1.0 or NaN as given."""
    if isinstance(zero_division, str) and zero_division == "warn":
        return 0.0
    if is_real(zero_division):
        if zero_division in (0, 1):
            return float(zero_division)
        if math.isnan(zero_division):
            return math.nan
    raise ValueError(f'zero_division must be "warn", 0.0, 1.0 or np.nan, got {zero_division!r}')


def check_fscore_arguments(beta, average, zero_division) -> None:
    """``beta >= 0``, a known ``average`` and a valid ``zero_division``."""
    zero_division_value(zero_division)
    if not isinstance(beta, numbers.Real) or not beta >= 0:
        raise ValueError(f"beta must be a number >= 0, got {beta!r}")
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r} "
                         "(multilabel averages such as 'samples' are not supported)")


def scored_labels(present: torch.Tensor, labels, pos_label, average) -> torch.Tensor:
    """The labels whose scores are reported: ``[pos_label]`` for ``average="binary"``
    (at most two labels present), else ``labels`` (default: every label present)."""
    if average == "binary":
        if len(present) > 2:
            raise ValueError("Target is multiclass but average='binary'; choose average from "
                             f"{[a for a in AVERAGES if a != 'binary']}")
        positive = check_pos_label(pos_label)
        if positive is None or (len(present) == 2 and not (present == positive).any()):
            raise ValueError(f"pos_label={pos_label!r} is not a valid label; the labels "
                             f"present are {present.tolist()}")
        return torch.tensor([positive], device=present.device)
    if pos_label not in (None, 1):
        warnings.warn(f"pos_label={pos_label!r} is ignored when average={average!r}; use "
                      "labels=[pos_label] to score a single class", UserWarning, stacklevel=3)
    return present if labels is None else check_label_list("labels", labels, present.device)


def divide(numerator, denominator, metric, modifier, warn_for, zero_division):
    """``numerator / denominator``; where the denominator is 0, ``zero_division``'s value
    (with ``"warn"``: 0.0 and an ``UndefinedMetricWarning`` if ``metric`` is in ``warn_for``)."""
    undefined = denominator == 0
    result = numerator / torch.where(undefined, 1, denominator)
    if undefined.any():
        result = torch.where(undefined, zero_division_value(zero_division), result)
        if zero_division == "warn" and metric in warn_for:
            where = "due to" if len(result) == 1 else "in labels with"
            warnings.warn(f"{metric.capitalize()} is ill-defined and being set to 0.0 {where} "
                          f"no {modifier} samples. Use `zero_division` parameter to control "
                          "this behavior.", undefined_metric_warning(), stacklevel=3)
    return result


def warn_if_single_label(cm: torch.Tensor) -> None:
    """scikit-learn's warning for a ``(1, 1)`` confusion matrix."""
    if cm.shape == (1, 1):
        warnings.warn("A single label was found in y_true and y_pred. For the confusion "
                      "matrix to have the correct shape, pass all known labels as labels.",
                      UserWarning, stacklevel=3)


# --------------------------------------------------------------------------- positive class


def check_pos_label(pos_label) -> int | None:
    """``pos_label`` as an int (a float with an integer value is accepted), or ``None``."""
    if pos_label is None or isinstance(pos_label, (numbers.Integral, np.bool_)):
        return None if pos_label is None else int(pos_label)
    if isinstance(pos_label, numbers.Real) and float(pos_label).is_integer():
        return int(pos_label)
    raise TypeError(f"pos_label must be an integer class label or None, got {pos_label!r}")


def positive_class(y_true: torch.Tensor, pos_label) -> torch.Tensor:
    """``y_true == pos_label``; without ``pos_label`` the labels must be {0, 1} or {-1, 1}."""
    classes = unique(y_true).tolist()
    pos_label = check_pos_label(pos_label)
    if pos_label is None:
        if len(classes) > 2:
            raise ValueError(f"y_true has {len(classes)} classes; pass pos_label to choose the "
                             "positive one")
        if classes not in _DEFAULT_POSITIVE:
            raise ValueError(f"y_true takes values {classes} and pos_label is not specified: "
                             "either make y_true take values in {0, 1} or {-1, 1} or pass "
                             "pos_label explicitly")
        pos_label = 1
    return y_true == pos_label


def binary_positive_class(y_true: torch.Tensor, pos_label, y_score: torch.Tensor) -> torch.Tensor:
    """``y_true == pos_label`` for ``average_precision_score`` on one or two classes."""
    classes = unique(y_true)
    pos_label = check_pos_label(pos_label)
    if len(classes) == 2 and not (classes == pos_label).any():
        raise ValueError(f"pos_label={pos_label!r} is not a valid label; y_true holds "
                         f"{classes.tolist()}")
    if y_score.ndim != 1:
        raise ValueError(f"for binary y_true, y_score must be 1-D, got {tuple(y_score.shape)}")
    return y_true == pos_label


# --------------------------------------------------------------------------- curves and areas


def rate(counts: torch.Tensor, kind: str, name: str) -> torch.Tensor:
    """``counts / counts[-1]``; NaN and a warning if there are no ``kind`` samples."""
    if counts[-1] <= 0:
        warnings.warn(f"No {kind} samples in y_true, {name} positive value should be "
                      "meaningless", undefined_metric_warning(), stacklevel=4)
        return torch.full_like(counts, math.nan)
    return counts / counts[-1]


def recall_without_positives(tps: torch.Tensor) -> torch.Tensor:
    """scikit-learn's recall when ``y_true`` has no positive: one at every threshold."""
    warnings.warn("No positive class found in y_true, recall is set to one for all "
                  "thresholds.", UserWarning, stacklevel=4)
    return torch.ones_like(tps)


def one_class_only(positive: torch.Tensor, weights: torch.Tensor | None) -> bool:
    """Whether the samples of non-zero weight are all positive or all negative (then
    a ROC AUC is undefined: scikit-learn warns and returns NaN)."""
    counted = positive if weights is None else positive[weights != 0]
    if counted.all() or not counted.any():
        warnings.warn("Only one class is present in y_true. ROC AUC score is not defined "
                      "in that case.", undefined_metric_warning(), stacklevel=4)
        return True
    return False


def check_ovr_average(average, where: str = "") -> None:
    """A one-vs-rest ``average``: ``"micro"``, ``"macro"``, ``"weighted"`` or ``None``."""
    if average not in ("micro", "macro", "weighted", None):
        raise ValueError(f"average must be 'micro', 'macro', 'weighted' or None{where}, "
                         f"got {average!r}")


def check_binary_auc_arguments(y_score: torch.Tensor, max_fpr) -> None:
    if y_score.ndim != 1:
        raise ValueError("for binary y_true, y_score must be (n_samples,): the score of the "
                         f"greater label; got shape {tuple(y_score.shape)}")
    if max_fpr is not None and not 0 < max_fpr <= 1:
        raise ValueError(f"max_fpr must be in (0, 1], got {max_fpr!r}")


def multiclass_auc_classes(y_true, y_score, *, average, max_fpr, multi_class,
                           labels) -> torch.Tensor:
    """The sorted classes of the columns of ``y_score`` for a one-vs-rest AUC."""
    if max_fpr is not None and max_fpr != 1:
        raise ValueError("max_fpr (a partial AUC) is only available for binary targets")
    if multi_class == "ovo":
        raise NotImplementedError("multi_class='ovo' is not implemented; use 'ovr'")
    if multi_class != "ovr":
        raise ValueError("y_true has more than two classes: pass multi_class='ovr'")
    check_ovr_average(average, " for multi-class targets")
    if y_score.ndim != 2:
        raise ValueError("y_score must be (n_samples, n_classes) probabilities when "
                         f"y_true has more than two classes, got shape {tuple(y_score.shape)}")
    if not torch.allclose(y_score.sum(1), torch.ones_like(y_score[:, 0])):
        raise ValueError("y_score rows must be probabilities that sum to one over classes")
    return column_classes(y_true, labels, y_score.shape[1])


def column_classes(y_true: torch.Tensor, labels, n_columns: int) -> torch.Tensor:
    """The sorted classes that the columns of a probability matrix stand for."""
    if labels is None:
        classes = unique(y_true)
        if len(classes) != n_columns:
            raise ValueError(f"y_true has {len(classes)} classes but y_score has {n_columns} "
                             "columns; pass labels to name the columns")
        return classes
    classes = check_label_list("labels", labels, y_true.device)
    if not torch.equal(classes, torch.sort(classes).values):
        raise ValueError("labels must be sorted: column k of y_score is the k-th smallest label")
    if len(classes) != n_columns:
        raise ValueError(f"labels has {len(classes)} entries but y_score has {n_columns} columns")
    if not torch.isin(y_true, classes).all():
        raise ValueError("y_true contains labels not in labels: "
                         f"{torch.unique(y_true[~torch.isin(y_true, classes)]).tolist()}")
    return classes


def multiclass_ap_classes(y_true, y_score, pos_label) -> torch.Tensor:
    """The classes of a one-vs-rest average precision (``pos_label`` must stay 1)."""
    classes = unique(y_true)
    if pos_label != 1:
        raise ValueError("pos_label is fixed to 1 for multi-class y_true; do not set it")
    if y_score.shape != (len(y_true), len(classes)):
        raise ValueError(f"y_score must be (n_samples, n_classes) = {(len(y_true), len(classes))}"
                         f" since y_true has {len(classes)} classes, got {tuple(y_score.shape)}")
    return classes


# --------------------------------------------------------------------------- probabilities


def input_eps(x) -> float:
    """Machine epsilon of the input's floating type (float64 for anything else)."""
    dtype = getattr(x, "dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return torch.finfo(dtype).eps
    if isinstance(dtype, np.dtype) and dtype.kind == "f":
        return float(np.finfo(dtype).eps)
    return float(np.finfo(np.float64).eps)


def _probability_classes(y_true: torch.Tensor, labels, device) -> torch.Tensor:
    """The sorted classes of ``log_loss``'s columns: ``labels``, or those of ``y_true``."""
    if labels is None:
        classes = unique(y_true)
        if len(classes) == 1:
            raise ValueError(f"y_true contains only one label ({classes.item()}); pass all "
                             "expected class labels as labels")
        return classes
    given = check_label_list("labels", labels, device)
    classes = torch.sort(given).values
    if not torch.equal(classes, given):
        warnings.warn(f"labels {given.tolist()} are not sorted; the columns of y_proba are "
                      f"taken to be the sorted labels {classes.tolist()}", UserWarning,
                      stacklevel=4)
    if not torch.isin(y_true, classes).all():
        extra = torch.unique(y_true[~torch.isin(y_true, classes)]).tolist()
        raise ValueError(f"y_true contains values {extra} not in labels {given.tolist()}")
    if len(classes) == 1:
        raise ValueError(f"labels must contain at least two labels, got {given.tolist()}")
    return classes


def probability_inputs(y_true, y_proba, sample_weight, labels):
    """``(onehot, proba, weights, eps)``, both ``(n, K)``, for the multi-class losses;
    ``eps`` is the machine epsilon of the probabilities as given."""
    eps = input_eps(y_proba)
    device = device_of(y_true, y_proba, sample_weight)
    y_true = check_labels("y_true", y_true, device)
    proba = check_real("y_proba", y_proba, device, (1, 2))
    check_unit_interval("y_proba", proba)
    n = check_same_length(y_true=y_true, y_proba=proba)
    weights = check_sample_weight(sample_weight, n, device)
    classes = _probability_classes(y_true, labels, device)
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


def binary_probability_inputs(y_true, proba, sample_weight, pos_label, device):
    """``(onehot, proba, weights)``, both ``(n, 2)``, for a binary Brier score of the
    ``(n,)`` probabilities of ``pos_label`` (default: 1, or the greater label)."""
    y = check_labels("y_true", y_true, device)
    proba = proba.flatten()
    weights = check_sample_weight(sample_weight, check_same_length(y_true=y, y_proba=proba),
                                  device)
    classes = unique(y)
    if len(classes) > 2:
        raise ValueError(f"y_true has {len(classes)} classes but y_proba is 1-D (binary); "
                         "pass (n_samples, n_classes) probabilities")
    check_unit_interval("y_proba", proba)
    pos_label = check_pos_label(pos_label)
    if pos_label is None:
        pos_label = 1 if classes.tolist() in _DEFAULT_POSITIVE else classes[-1].item()
    positive = (y == pos_label).to(proba.dtype)
    return torch.stack([1 - positive, positive], 1), torch.stack([1 - proba, proba], 1), weights
