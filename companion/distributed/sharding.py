"""Sharding the training state: ZeRO-1 by hand, PyTorch's FSDP, and the bytes per device of
the ZeRO stages (chapter 8, "Sharding")."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._validate import check_choice, check_float, check_int
from .data_parallel import TrainConfig, digits_mlp, flat_parameters


def zero1_worker(rank: int, world_size: int, X: torch.Tensor, y: torch.Tensor,
                 config: TrainConfig) -> dict:
    """ZeRO stage 1 by hand: each rank keeps AdamW's states for its shard only.

    Per step: local gradient of the rank's half of the batch, flattened; a reduce-scatter
    leaves each rank the summed gradient of its own shard (divided by the world size:
    the mean); AdamW updates that shard; an all-gather gives every rank all parameters.
    Returns the final parameters and the number of optimizer-state elements this rank kept.
    """
    model = digits_mlp(config.seed, config.batch_norm, X.dtype)
    flat = flat_parameters(model)
    n = flat.numel()
    padded = -(-n // world_size) * world_size  # equal shards for the collectives
    shard_len = padded // world_size
    lo = rank * shard_len
    shard = nn.Parameter(torch.cat([flat, flat.new_zeros(padded - n)])[lo:lo + shard_len].clone())
    optimizer = torch.optim.AdamW([shard], lr=config.lr, weight_decay=0.01, foreach=False)
    for batch in config.batches(len(X)):
        mine = batch.tensor_split(world_size)[rank]
        model.zero_grad()
        F.cross_entropy(model(X[mine]), y[mine]).backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        grads = torch.cat([grads, grads.new_zeros(padded - n)])
        shard.grad = grads.new_empty(shard_len)
        dist.reduce_scatter_single(shard.grad, grads)
        shard.grad /= world_size
        optimizer.step()  # Adam's m and v exist for this shard only
        full = shard.detach().new_empty(padded)
        dist.all_gather_single(full, shard.detach().clone())
        torch.nn.utils.vector_to_parameters(full[:n], model.parameters())
    kept = sum(s.numel() for st in optimizer.state.values() for s in st.values() if s.ndim)
    return {"params": flat_parameters(model), "state_elements": kept}


def fsdp_worker(rank: int, world_size: int, X: torch.Tensor, y: torch.Tensor,
                config: TrainConfig) -> dict:
    """PyTorch's FSDP2 (``fully_shard`` on every Linear, then the model) on the same task.

    Each rank stores a shard of every parameter (a ``DTensor``) and of its optimizer
    state; the forward pass all-gathers a layer's weights just before using it, the
    backward pass reduce-scatters its gradients.
    """
    from torch.distributed.fsdp import fully_shard

    model = digits_mlp(config.seed, config.batch_norm, X.dtype)
    full = sum(p.numel() for p in model.parameters())
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    local = sum(p.to_local().numel() for p in model.parameters())
    optimizer = config.make_optimizer(model.parameters())
    for batch in config.batches(len(X)):
        mine = batch.tensor_split(world_size)[rank]
        optimizer.zero_grad()
        F.cross_entropy(model(X[mine]), y[mine]).backward()
        optimizer.step()
    params = torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])
    return {"params": params, "local_elements": local, "full_elements": full}


def zero_memory_per_device(n_params: float, n_devices: int, stage: int) -> float:
    """Bytes of training state per device for mixed-precision Adam under ZeRO ``stage``.

    With chapter 1's 16 bytes per parameter -- 2 (fp16 weights) + 2 (fp16 gradients) +
    12 (fp32 master weights, ``m`` and ``v``) -- :cite:p:`rajbhandari2020zero`:
    stage 0 (plain data parallelism) keeps all 16 on every device; stage 1 shards the
    12 bytes of optimizer state, stage 2 also the gradients, stage 3 also the weights.
    """
    from ..scale import training_memory

    check_float("n_params", n_params, 0, low_open=True)
    check_int("n_devices", n_devices, 1)
    check_choice("stage", stage, (0, 1, 2, 3))
    m = training_memory(n_params, precision="mixed", optimizer="adam")
    optimizer = m.optimizer_states + m.master_weights
    sharded = [0.0, optimizer, optimizer + m.gradients, m.total][stage]
    return m.total - sharded + sharded / n_devices
