"""An open-loop load generator for the model server (book: chapter 11).

A *closed* loop -- N clients that each send their next request when the previous one
is answered -- slows down when the server does, and so hides queueing: it measures the
server at whatever rate the server itself sets. Real traffic does not wait. An *open*
loop sends requests on a schedule fixed in advance: here a Poisson process, with
exponential gaps of mean ``1 / rate`` seconds, whether or not earlier requests have been
answered. :func:`open_loop` does that against ``POST /v1/completions`` and returns a
:class:`LoadResult`: per-request latency, status code and generated tokens, with the
first ``warmup`` requests sent but left out of the statistics.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

import torch

from companion._validate import check_float, check_int, check_type


@dataclass
class LoadResult:
    """What :func:`open_loop` measured after the warm-up: latencies (s), codes, tokens."""

    rate: float
    wall_seconds: float
    latencies: list[float]
    status_codes: list[int]
    completion_tokens: list[int]

    @property
    def n(self) -> int:
        """Requests answered with 200 (the latency percentiles are over these)."""
        return sum(code == 200 for code in self.status_codes)

    @property
    def tokens_per_second(self) -> float:
        return sum(self.completion_tokens) / self.wall_seconds

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile of the 200 responses' latencies in seconds (linear)."""
        ok = [t for t, code in zip(self.latencies, self.status_codes) if code == 200]
        if not ok:
            return math.nan
        return float(torch.quantile(torch.tensor(ok, dtype=torch.float64), q / 100))


def poisson_schedule(n: int, rate: float, generator: torch.Generator) -> list[float]:
    """Send times in seconds of ``n`` requests arriving as a Poisson process of ``rate``/s."""
    gaps = torch.empty(n, dtype=torch.float64).exponential_(rate, generator=generator)
    return torch.cumsum(gaps, 0).tolist()


async def open_loop(url: str, payloads: list[dict], rate: float, seed: int = 0,
                    warmup: int = 0, timeout: float = 60.0) -> LoadResult:
    """POST ``payloads`` to ``url + "/v1/completions"`` at Poisson times of ``rate`` per s.

    Every request is sent at its scheduled time, answered or not; each has a ``timeout``
    in seconds. The first ``warmup`` requests are sent but not counted; tokens per second
    are counted from the first counted request's send time to the last answer.
    """
    import httpx

    check_type("payloads", payloads, list)
    check_float("rate", rate, low=0.0, low_open=True)
    check_int("warmup", warmup, low=0, high=len(payloads))
    times = poisson_schedule(len(payloads), rate, torch.Generator().manual_seed(seed))
    n = len(payloads)
    latencies, codes, tokens, ends = [0.0] * n, [0] * n, [0] * n, [0.0] * n
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)

    async def one(client, i, start):
        await asyncio.sleep(max(0.0, start + times[i] - time.perf_counter()))
        sent = time.perf_counter()
        try:
            response = await client.post(url + "/v1/completions", json=payloads[i])
            codes[i] = response.status_code
            if response.status_code == 200:
                tokens[i] = response.json()["usage"]["completion_tokens"]
        except httpx.HTTPError:
            codes[i] = -1  # no answer (timeout or connection error)
        ends[i] = time.perf_counter()
        latencies[i] = ends[i] - sent

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i, start) for i in range(n)))
    wall = max(ends[warmup:]) - (start + times[warmup]) if warmup < n else 0.0
    return LoadResult(rate, wall, latencies[warmup:], codes[warmup:], tokens[warmup:])


# --------------------------------------------------------------------------- the workload


def mixed_workload(n: int, text: str, generator: torch.Generator, model: str = "companion-gpt",
                   long_fraction: float = 0.25) -> list[dict]:
    """``n`` completion requests of mixed lengths, as chat traffic has them.

    Prompts of 8 to 32 characters cut from ``text``; a fraction ``1 - long_fraction``
    asks for 2 to 8 tokens, the rest for 32 to 64; temperature 0.8, seed ``i``.
    """
    check_int("n", n, low=1)
    check_type("text", text, str)
    check_float("long_fraction", long_fraction, low=0.0, high=1.0)
    if len(text) < 40:
        raise ValueError(f"text must hold at least 40 characters, got {len(text)}")
    lengths = torch.randint(8, 33, (n,), generator=generator).tolist()
    is_long = (torch.rand(n, generator=generator) < long_fraction).tolist()
    new = [int(torch.randint(32, 65, (1,), generator=generator)) if long
           else int(torch.randint(2, 9, (1,), generator=generator)) for long in is_long]
    starts = torch.randint(0, len(text) - 40, (n,), generator=generator).tolist()
    return [{"model": model, "prompt": text[s:s + k], "max_tokens": m, "temperature": 0.8,
             "seed": i} for i, (s, k, m) in enumerate(zip(starts, lengths, new))]


async def capacity(url: str, payloads: list[dict]) -> float:
    """Requests per second the server answers when ``payloads`` all arrive at once."""
    burst = await open_loop(url, payloads, rate=1e4)
    return burst.n / burst.wall_seconds


# --------------------------------------------------------------------------- a recorded curve


def quantile_interval(samples: list[float], q: float,
                      confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free ``confidence`` interval for the ``q``-th percentile.

    For ``n`` independent samples the number below the true quantile is
    Binomial(``n``, ``q / 100``), so the order statistics ``x_(l) <= x_(u)`` (1-based)
    cover it with probability ``P(l <= B < u)``; the narrowest central pair with at least
    ``confidence`` is returned. Where even ``(x_(1), x_(n))`` covers less (too few samples
    for so extreme a quantile), the missing end is ``-inf`` or ``inf``: the interval does
    not close inside the sample.
    """
    from scipy import stats

    check_float("q", q, low=0.0, high=100.0)
    check_float("confidence", confidence, low=0.0, high=1.0)
    x = sorted(float(v) for v in samples)
    n = len(x)
    if n == 0:
        raise ValueError("samples must not be empty")
    p = q / 100
    tail = (1 - confidence) / 2
    # l: the largest rank with P(B < l) <= tail; u: the smallest with P(B >= u) <= tail
    lo_rank = int(stats.binom.ppf(tail, n, p))  # smallest k with P(B <= k) >= tail
    hi_rank = int(stats.binom.ppf(1 - tail, n, p)) + 1
    low = x[lo_rank - 1] if lo_rank >= 1 else -math.inf
    high = x[hi_rank - 1] if hi_rank <= n else math.inf
    return low, high


def record_curve(loads=(0.3, 0.5, 0.7, 0.9), n: int = 220, warmup: int = 20,
                 seed: int = 0, arrival_seeds=(1, 2, 3),
                 static_waits=(0.0, 5.0, 20.0)) -> dict:
    """The throughput-latency curve of continuous vs static batching, at ``loads`` times
    the continuous server's measured capacity.

    The static server runs once per ``max_wait_ms`` in ``static_waits`` (its one tuning
    knob), each point is measured with every Poisson arrival seed in ``arrival_seeds``,
    and all servers run side by side, measured one after the other for each load and
    seed. Each point keeps its raw latencies (seconds, answered requests only) so that
    intervals can be computed from them. Takes about ten minutes on two CPU cores;
    returns a JSON-able dict."""
    import os
    import platform

    from companion import serve
    from companion.pretrained import load_pretrained_gpt

    _, corpus = load_pretrained_gpt("cpu")
    text = corpus.tokenizer.decode(corpus.val_ids)
    g = torch.Generator().manual_seed(seed)
    payloads, burst = mixed_workload(n, text, g), mixed_workload(48, text, g)
    configs = [("continuous", None)] + [("static", float(w)) for w in static_waits]
    servers = {c: serve.ServerProcess(serve.Limits(
        max_queue=1024, batching=c[0], **({} if c[1] is None else {"max_wait_ms": c[1]})))
        for c in configs}
    points = []
    try:
        for s in servers.values():
            s.launch()
        for s in servers.values():
            s.wait_ready()
        cap = asyncio.run(capacity(servers["continuous", None].url, burst))
        for load in loads:
            for arrival_seed in arrival_seeds:
                for (policy, wait), s in servers.items():
                    r = asyncio.run(open_loop(s.url, payloads, load * cap,
                                              seed=arrival_seed, warmup=warmup))
                    ok = [t for t, c in zip(r.latencies, r.status_codes) if c == 200]
                    points.append({
                        "policy": policy, "max_wait_ms": wait, "load": load,
                        "seed": arrival_seed, "rate": load * cap, "n": r.n,
                        "p50": r.percentile(50), "p99": r.percentile(99),
                        "tokens_per_second": r.tokens_per_second,
                        "latencies": [round(t, 6) for t in ok]})
    finally:
        for s in servers.values():
            s.stop()
    return {"machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch "
                       f"{torch.__version__}", "capacity": cap, "requests": n, "warmup": warmup,
            "arrival_seeds": list(arrival_seeds), "static_waits_ms": list(static_waits),
            "points": points}


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m companion.loadtest",
                                     description="Record the throughput-latency curve of "
                                                 "continuous vs static batching.")
    parser.add_argument("--record", required=True, help="the JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    curve = record_curve()
    with open(args.record, "w") as f:
        json.dump(curve, f, indent=1)
        f.write("\n")
    print(f"wrote {len(curve['points'])} points to {args.record}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
