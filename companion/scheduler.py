"""Continuous batching: the iteration-level scheduler of the model server (book: chapter 11).

A decoding step reads every weight of the model once, whatever the batch size, so its
cost grows far more slowly than its batch: on a GPU, decoding a small batch is bound by
memory bandwidth, not by arithmetic. On the CPU of the book's chapter 11 a step of 16
sequences took about 5 times as long as a step of one (not 16 times; for a model this
small, per-operator overhead in Python and PyTorch is likely much of a step's cost). A
server therefore runs the requests it has *together*. How it forms those batches
decides latency:

* **static batching** (:func:`schedule` with ``policy="static"``) admits new requests
  only when the running batch is empty; a short request that arrives while a long one
  runs waits for it (head-of-line blocking), and finished rows idle until the longest
  one is done;
* **continuous batching** (``policy="continuous"``), introduced by Orca
  :cite:p:`yu2022orca` and used by vLLM :cite:p:`kwon2023vllm`, schedules at the level of
  one iteration: a finished sequence leaves the batch after the step that finished it,
  and a waiting one joins at the next step.

Joining mid-flight means the sequences of one batch have different lengths. Each
:class:`Sequence` has its own key/value caches (:class:`~companion.transformer.KVCache`)
and position, and :func:`ragged_forward` runs one step for all of them as Orca's
*selective batching* does: the layers that treat each token alone (embeddings, layer
norms, the MLPs, the output head) run once on all the batch's tokens concatenated, and
attention, which mixes a sequence's own tokens, runs per sequence against its own cache.
A newly admitted sequence contributes its whole prompt to the step (its prefill), a
running one its last token. :func:`decode_step` samples each sequence's next token with
its own generator, so a request's text does not depend on its company -- up to the last
bits of float32 matrix products, which kernels may sum in a different order for
different batch sizes. One sequence's failure never fails another's: a failing batch is
rolled back and retried one sequence at a time.

:class:`Scheduler` runs the loop in an asyncio task (the model in a worker thread) with a
bounded waiting queue and per-request deadlines; :mod:`companion.serve` puts HTTP in front.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from companion._validate import check_float, check_int
from companion.transformer import GPT, KVCache, sample_next_token

POLICIES = ("continuous", "static")


class QueueFull(Exception):
    """The waiting queue holds ``max_queue`` requests already (the server answers 429)."""


class SchedulerDead(Exception):
    """The scheduler's task has stopped (the server answers 503)."""


@dataclass(eq=False)
class Sequence:
    """One request being generated: its prompt ids, sampling settings, new ids and caches.

    ``finish_reason`` is ``None`` while it runs, then ``"length"`` (``max_new_tokens``
    reached), ``"stop"`` (it ended with one of ``stop``, which is removed from ``new``),
    ``"timeout"`` (past ``deadline``, a ``time.monotonic()`` value), ``"cancelled"`` or
    ``"error"`` (``error`` holds the exception). ``on_update`` is called in the event loop
    after every step that changed the sequence.
    """

    prompt: list[int]
    max_new_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    generator: torch.Generator | None = None
    stop: tuple[tuple[int, ...], ...] = ()
    deadline: float = float("inf")
    on_update: Callable[[], None] | None = None
    new: list[int] = field(default_factory=list)
    caches: list[KVCache] | None = None
    finish_reason: str | None = None
    error: BaseException | None = None
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """Mark it finished (the first reason counts); it leaves the batch at the next step."""
        if self.finish_reason is None:
            self.finish_reason, self.error = reason, error
            self.caches = None  # the memory goes back

    def append(self, token: int) -> None:
        """Add one generated id; finish on a stop sequence or at ``max_new_tokens``."""
        if self.done:
            return
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.new.append(token)
        for stop in self.stop:
            if tuple(self.new[-len(stop):]) == stop:
                del self.new[-len(stop):]
                return self.finish("stop")
        if len(self.new) >= self.max_new_tokens:
            self.finish("length")


# --------------------------------------------------------------------------- one step


@torch.no_grad()
def ragged_forward(model: GPT, sequences: list[Sequence]) -> torch.Tensor:
    """Last-position logits ``(N, V)`` of N sequences of different lengths, in one step.

    Each sequence feeds its whole prompt if it has no cache yet (prefill), else its
    last new id, at the positions after its own cache. Token-wise layers run on all
    tokens at once; attention runs per sequence with its own cache.
    """
    device = model.token_embedding.weight.device
    chunks, caches = [], []
    for s in sequences:
        if s.caches is None:
            s.caches = model.new_kv_caches(1)
        chunks.append(s.prompt if not s.new else s.new[-1:])
        caches.append(s.caches)
    lengths = [len(c) for c in chunks]
    ids = torch.tensor([i for c in chunks for i in c], device=device)  # (sum T,)
    positions = torch.cat([torch.arange(c[0].length, c[0].length + n, device=device)
                           for c, n in zip(caches, lengths)])  # (sum T,)
    x = model.token_embedding(ids) + model.position_embedding(positions)  # (sum T, C)
    for layer, block in enumerate(model.blocks):
        attn = block.attn
        qkv = attn.in_proj(block.attn_norm(x))  # (sum T, 3C): all tokens at once
        attended = [_attend(attn, part, c[layer]) for part, c in zip(qkv.split(lengths), caches)]
        x = x + attn.out_proj(torch.cat(attended))  # (sum T, C)
        x = x + block.mlp(block.mlp_norm(x))  # all tokens of all sequences at once
    last = torch.tensor(lengths, device=device).cumsum(0) - 1  # (N,)
    return model.lm_head(model.final_norm(x[last]))  # (N, V)


def _attend(attn, qkv: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One sequence's attention: its ``(T, 3C)`` projections against its own cache."""
    T, H = qkv.size(0), attn.num_heads
    q, k, v = (t.view(1, T, H, attn.head_dim).transpose(1, 2)  # (1, nh, T, hs)
               for t in qkv.split(attn.embed_dim, dim=-1))
    past = cache.length
    k, v = cache.append(k, v)  # (1, nh, past + T, hs)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=past == 0)  # after a cache: all
    return y.transpose(1, 2).reshape(T, attn.embed_dim)  # (T, C)


def _rollback(sequences: list[Sequence], lengths: list[int | None]) -> None:
    for s, n in zip(sequences, lengths):
        if s.caches is not None:
            for cache in s.caches:
                cache.length = n or 0


def decode_step(model: GPT, running: list[Sequence]) -> None:
    """One forward pass for ``running`` and one sampled id for each of them.

    If the batch fails, its caches are rolled back and each sequence is stepped alone,
    so that only the sequences that fail by themselves finish with ``"error"``.
    """
    lengths = [s.caches[0].length if s.caches else None for s in running]
    try:
        logits = ragged_forward(model, running)
    except Exception:  # noqa: BLE001 -- isolated below
        if len(running) == 1:
            _rollback(running, lengths)
            return running[0].finish("error", RuntimeError("the forward pass failed"))
        _rollback(running, lengths)
        for s in running:
            decode_step(model, [s])
        return
    for s, row in zip(running, logits):
        try:
            s.append(int(sample_next_token(row[None], s.temperature, s.top_k, s.generator,
                                           s.top_p)))
        except Exception as error:  # noqa: BLE001 -- this request alone fails
            s.finish("error", error)


# --------------------------------------------------------------------------- the policy


def schedule(running: list[Sequence], waiting: collections.deque, max_batch_size: int,
             policy: str = "continuous") -> list[Sequence]:
    """The batch of the next step: finished sequences leave, waiting ones join.

    Continuous batching admits at every step while there is room; static batching
    only when the whole batch has finished.
    """
    running = [s for s in running if not s.done]
    if policy == "continuous" or not running:
        while waiting and len(running) < max_batch_size:
            s = waiting.popleft()
            if not s.done:  # cancelled or timed out while waiting
                running.append(s)
    return running


# --------------------------------------------------------------------------- the loop


class Scheduler:
    """Runs :func:`schedule` and :func:`decode_step` in a loop, in an asyncio task.

    ``max_queue`` bounds the waiting requests (:meth:`submit` raises :class:`QueueFull`
    beyond it); a sequence past its ``deadline`` finishes with ``"timeout"`` and frees its
    slot; a ``"static"`` scheduler waits up to ``max_wait_ms`` for company before it
    starts a batch. ``on_step(batch_size, seconds)`` is called after every step. The model
    runs in a worker thread, so the event loop keeps answering while a step computes.
    """

    def __init__(self, model: GPT, max_batch_size: int = 16, max_queue: int = 64,
                 policy: str = "continuous", max_wait_ms: float = 5.0, on_step=None):
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a GPT, got {type(model).__name__}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.model, self.policy = model, policy
        self.max_batch_size = check_int("max_batch_size", max_batch_size, low=1, high=1024)
        self.max_queue = check_int("max_queue", max_queue, low=0, high=1_000_000)
        self.max_wait = check_float("max_wait_ms", max_wait_ms, low=0.0, high=10_000.0) / 1e3
        self.on_step = on_step or (lambda size, seconds: None)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.steps = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(self._fail_all)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def kill(self) -> None:
        """Cancel the task without waiting (what a crash of the loop looks like)."""
        if self._task is not None:
            self._task.cancel()

    def submit(self, sequence: Sequence) -> None:
        """Queue ``sequence``; it joins a batch at a coming step."""
        if not self.alive:
            raise SchedulerDead("the scheduler is not running")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting already")
        self.waiting.append(sequence)
        self._wake.set()

    def _expire(self, now: float) -> list[Sequence]:
        expired = [s for s in (*self.waiting, *self.running)
                   if not s.done and now > s.deadline]
        for s in expired:
            s.finish("timeout")
        self.waiting = collections.deque(s for s in self.waiting if not s.done)
        return expired

    async def _gather_company(self) -> None:
        """Static batching: let the first request wait up to ``max_wait`` for others."""
        deadline = time.monotonic() + self.max_wait
        while len(self.waiting) < self.max_batch_size and time.monotonic() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), deadline - time.monotonic())

    async def _run(self) -> None:
        while True:
            changed = self._expire(time.monotonic())
            if not self.running and not self.waiting:
                _notify(changed)
                self._wake.clear()
                await self._wake.wait()
                continue
            if self.policy == "static" and not self.running and self.max_wait > 0:
                await self._gather_company()
            self.running = schedule(self.running, self.waiting, self.max_batch_size,
                                    self.policy)
            batch, start = list(self.running), time.perf_counter()
            if batch:
                await asyncio.to_thread(decode_step, self.model, batch)
                self.steps += 1
                self.on_step(len(batch), time.perf_counter() - start)
            _notify(changed + batch)

    def _fail_all(self, task: asyncio.Task) -> None:
        """When the loop ends, every request still waiting or running gets an answer."""
        leftover = [*self.waiting, *self.running]
        for s in leftover:
            s.finish("error", SchedulerDead("the scheduler stopped"))
        self.waiting.clear()
        self.running = []
        _notify(leftover)


def _notify(sequences: list[Sequence]) -> None:
    for s in sequences:
        if s.on_update is not None:
            s.on_update()


def run_to_completion(model: GPT, sequences: list[Sequence], arrivals: list[int] | None = None,
                      max_batch_size: int = 16, policy: str = "continuous") -> int:
    """Serve ``sequences`` synchronously, sequence ``i`` arriving before step
    ``arrivals[i]`` (default: all at step 0); returns the number of steps taken.

    The same :func:`schedule` and :func:`decode_step` as :class:`Scheduler`, without
    asyncio: for tests and for the book's step-by-step demonstration.
    """
    arrivals = [0] * len(sequences) if arrivals is None else list(arrivals)
    if len(arrivals) != len(sequences):
        raise ValueError("arrivals must have one step per sequence")
    order = sorted(range(len(sequences)), key=arrivals.__getitem__)
    waiting, running, step, i = collections.deque(), [], 0, 0
    while i < len(order) or waiting or any(not s.done for s in running):
        while i < len(order) and arrivals[order[i]] <= step:
            waiting.append(sequences[order[i]])
            i += 1
        running = schedule(running, waiting, max_batch_size, policy)
        if running:
            decode_step(model, running)
        step += 1
    return step
