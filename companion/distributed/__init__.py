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

One module per group: ``collectives``, ``processes``, ``data_parallel``, ``sharding``,
``tensor_parallel``, ``pipeline`` and ``cost``; every public name is importable from
``companion.distributed`` itself.

``torchrun --standalone --nproc-per-node 2 -m companion.distributed`` runs ``__main__``:
data-parallel training against one process, exit code 1 if they differ by more than
``1e-12``.
"""
from .collectives import (
    Collective,
    all_reduce_bytes_per_rank,
    naive_all_reduce,
    ring_all_gather,
    ring_all_reduce,
    ring_reduce_scatter,
    shard_bounds,
)
from .cost import all_reduce_seconds, data_parallel_step_seconds, throughput_worker
from .data_parallel import (
    TrainConfig,
    data_parallel_worker,
    digits_mlp,
    flat_parameters,
    train_data_parallel,
    train_single,
)
from .pipeline import Schedule, Task, gpipe_schedule, one_f_one_b_schedule
from .processes import collectives_worker, launch
from .sharding import fsdp_worker, zero1_worker, zero_memory_per_device
from .tensor_parallel import TensorParallelMLP, tensor_parallel_worker

__all__ = [
    "Collective", "Schedule", "Task", "TensorParallelMLP", "TrainConfig",
    "all_reduce_bytes_per_rank", "all_reduce_seconds", "collectives_worker",
    "data_parallel_step_seconds", "data_parallel_worker", "digits_mlp", "flat_parameters",
    "fsdp_worker",
    "gpipe_schedule", "launch", "naive_all_reduce", "one_f_one_b_schedule",
    "ring_all_gather", "ring_all_reduce", "ring_reduce_scatter", "shard_bounds",
    "tensor_parallel_worker", "throughput_worker", "train_data_parallel", "train_single",
    "zero1_worker", "zero_memory_per_device",
]

# The public home of every name is the package (the API page, the book's cross-references):
for _name in __all__:
    globals()[_name].__module__ = __name__
