"""Gradient noise: per-example gradients and the variance of a mini-batch gradient.

Book: chapter 3, "Gradient noise and the batch size" -- a mini-batch gradient is an
unbiased estimate of the full-batch gradient whose variance, for ``B`` distinct examples
out of ``N``, is :math:`\frac{\\sigma^2}{B}\frac{N-B}{N-1}`
(:func:`minibatch_gradient_variance`, checked by sampling in
:func:`sampled_minibatch_gradient_variance`). Chapter 9's DP-SGD clips the same
per-example gradients (:func:`per_example_gradients` with ``flatten=False``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from companion._validate import check_int, check_tensor


def per_example_gradients(model: nn.Module, X: torch.Tensor, y: torch.Tensor,
                          loss_fn=F.cross_entropy, *, flatten: bool = True):
    """The gradient of the loss of each example: shape ``(N, n_trainable)``.

    Row ``i`` is the gradient of ``loss_fn(model(X[i:i+1]), y[i:i+1])`` with respect to
    the parameters that require gradients -- those an optimizer would update; frozen ones
    (``requires_grad=False``) are held fixed and get no columns -- concatenated in
    ``model.parameters()`` order; their mean over the rows is the full-batch gradient.
    ``flatten=False`` returns ``{name: (N, *param.shape)}`` instead (chapter 9's DP-SGD
    clips these). One vectorised pass: ``torch.func.grad`` makes one example's loss a
    function of the parameters and ``vmap`` maps it over the batch. The model must treat
    examples independently and deterministically: a BatchNorm or dropout module in
    training mode raises ``ValueError`` (call ``model.eval()`` first).
    Book: section "Gradient noise and the batch size".
    """
    trainable, frozen = _per_example_parameters(model, X, y)

    def loss_of_one(p, x, target):
        return loss_fn(functional_call(model, {**p, **frozen}, (x[None],)), target[None])

    grads = vmap(grad(loss_of_one), in_dims=(None, 0, 0))(trainable, X, y)  # name -> (N, ...)
    if not flatten:
        return grads
    return torch.cat([g.reshape(len(X), -1) for g in grads.values()], dim=1)  # (N, n_trainable)


def _per_example_parameters(model, X, y) -> tuple[dict, dict]:
    """Check the arguments of :func:`per_example_gradients`; ``(trainable, frozen)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_tensor("X", X)
    check_tensor("y", y)
    if len(X) != len(y):
        raise ValueError(f"X has {len(X)} rows but y has {len(y)}")
    per_batch = [f"{name or 'model'} ({type(m).__name__})" for name, m in model.named_modules()
                 if m.training and isinstance(m, (nn.modules.batchnorm._BatchNorm,
                                                  nn.modules.dropout._DropoutNd))]
    if per_batch:
        raise ValueError(f"per-example gradients need a deterministic model that treats "
                         f"examples independently, but {', '.join(per_batch)} is in "
                         f"training mode; call model.eval()")
    trainable = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach() for name, p in model.named_parameters()
              if not p.requires_grad}
    if not trainable:
        raise ValueError("model has no parameter that requires gradients")
    return trainable, frozen


def _check_batch_size(per_example_grads: torch.Tensor, batch_size: int) -> int:
    if per_example_grads.ndim != 2:
        raise ValueError(f"per_example_grads must be 2-D (N, P), got shape "
                         f"{tuple(per_example_grads.shape)}")
    n = len(per_example_grads)
    check_int("batch_size", batch_size, low=1)
    if not batch_size <= n:
        raise ValueError(f"batch_size must be an int in [1, {n}], got {batch_size!r}")
    return n


def minibatch_gradient_variance(per_example_grads: torch.Tensor, batch_size: int) -> float:
    r"""Exact :math:`\mathbb{E}\,\lVert \hat g_B - g \rVert^2` of a batch drawn without replacement.

    With :math:`N` examples whose gradients have mean :math:`g` and total variance
    :math:`\sigma^2 = \tfrac1N \sum_i \lVert g_i - g \rVert^2`, the mean :math:`\hat g_B` of
    :math:`B` distinct random examples has

    .. math:: \mathbb{E}\,\lVert \hat g_B - g \rVert^2 = \frac{\sigma^2}{B}\,\frac{N - B}{N - 1},

    the :math:`1/B` law with the finite-population correction: zero at :math:`B = N`,
    where "stochastic" gradient descent has become full-batch gradient descent.
    ``per_example_grads`` is ``(N, P)``, e.g. from :func:`per_example_gradients`.
    """
    n = _check_batch_size(per_example_grads, batch_size)
    if n == 1:
        return 0.0
    total_variance = (per_example_grads - per_example_grads.mean(0)).square().sum(1).mean()
    return (total_variance / batch_size * (n - batch_size) / (n - 1)).item()


def sampled_minibatch_gradient_variance(per_example_grads: torch.Tensor, batch_size: int,
                                        draws: int = 1000,
                                        generator: torch.Generator | None = None) -> float:
    r"""Monte-Carlo estimate of :math:`\mathbb{E}\,\lVert \hat g_B - g \rVert^2`.

    Draws ``draws`` mini-batches of ``batch_size`` distinct rows (as one epoch of shuffled
    mini-batches does) and averages the squared distance of their mean gradient from the
    full-batch gradient. Compare with :func:`minibatch_gradient_variance`.
    """
    n = _check_batch_size(per_example_grads, batch_size)
    check_int("draws", draws, low=1)
    g = per_example_grads
    order = torch.rand(draws, n, generator=generator).argsort(dim=1).to(g.device)  # (draws, N)
    weights = torch.zeros(draws, n, dtype=g.dtype, device=g.device)
    weights.scatter_(1, order[:, :batch_size], 1.0 / batch_size)  # each row: one mini-batch
    batch_means = weights @ g  # (draws, P)
    return (batch_means - g.mean(0)).square().sum(1).mean().item()


__all__ = ["per_example_gradients", "minibatch_gradient_variance",
           "sampled_minibatch_gradient_variance"]
