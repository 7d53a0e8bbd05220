"""A real HTTP model server for the pretrained GPT, with dynamic batching (book: chapter 11).

``create_app(model, vocab)`` returns a FastAPI application; ``python -m companion.serve``
runs it under uvicorn::

    python -m companion.serve --host 127.0.0.1 --port 8000 --max-batch-size 16 --max-wait-ms 5
    curl -s http://127.0.0.1:8000/v1/generate -H 'content-type: application/json' \\
         -d '{"prompt": "The ", "max_new_tokens": 40, "temperature": 0.8, "top_k": 10, "seed": 1}'

Endpoints: ``POST /v1/generate`` (:class:`GenerateRequest` -> ``{"text", "prompt_tokens",
"completion_tokens"}``), ``GET /health`` and ``GET /metrics`` (Prometheus text format).

**Dynamic batching.** Requests wait in a queue; the :class:`Batcher` takes the first,
then keeps collecting for at most ``max_wait_ms`` or until ``max_batch_size`` are there,
and runs the requests whose prompts have the same length as one batch through
:func:`generate_batch` -- one forward pass per generated token for all of them, with
the key/value cache. (Rows of one batch must be equally long because the package's
cache has one fill level for the whole batch; continuous batching with paged caches,
as in vLLM, lifts both this and the wait for the longest request.) Each request samples
with its own ``torch.Generator`` seeded from its ``seed``, so its text does not depend
on which other requests share its batch -- up to the last bits of the logits, which
matrix kernels compute slightly differently for different batch sizes.

**Limits.** Every field is bounded by the schema; a body over :data:`MAX_BODY_BYTES` gets
413, characters outside the vocabulary 422; every error is JSON naming the field
(:func:`error_response`), and a bad request never disturbs the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from companion._validate import check_float, check_int, check_type
from companion.transformer import GPT, sample_next_token

#: Longest prompt, in characters (one token per character).
MAX_PROMPT_CHARS = 1024
#: Most tokens one request may ask for.
MAX_NEW_TOKENS = 512
#: Highest sampling temperature.
MAX_TEMPERATURE = 100.0
#: Largest request body in bytes (413 above; checked before the JSON is parsed).
MAX_BODY_BYTES = 16 * 1024
#: Largest seed (a ``torch.Generator`` takes 64-bit seeds).
MAX_SEED = 2**63 - 1


class GenerateRequest(BaseModel):
    """The body of ``POST /v1/generate``. Unknown fields and wrong JSON types are errors
    (strict mode: ``"5"`` is not an integer); an integer is accepted where a float is."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int = Field(default=64, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(default=1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1, le=100_000)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)


class GenerateResponse(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int


def error_response(status: int, errors: list[dict]) -> JSONResponse:
    """JSON ``{"error": message, "field": name, "detail": [{"field", "message", "type"}, ...]}``
    (``error`` and ``field`` of the first problem, ``detail`` lists all)."""
    detail = [{"field": e["field"], "message": e["message"], "type": e["type"]} for e in errors]
    return JSONResponse(status_code=status, content={"error": detail[0]["message"],
                                                     "field": detail[0]["field"],
                                                     "detail": detail})


def _field_name(loc) -> str:
    """``("body", "top_k")`` -> ``"top_k"``; a body that is not valid JSON -> ``"body"``."""
    names = [str(part) for part in loc if part != "body"]
    return ".".join(names) if names and isinstance(loc[-1], str) else "body"


# --------------------------------------------------------------------------- batched generation


@torch.no_grad()
def generate_batch(model: GPT, prompts: torch.Tensor, max_new_tokens: list[int],
                   temperatures: list[float], top_ks: list[int | None],
                   generators: list[torch.Generator]) -> list[list[int]]:
    """Continue each row of ``prompts (B, T)`` -- one request each -- with the KV cache.

    Like :meth:`~companion.transformer.GPT.generate`, but row ``i`` draws its tokens with
    its own ``temperatures[i]``, ``top_ks[i]`` and ``generators[i]`` and stops after
    ``max_new_tokens[i]``; the batch runs until its longest request is done. Returns the
    new ids of each row. Book: "Dynamic batching".
    """
    B = prompts.size(0)
    if not (len(max_new_tokens) == len(temperatures) == len(top_ks) == len(generators) == B):
        raise ValueError("one max_new_tokens, temperature, top_k and generator per row")
    block_size, caches, idx = model.config.block_size, None, prompts
    new = [[] for _ in range(B)]
    for _ in range(max(max_new_tokens)):
        if idx.size(1) <= block_size:
            if caches is None:  # prefill: every prompt at once
                caches = model.new_kv_caches(B)
                logits, _ = model(idx, kv_caches=caches)
            else:  # decode: one token per row, one forward pass for the batch
                logits, _ = model(idx[:, -1:], kv_caches=caches)
        else:  # past the context: the last block_size tokens, no cache
            logits, _ = model(idx[:, -block_size:])
        last = logits[:, -1]  # (B, V)
        next_ids = torch.cat([sample_next_token(last[i:i + 1], temperatures[i], top_ks[i],
                                                generators[i]) for i in range(B)])  # (B, 1)
        for i in range(B):
            if len(new[i]) < max_new_tokens[i]:
                new[i].append(int(next_ids[i]))
        idx = torch.cat((idx, next_ids), dim=1)
    return new


@dataclass
class _Job:
    ids: list[int]
    request: GenerateRequest
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Collects queued requests into batches and runs them one batch at a time.

    ``max_batch_size=1`` turns batching off (each request alone, in arrival order).
    The model runs in a worker thread, so the event loop keeps answering ``/health``
    and ``/metrics`` while a batch is computed.
    """

    def __init__(self, model: GPT, max_batch_size: int = 16, max_wait_ms: float = 5.0,
                 on_batch=None):
        self.model = model
        self.max_batch_size = check_int("max_batch_size", max_batch_size, low=1, high=1024)
        self.max_wait = check_float("max_wait_ms", max_wait_ms, low=0.0, high=10_000.0) / 1e3
        self.on_batch = on_batch or (lambda size: None)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self.batches = 0

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def submit(self, ids: list[int], request: GenerateRequest) -> list[int]:
        """Queue one request; return its new token ids when its batch is done."""
        job = _Job(ids, request, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def _collect(self) -> list[_Job]:
        jobs = [await self.queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch_size:
            if not self.queue.empty():  # already waiting: take it without waiting
                jobs.append(self.queue.get_nowait())
                continue
            timeout = deadline - time.perf_counter()
            if timeout <= 0:
                break
            try:  # a get() cancelled by the timeout leaves its item in the queue
                jobs.append(await asyncio.wait_for(self.queue.get(), timeout))
            except TimeoutError:
                break
        return jobs

    async def _run(self) -> None:
        while True:
            jobs = await self._collect()
            groups: dict[int, list[_Job]] = {}
            for job in jobs:  # equal prompt lengths share a batch
                groups.setdefault(len(job.ids), []).append(job)
            for group in groups.values():
                self.batches += 1
                self.on_batch(len(group))
                try:
                    results = await asyncio.to_thread(self._compute, group)
                except Exception as error:  # noqa: BLE001 -- every waiting request is answered
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(error)
                    continue
                finally:
                    self.on_batch(0)
                for job, ids in zip(group, results):
                    if not job.future.done():
                        job.future.set_result(ids)

    def _compute(self, group: list[_Job]) -> list[list[int]]:
        device = self.model.token_embedding.weight.device
        prompts = torch.tensor([job.ids for job in group], dtype=torch.long, device=device)
        generators = []
        for job in group:
            g = torch.Generator(device=device)
            g.manual_seed(job.request.seed) if job.request.seed is not None else g.seed()
            generators.append(g)
        r = [job.request for job in group]
        return generate_batch(self.model, prompts, [x.max_new_tokens for x in r],
                              [x.temperature for x in r], [x.top_k for x in r], generators)


# --------------------------------------------------------------------------- the application


def create_app(model: GPT, vocab: str, max_batch_size: int = 16, max_wait_ms: float = 5.0):
    """The FastAPI application serving ``model`` (a character-level GPT over ``vocab``).

    Metrics live in the app's own ``prometheus_client.CollectorRegistry``
    (``app.state.registry``), so that several apps in one process do not share counts.
    """
    import prometheus_client as prom

    check_type("model", model, GPT)
    check_type("vocab", vocab, str)
    if len(vocab) != model.config.vocab_size or len(set(vocab)) != len(vocab):
        raise ValueError(f"vocab must be {model.config.vocab_size} distinct characters, "
                         f"got {len(vocab)} ({len(set(vocab))} distinct)")
    model.eval()
    stoi = {ch: i for i, ch in enumerate(vocab)}
    registry = prom.CollectorRegistry()
    requests_total = prom.Counter("companion_requests", "Generate requests by HTTP status code.",
                                  ["code"], registry=registry)
    latency = prom.Histogram("companion_request_latency_seconds",
                             "Time from receiving a generate request to its answer.",
                             buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
                             registry=registry)
    tokens_total = prom.Counter("companion_generated_tokens", "Tokens generated.",
                                registry=registry)
    batch_size = prom.Gauge("companion_batch_size",
                            "Requests in the batch being computed now (0 when idle).",
                            registry=registry)
    batches_total = prom.Counter("companion_batches", "Batches computed.", registry=registry)

    def on_batch(size: int) -> None:
        batch_size.set(size)
        if size:
            batches_total.inc()

    batcher = Batcher(model, max_batch_size, max_wait_ms, on_batch)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        await batcher.stop()  # after uvicorn has answered every request in flight
        print(f"stopped cleanly after {batcher.batches} batches", flush=True)

    app = FastAPI(title="companion GPT server", lifespan=lifespan)
    app.state.registry, app.state.batcher = registry, batcher

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        start = time.perf_counter()
        length = request.headers.get("content-length")
        if request.method == "POST" and length is None:
            response = error_response(411, [{"field": "body", "type": "length_required",
                                             "message": "a Content-Length header is required"}])
        elif length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            response = error_response(413, [{"field": "body", "type": "too_large",
                                             "message": f"the body must be at most "
                                                        f"{MAX_BODY_BYTES} bytes, got {length}"}])
        else:
            response = await call_next(request)
        if request.url.path == "/v1/generate":
            requests_total.labels(code=str(response.status_code)).inc()
            latency.observe(time.perf_counter() - start)
        return response

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(422, [{"field": _field_name(e.get("loc", ("body",))),
                                     "message": e.get("msg", "invalid"),
                                     "type": e.get("type", "value_error")} for e in exc.errors()])

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": batcher.queue.qsize()}

    @app.get("/metrics")
    async def metrics():
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(body: GenerateRequest):
        unknown = sorted({ch for ch in body.prompt if ch not in stoi})
        if unknown:
            shown = "".join(unknown[:10])
            return error_response(422, [{"field": "prompt", "type": "unknown_characters",
                                         "message": f"{len(unknown)} characters are not in the "
                                                    f"model's vocabulary: {shown!r}"}])
        ids = [stoi[ch] for ch in body.prompt]
        new_ids = await batcher.submit(ids, body)
        tokens_total.inc(len(new_ids))
        return GenerateResponse(text="".join(vocab[i] for i in new_ids),
                                prompt_tokens=len(ids), completion_tokens=len(new_ids))

    return app


# --------------------------------------------------------------------------- load test


@dataclass
class LoadResult:
    """What :func:`load_test` measured: per-request latencies (s), codes and tokens."""

    concurrency: int
    wall_seconds: float
    latencies: list[float]
    status_codes: list[int]
    completion_tokens: list[int]

    @property
    def requests_per_second(self) -> float:
        return len(self.latencies) / self.wall_seconds

    @property
    def tokens_per_second(self) -> float:
        return sum(self.completion_tokens) / self.wall_seconds

    def percentile(self, q: float) -> float:
        """The ``q``-th percentile of the latencies in seconds (linear interpolation)."""
        return float(torch.quantile(torch.tensor(self.latencies, dtype=torch.float64), q / 100))


async def load_test(url: str, payloads: list[dict], concurrency: int,
                    timeout: float = 60.0) -> LoadResult:
    """POST every payload to ``url + "/v1/generate"`` with at most ``concurrency`` in flight.

    A bounded closed loop: ``concurrency`` workers each send their next request when the
    previous one is answered, until ``payloads`` are used up; each request has a
    ``timeout`` in seconds. Returns a :class:`LoadResult`.
    """
    import httpx

    check_int("concurrency", concurrency, low=1, high=1024)
    check_type("payloads", payloads, list)
    pending = list(enumerate(payloads))[::-1]
    n = len(payloads)
    latencies, codes, tokens = [0.0] * n, [0] * n, [0] * n
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async def worker(client):
        while pending:
            i, payload = pending.pop()
            start = time.perf_counter()
            response = await client.post(url + "/v1/generate", json=payload)
            latencies[i], codes[i] = time.perf_counter() - start, response.status_code
            if response.status_code == 200:
                tokens[i] = response.json()["completion_tokens"]

    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(min(concurrency, n))))
        wall = time.perf_counter() - start
    return LoadResult(concurrency, wall, latencies, codes, tokens)


# --------------------------------------------------------------------------- running it


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child, before ``exec``: on Linux, ask for SIGTERM when the parent dies, so
    that a server never outlives the notebook kernel or test run that started it."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1


class ServerProcess:
    """``python -m companion.serve`` in a subprocess on a free loopback port; a context manager.

    ``with ServerProcess(max_batch_size=8) as server: httpx.get(server.url + "/health")``.
    Entering waits (at most ``startup_timeout`` seconds) until ``/health`` answers;
    leaving sends SIGTERM, waits ``stop_timeout`` seconds for a clean exit, then kills.
    On Linux the server also gets SIGTERM when the process that started it dies. Its
    output goes to a temporary log file (:meth:`log`), shown if it fails to start.
    """

    def __init__(self, max_batch_size: int = 16, max_wait_ms: float = 5.0, threads: int = 1,
                 startup_timeout: float = 180.0, stop_timeout: float = 30.0):
        self.args = ["--max-batch-size", str(check_int("max_batch_size", max_batch_size, low=1)),
                     "--max-wait-ms", str(check_float("max_wait_ms", max_wait_ms, low=0.0)),
                     "--threads", str(check_int("threads", threads, low=1))]
        self.startup_timeout = check_float("startup_timeout", startup_timeout, low=0.0)
        self.stop_timeout = check_float("stop_timeout", stop_timeout, low=0.0)
        self.process: subprocess.Popen | None = None
        self.returncode: int | None = None
        self.url = ""
        self._log = None

    def launch(self) -> ServerProcess:
        """Start the process without waiting (see :meth:`wait_ready`)."""
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self._log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "companion.serve", "--host", "127.0.0.1", "--port", str(port),
             *self.args], stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=_die_with_parent)
        self._deadline = time.monotonic() + self.startup_timeout
        return self

    def wait_ready(self) -> ServerProcess:
        """Poll ``/health`` until it answers 200; stop the process and raise on failure."""
        import httpx

        while time.monotonic() < self._deadline and self.process.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            time.sleep(0.1)
        log = self.log()
        self.stop()
        raise RuntimeError(f"the server at {self.url} did not come up within "
                           f"{self.startup_timeout} s:\n{log[-2000:]}")

    def start(self) -> ServerProcess:
        """:meth:`launch`, then :meth:`wait_ready`."""
        return self.launch().wait_ready()

    def log(self) -> str:
        """Everything the server has printed so far."""
        if self._log is None:
            return ""
        self._log.flush()
        self._log.seek(0)
        return self._log.read()

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout`` s; returns the exit code."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self.returncode = self.process.returncode
        return self.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._log is not None:
            self._log.close()


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from companion.pretrained import load_pretrained_gpt

    parser = argparse.ArgumentParser(prog="python -m companion.serve",
                                     description="Serve the pretrained GPT over HTTP.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch-size", type=int, default=16,
                        help="requests per forward pass (1: no batching)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0,
                        help="how long the first request of a batch waits for company")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the model")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: get_device())")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, corpus = load_pretrained_gpt(args.device)
    app = create_app(model, "".join(corpus.tokenizer.itos), args.max_batch_size, args.max_wait_ms)
    print(f"serving the pretrained GPT on http://{args.host}:{args.port} "
          f"(max batch {args.max_batch_size}, max wait {args.max_wait_ms} ms)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
