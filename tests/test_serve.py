"""companion.serve through real HTTP: uvicorn on free loopback ports.

Two subprocess servers (module fixtures): ``server`` with the default limits, and
``small`` with a queue of 4 and batches of 2 for the load-shedding tests. One in-process
server (uvicorn in a thread) checks deadlines and a dead scheduler. Every server is
started and stopped with timeouts and stopped also when a test fails. The last test
sends ``server`` SIGTERM with a request in flight.
"""

import asyncio
import concurrent.futures
import signal
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn

from companion import loadtest, serve
from companion.monitor import parse_metrics
from companion.pretrained import load_pretrained_gpt

TIMEOUT = 60.0
MODEL = "companion-gpt"


@pytest.fixture(scope="module")
def server():
    with serve.ServerProcess(serve.Limits(max_batch_size=8), startup_timeout=300.0) as s:
        yield s


@pytest.fixture(scope="module")
def small():
    limits = serve.Limits(max_batch_size=2, max_queue=4, request_timeout=20.0, retry_after=2)
    with serve.ServerProcess(limits, startup_timeout=300.0) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def local_model():
    model, corpus = load_pretrained_gpt("cpu")
    return model, "".join(corpus.tokenizer.itos)


def metric(client, name, **labels):
    samples = parse_metrics(client.get("/metrics").text)
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def completion(**fields):
    return {"model": MODEL, "prompt": "The ", "max_tokens": 8, **fields}


def test_a_completion_equals_the_model_run_locally(client, local_model):
    assert client.get("/health").json()["status"] == "ok"
    assert client.get("/v1/models").json()["data"][0]["id"] == MODEL
    r = client.post("/v1/completions", json=completion(max_tokens=30, temperature=0.8, top_k=10,
                                                       seed=3), headers={"x-request-id": "abc-1"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc-1"
    out = r.json()
    assert out["id"] == "cmpl-abc-1" and out["object"] == "text_completion"
    assert out["usage"] == {"prompt_tokens": 4, "completion_tokens": 30, "total_tokens": 34}
    model, vocab = local_model
    prompt = torch.tensor([[vocab.index(ch) for ch in "The "]])
    ids = model.generate(prompt, 30, 0.8, 10, torch.Generator().manual_seed(3))[0, 4:]
    assert out["choices"][0]["text"] == "".join(vocab[i] for i in ids)
    assert out["choices"][0]["finish_reason"] == "length"


def test_tiny_temperatures_do_not_fail_their_batch(server, client):
    """A 1e-38 temperature once made NaN and a 500 for every request batched with it."""
    bodies = [completion(temperature=t, seed=i, max_tokens=20)
              for i, t in enumerate([1e-38, 5e-324, 0.8, 1.0, 0.5, 2.0])]
    before = metric(client, "companion_requests_total", route="/v1/completions", code="200")
    answers = asyncio.run(_concurrent(server.url, bodies))
    assert [r.status_code for r in answers] == [200] * 6
    greedy = client.post("/v1/completions", json=completion(temperature=0.0, max_tokens=20))
    assert answers[0].json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    assert answers[1].json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]
    after = metric(client, "companion_requests_total", route="/v1/completions", code="200")
    assert after == before + 7


async def _concurrent(url, bodies, path="/v1/completions"):
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
        return await asyncio.gather(*(c.post(path, json=b) for b in bodies))


def test_concurrent_texts_equal_the_texts_alone(server, client):
    bodies = [completion(prompt=p, max_tokens=4 + 9 * i, temperature=0.9, seed=100 + i,
                         **({"top_k": 5} if i % 2 else {"top_p": 0.9}))
              for i, p in enumerate(["The ", "import os", "def f(x):", "a", "class A", "# "])]
    alone = [client.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    steps = metric(client, "companion_decoding_steps_total")
    together = asyncio.run(_concurrent(server.url, bodies))
    assert [r.json()["choices"][0]["text"] for r in together] == alone
    assert metric(client, "companion_decoding_steps_total") - steps < sum(b["max_tokens"]
                                                                          for b in bodies)


BAD = [  # (what, body, status, param, code)
    ("malformed JSON", b'{"prompt": "x"', 400, "body", "json_invalid"),
    ("not UTF-8", b'\xff\xfe{"a"', 400, "body", "json_invalid"),
    ("not an object", b'["The "]', 400, "body", "model_attributes_type"),
    ("prompt not a string", completion(prompt=5), 400, "prompt", "string_type"),
    ("prompt missing", {"model": MODEL}, 400, "prompt", "missing"),
    ("empty prompt", completion(prompt=""), 400, "prompt", "string_too_short"),
    ("unknown model", completion(model="gpt-4"), 404, "model", "model_not_found"),
    ("unknown characters", completion(prompt="héllo 中文"), 422, "prompt", "unknown_characters"),
    ("max_tokens as a string", completion(max_tokens="5"), 400, "max_tokens", "int_type"),
    ("max_tokens zero", completion(max_tokens=0), 400, "max_tokens", "greater_than_equal"),
    ("beyond the context", completion(prompt="a" * 100, max_tokens=29), 422, "max_tokens",
     "context_length_exceeded"),
    ("prompt fills the context", completion(prompt="a" * 128, max_tokens=1), 422, "prompt",
     "context_length_exceeded"),
    ("negative temperature", completion(temperature=-0.5), 400, "temperature",
     "greater_than_equal"),
    ("temperature above 2", completion(temperature=2.5), 400, "temperature", "less_than_equal"),
    ("temperature a bool", completion(temperature=True), 400, "temperature", "float_type"),
    ("top_p zero", completion(top_p=0), 400, "top_p", "greater_than"),
    ("top_k zero", completion(top_k=0), 400, "top_k", "greater_than_equal"),
    ("n = 2", completion(n=2), 400, "n", None),
    ("stop not a string", completion(stop=5), 400, "stop", "string_type"),
    ("five stops", completion(stop=["a", "b", "c", "d", "e"]), 400, "stop", None),
    ("negative seed", completion(seed=-1), 400, "seed", "greater_than_equal"),
    ("logprobs", completion(logprobs=2), 400, "logprobs", "extra_forbidden"),
    ("echo", completion(echo=True), 400, "echo", "extra_forbidden"),
]


@pytest.mark.parametrize("body, status, param, code", [b[1:] for b in BAD],
                         ids=[b[0] for b in BAD])
def test_bad_requests_get_openai_json_errors_naming_the_field(client, body, status, param, code):
    before = metric(client, "companion_requests_total", route="/v1/completions", code=str(status))
    if isinstance(body, bytes):
        r = client.post("/v1/completions", content=body,
                        headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=body)
    assert r.status_code == status and r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == code and error["message"]
    assert error["type"] == "invalid_request_error"
    after = metric(client, "companion_requests_total", route="/v1/completions", code=str(status))
    assert after == before + 1
    assert client.post("/v1/completions", json=completion(max_tokens=2)).status_code == 200


def test_context_and_max_tokens_at_their_bounds(client):
    r = client.post("/v1/completions", json=completion(prompt="a" * 127, max_tokens=1, seed=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1
    r = client.post("/v1/completions", json=completion(max_tokens=124, temperature=0.0))
    assert r.status_code == 200 and r.json()["usage"]["total_tokens"] == 128
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 200}]}
    r = client.post("/v1/chat/completions", json=chat)
    assert r.status_code == 422 and r.json()["error"]["param"] == "messages"


def test_route_and_size_errors_have_the_same_shape(client):
    big = b'{"prompt": "' + b"a" * serve.Limits().max_body_bytes + b'"}'
    cases = [
        client.post("/v1/completions", content=big, headers={"content-type": "application/json"}),
        client.post("/v1/completions", content=iter([b'{"prompt": "a"}']),
                    headers={"content-type": "application/json"}),  # chunked: no length
        client.get("/v1/completions"), client.get("/nothing-here"),
    ]
    assert [r.status_code for r in cases] == [413, 411, 405, 404]
    assert [r.json()["error"]["param"] for r in cases] == ["body", "body", "method", "path"]
    assert all(r.headers["content-type"] == "application/json" for r in cases)


def test_openai_client_completion_chat_stream_and_errors(server, client):
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                        timeout=TIMEOUT)
    assert [m.id for m in api.models.list()] == [MODEL]
    done = api.completions.create(model=MODEL, prompt="The ", max_tokens=12, seed=7,
                                  temperature=0.7)
    direct = client.post("/v1/completions", json=completion(max_tokens=12, seed=7,
                                                            temperature=0.7)).json()
    assert done.choices[0].text == direct["choices"][0]["text"] and done.usage.total_tokens == 16
    chat = api.chat.completions.create(model=MODEL, max_tokens=20, seed=1, messages=[
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "A class, please."}])
    assert chat.choices[0].message.role == "assistant"
    assert chat.usage.prompt_tokens == len(serve.chat_template([
        {"role": "system", "content": "You write Python."},
        {"role": "user", "content": "A class, please."}]))
    pieces = list(api.completions.create(model=MODEL, prompt="The ", max_tokens=12, seed=7,
                                         temperature=0.7, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == done.choices[0].text
    assert pieces[-1].choices[0].finish_reason == "length"
    stream = api.chat.completions.create(model=MODEL, max_tokens=20, seed=1, stream=True,
                                         messages=[{"role": "system",
                                                    "content": "You write Python."},
                                                   {"role": "user",
                                                    "content": "A class, please."}])
    assert "".join(c.choices[0].delta.content or "" for c in stream) == \
        chat.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as bad:
        api.completions.create(model=MODEL, prompt="The ", temperature=3.0)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="gpt-4", prompt="The ")
    with pytest.raises(openai.UnprocessableEntityError):
        api.completions.create(model=MODEL, prompt="The ", max_tokens=125)


def test_stop_sequences_in_whole_and_streamed_answers(client):
    full = client.post("/v1/completions", json=completion(max_tokens=40, temperature=0.0))
    text = full.json()["choices"][0]["text"]
    stop = text[12:14]
    cut = client.post("/v1/completions", json=completion(max_tokens=40, temperature=0.0,
                                                         stop=[stop, "zzz"])).json()
    assert cut["choices"][0]["text"] == text[:text.index(stop)]
    assert cut["choices"][0]["finish_reason"] == "stop"
    with client.stream("POST", "/v1/completions",
                       json=completion(max_tokens=40, temperature=0.0, stop=[stop, "zzz"],
                                       stream=True)) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[:text.index(stop)]


def test_streamed_chunks_join_to_the_whole_answer_every_time(server, client):
    """The model's thread appends while the stream reads: no token may be lost or doubled
    (a last token was once dropped when ``done`` turned true between two reads)."""
    import json

    for i in range(8):
        body = completion(max_tokens=6 + 3 * i, temperature=0.9, seed=i,
                          stop=["zq"] if i % 2 else None)
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
        assert "".join(c["text"] for c in chunks) == whole["text"]
        assert chunks[-1]["finish_reason"] == whole["finish_reason"]


def test_burst_of_300_gets_200_or_429_with_retry_after_and_no_500(small):
    with httpx.Client(base_url=small.url, timeout=TIMEOUT) as c:
        before = metric(c, "companion_rejections_total", reason="queue_full")
        bodies = [completion(max_tokens=4, seed=i) for i in range(300)]
        answers = asyncio.run(_concurrent(small.url, bodies))
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 429} and codes.count(200) >= 6 and codes.count(429) >= 1
        refused = [r for r in answers if r.status_code == 429]
        assert all(r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "queue_full"
                   for r in refused)
        assert all(r.json()["usage"]["completion_tokens"] == 4
                   for r in answers if r.status_code == 200)
        after = metric(c, "companion_rejections_total", reason="queue_full")
        assert after - before == codes.count(429)
        assert c.get("/health").json() == {"status": "ok", "waiting": 0, "running": 0}


def test_a_client_that_disconnects_cancels_its_generation(small):
    with httpx.Client(base_url=small.url, timeout=TIMEOUT) as c:
        before = metric(c, "companion_requests_total", route="/v1/completions", code="499")
        tokens = metric(c, "companion_generated_tokens_total")
        body = completion(max_tokens=124, temperature=0.0)
        for _ in range(2):
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(small.url + "/v1/completions", json=body, timeout=0.05)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and c.get("/health").json()["running"]:
            time.sleep(0.02)
        assert c.get("/health").json()["running"] == 0
        cancelled = metric(c, "companion_requests_total", route="/v1/completions",
                           code="499") - before
        generated = metric(c, "companion_generated_tokens_total") - tokens
        assert cancelled >= 1 and generated < 2 * 124


class InProcessServer:
    """uvicorn in a thread, on a free loopback port; stopped with a timeout."""

    def __init__(self, app):
        self.port = serve.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            self.__exit__()
            raise RuntimeError("the in-process server did not start within 30 s")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def test_deadline_504_frees_the_slot_and_a_dead_scheduler_makes_health_fail(local_model):
    model, vocab = local_model
    app = serve.create_app(model, vocab, serve.Limits(request_timeout=1e-3))

    async def boom():  # a bug in a handler: the middleware must answer JSON and count it
        raise RuntimeError("a bug")

    app.add_api_route("/v1/boom", boom, methods=["POST"])
    with InProcessServer(app) as s, httpx.Client(base_url=s.url, timeout=TIMEOUT) as c:
        r = c.post("/v1/boom", json={})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert r.headers["content-type"] == "application/json" and r.headers["x-request-id"]
        assert metric(c, "companion_requests_total", route="/v1/boom", code="500") == 1
        r = c.post("/v1/completions", json=completion(max_tokens=124))
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        assert c.get("/health").json() == {"status": "ok", "waiting": 0, "running": 0}
        assert metric(c, "companion_rejections_total", reason="timeout") == 1
        loop = app.state.scheduler._task.get_loop()
        loop.call_soon_threadsafe(app.state.scheduler.kill)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and c.get("/health").status_code == 200:
            time.sleep(0.02)
        assert c.get("/health").status_code == 503
        r = c.post("/v1/completions", json=completion())
        assert r.status_code == 503 and r.json()["error"]["code"] == "scheduler_stopped"


def test_metrics_histograms_gauges_counters_and_access_log(server, client):
    payloads = [completion(max_tokens=4 + 4 * (i % 3), seed=i) for i in range(12)]
    payloads += [completion(max_tokens=999)] * 3
    before = parse_metrics(client.get("/metrics").text)
    result = asyncio.run(loadtest.open_loop(server.url, payloads, rate=200.0, seed=0))
    text = client.get("/metrics").text
    after = parse_metrics(text)
    for name in ("request_latency_seconds", "time_to_first_token_seconds",
                 "time_per_output_token_seconds", "batch_size"):
        assert f"# TYPE companion_{name} histogram" in text
    for name in ("queue_depth", "running"):
        assert f"# TYPE companion_{name} gauge" in text
    assert "process_cpu_seconds_total" in text and "python_gc_objects_collected_total" in text

    def delta(name, *labels):
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    route = ("route", "/v1/completions")
    assert sorted(result.status_codes) == [200] * 12 + [422] * 3 and result.n == 12
    assert delta("companion_requests_total", ("code", "200"), route) == 12
    assert delta("companion_requests_total", ("code", "422"), route) == 3
    assert delta("companion_generated_tokens_total") == sum(result.completion_tokens) == 96
    assert delta("companion_prompt_tokens_total") == 12 * 4
    assert delta("companion_time_to_first_token_seconds_count") == 12
    assert delta("companion_request_latency_seconds_count") == 15
    assert 0 < result.percentile(50) <= result.percentile(99) <= max(result.latencies)
    assert after[("companion_queue_depth", ())] == after[("companion_running", ())] == 0
    rid = client.post("/v1/completions", json=completion()).headers["x-request-id"]
    time.sleep(0.2)
    assert f'{rid} 127.0.0.1 "POST /v1/completions" 200' in server.log()


def test_sigterm_finishes_the_request_in_flight_then_exits(server):
    # last test of the module: it stops the shared server
    body = completion(max_tokens=124, temperature=0.0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, server.url + "/v1/completions", json=body,
                             timeout=TIMEOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until the request is being computed
            if httpx.get(server.url + "/health", timeout=5).json()["running"] > 0:
                break
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        response = future.result(timeout=TIMEOUT)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 124
    server.process.wait(timeout=30)
    assert "stopped cleanly" in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


def test_server_process_app_and_limits_bad_input(local_model):
    model, vocab = local_model
    with pytest.raises(ValueError, match="max_batch_size"):
        serve.Limits(max_batch_size=0)
    with pytest.raises(ValueError, match="batching"):
        serve.Limits(batching="dynamic")
    with pytest.raises(TypeError, match="limits"):
        serve.ServerProcess(limits={"max_queue": 3})
    with pytest.raises(ValueError, match="vocab"):
        serve.create_app(model, vocab[:-1])
    with pytest.raises(TypeError, match="model"):
        serve.create_app("gpt", vocab)
    with pytest.raises(ValueError, match="rate"):
        asyncio.run(loadtest.open_loop("http://127.0.0.1:9", [], rate=0.0))
    args = serve.parse_args(["--max-queue", "3", "--batching", "static"])
    assert (args.max_queue, args.batching, args.request_timeout) == (3, "static", 30.0)


def test_a_server_that_does_not_come_up_in_time_is_stopped():
    server = serve.ServerProcess(startup_timeout=0.0, stop_timeout=10.0)
    with pytest.raises(RuntimeError, match="did not come up within 0.0 s"):
        server.start()
    assert server.process.poll() is not None  # nothing left running


def test_chat_template_is_written_down():
    text = serve.chat_template([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}])
    assert text == "\n### System:\nBe brief.\n### User:\nHi\n### Assistant:\n"
