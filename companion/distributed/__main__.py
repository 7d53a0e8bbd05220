"""``torchrun --standalone --nproc-per-node 2 -m companion.distributed``: data-parallel
training against one process, exit code 1 if they differ by more than ``1e-12``."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from .data_parallel import TrainConfig, train_data_parallel, train_single


def main(steps: int = 20, tolerance: float = 1e-12) -> int:
    """Entry point of ``torchrun ... -m companion.distributed``: DDP on the digits against
    one process on rank 0; returns (and exits with) 1 if they differ by more than
    ``tolerance``. Uses NCCL when every local rank can have a GPU of its own, gloo
    otherwise."""
    from ..data import load_digits_split

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    backend = "nccl" if torch.cuda.device_count() >= local_ranks > 0 else "gloo"
    dist.init_process_group(backend)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" \
        else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    digits = load_digits_split(device=device, dtype=torch.float64)
    config = TrainConfig(steps=steps, batch_size=64 * world_size // 2 or 32)
    params = train_data_parallel(digits.X_train, digits.y_train, config)
    status = torch.zeros(1, device=device)
    if rank == 0:
        reference = train_single(digits.X_train, digits.y_train, config)
        difference = (params - reference).abs().max().item()
        ok = difference <= tolerance
        print(f"{world_size} ranks ({backend}), {steps} SGD steps, batch {config.batch_size}: "
              f"largest |DDP - one process| = {difference:.1e} "
              f"({'<=' if ok else '>'} {tolerance:g})")
        status[0] = 0.0 if ok else 1.0
    dist.broadcast(status, 0)
    dist.destroy_process_group()
    return int(status.item())


if __name__ == "__main__":
    sys.exit(main())
