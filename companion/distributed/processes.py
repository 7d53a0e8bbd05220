"""Real processes: :func:`~companion.distributed.launch` starts ``world_size`` ranks on a
gloo process group (NCCL on GPUs) and collects their results;
:func:`~companion.distributed.collectives_worker` runs ``torch.distributed``'s collectives
(chapter 8, "Real processes")."""

from __future__ import annotations

import datetime
import io
import queue as queue_module
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .._validate import check_float, check_int

# What the fork server imports once, before it forks any rank: this module (torch), and
# torch._dynamo, which DistributedDataParallel and FSDP import on first use (about 900
# modules: seconds of CPU that every rank would otherwise spend again).
PRELOAD = [__name__, "torch._dynamo", "torch.distributed.fsdp", "companion.transformer"]


def _child(worker, rank: int, world_size: int, port: int, timeout: float, args, results) -> None:
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        # init can return on one rank while a peer still connects to it; a worker with no
        # collective would then let that rank destroy the group under the peer's feet
        dist.barrier()
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
    ctx.set_forkserver_preload(PRELOAD)  # import once, then fork cheap children
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
