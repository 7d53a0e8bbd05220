"""companion.distributed against the plain sum and against torch.distributed on gloo.

The single-process simulations are checked for world sizes 1 to 8 and lengths that the
world size does not divide; the multi-process tests start 2 or 3 real processes through
``launch``, which has a timeout and always ends its processes (checked below too).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import digits_split
from torch import nn

from companion import distributed as D

TIMEOUT = 120.0  # seconds per launch; a healthy launch on 2 busy cores takes a few


def _rank_tensors(world_size: int, length: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(length, dtype=torch.float64, generator=g) for _ in range(world_size)]


def _pid_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture(scope="module")
def digits():
    return digits_split(torch.float64)


# --------------------------------------------------------------------------- simulations


@pytest.mark.parametrize("world_size", range(1, 9))
def test_ring_all_reduce_is_the_sum_for_any_length(world_size):
    g = torch.Generator().manual_seed(world_size)
    for trial in range(4):
        length = int(torch.randint(1, 50, (1,), generator=g))
        tensors = _rank_tensors(world_size, length, 100 * world_size + trial)
        result = D.ring_all_reduce(tensors)
        expected = torch.stack(tensors).sum(0)
        for out in result.outputs:
            torch.testing.assert_close(out, expected, rtol=1e-13, atol=1e-13)
        # every chunk travels n - 1 hops in each phase: 2 (n - 1) S bytes in total
        assert sum(result.bytes_sent) == 2 * (world_size - 1) * length * 8


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_ring_bytes_per_rank_are_2_n_minus_1_over_n_times_s(world_size):
    tensors = [t.reshape(2, -1) for t in _rank_tensors(world_size, 24 * world_size, 0)]
    result = D.ring_all_reduce(tensors)
    size = tensors[0].numel() * 8
    assert result.bytes_sent == [2 * (world_size - 1) * size // world_size] * world_size
    assert result.outputs[0].shape == (2, 12 * world_size)
    assert D.all_reduce_bytes_per_rank(size, world_size) == 2 * (world_size - 1) / world_size * size


@pytest.mark.parametrize("world_size", [1, 3, 5, 8])
def test_reduce_scatter_and_all_gather_on_their_own(world_size):
    tensors = _rank_tensors(world_size, 37, world_size)
    scattered = D.ring_reduce_scatter(tensors)
    expected = torch.stack(tensors).sum(0).tensor_split(world_size)
    for r in range(world_size):
        torch.testing.assert_close(scattered.outputs[r], expected[r], rtol=1e-13, atol=1e-13)
        lo, hi = D.shard_bounds(37, r, world_size)
        assert scattered.outputs[r].numel() == hi - lo
    chunks = [torch.full((r + 1,), float(r), dtype=torch.float64) for r in range(world_size)]
    gathered = D.ring_all_gather(chunks)
    for out in gathered.outputs:
        assert torch.equal(out, torch.cat(chunks))
    # rank r forwards every chunk but the one of its right neighbour
    assert gathered.bytes_sent == [8 * (sum(range(1, world_size + 1)) - (r + 1) % world_size - 1)
                                   for r in range(world_size)]


def test_naive_all_reduce_loads_the_root():
    tensors = _rank_tensors(4, 10, 0)
    result = D.naive_all_reduce(tensors)
    torch.testing.assert_close(result.outputs[3], torch.stack(tensors).sum(0))
    assert result.bytes_sent == [3 * 80, 80, 80, 80]
    assert D.all_reduce_bytes_per_rank(80, 4, "naive") == 240


def test_shard_bounds_cover_the_tensor():
    for n in (1, 2, 7):
        for numel in (0, 5, 16):
            bounds = [D.shard_bounds(numel, r, n) for r in range(n)]
            sizes = [len(s) for s in torch.arange(numel).tensor_split(n)]
            assert [hi - lo for lo, hi in bounds] == sizes
            assert bounds[0][0] == 0 and bounds[-1][1] == numel


@pytest.mark.parametrize("bad, error, words", [
    ([], ValueError, "world size >= 1"),
    ("not a list", TypeError, "tensors must be list"),
    ([torch.zeros(3), torch.zeros(4)], ValueError, "shape"),
    ([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], TypeError, "dtype"),
    ([torch.zeros(3), [0.0, 0.0, 0.0]], TypeError, "tensors[1]"),
])
def test_bad_collective_input(bad, error, words):
    for fn in (D.ring_all_reduce, D.ring_reduce_scatter, D.naive_all_reduce):
        with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
            fn(bad)


def test_bad_ranks_and_sizes():
    with pytest.raises(ValueError, match="rank must be <= 1"):
        D.shard_bounds(10, 2, 2)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        D.shard_bounds(10, -1, 2)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        D.shard_bounds(10, 0, 0)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        D.launch(D.collectives_worker, 0)
    with pytest.raises(TypeError, match="worker must be callable"):
        D.launch("collectives_worker", 2)
    with pytest.raises(ValueError, match="rank must be <= 1"):
        D.TensorParallelMLP(nn.Linear(2, 4), nn.Linear(4, 2), 2, 2)
    with pytest.raises(ValueError, match="chunks\\[0\\] must be 1-D"):
        D.ring_all_gather([torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="algorithm must be one of"):
        D.all_reduce_bytes_per_rank(8, 2, "tree")
    with pytest.raises(ValueError, match="shares must add up"):
        D.TrainConfig(batch_size=64, shares=(40, 20))
    with pytest.raises(ValueError, match="stage must be one of"):
        D.zero_memory_per_device(1e9, 8, 4)


# --------------------------------------------------------------------------- gloo


def test_gloo_collectives_equal_the_ring_simulation():
    world_size = 3
    inputs = [t.reshape(3, 4) for t in _rank_tensors(world_size, 12, 1)]
    results = D.launch(D.collectives_worker, world_size, inputs, timeout=TIMEOUT)
    ring = D.ring_all_reduce(inputs).outputs
    scattered = D.ring_reduce_scatter(inputs).outputs
    gathered = D.ring_all_gather([t.reshape(-1) for t in inputs]).outputs
    for r, res in enumerate(results):
        torch.testing.assert_close(res["all_reduce"], ring[r], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(res["reduce_scatter"], scattered[r], rtol=1e-13, atol=1e-13)
        assert torch.equal(res["all_gather"], gathered[r])


def test_data_parallel_equals_one_process_and_accumulation(digits):
    config = D.TrainConfig(steps=6)
    reference = D.train_single(digits.X_train, digits.y_train, config)
    accumulated = D.train_single(digits.X_train, digits.y_train, config, micro_batches=4)
    ranks = D.launch(D.data_parallel_worker, 2, digits.X_train, digits.y_train, config,
                     timeout=TIMEOUT)
    assert (accumulated - reference).abs().max() <= 1e-12
    for params in ranks:
        assert (params - reference).abs().max() <= 1e-12
    start = D.digits_mlp(0)
    assert (reference - torch.cat([p.reshape(-1) for p in start.parameters()])).abs().max() > 1e-3


def test_unequal_shares_break_data_parallelism_unless_rescaled(digits):
    uneven = D.TrainConfig(steps=4, shares=(48, 16))
    reference = D.train_single(digits.X_train, digits.y_train, uneven)
    naive = D.launch(D.data_parallel_worker, 2, digits.X_train, digits.y_train, uneven,
                     timeout=TIMEOUT)[0]
    fixed_config = D.TrainConfig(steps=4, shares=(48, 16), rescale_uneven=True)
    fixed = D.launch(D.data_parallel_worker, 2, digits.X_train, digits.y_train, fixed_config,
                     timeout=TIMEOUT)[0]
    assert (naive - reference).abs().max() > 1e-4
    assert (fixed - reference).abs().max() <= 1e-12


def test_batch_norm_without_sync_differs(digits):
    config = D.TrainConfig(steps=3, batch_norm=True)
    reference = D.train_single(digits.X_train, digits.y_train, config)
    ranks = D.launch(D.data_parallel_worker, 2, digits.X_train, digits.y_train, config,
                     timeout=TIMEOUT)
    assert (ranks[0] - reference).abs().max() > 1e-4
    assert (ranks[0] - ranks[1]).abs().max() <= 1e-12  # the ranks still agree with each other


def test_zero1_and_fsdp_equal_adamw(digits):
    config = D.TrainConfig(steps=5, optimizer="adamw", lr=1e-2)
    reference = D.train_single(digits.X_train, digits.y_train, config)
    zero = D.launch(D.zero1_worker, 2, digits.X_train, digits.y_train, config, timeout=TIMEOUT)
    for res in zero:
        assert (res["params"] - reference).abs().max() <= 1e-12
        assert res["state_elements"] == reference.numel()  # m and v of half the parameters
    fsdp = D.launch(D.fsdp_worker, 2, digits.X_train, digits.y_train, config, timeout=TIMEOUT)
    for res in fsdp:
        assert (res["params"] - reference).abs().max() <= 1e-12
        assert res["local_elements"] * 2 == res["full_elements"] == reference.numel()


def test_tensor_parallel_mlp_equals_the_unsplit_one():
    torch.manual_seed(0)
    d_model, hidden = 6, 20  # 20 / 3 is not whole: shards of 7, 7 and 6 hidden units
    fc1, fc2 = nn.Linear(d_model, hidden).double(), nn.Linear(hidden, d_model).double()
    x = torch.randn(2, 5, d_model, dtype=torch.float64)
    ranks = D.launch(D.tensor_parallel_worker, 3, fc1, fc2, x, timeout=TIMEOUT)
    x_ref = x.clone().requires_grad_()
    out = fc2(F.gelu(fc1(x_ref)))
    out.square().sum().backward()
    for res in ranks:
        torch.testing.assert_close(res["out"], out.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(res["x_grad"], x_ref.grad, rtol=0, atol=1e-12)
        assert res["bytes"] == [x.numel() * 8] * 2  # one all-reduce forward, one backward
        torch.testing.assert_close(res["b2_grad"], fc2.bias.grad, rtol=0, atol=1e-12)
    for name, ref, dim in (("w1", fc1.weight.grad, 0), ("b1", fc1.bias.grad, 0),
                           ("w2", fc2.weight.grad, 1)):
        joined = torch.cat([res[f"{name}_grad"] for res in ranks], dim=dim)
        torch.testing.assert_close(joined, ref, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- launch itself


def failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ArithmeticError("rank 1 gives up")
    torch.distributed.barrier()  # rank 0 would wait for ever: launch must end it


def sleeping_worker(rank: int, world_size: int, folder: str) -> None:
    Path(folder, f"{rank}.pid").write_text(str(os.getpid()))
    time.sleep(600)


def test_a_failing_worker_raises_with_its_traceback():
    with pytest.raises(RuntimeError, match="rank 1 failed(.|\n)*ArithmeticError: rank 1 gives up"):
        D.launch(failing_worker, 2, timeout=TIMEOUT)


def test_a_hanging_worker_times_out_and_is_ended(tmp_path):
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish within"):
        D.launch(sleeping_worker, 2, str(tmp_path), timeout=30.0)
    assert time.monotonic() - started < 90
    pids = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert len(pids) == 2
    assert all(_pid_is_gone(pid) for pid in pids)


def test_launch_returns_in_rank_order_and_leaves_nothing():
    results = D.launch(os_getpid_worker, 2, timeout=TIMEOUT)
    assert [r for r, _ in results] == [0, 1]
    assert all(_pid_is_gone(pid) for _, pid in results)


def os_getpid_worker(rank: int, world_size: int) -> tuple[int, int]:
    return rank, os.getpid()


def test_launch_ranks_start_with_the_preloads_imported():
    # the fork server imports them once (a name it cannot import, it skips silently)
    import importlib

    preload = D.processes.PRELOAD
    assert "torch._dynamo" in preload  # what DDP and FSDP import on first use
    for name in preload:
        importlib.import_module(name)
    assert D.launch(imported_worker, 2, preload, timeout=TIMEOUT) == [True, True]


def imported_worker(rank: int, world_size: int, names: list[str]) -> bool:
    import sys

    return all(name in sys.modules for name in names)


# --------------------------------------------------------------------------- schedules and costs


@pytest.mark.parametrize("p, m", [(1, 1), (2, 1), (4, 8), (4, 4), (8, 32), (3, 7)])
def test_gpipe_bubble_and_1f1b_memory(p, m):
    for t_f, t_b in ((1.0, 2.0), (1.0, 1.0)):
        gpipe = D.gpipe_schedule(p, m, t_f, t_b)
        assert math.isclose(gpipe.idle_fraction, (p - 1) / (m + p - 1), abs_tol=1e-12)
        assert math.isclose(gpipe.makespan, (m + p - 1) * (t_f + t_b))
        assert gpipe.peak_activations() == [m] * p
        ofob = D.one_f_one_b_schedule(p, m, t_f, t_b)
        assert math.isclose(ofob.makespan, gpipe.makespan)
        assert ofob.peak_activations() == [min(p - s, m) for s in range(p)]
        for schedule in (gpipe, ofob):
            assert len(schedule.tasks) == 2 * p * m
            for s in range(p):  # a stage never runs two tasks at once
                own = sorted((t for t in schedule.tasks if t.stage == s), key=lambda t: t.start)
                assert all(a.end <= b.start + 1e-12 for a, b in zip(own, own[1:]))


def test_zero_memory_matches_the_paper():
    # Rajbhandari et al. 2020, figure 1: 7.5B parameters on 64 GPUs
    psi, n = 7.5e9, 64
    expected = {0: 120e9, 1: 31.4e9, 2: 16.6e9, 3: 1.88e9}
    for stage, bytes_ in expected.items():
        assert abs(D.zero_memory_per_device(psi, n, stage) - bytes_) / bytes_ < 0.01
    assert D.zero_memory_per_device(psi, 1, 3) == D.zero_memory_per_device(psi, 1, 0)


def test_cost_model():
    one = D.all_reduce_seconds(1e9, 1, 1e-5, 1e10)
    assert one == 0.0
    t = D.all_reduce_seconds(1e9, 4, 1e-5, 1e10)
    assert math.isclose(t, 6e-5 + 1.5e9 / 1e10)
    step = D.data_parallel_step_seconds(0.1, 1e9, 4, 1e-5, 1e10, overlap=0.5)
    assert math.isclose(step, 0.1 + t - 0.05)
    assert D.data_parallel_step_seconds(1.0, 1e9, 4, 1e-5, 1e10, overlap=1.0) == 1.0
