"""An OpenAI-compatible HTTP server for the pretrained GPT (book: chapter 11).

``create_app(model, vocab)`` returns a FastAPI application; ``python -m companion.serve``
runs it under uvicorn::

    python -m companion.serve --port 8000
    curl -s localhost:8000/v1/completions -H 'content-type: application/json' \\
         -d '{"model": "companion-gpt", "prompt": "The ", "max_tokens": 40, "seed": 1}'

or with the official client, ``OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-")``.

**Routes.** ``POST /v1/completions`` and ``POST /v1/chat/completions`` take the fields of
OpenAI's API that apply to this model -- ``model``, ``prompt`` / ``messages``,
``max_tokens``, ``temperature``, ``top_p``, ``n`` (1 only), ``stop``, ``seed``,
``stream`` -- plus vLLM's ``top_k`` extension; any other field is refused. With
``"stream": true`` the answer is server-sent events in OpenAI's chunk format, ending with
``data: [DONE]``. Chat messages become one prompt through :func:`chat_template`.
``GET /v1/models`` lists the model, ``GET /health`` says whether the scheduler runs,
``GET /metrics`` is Prometheus's text format.

**Errors** all have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``,
``param`` naming the field: 400 for a request outside the schema (malformed JSON, wrong
types, values out of range, unknown or unsupported fields), 404 for an unknown model or
route, 405, 411 and 413 for the wrong method, a missing length or a body over
``max_body_bytes``, 422 for a valid request this model cannot process (characters outside
its vocabulary, ``prompt tokens + max_tokens`` beyond its context), 429 with
``Retry-After`` when ``max_queue`` requests wait already, 504 when a request passes its
deadline (``request_timeout``), 503 when the scheduler has died, and 500 -- JSON, counted
-- for anything unexpected. A client that disconnects cancels its generation (logged
as 499).

**Batching** is :mod:`companion.scheduler`'s: continuous by default, static with
``--batching static``. Every limit is a command-line flag (``--help``; defaults in
:class:`Limits`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from typing import Literal

import torch

from companion._optional import require

for _name in ("fastapi", "pydantic", "starlette"):  # the 'serve' extra: name it if missing
    require(_name)

from fastapi import FastAPI, Request  # noqa: E402
from fastapi.exceptions import RequestValidationError  # noqa: E402
from fastapi.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from companion._validate import check_float, check_int, check_type  # noqa: E402
from companion.scheduler import (  # noqa: E402
    POLICIES,
    QueueFull,
    Scheduler,
    SchedulerDead,
    Sequence,
)
from companion.transformer import GPT  # noqa: E402

MAX_SEED = 2**63 - 1
ACCESS_LOG = logging.getLogger("companion.serve.access")


@dataclasses.dataclass(frozen=True)
class Limits:
    """The server's limits; each is a flag of ``python -m companion.serve``."""

    max_batch_size: int = 16  # sequences per decoding step
    max_queue: int = 64  # waiting requests; beyond: 429 with Retry-After
    request_timeout: float = 30.0  # seconds from arrival to the last token; beyond: 504
    max_body_bytes: int = 16 * 1024  # beyond: 413, before the body is read
    batching: str = "continuous"  # or "static"
    max_wait_ms: float = 5.0  # static batching: how long a batch waits for company
    retry_after: int = 1  # seconds, in the Retry-After header of a 429

    def __post_init__(self):
        check_int("max_batch_size", self.max_batch_size, low=1, high=1024)
        check_int("max_queue", self.max_queue, low=0, high=1_000_000)
        check_float("request_timeout", self.request_timeout, low=1e-3, high=86_400.0)
        check_int("max_body_bytes", self.max_body_bytes, low=64)
        check_float("max_wait_ms", self.max_wait_ms, low=0.0, high=10_000.0)
        check_int("retry_after", self.retry_after, low=0)
        if self.batching not in POLICIES:
            raise ValueError(f"batching must be one of {POLICIES}, got {self.batching!r}")


# --------------------------------------------------------------------------- the protocol


class SamplingFields(BaseModel):
    """Fields shared by both routes. Strict JSON types (``"5"`` is not an integer)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    top_k: int | None = Field(default=None, ge=1)  # vLLM's extension
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stream: bool = False


class CompletionRequest(SamplingFields):
    """The body of ``POST /v1/completions``."""

    prompt: str = Field(min_length=1)
    max_tokens: int = Field(default=16, ge=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(SamplingFields):
    """The body of ``POST /v1/chat/completions``; ``max_tokens`` defaults to what the
    context leaves."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)


#: What :func:`chat_template` writes before each message, and the stop sequence of chat.
CHAT_HEADER = "\n### {role}:\n"


def chat_template(messages: list[dict]) -> str:
    """The prompt for a chat: each message under a ``### Role:`` header, then the header
    of the assistant's turn. Chat completions also stop at ``"\\n###"``, so the answer
    ends where the model starts another header."""
    turns = [CHAT_HEADER.format(role=m["role"].capitalize()) + m["content"] for m in messages]
    return "".join(turns) + CHAT_HEADER.format(role="Assistant")


def api_error(status: int, message: str, param: str | None, code: str | None = None,
              kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return JSONResponse(status_code=status, headers=headers, content={"error": {
        "message": message, "type": kind, "param": param, "code": code}})


def _field_name(loc) -> str:
    """``("body", "messages", 0, "role")`` -> ``"messages.0.role"``; the body -> ``"body"``."""
    names = [str(part) for part in loc if part != "body"]
    if names and isinstance(loc[-1], str) and loc[-1] in {"str", "list[str]"}:
        names = names[:-1]  # ("stop", "list[str]"): the union member is not the field
    return ".".join(names) if names else "body"


class _Refusal(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


# --------------------------------------------------------------------------- metrics


def _metrics(prom, registry):
    """The server's Prometheus metrics, in ``registry`` with the default process collectors."""
    prom.ProcessCollector(registry=registry)
    prom.PlatformCollector(registry=registry)
    prom.GCCollector(registry=registry)
    seconds = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
    h, c, g = prom.Histogram, prom.Counter, prom.Gauge
    return {
        "requests": c("companion_requests", "HTTP requests by route and status code.",
                      ["route", "code"], registry=registry),
        "latency": h("companion_request_latency_seconds", "Request arrival to last byte.",
                     buckets=seconds, registry=registry),
        "ttft": h("companion_time_to_first_token_seconds", "Arrival to first generated token.",
                  buckets=seconds, registry=registry),
        "tpot": h("companion_time_per_output_token_seconds",
                  "Mean time between a request's generated tokens after the first.",
                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
                  registry=registry),
        "batch": h("companion_batch_size", "Sequences in each decoding step.",
                   buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=registry),
        "steps": c("companion_decoding_steps", "Decoding steps run.", registry=registry),
        "queue": g("companion_queue_depth", "Requests waiting to join the batch.",
                   registry=registry),
        "running": g("companion_running", "Sequences in the running batch.", registry=registry),
        "prompt_tokens": c("companion_prompt_tokens", "Prompt tokens of accepted requests.",
                           registry=registry),
        "generated": c("companion_generated_tokens", "Tokens generated.", registry=registry),
        "rejections": c("companion_rejections", "Requests refused for load or time.",
                        ["reason"], registry=registry),
    }


class _Middleware:
    """Pure ASGI middleware: request id, body limits, JSON 500s, the access log and the
    request counters -- counted in ``finally``, whatever happened."""

    def __init__(self, app, metrics, limits: Limits):
        self.app, self.m, self.limits = app, metrics, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, headers = time.perf_counter(), [0], dict(scope["headers"])
        given = headers.get(b"x-request-id", b"").decode("latin-1")
        rid = given if re.fullmatch(r"[A-Za-z0-9._-]{1,64}", given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", []),
                                      (b"x-request-id", rid.encode())]
            await send(message)

        try:
            refusal = self._check_body(scope["method"], headers.get(b"content-length"))
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception as error:  # noqa: BLE001 -- answered as JSON, counted below
            ACCESS_LOG.error("%s unhandled %r", rid, error)
            if status[0] == 0:
                await api_error(500, "internal error", None, "internal_error",
                                "server_error")(scope, receive, send_with_id)
        finally:
            code = status[0] or 499  # nothing sent: the client went away
            path = scope["path"]
            route = path if path.startswith("/v1/") else "other"
            self.m["requests"].labels(route=route, code=str(code)).inc()
            if path.startswith("/v1/") and scope["method"] == "POST":
                self.m["latency"].observe(time.perf_counter() - start)
            ACCESS_LOG.info('%s %s "%s %s" %d %.1fms', rid, (scope.get("client") or ("-",))[0],
                            scope["method"], path, code, 1e3 * (time.perf_counter() - start))

    def _check_body(self, method: str, length: bytes | None):
        if method == "POST" and length is None:
            return api_error(411, "a Content-Length header is required", "body",
                             "length_required")
        if length is not None and (not length.isdigit()
                                   or int(length) > self.limits.max_body_bytes):
            return api_error(413, f"the body must be at most {self.limits.max_body_bytes} "
                                  f"bytes, got {length.decode('latin-1')!r}", "body",
                             "body_too_large")
        return None


# --------------------------------------------------------------------------- the application


def create_app(model: GPT, vocab: str, limits: Limits | None = None,
               model_name: str = "companion-gpt") -> FastAPI:
    """The FastAPI application serving ``model`` (a character-level GPT over ``vocab``).

    Metrics live in the app's own registry (``app.state.registry``), the scheduler in
    ``app.state.scheduler``.
    """
    import prometheus_client as prom

    check_type("model", model, GPT)
    check_type("vocab", vocab, str)
    limits = Limits() if limits is None else limits
    check_type("limits", limits, Limits)
    if len(vocab) != model.config.vocab_size or len(set(vocab)) != len(vocab):
        raise ValueError(f"vocab must be {model.config.vocab_size} distinct characters, "
                         f"got {len(vocab)} ({len(set(vocab))} distinct)")
    model.eval()
    stoi, context = {ch: i for i, ch in enumerate(vocab)}, model.config.block_size
    registry = prom.CollectorRegistry()
    m = _metrics(prom, registry)

    def on_step(size: int, seconds: float) -> None:
        m["batch"].observe(size)
        m["steps"].inc()

    scheduler = Scheduler(model, limits.max_batch_size, limits.max_queue, limits.batching,
                          limits.max_wait_ms, on_step)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await scheduler.stop()  # after uvicorn has answered every request in flight
        print(f"stopped cleanly after {scheduler.steps} decoding steps", flush=True)

    app = FastAPI(title="companion GPT server", lifespan=lifespan)
    app.state.registry, app.state.scheduler, app.state.limits = registry, scheduler, limits

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        e = exc.errors()[0]
        kind = e.get("type", "value_error")
        field = "body" if kind == "json_invalid" else _field_name(e.get("loc", ("body",)))
        message = (f"{field} is not supported by this server" if kind == "extra_forbidden"
                   else f"{field}: {e.get('msg', 'invalid')}")
        return api_error(400, message, field, kind)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        param = {400: "body", 404: "path", 405: "method"}.get(exc.status_code)
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(
            exc.status_code, str(exc.detail))
        return api_error(exc.status_code, message, param, kind="invalid_request_error",
                         headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health():
        ok = scheduler.alive
        return JSONResponse(status_code=200 if ok else 503, content={
            "status": "ok" if ok else "scheduler stopped", "waiting": len(scheduler.waiting),
            "running": len(scheduler.running)})

    @app.get("/metrics")
    async def metrics():
        m["queue"].set(len(scheduler.waiting))
        m["running"].set(len(scheduler.running))
        return Response(prom.generate_latest(registry), media_type=prom.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "created": 0, "owned_by": "companion"}]}

    def encode(text: str, field: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in stoi})
        if unknown:
            raise _Refusal(api_error(422, f"{len(unknown)} characters of {field} are not in "
                                          f"the model's vocabulary: {''.join(unknown[:10])!r}",
                                     field, "unknown_characters"))
        return [stoi[ch] for ch in text]

    def make_sequence(body: SamplingFields, prompt: list[int], prompt_field: str,
                      max_tokens: int | None, stops: list[str]) -> Sequence:
        if body.model != model_name:
            raise _Refusal(api_error(404, f"the model {body.model!r} does not exist; this "
                                          f"server has {model_name!r}", "model",
                                     "model_not_found"))
        if body.n != 1:
            raise _Refusal(api_error(400, f"only n=1 is supported, got {body.n}", "n"))
        if len(stops) > 4 or not all(0 < len(s) <= 32 for s in stops):
            raise _Refusal(api_error(400, "stop: at most 4 sequences of 1 to 32 characters",
                                     "stop"))
        if len(prompt) >= context:
            raise _Refusal(api_error(422, f"the prompt has {len(prompt)} tokens; the "
                                          f"context holds {context}, and at least one "
                                          f"token must be generated", prompt_field,
                                     "context_length_exceeded"))
        max_tokens = context - len(prompt) if max_tokens is None else max_tokens
        if len(prompt) + max_tokens > context:
            raise _Refusal(api_error(422, f"max_tokens={max_tokens} plus the prompt's "
                                          f"{len(prompt)} tokens exceed the context of "
                                          f"{context} tokens", "max_tokens",
                                     "context_length_exceeded"))
        generator = torch.Generator(model.token_embedding.weight.device)
        generator.manual_seed(body.seed) if body.seed is not None else generator.seed()
        return Sequence(prompt, max_tokens, body.temperature, body.top_k,
                        body.top_p if body.top_p < 1 else None, generator,
                        tuple(tuple(encode(s, "stop")) for s in stops),
                        time.monotonic() + limits.request_timeout)

    async def serve(request: Request, body: SamplingFields, prompt_text: str, prompt_field: str,
                    max_tokens: int | None, stops: list[str], chat: bool):
        try:
            seq = make_sequence(body, encode(prompt_text, prompt_field), prompt_field,
                                max_tokens, stops)
            updated = asyncio.Event()
            seq.on_update = updated.set
            scheduler.submit(seq)
        except _Refusal as refusal:
            return refusal.response
        except QueueFull as full:
            m["rejections"].labels(reason="queue_full").inc()
            return api_error(429, f"the server is busy: {full}; retry later", None,
                             "queue_full", "rate_limit_exceeded",
                             {"Retry-After": str(limits.retry_after)})
        except SchedulerDead as dead:
            return api_error(503, str(dead), None, "scheduler_stopped", "server_error")
        m["prompt_tokens"].inc(len(seq.prompt))
        rid = request.scope["state"]["request_id"]
        reply = _Reply(seq, vocab, model_name, rid, chat)
        if body.stream:
            return StreamingResponse(stream(seq, updated, reply), media_type="text/event-stream")
        try:
            while not seq.done:
                await wait_update(seq, updated)
                if not seq.done and await request.is_disconnected():
                    seq.finish("cancelled")
        finally:
            seq.finish("cancelled")  # no-op if it finished; else the handler was cancelled
            observe(seq)
        return finished(seq) or reply.whole()

    async def wait_update(seq: Sequence, updated: asyncio.Event) -> None:
        updated.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(updated.wait(), 0.05)  # wake up to check the client
        if not seq.done and time.monotonic() > seq.deadline:
            seq.finish("timeout")

    def finished(seq: Sequence) -> JSONResponse | None:
        """The error response of a sequence that did not finish normally."""
        if seq.finish_reason == "timeout":
            m["rejections"].labels(reason="timeout").inc()
            return api_error(504, f"the request took longer than {limits.request_timeout} s "
                                  f"(after {len(seq.new)} tokens)", None, "timeout",
                             "timeout_error")
        if seq.finish_reason == "error":
            return api_error(500, f"generation failed: {seq.error}", None, "generation_error",
                             "server_error")
        if seq.finish_reason == "cancelled":
            return api_error(499, "the client closed the connection", None, "cancelled")
        return None

    def observe(seq: Sequence) -> None:
        m["generated"].inc(len(seq.new))
        if seq.first_token_at is not None:
            m["ttft"].observe(seq.first_token_at - seq.arrived)
            if len(seq.new) > 1:
                m["tpot"].observe((time.monotonic() - seq.first_token_at) / (len(seq.new) - 1))

    async def stream(seq: Sequence, updated: asyncio.Event, reply: _Reply):
        # the model's thread appends while this runs: hold back what may become a stop
        # sequence, and read ``done`` once per round (then every token is in ``new``)
        holdback = max((len(s) for s in seq.stop), default=0)
        sent = 0
        try:
            yield reply.chunk_start()
            while True:
                await wait_update(seq, updated)
                done = seq.done
                ready = len(seq.new) if done else max(sent, len(seq.new) - holdback)
                if ready > sent:
                    yield reply.chunk(seq.new[sent:ready])
                    sent = ready
                if done:
                    break
            error = finished(seq)
            yield reply.chunk_end() if error is None else f"data: {error.body.decode()}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            seq.finish("cancelled")
            observe(seq)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        return await serve(request, body, body.prompt, "prompt", body.max_tokens, stops, False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
        prompt = chat_template([message.model_dump() for message in body.messages])
        return await serve(request, body, prompt, "messages", body.max_tokens,
                           [*stops, "\n###"], True)

    app.add_middleware(_Middleware, metrics=m, limits=limits)
    return app


class _Reply:
    """The JSON bodies of one request's answer, whole or as stream chunks."""

    def __init__(self, seq: Sequence, vocab: str, model: str, rid: str, chat: bool):
        self.seq, self.vocab, self.model, self.chat = seq, vocab, model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _text(self, ids) -> str:
        return "".join(self.vocab[i] for i in ids)

    def _head(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created,
                "model": self.model}

    def whole(self) -> dict:
        text, seq = self._text(self.seq.new), self.seq
        choice = ({"message": {"role": "assistant", "content": text}} if self.chat
                  else {"text": text})
        return {**self._head(self.object), "choices": [
            {"index": 0, **choice, "logprobs": None, "finish_reason": seq.finish_reason}],
            "usage": {"prompt_tokens": len(seq.prompt), "completion_tokens": len(seq.new),
                      "total_tokens": len(seq.prompt) + len(seq.new)}}

    def _event(self, payload: dict, finish_reason: str | None) -> str:
        import json

        name = "chat.completion.chunk" if self.chat else "text_completion"
        choice = {"index": 0, **payload, "logprobs": None, "finish_reason": finish_reason}
        return f"data: {json.dumps({**self._head(name), 'choices': [choice]})}\n\n"

    def chunk_start(self) -> str:
        return self._event({"delta": {"role": "assistant", "content": ""}} if self.chat
                           else {"text": ""}, None)

    def chunk(self, ids: list[int]) -> str:
        text = self._text(ids)
        return self._event({"delta": {"content": text}} if self.chat else {"text": text}, None)

    def chunk_end(self) -> str:
        return self._event({"delta": {}} if self.chat else {"text": ""},
                           self.seq.finish_reason)


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

    ``with ServerProcess(Limits(max_queue=8)) as server: httpx.get(server.url + "/health")``.
    Entering waits (at most ``startup_timeout`` seconds) until ``/health`` answers;
    leaving sends SIGTERM, waits ``stop_timeout`` seconds for a clean exit, then kills.
    On Linux the server also gets SIGTERM when the process that started it dies. Its
    output goes to a temporary log file (:meth:`log`), shown if it fails to start.
    """

    def __init__(self, limits: Limits | None = None, threads: int = 1,
                 startup_timeout: float = 180.0, stop_timeout: float = 30.0):
        limits = Limits() if limits is None else limits
        check_type("limits", limits, Limits)
        self.args = [arg for f in dataclasses.fields(limits) for arg in
                     (f"--{f.name.replace('_', '-')}", str(getattr(limits, f.name)))]
        self.args += ["--threads", str(check_int("threads", threads, low=1))]
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

        with httpx.Client(timeout=2.0) as client:  # one client: each new one costs ~20 ms CPU
            while time.monotonic() < self._deadline and self.process.poll() is None:
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + "/health").status_code == 200:
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m companion.serve",
                                     description="Serve the pretrained GPT over HTTP "
                                                 "(OpenAI-compatible routes).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    helps = {"max_batch_size": "sequences per decoding step",
             "max_queue": "waiting requests; beyond them 429 with Retry-After",
             "request_timeout": "seconds a request may take; beyond them 504",
             "max_body_bytes": "largest request body; beyond it 413",
             "batching": "continuous (iteration-level) or static",
             "max_wait_ms": "static batching: how long a batch waits for company",
             "retry_after": "seconds, in the Retry-After header of a 429"}
    for f in dataclasses.fields(Limits):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default),
                            default=f.default, help=f"{helps[f.name]} (default {f.default})",
                            **({"choices": POLICIES} if f.name == "batching" else {}))
    parser.add_argument("--model-name", default="companion-gpt")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the model")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: get_device())")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from companion.pretrained import load_pretrained_gpt

    args = parse_args(argv)
    limits = Limits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Limits)})
    torch.set_num_threads(args.threads)
    model, corpus = load_pretrained_gpt(args.device)
    app = create_app(model, "".join(corpus.tokenizer.itos), limits, args.model_name)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    print(f"serving {args.model_name} on http://{args.host}:{args.port}/v1 with {limits}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
