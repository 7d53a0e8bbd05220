"""The alpha-beta cost model of an all-reduce and of a data-parallel step, and the
throughput worker that measures one (chapter 8, "What it costs")."""

from __future__ import annotations

import time

import torch
from torch import nn

from .._validate import check_float
from .collectives import all_reduce_bytes_per_rank


def all_reduce_seconds(nbytes: float, world_size: int, latency: float, bandwidth: float) -> float:
    """Alpha-beta time of a ring all-reduce: ``2 (n-1) alpha + 2 (n-1)/n * S / beta``.

    ``latency`` (alpha) in seconds per message, ``bandwidth`` (beta) in bytes per second
    per link; ``2 (n - 1)`` messages in sequence, each of ``S / n`` bytes.
    """
    check_float("latency", latency, 0)
    check_float("bandwidth", bandwidth, 0, low_open=True)
    steps = 2 * (world_size - 1)
    return steps * latency + all_reduce_bytes_per_rank(nbytes, world_size) / bandwidth


def data_parallel_step_seconds(compute_seconds: float, grad_bytes: float, world_size: int,
                               latency: float, bandwidth: float, overlap: float = 0.0) -> float:
    """Predicted time of one data-parallel step: one device's compute plus the part of
    the gradient all-reduce (:func:`all_reduce_seconds` of ``grad_bytes``) that does not
    hide behind it.

    ``compute_seconds`` is the compute time of one device in this step, whatever the
    scaling: with a fixed global batch (strong scaling) pass the one-device time divided
    by ``world_size``; with a fixed batch per device (weak scaling) pass the same time for
    every ``world_size``. ``overlap`` is the fraction of ``compute_seconds`` during which
    the all-reduce can run (the backward pass, about 2/3 of a step, where DDP sends its
    buckets): communication beyond ``overlap * compute_seconds`` adds to the step."""
    check_float("compute_seconds", compute_seconds, 0)
    check_float("overlap", overlap, 0, 1)
    comm = all_reduce_seconds(grad_bytes, world_size, latency, bandwidth)
    return compute_seconds + max(0.0, comm - overlap * compute_seconds)


def throughput_worker(rank: int, world_size: int, config: dict) -> float:
    """Tokens per second of this rank training chapter 4's small GPT with DDP for
    ``config["steps"]`` steps (after one warm-up step); ``config`` holds the model's
    ``GPTConfig`` keyword arguments under ``"model"``, ``"batch_size"`` and ``"steps"``."""
    from ..transformer import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(**config["model"])
    model = GPT(cfg)
    if world_size > 1:
        model = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    shape = (config["batch_size"], cfg.block_size)
    x = torch.randint(cfg.vocab_size, shape, generator=generator)
    started = 0.0
    for step in range(config["steps"] + 1):
        if step == 1:
            started = time.perf_counter()
        _, loss = model(x, x)  # (logits, loss): a copy task is enough to time a step
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return config["steps"] * x.numel() / (time.perf_counter() - started)
