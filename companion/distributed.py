"""Training on many devices with ``torch.distributed``: collectives, data, tensor and
pipeline parallelism, optimizer sharding, and a communication cost model (chapter 8).

Four groups, top to bottom:

* **Collectives, simulated.** :func:`ring_reduce_scatter`, :func:`ring_all_gather` and
  :func:`ring_all_reduce` run the ring algorithm of :cite:t:`patarasuk2009bandwidth` for
  ``n`` ranks inside one process and count the bytes each rank sends: an all-reduce of
  ``S`` bytes costs every rank ``2 (n - 1) / n * S``, whatever ``n`` -- against
  ``(n - 1) S`` for the root of the naive :func:`naive_all_reduce`.
* **Real processes.** :func:`launch` starts ``world_size`` processes that talk through a
  gloo process group (NCCL on GPUs, with ``torchrun``) and returns each rank's result; the
  ``*_worker`` functions are what they run: the collectives of ``torch.distributed``,
  data parallelism with ``DistributedDataParallel`` (:func:`train_data_parallel`),
  ZeRO-1 optimizer-state sharding by hand (:func:`zero1_worker`), PyTorch's FSDP
  (:func:`fsdp_worker`) and a Megatron tensor-parallel MLP (:class:`TensorParallelMLP`).
  Each is compared with one process doing the whole job (:func:`train_single`).
* **Pipeline schedules.** :func:`gpipe_schedule` and :func:`one_f_one_b_schedule` place
  the forward and backward passes of ``m`` micro-batches on ``p`` stages; the idle
  ("bubble") fraction of GPipe is ``(p - 1) / (m + p - 1)``.
* **Costs.** :func:`zero_memory_per_device` (bytes of training state per device for the
  ZeRO stages, chapter 1's arithmetic) and the alpha-beta model
  :func:`all_reduce_seconds` / :func:`data_parallel_step_seconds`.

``torchrun --standalone --nproc-per-node 2 -m companion.distributed`` runs :func:`main`:
data-parallel training against one process, exit code 1 if they differ by more than
``1e-12``.
"""

from __future__ import annotations

import datetime
import io
import os
import queue as queue_module
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from ._validate import check_choice, check_float, check_int, check_tensor, check_type

# --------------------------------------------------------------------------- collectives


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


# --------------------------------------------------------------------------- real processes


def _child(worker, rank: int, world_size: int, port: int, timeout: float, args, results) -> None:
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        payload = ("ok", rank, worker(rank, world_size, *args))
    except BaseException:  # report it to the parent rather than die silently
        payload = ("error", rank, traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # tensors by value: the child exits before they are read
    results.put(buffer.getvalue())


def _failures(errors: dict[int, str], results, pending: int, grace: float = 2.0) -> str:
    """Every failed rank's traceback, in rank order. When one rank fails its peers fail
    too ("connection closed by peer"), in an order the operating system decides; the
    reports that arrive within ``grace`` seconds are gathered so that the root cause is
    always among them."""
    end = time.monotonic() + grace
    while len(errors) < pending and time.monotonic() < end:
        try:
            status, rank, value = torch.load(io.BytesIO(results.get(timeout=0.1)),
                                             weights_only=True)
        except queue_module.Empty:
            continue
        if status == "error":
            errors[rank] = value
    return "\n".join(f"launch: rank {r} failed:\n{errors[r]}" for r in sorted(errors))


def launch(worker, world_size: int, *args, timeout: float = 120.0) -> list:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` processes on gloo.

    Returns the workers' return values (tensors, numbers, lists and dicts of them) in
    rank order. The processes rendezvous through a ``TCPStore`` that this process holds on
    a free port of 127.0.0.1 (the operating system picks it, so two launches never
    collide). ``worker`` must be a module-level function (a notebook's own functions
    cannot be pickled for a new process). An exception in a worker is raised here as a
    ``RuntimeError`` with the traceback of every rank that failed; past ``timeout``
    seconds a ``TimeoutError``.
    Either way, and on success, every process is ended before this returns.
    """
    if not callable(worker):
        raise TypeError(f"worker must be callable, got {type(worker).__name__}")
    check_int("world_size", world_size, 1)
    timeout = check_float("timeout", timeout, 0, low_open=True)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])  # import torch once, then fork cheap children
    store = dist.TCPStore("127.0.0.1", 0, world_size + 1, is_master=True,
                          wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout))
    results = ctx.Queue()
    processes = [ctx.Process(target=_child, daemon=True,
                             args=(worker, rank, world_size, store.port, timeout, args, results))
                 for rank in range(world_size)]
    deadline = time.monotonic() + timeout
    outputs: dict[int, object] = {}
    try:
        for p in processes:
            p.start()
        while len(outputs) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"launch: {world_size - len(outputs)} of {world_size} ranks "
                                   f"did not finish within {timeout:g} s")
            try:
                raw = results.get(timeout=0.2)
            except queue_module.Empty:
                dead = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"launch: a worker process died with exit code "
                                       f"{dead[0]}") from None
                continue
            status, rank, value = torch.load(io.BytesIO(raw), weights_only=True)
            if status == "error":
                raise RuntimeError(_failures({rank: value}, results, world_size - len(outputs)))
            outputs[rank] = value
    finally:
        for p in processes:
            if p.pid is not None:
                p.join(timeout=max(0.0, min(5.0, deadline - time.monotonic())))
                if p.is_alive():
                    p.terminate()
                    p.join(timeout=2)
                if p.is_alive():
                    p.kill()
                    p.join()
        results.close()
        results.join_thread()
        del store
    return [outputs[r] for r in range(world_size)]


def collectives_worker(rank: int, world_size: int, inputs: list[torch.Tensor]) -> dict:
    """On rank ``rank``: ``all_reduce``, ``reduce_scatter_single`` and ``all_gather_single``
    of ``inputs[rank]`` (PyTorch 2.13's names for ``reduce_scatter_tensor`` and
    ``all_gather_into_tensor``); the reduce-scatter needs a length divisible by the
    world size and scatters the flattened tensor."""
    mine = inputs[rank].reshape(-1)
    summed = mine.clone()
    dist.all_reduce(summed)
    result = {"all_reduce": summed.reshape(inputs[rank].shape)}
    if mine.numel() % world_size == 0:
        shard = mine.new_empty(mine.numel() // world_size)
        dist.reduce_scatter_single(shard, mine.clone())
        result["reduce_scatter"] = shard
    gathered = mine.new_empty(world_size * mine.numel())
    dist.all_gather_single(gathered, mine.clone())
    result["all_gather"] = gathered
    return result


# --------------------------------------------------------------------------- data parallelism


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


def _flat(model: nn.Module) -> torch.Tensor:
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
    return _flat(model)


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
    return _flat(model.module)


def data_parallel_worker(rank: int, world_size: int, X, y, config: TrainConfig):
    """:func:`train_data_parallel` as a :func:`launch` worker."""
    return train_data_parallel(X, y, config)


# --------------------------------------------------------------------------- sharding


def zero1_worker(rank: int, world_size: int, X: torch.Tensor, y: torch.Tensor,
                 config: TrainConfig) -> dict:
    """ZeRO stage 1 by hand: each rank keeps AdamW's states for its shard only.

    Per step: local gradient of the rank's half of the batch, flattened; a reduce-scatter
    leaves each rank the summed gradient of its own shard (divided by the world size:
    the mean); AdamW updates that shard; an all-gather gives every rank all parameters.
    Returns the final parameters and the number of optimizer-state elements this rank kept.
    """
    model = digits_mlp(config.seed, config.batch_norm, X.dtype)
    flat = _flat(model)
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
    return {"params": _flat(model), "state_elements": kept}


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
    from .scale import training_memory

    check_float("n_params", n_params, 0, low_open=True)
    check_int("n_devices", n_devices, 1)
    check_choice("stage", stage, (0, 1, 2, 3))
    m = training_memory(n_params, precision="mixed", optimizer="adam")
    optimizer = m.optimizer_states + m.master_weights
    sharded = [0.0, optimizer, optimizer + m.gradients, m.total][stage]
    return m.total - sharded + sharded / n_devices


# --------------------------------------------------------------------------- tensor parallelism


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


# --------------------------------------------------------------------------- pipelines


@dataclass(frozen=True)
class Task:
    """One pass of one micro-batch on one pipeline stage, placed in time."""

    stage: int
    micro_batch: int
    kind: str  # "F" (forward) or "B" (backward)
    start: float
    end: float


@dataclass
class Schedule:
    """A pipeline schedule: its tasks, and what it costs."""

    tasks: list[Task] = field(default_factory=list)
    n_stages: int = 0

    @property
    def makespan(self) -> float:
        """Time from the first task's start to the last task's end."""
        return max(t.end for t in self.tasks)

    @property
    def idle_fraction(self) -> float:
        """The share of stage time spent waiting, ``1 - busy / (p * makespan)``."""
        busy = sum(t.end - t.start for t in self.tasks)
        return 1 - busy / (self.n_stages * self.makespan)

    def peak_activations(self) -> list[int]:
        """Per stage, the most micro-batches whose activations are held at once
        (forward done, backward not yet)."""
        peaks = []
        for s in range(self.n_stages):
            held = peak = 0
            for t in sorted((t for t in self.tasks if t.stage == s), key=lambda t: t.start):
                held += 1 if t.kind == "F" else -1
                peak = max(peak, held)
            peaks.append(peak)
        return peaks


def _place(orders: list[list[tuple[str, int]]], t_forward: float, t_backward: float) -> Schedule:
    """Start every task as early as its stage and its data allow: ``F(s, i)`` after
    ``F(s-1, i)``; ``B(s, i)`` after ``B(s+1, i)`` (and after ``F(p-1, i)`` on the last
    stage); each stage runs its tasks in the given order, one at a time."""
    p = len(orders)
    end: dict[tuple[str, int, int], float] = {}
    position = [0] * p
    free = [0.0] * p
    tasks = []
    while any(position[s] < len(orders[s]) for s in range(p)):
        progressed = False
        for s in range(p):
            if position[s] == len(orders[s]):
                continue
            kind, i = orders[s][position[s]]
            dep = ("F", s - 1, i) if kind == "F" else (("B", s + 1, i) if s < p - 1
                                                        else ("F", s, i))
            if kind == "F" and s == 0:
                ready = 0.0
            elif dep in end:
                ready = end[dep]
            else:
                continue
            start = max(ready, free[s])
            finish = start + (t_forward if kind == "F" else t_backward)
            end[kind, s, i] = free[s] = finish
            tasks.append(Task(s, i, kind, start, finish))
            position[s] += 1
            progressed = True
        if not progressed:
            raise RuntimeError("pipeline schedule deadlocks")
    return Schedule(tasks, p)


def _check_pipeline(n_stages, n_micro, t_forward, t_backward) -> None:
    check_int("n_stages", n_stages, 1)
    check_int("n_micro", n_micro, 1)
    check_float("t_forward", t_forward, 0, low_open=True)
    check_float("t_backward", t_backward, 0, low_open=True)


def gpipe_schedule(n_stages: int, n_micro: int, t_forward: float = 1.0,
                   t_backward: float = 2.0) -> Schedule:
    """GPipe :cite:p:`huang2019gpipe`: all forwards, then all backwards, on every stage.

    Idle fraction ``(p - 1) / (m + p - 1)``; each stage holds the activations of all
    ``m`` micro-batches at the turn.
    """
    _check_pipeline(n_stages, n_micro, t_forward, t_backward)
    order = [("F", i) for i in range(n_micro)] + [("B", i) for i in range(n_micro)]
    return _place([order] * n_stages, t_forward, t_backward)


def one_f_one_b_schedule(n_stages: int, n_micro: int, t_forward: float = 1.0,
                         t_backward: float = 2.0) -> Schedule:
    """1F1B (PipeDream-Flush, :cite:t:`narayanan2021efficient`): stage ``s`` runs
    ``p - s - 1`` warm-up forwards, then alternates one forward and one backward.

    Same bubble as GPipe, but stage ``s`` holds at most ``p - s`` micro-batches'
    activations instead of ``m``.
    """
    _check_pipeline(n_stages, n_micro, t_forward, t_backward)
    orders = []
    for s in range(n_stages):
        warm = min(n_stages - s - 1, n_micro)
        order = [("F", i) for i in range(warm)]
        for i in range(n_micro - warm):
            order += [("F", warm + i), ("B", i)]
        order += [("B", i) for i in range(n_micro - warm, n_micro)]
        orders.append(order)
    return _place(orders, t_forward, t_backward)


# --------------------------------------------------------------------------- cost model


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
    from .transformer import GPT, GPTConfig

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


# --------------------------------------------------------------------------- torchrun


def main(steps: int = 20, tolerance: float = 1e-12) -> int:
    """Entry point of ``torchrun ... -m companion.distributed``: DDP on the digits against
    one process on rank 0; returns (and exits with) 1 if they differ by more than
    ``tolerance``. Uses NCCL when every local rank can have a GPU of its own, gloo
    otherwise."""
    from .data import load_digits_split

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
