"""Pruning: zero the smallest weights (unstructured) or remove whole MLP neurons (structured).

Chapter 7, section "Pruning". Magnitude pruning keeps the weights with the largest
``|w|`` (Han et al., 2015): with ``n`` weights and a fraction ``amount`` to remove, the
``k = round(amount * n)`` smallest in absolute value get mask ``False`` (``True`` = keep),
exactly as ``torch.nn.utils.prune.l1_unstructured`` counts them. Layer-wise pruning ranks
each tensor on its own; global pruning ranks all tensors together
(``prune.global_unstructured``), so layers with small weights lose more.

Unstructured zeros leave the matrix shape, and the time of a dense matmul, unchanged.
Structured pruning removes whole hidden neurons of an MLP ``Linear(d, h) -> act ->
Linear(h, d)``: neuron ``j`` is scored by ``||W_in[j, :]||_2 * ||W_out[:, j]||_2`` (how much it
can carry from input to output) and the kept neurons form two smaller ``nn.Linear`` layers.
"""

from __future__ import annotations

import torch
from torch import nn

from ._validate import check_float, check_int, check_tensor, check_type


def _count(amount, n: int) -> int:
    """Number of entries to prune: ``round(amount * n)`` (Python's round, as torch's prune)."""
    check_float("amount", amount, 0.0, 1.0)
    return round(float(amount) * n)


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask, True for all but the ``k`` smallest entries of the 1-D ``scores``."""
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep[torch.argsort(scores, stable=True)[:k]] = False
    return keep


def magnitude_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Keep-mask of ``weight``'s shape: False for the ``round(amount * numel)`` smallest ``|w|``."""
    check_tensor("weight", weight, floating=True)
    k = _count(amount, weight.numel())
    return _smallest(weight.detach().abs().flatten(), k).reshape(weight.shape)


def global_magnitude_masks(weights, amount: float) -> list[torch.Tensor]:
    """Keep-masks for a list of tensors ranked together by ``|w|`` (one global threshold)."""
    weights = list(weights)
    if not weights:
        raise ValueError("weights must contain at least one tensor, got an empty list")
    for i, w in enumerate(weights):
        check_tensor(f"weights[{i}]", w, floating=True)
    scores = torch.cat([w.detach().abs().flatten() for w in weights])
    keep = _smallest(scores, _count(amount, scores.numel()))
    return [m.reshape(w.shape) for m, w in zip(keep.split([w.numel() for w in weights]), weights)]


@torch.no_grad()
def apply_masks(weights, masks) -> None:
    """Zero, in place, the entries of each weight whose mask is False."""
    for w, m in zip(weights, masks, strict=True):
        w.mul_(m.to(w.dtype))


def sparsity(weights) -> float:
    """Fraction of zero entries over all the given tensors."""
    weights = list(weights)
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / total if total else 0.0


def neuron_importance(fc_in: nn.Linear, fc_out: nn.Linear) -> torch.Tensor:
    """Score of each hidden neuron: ``||W_in[j, :]||_2 * ||W_out[:, j]||_2``, shape ``(h,)``."""
    check_type("fc_in", fc_in, nn.Linear)
    check_type("fc_out", fc_out, nn.Linear)
    if fc_in.out_features != fc_out.in_features:
        raise ValueError(f"fc_in.out_features ({fc_in.out_features}) must equal "
                         f"fc_out.in_features ({fc_out.in_features})")
    return fc_in.weight.detach().norm(dim=1) * fc_out.weight.detach().norm(dim=0)


@torch.no_grad()
def prune_neurons(fc_in: nn.Linear, fc_out: nn.Linear, keep: int) -> tuple[nn.Linear, nn.Linear]:
    """Two smaller layers holding the ``keep`` most important hidden neurons (original order)."""
    scores = neuron_importance(fc_in, fc_out)
    check_int("keep", keep, 1, scores.numel())
    idx = torch.argsort(scores, descending=True, stable=True)[:keep].sort().values
    new_in = nn.Linear(fc_in.in_features, keep, bias=fc_in.bias is not None,
                       device=fc_in.weight.device, dtype=fc_in.weight.dtype)
    new_out = nn.Linear(keep, fc_out.out_features, bias=fc_out.bias is not None,
                        device=fc_out.weight.device, dtype=fc_out.weight.dtype)
    new_in.weight.copy_(fc_in.weight[idx])                      # (keep, d)
    if fc_in.bias is not None:
        new_in.bias.copy_(fc_in.bias[idx])
    new_out.weight.copy_(fc_out.weight[:, idx])                 # (d, keep)
    if fc_out.bias is not None:
        new_out.bias.copy_(fc_out.bias)
    return new_in, new_out


def prune_mlp_neurons(model: nn.Module, amount: float) -> nn.Module:
    """Remove ``round(amount * h)`` neurons from every ``Linear -> act -> Linear`` MLP in place.

    An MLP is an ``nn.Sequential`` whose items 0 and 2 are ``nn.Linear`` layers with matching
    hidden size (the chapter-4 :class:`~companion.transformer.MLP`). At least one neuron stays.
    Returns ``model``.
    """
    check_type("model", model, nn.Module)
    check_float("amount", amount, 0.0, 1.0)
    for module in model.modules():
        if (isinstance(module, nn.Sequential) and len(module) >= 3
                and isinstance(module[0], nn.Linear) and isinstance(module[2], nn.Linear)
                and module[0].out_features == module[2].in_features):
            h = module[0].out_features
            keep = max(1, h - _count(amount, h))
            module[0], module[2] = prune_neurons(module[0], module[2], keep)
    return model
