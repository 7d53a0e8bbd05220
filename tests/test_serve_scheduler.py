"""companion.scheduler and the shared sampling step, without HTTP.

Sampling at the numeric edges (the smallest positive float, subnormals, float16, huge
``top_k``, tiny ``top_p``); continuous and static batching against ``GPT.generate`` run
one request at a time (float64, so that batch-dependent rounding cannot flip a token);
one failing sequence leaving the others untouched; deadlines and the asyncio loop.
"""

import asyncio
import collections
import sys

import pytest
import torch

from companion import scheduler as S
from companion.pretrained import load_pretrained_gpt
from companion.transformer import MIN_TEMPERATURE, sample_next_token

TINY = [sys.float_info.min, 5e-324, 1e-38, 1e-45, 1e-300, MIN_TEMPERATURE / 2]


@pytest.fixture(scope="module")
def model64():
    model, _ = load_pretrained_gpt("cpu")
    return model.double().eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperatures_are_greedy_and_finite(dtype, temperature):
    logits = (torch.randn(4, 103, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    got = sample_next_token(logits, temperature, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, logits.argmax(-1, keepdim=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_temperatures_just_above_the_floor_sample_valid_ids(dtype):
    logits = (torch.randn(64, 103, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    for temperature in (MIN_TEMPERATURE, 2 * MIN_TEMPERATURE, 1e-3, 2.0):
        ids = sample_next_token(logits, temperature, generator=torch.Generator().manual_seed(2))
        assert ids.shape == (64, 1) and 0 <= ids.min() and ids.max() < 103
    # at the floor the logits' gaps (>= 1e-2 here) are 1e3 nats: the arg-max every time
    cold = sample_next_token(logits.float(), MIN_TEMPERATURE)
    assert torch.equal(cold, logits.float().argmax(-1, keepdim=True))


def test_huge_top_k_and_edge_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    assert sample_next_token(logits, 1.0, top_k=10**12, generator=g).item() in range(4)
    tiny = [sample_next_token(logits, 1.0, generator=g, top_p=1e-300).item() for _ in range(50)]
    assert set(tiny) == {0}  # the most likely id always stays
    draws = torch.cat([sample_next_token(logits.expand(4000, 4), 1.0, generator=g, top_p=0.75)])
    freq = torch.bincount(draws.flatten(), minlength=4).double() / 4000
    # the nucleus of 0.75 is {0, 1}: renormalised 0.625 / 0.375, nothing else
    assert freq[2] == freq[3] == 0
    torch.testing.assert_close(freq[:2], torch.tensor([0.625, 0.375], dtype=torch.float64),
                               atol=0.03, rtol=0)
    same = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(sample_next_token(logits.expand(50, 4), 0.7, generator=same[0], top_p=1.0),
                       sample_next_token(logits.expand(50, 4), 0.7, generator=same[1]))
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="top_p"):
            sample_next_token(logits, 1.0, top_p=bad)
    with pytest.raises(TypeError, match="top_p must be a real number"):
        sample_next_token(logits, 1.0, top_p=True)


SPECS = [  # prompt length, max_new_tokens, temperature, top_k, top_p, seed, arrival step
    (5, 20, 0.8, None, None, 1, 0), (30, 3, 1.0, 5, None, 2, 2), (60, 40, 0.0, None, None, 3, 2),
    (1, 12, 1.2, None, 0.9, 4, 5), (10, 7, 1e-38, 3, 0.5, 5, 30), (127, 1, 1.0, None, None, 6, 31),
]


def _sequences(model):
    g = torch.Generator().manual_seed(0)
    return [S.Sequence(torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist(), k,
                       t, tk, tp, torch.Generator().manual_seed(seed))
            for n, k, t, tk, tp, seed, _ in SPECS]


def _alone(model, seq, seed):
    out = model.generate(torch.tensor([seq.prompt]), seq.max_new_tokens, seq.temperature,
                         seq.top_k, torch.Generator().manual_seed(seed), top_p=seq.top_p)
    return out[0, len(seq.prompt):].tolist()


@pytest.mark.parametrize("policy", S.POLICIES)
def test_batched_texts_equal_each_request_alone(model64, policy):
    sequences = _sequences(model64)
    expected = [_alone(model64, s, spec[5]) for s, spec in zip(sequences, SPECS)]
    steps = S.run_to_completion(model64, sequences, [spec[6] for spec in SPECS],
                                max_batch_size=3, policy=policy)
    assert [s.new for s in sequences] == expected
    assert all(s.finish_reason == "length" and s.caches is None for s in sequences)
    # continuous batching needs fewer steps than static for these staggered arrivals
    assert steps == {"continuous": 42, "static": 67}[policy]


def test_schedule_admits_at_every_step_only_when_continuous():
    a, b, c = (S.Sequence([0], 5) for _ in range(3))
    b.finish("length")
    waiting = collections.deque([c])
    assert S.schedule([a, b], waiting, 4, "static") == [a] and list(waiting) == [c]
    assert S.schedule([a, b], waiting, 4, "continuous") == [a, c] and not waiting
    cancelled = S.Sequence([0], 5)
    cancelled.finish("cancelled")
    assert S.schedule([], collections.deque([cancelled, a]), 1, "static") == [a]


def test_one_failing_sequence_fails_alone(model64):
    sequences = _sequences(model64)[:4]
    expected = [_alone(model64, s, spec[5]) for s, spec in zip(sequences, SPECS)]
    for s, spec in zip(sequences, SPECS):
        s.generator.manual_seed(spec[5])
    bad_id = S.Sequence([0, model64.config.vocab_size + 7], 5)  # the forward pass fails
    bad_sampling = S.Sequence([1, 2], 5, top_k=0)  # sampling refuses top_k=0
    S.run_to_completion(model64, [*sequences, bad_id, bad_sampling], [0, 0, 0, 0, 0, 1],
                        max_batch_size=6)
    assert [s.new for s in sequences] == expected
    assert bad_id.finish_reason == bad_sampling.finish_reason == "error"
    assert "top_k" in str(bad_sampling.error) and bad_id.new == bad_sampling.new == []


def test_stop_sequences_end_the_text_and_are_removed(model64):
    seq = S.Sequence([5, 6, 7], 40, 0.0)
    S.run_to_completion(model64, [seq])
    stop = tuple(seq.new[10:12])
    again = S.Sequence([5, 6, 7], 40, 0.0, stop=(stop,))
    S.run_to_completion(model64, [again])
    first = next(i for i in range(len(seq.new)) if tuple(seq.new[i:i + 2]) == stop)
    assert again.finish_reason == "stop" and again.new == seq.new[:first]


def test_scheduler_loop_deadlines_queue_and_death(model64):
    async def main():
        sched = S.Scheduler(model64, max_batch_size=2, max_queue=1)
        with pytest.raises(S.SchedulerDead):
            sched.submit(S.Sequence([1], 2))
        sched.start()
        late = S.Sequence([1, 2], 100, deadline=0.0)  # already past its deadline
        sched.submit(late)
        with pytest.raises(S.QueueFull):
            sched.submit(S.Sequence([1], 2))
        ok = S.Sequence([3], 4, 0.0)
        while not late.done:
            await asyncio.sleep(0.01)
        sched.submit(ok)
        while not ok.done:
            await asyncio.sleep(0.01)
        assert late.finish_reason == "timeout" and late.new == [] and ok.finish_reason == "length"
        pending = S.Sequence([3], 127)
        sched.submit(pending)
        sched.kill()
        await asyncio.sleep(0.05)
        assert not sched.alive and pending.finish_reason == "error"
        await sched.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


def test_scheduler_bad_arguments(model64):
    with pytest.raises(TypeError, match="model"):
        S.Scheduler("gpt")
    with pytest.raises(ValueError, match="policy"):
        S.Scheduler(model64, policy="fifo")
    with pytest.raises(ValueError, match="max_batch_size"):
        S.Scheduler(model64, max_batch_size=0)
    with pytest.raises(ValueError, match="arrivals"):
        S.run_to_completion(model64, [S.Sequence([1], 1)], [0, 1])
