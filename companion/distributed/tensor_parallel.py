"""Tensor parallelism: a Megatron MLP split over ranks (chapter 8, "Tensor parallelism")."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._validate import check_int, check_type
from .collectives import shard_bounds


class _CopyToParallel(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the input gradient backward."""

    @staticmethod
    def forward(ctx, x, counter):
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        ctx.counter.append(grad.numel() * grad.element_size())
        return grad, None


class _ReduceFromParallel(torch.autograd.Function):
    """Megatron's ``g``: all-reduce of the partial outputs forward, identity backward."""

    @staticmethod
    def forward(ctx, partial, counter):
        total = partial.clone()
        dist.all_reduce(total)
        counter.append(total.numel() * total.element_size())
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class TensorParallelMLP(nn.Module):
    """This rank's slice of ``fc2(gelu(fc1(x)))``, split as in Megatron-LM.

    ``fc1`` is split by its output features (columns of ``x W1^T``): rank ``r`` computes
    hidden units ``[lo, hi)`` on its own, GELU included, because GELU acts per unit.
    ``fc2`` is split by its input features (rows of ``W2^T``): each rank's product with
    its hidden slice is a partial sum of the output, and one all-reduce adds them. The
    backward pass needs one all-reduce too, for the gradient of ``x``. ``bytes_all_reduced``
    lists the size of every all-reduce issued.
    """

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, rank: int, world_size: int):
        super().__init__()
        check_type("fc1", fc1, nn.Linear)
        check_type("fc2", fc2, nn.Linear)
        check_int("world_size", world_size, 1)
        check_int("rank", rank, 0, world_size - 1)
        lo, hi = shard_bounds(fc1.out_features, rank, world_size)
        self.w1 = nn.Parameter(fc1.weight.detach()[lo:hi].clone())  # (h/n, d)
        self.b1 = nn.Parameter(fc1.bias.detach()[lo:hi].clone())    # (h/n,)
        self.w2 = nn.Parameter(fc2.weight.detach()[:, lo:hi].clone())  # (d, h/n)
        self.b2 = nn.Parameter(fc2.bias.detach().clone())  # added once, after the sum
        self.bytes_all_reduced: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _CopyToParallel.apply(x, self.bytes_all_reduced)              # (B, T, d)
        hidden = F.gelu(F.linear(x, self.w1, self.b1))                    # (B, T, h/n)
        partial = F.linear(hidden, self.w2)                               # (B, T, d)
        return _ReduceFromParallel.apply(partial, self.bytes_all_reduced) + self.b2


def tensor_parallel_worker(rank: int, world_size: int, fc1: nn.Linear, fc2: nn.Linear,
                           x: torch.Tensor) -> dict:
    """Forward and backward of :class:`TensorParallelMLP` on rank ``rank``; the loss is
    ``sum(out ** 2)``. Returns the output, the input gradient, this rank's parameter
    gradients and the bytes of each all-reduce."""
    mlp = TensorParallelMLP(fc1, fc2, rank, world_size)
    x = x.clone().requires_grad_()
    out = mlp(x)
    out.square().sum().backward()
    return {"out": out.detach(), "x_grad": x.grad,
            **{f"{name}_grad": p.grad for name, p in mlp.named_parameters()},
            "bytes": list(mlp.bytes_all_reduced)}
