"""Collectives, simulated: the ring algorithm for ``n`` ranks in one process, with the bytes
each rank sends counted (chapter 8, "Collectives")."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._validate import check_choice, check_float, check_int, check_tensor, check_type


@dataclass
class Collective:
    """What a simulated collective leaves on each rank, and the bytes each rank sent."""

    outputs: list[torch.Tensor]
    bytes_sent: list[int]


def _check_rank_tensors(name: str, tensors) -> list[torch.Tensor]:
    check_type(name, tensors, (list, tuple))
    if len(tensors) < 1:
        raise ValueError(f"{name} must hold one tensor per rank (world size >= 1), got 0")
    for i, t in enumerate(tensors):
        check_tensor(f"{name}[{i}]", t)
    first = tensors[0]
    for i, t in enumerate(tensors[1:], start=1):
        if t.dtype != first.dtype or t.device != first.device:
            raise TypeError(f"{name}[{i}] must have dtype {first.dtype} on {first.device} like "
                            f"{name}[0], got {t.dtype} on {t.device}")
    return list(tensors)


def _check_same_shape(name: str, tensors: list[torch.Tensor]) -> None:
    for i, t in enumerate(tensors[1:], start=1):
        if t.shape != tensors[0].shape:
            raise ValueError(f"{name}[{i}] must have the shape of {name}[0], "
                             f"{tuple(tensors[0].shape)}, got {tuple(t.shape)}")


def shard_bounds(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """Start and end of rank ``rank``'s shard of ``numel`` elements split ``world_size`` ways.

    The first ``numel % world_size`` shards hold one element more (``torch.tensor_split``).
    """
    check_int("numel", numel, 0)
    check_int("world_size", world_size, 1)
    check_int("rank", rank, 0, world_size - 1)
    base, extra = divmod(numel, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def _ring_reduce_scatter(chunks: list[list[torch.Tensor]], sent: list[int]) -> None:
    """In place: after it, ``chunks[r][r]`` is the sum over ranks of chunk ``r``."""
    n = len(chunks)
    for step in range(n - 1):
        # every rank r sends chunk (r - step - 1) mod n to its right neighbour at once
        messages = [(r, (r - step - 1) % n, chunks[r][(r - step - 1) % n].clone())
                    for r in range(n)]
        for r, c, message in messages:
            chunks[(r + 1) % n][c] = chunks[(r + 1) % n][c] + message
            sent[r] += message.numel() * message.element_size()


def _ring_all_gather(chunks: list[list[torch.Tensor]], sent: list[int]) -> None:
    """In place: rank r starts with chunk r complete, and ends with every chunk."""
    n = len(chunks)
    for step in range(n - 1):
        messages = [(r, (r - step) % n, chunks[r][(r - step) % n]) for r in range(n)]
        for r, c, message in messages:
            chunks[(r + 1) % n][c] = message.clone()
            sent[r] += message.numel() * message.element_size()


def _ring_inputs(tensors):
    """Checked rank tensors, each cut into ``n`` chunks, and a zero byte count per rank."""
    tensors = _check_rank_tensors("tensors", tensors)
    _check_same_shape("tensors", tensors)
    n = len(tensors)
    chunks = [list(torch.tensor_split(t.reshape(-1), n)) for t in tensors]
    return tensors, chunks, [0] * n


def ring_reduce_scatter(tensors) -> Collective:
    """Ring reduce-scatter: rank ``r`` ends with the sum over ranks of chunk ``r``.

    ``tensors[r]`` is rank ``r``'s input (all of one shape and dtype). Each is flattened
    and cut into ``n`` chunks by ``torch.tensor_split`` (any length; sizes differ by at
    most one). In each of ``n - 1`` steps every rank sends one chunk to its right
    neighbour, which adds it to its own copy, so each rank sends ``(n - 1) / n`` of the
    tensor.
    """
    tensors, chunks, sent = _ring_inputs(tensors)
    _ring_reduce_scatter(chunks, sent)
    return Collective([chunks[r][r] for r in range(len(tensors))], sent)


def ring_all_gather(chunks) -> Collective:
    """Ring all-gather: every rank ends with the concatenation of all ranks' 1-D chunks."""
    chunks = _check_rank_tensors("chunks", chunks)
    for i, c in enumerate(chunks):
        if c.ndim != 1:
            raise ValueError(f"chunks[{i}] must be 1-D, got shape {tuple(c.shape)}")
    n = len(chunks)
    held = [[chunks[r] if c == r else None for c in range(n)] for r in range(n)]
    sent = [0] * n
    _ring_all_gather(held, sent)
    return Collective([torch.cat(h) for h in held], sent)


def ring_all_reduce(tensors) -> Collective:
    """Ring all-reduce = ring reduce-scatter, then ring all-gather (every rank gets the sum).

    Each rank sends ``2 (n - 1) / n * S`` bytes for a tensor of ``S`` bytes (exactly,
    when ``n`` divides its length), the bandwidth-optimal amount for any ``n``.
    """
    tensors, chunks, sent = _ring_inputs(tensors)
    _ring_reduce_scatter(chunks, sent)
    _ring_all_gather(chunks, sent)
    shape = tensors[0].shape
    return Collective([torch.cat(c).reshape(shape) for c in chunks], sent)


def naive_all_reduce(tensors) -> Collective:
    """All-reduce through rank 0: everyone sends it their tensor, it sends back the sum.

    Rank 0 sends ``(n - 1) S`` bytes, every other rank ``S``: the root's link is the
    bottleneck, and it grows with ``n``.
    """
    tensors = _check_rank_tensors("tensors", tensors)
    _check_same_shape("tensors", tensors)
    n = len(tensors)
    total = tensors[0].clone()
    for t in tensors[1:]:
        total = total + t
    size = tensors[0].numel() * tensors[0].element_size()
    return Collective([total.clone() for _ in range(n)], [(n - 1) * size] + [size] * (n - 1))


def all_reduce_bytes_per_rank(nbytes: float, world_size: int, algorithm: str = "ring") -> float:
    """Bytes the busiest rank sends in an all-reduce of ``nbytes``: ring or naive (root)."""
    check_float("nbytes", nbytes, 0)
    check_int("world_size", world_size, 1)
    check_choice("algorithm", algorithm, ("ring", "naive"))
    if algorithm == "ring":
        return 2 * (world_size - 1) / world_size * nbytes
    return (world_size - 1) * nbytes
