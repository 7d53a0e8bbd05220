"""Activation memory: the bytes autograd keeps for the backward pass, measured exactly.

Chapter 7, section "Activation memory". During the forward pass every operation that
needs its inputs (or outputs) to compute gradients hands them to autograd, which holds
them until ``backward()``. :func:`saved_tensor_bytes` intercepts those hand-overs with
``torch.autograd.graph.saved_tensors_hooks`` and adds up the bytes of the distinct
storages, leaving out the parameters (they are in memory anyway). Activation
checkpointing (``torch.utils.checkpoint``, Chen et al., 2016) keeps only a segment's input
and recomputes the rest during the backward pass: fewer saved bytes for more compute.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ._validate import check_type


def saved_tensor_bytes(fn: Callable, *args, module: nn.Module | None = None) -> int:
    """Bytes of the distinct tensors autograd saves while running ``fn(*args)``.

    Tensors that share a storage count once (by the storage's size); storages of
    ``module``'s parameters and buffers are left out.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if module is not None:
        check_type("module", module, nn.Module)
    skip = set()
    if module is not None:
        skip = {t.untyped_storage().data_ptr()
                for t in [*module.parameters(), *module.buffers()]}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return sum(storages.values())
