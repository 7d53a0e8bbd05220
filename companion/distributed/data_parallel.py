"""Data parallelism: one process against ``DistributedDataParallel`` on the digits MLP in
float64 (chapter 8, "Data parallelism")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._validate import check_choice, check_float, check_int, check_tensor


def digits_mlp(seed: int = 0, batch_norm: bool = False, dtype=torch.float64) -> nn.Sequential:
    """Chapter 2's digits MLP, 64 -> 128 -> 64 -> 10 with ReLU (optionally a BatchNorm
    after the first layer), initialised from ``torch.manual_seed(seed)``."""
    check_int("seed", seed, 0)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    norm = [nn.BatchNorm1d(128)] if batch_norm else []
    model = nn.Sequential(nn.Linear(64, 128), *norm, nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 10)).to(dtype)
    torch.random.set_rng_state(generator_state)
    return model


@dataclass(frozen=True)
class TrainConfig:
    """A short training run that every form of parallelism must reproduce.

    ``sync_batch_norm``: turn BatchNorm layers into ``nn.SyncBatchNorm`` under DDP (which
    all-reduces the batch statistics; PyTorch implements it for GPUs only).
    ``shares``: how many examples of each batch every rank takes (``None``: equal
    halves); ``rescale_uneven``: weight each rank's loss by its share so that unequal
    shares still give the full batch's mean gradient.
    """

    steps: int = 10
    batch_size: int = 64
    lr: float = 0.1
    optimizer: str = "sgd"
    seed: int = 0
    batch_norm: bool = False
    sync_batch_norm: bool = False
    shares: tuple[int, ...] | None = None
    rescale_uneven: bool = False

    def __post_init__(self):
        check_int("steps", self.steps, 1)
        check_int("batch_size", self.batch_size, 1)
        check_float("lr", self.lr, 0, low_open=True)
        check_choice("optimizer", self.optimizer, ("sgd", "adamw"))
        if self.shares is not None and sum(self.shares) != self.batch_size:
            raise ValueError(f"shares must add up to batch_size {self.batch_size}, "
                             f"got {self.shares}")

    def batches(self, n_examples: int) -> list[torch.Tensor]:
        """The index sets of the ``steps`` batches: reshuffled each epoch, seeded."""
        generator = torch.Generator().manual_seed(self.seed)
        order: list[torch.Tensor] = []
        while len(order) < self.steps:
            order += list(torch.randperm(n_examples, generator=generator)
                          .split(self.batch_size))
            order = [b for b in order if len(b) == self.batch_size]  # full batches only
        return order[:self.steps]

    def make_optimizer(self, params) -> torch.optim.Optimizer:
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.01, foreach=False)


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All of ``model``'s parameters, detached, in one flat vector (to compare runs)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def train_single(X: torch.Tensor, y: torch.Tensor, config: TrainConfig,
                 micro_batches: int = 1) -> torch.Tensor:
    """One process, whole batches (optionally accumulated over ``micro_batches`` pieces);
    returns the final parameters as one vector. Each piece adds its summed loss divided
    by the batch size, so the accumulated gradient is the batch's mean gradient."""
    check_tensor("X", X, ndim=2, floating=True)
    check_int("micro_batches", micro_batches, 1, config.batch_size)
    model = digits_mlp(config.seed, config.batch_norm, X.dtype).to(X.device)
    optimizer = config.make_optimizer(model.parameters())
    for batch in config.batches(len(X)):
        optimizer.zero_grad()
        for piece in batch.tensor_split(micro_batches):
            loss = F.cross_entropy(model(X[piece]), y[piece], reduction="sum") / len(batch)
            loss.backward()
        optimizer.step()
    return flat_parameters(model)


def train_data_parallel(X: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """Data parallelism with ``DistributedDataParallel`` (inside an initialised process group).

    Every rank holds the whole model, takes its share of each batch, and computes the
    mean loss over it; DDP all-reduces the gradients during ``backward`` and divides by
    the world size, so with equal shares every rank applies the full batch's mean
    gradient -- the update of :func:`train_single`. Returns the final parameters.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    shares = config.shares or [len(s) for s in
                               torch.arange(config.batch_size).tensor_split(world_size)]
    if len(shares) != world_size:
        raise ValueError(f"shares must have one entry per rank ({world_size}), got {shares}")
    start = sum(shares[:rank])
    model = digits_mlp(config.seed, config.batch_norm, X.dtype).to(X.device)
    if config.sync_batch_norm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = nn.parallel.DistributedDataParallel(model)
    optimizer = config.make_optimizer(model.parameters())
    for batch in config.batches(len(X)):
        mine = batch[start:start + shares[rank]]  # this rank's share of the batch
        loss = F.cross_entropy(model(X[mine]), y[mine])
        if config.rescale_uneven:  # mean over the batch, not over my share
            loss = loss * len(mine) * world_size / len(batch)
        optimizer.zero_grad()
        loss.backward()  # DDP: all-reduce (average) of the gradients, bucket by bucket
        optimizer.step()
    return flat_parameters(model.module)


def data_parallel_worker(rank: int, world_size: int, X, y, config: TrainConfig):
    """:func:`train_data_parallel` as a :func:`launch` worker."""
    return train_data_parallel(X, y, config)
