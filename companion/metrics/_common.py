"""Tensor helpers shared by the metric modules (private module; book: chapter 5).

Class labels become positions ``0 .. P-1`` among the labels present, so that one
``bincount`` counts them; weighted or not, every count is a tensor on the inputs' device.
"""

from __future__ import annotations

import torch

from companion._validate import (
    check_labels,
    check_real,
    check_same_length,
    check_sample_weight,
    device_of,
)


def classification_inputs(y_true, y_pred, sample_weight):
    """``(y_true, y_pred, weights)``: two ``(n,)`` int64 label tensors and ``(n,)`` or None."""
    device = device_of(y_true, y_pred, sample_weight)
    y_true, y_pred = check_labels("y_true", y_true, device), check_labels("y_pred", y_pred, device)
    n = check_same_length(y_true=y_true, y_pred=y_pred)
    return y_true, y_pred, check_sample_weight(sample_weight, n, device)


def ranking_inputs(y_true, y_score, sample_weight, score_dims=(1,)):
    """``(y_true, y_score, weights)``: ``(n,)`` int64 labels, float64 scores, weights."""
    device = device_of(y_true, y_score, sample_weight)
    y_true = check_labels("y_true", y_true, device)
    y_score = check_real("y_score", y_score, device, score_dims)
    n = check_same_length(y_true=y_true, y_score=y_score)
    return y_true, y_score, check_sample_weight(sample_weight, n, device)


def unique(y: torch.Tensor) -> torch.Tensor:
    """``torch.unique(y)`` (sorted) for int64 labels; by counting when their range is small."""
    low, high = int(y.min()), int(y.max())
    shift = min(low, 0)
    if high - shift > 4 * len(y) + 1024:
        return torch.unique(y)
    return torch.nonzero(torch.bincount(y - shift if shift else y)).flatten() + shift


def present_labels(y_true: torch.Tensor, y_pred: torch.Tensor) -> torch.Tensor:
    """The sorted labels that occur in ``y_true`` or ``y_pred``."""
    return torch.unique(torch.cat([unique(y_true), unique(y_pred)]))


def encode(y: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Position of each label of ``y`` in the sorted ``present``, which holds all of them."""
    if torch.equal(present, torch.arange(len(present), device=present.device)):
        return y  # labels 0, 1, ..., K-1 are their own positions
    return torch.searchsorted(present, y)


def select_labels(counts: torch.Tensor, present: torch.Tensor,
                  labels: torch.Tensor) -> torch.Tensor:
    """Rows of ``counts`` (indexed like ``present``) for ``labels``; zeros for absent labels."""
    slot = torch.searchsorted(present, labels).clamp(max=len(present) - 1)
    found = present[slot] == labels
    return counts[slot] * found.reshape(-1, *[1] * (counts.ndim - 1))


def bincount(index: torch.Tensor, weights: torch.Tensor | None, minlength: int) -> torch.Tensor:
    """Counts (int64) or sums of ``weights`` per index; deterministic on CUDA as well."""
    if weights is None:
        return torch.bincount(index, minlength=minlength)
    out = torch.zeros(minlength, dtype=weights.dtype, device=weights.device)
    return out.index_put_((index,), weights, accumulate=True)


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None, normalize=True) -> float:
    """``np.average`` (or the weighted sum with ``normalize=False``)."""
    if weights is None:
        return float(values.mean() if normalize else values.sum())
    total = (values * weights).sum()
    return float(total / weights.sum() if normalize else total)
