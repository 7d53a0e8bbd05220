"""companion.serve through real HTTP: a uvicorn subprocess on a free loopback port.

One server (module fixture) answers every test; ``ServerProcess`` bounds its start-up and
shut-down with timeouts and stops it also when a test fails. The last test sends it
SIGTERM with a request in flight.
"""

import asyncio
import concurrent.futures
import signal
import time

import httpx
import pytest
import torch

from companion import serve
from companion.monitor import parse_metrics
from companion.pretrained import load_pretrained_gpt

TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server():
    with serve.ServerProcess(max_batch_size=8, max_wait_ms=20.0, startup_timeout=300.0) as s:
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


def test_health_and_a_good_request_match_the_model_run_locally(client, local_model):
    assert client.get("/health").json()["status"] == "ok"
    body = {"prompt": "The ", "max_new_tokens": 30, "temperature": 0.8, "top_k": 10, "seed": 3}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    out = r.json()
    assert out["prompt_tokens"] == 4 and out["completion_tokens"] == 30 and len(out["text"]) == 30
    model, vocab = local_model
    prompt = torch.tensor([[vocab.index(ch) for ch in "The "]])
    ids = model.generate(prompt, 30, 0.8, 10, torch.Generator().manual_seed(3))[0, 4:]
    assert out["text"] == "".join(vocab[i] for i in ids)


def test_generate_batch_equals_gpt_generate_row_by_row(local_model):
    model, _ = local_model
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (3, 120), generator=g)
    settings = [(12, 1.0, None, 5), (3, 0.7, 4, 6), (9, 0.0, None, 7)]  # crosses block_size
    got = serve.generate_batch(model, prompts, [s[0] for s in settings],
                               [s[1] for s in settings], [s[2] for s in settings],
                               [torch.Generator().manual_seed(s[3]) for s in settings])
    for i, (n, temperature, top_k, seed) in enumerate(settings):
        ref = model.generate(prompts[i:i + 1], n, temperature, top_k,
                             torch.Generator().manual_seed(seed))[0, 120:]
        assert got[i] == ref.tolist()
        alone = serve.generate_batch(model, prompts[i:i + 1], [n], [temperature], [top_k],
                                     [torch.Generator().manual_seed(seed)])
        assert alone == [ref.tolist()]
    with pytest.raises(ValueError, match="one max_new_tokens"):
        serve.generate_batch(model, prompts, [1], [1.0], [None], [g])


BAD_REQUESTS = [
    ("malformed JSON", b'{"prompt": "x"', "body", "json_invalid"),
    ("not an object", b'["The "]', "body", "model_attributes_type"),
    ("prompt not a string", {"prompt": 5}, "prompt", "string_type"),
    ("prompt missing", {"max_new_tokens": 5}, "prompt", "missing"),
    ("empty prompt", {"prompt": ""}, "prompt", "string_too_short"),
    ("prompt too long", {"prompt": "a" * (serve.MAX_PROMPT_CHARS + 1)}, "prompt",
     "string_too_long"),
    ("unknown characters", {"prompt": "héllo 中文"}, "prompt", "unknown_characters"),
    ("max_new_tokens as a string", {"prompt": "a", "max_new_tokens": "5"}, "max_new_tokens",
     "int_type"),
    ("max_new_tokens too large", {"prompt": "a", "max_new_tokens": 513}, "max_new_tokens",
     "less_than_equal"),
    ("max_new_tokens zero", {"prompt": "a", "max_new_tokens": 0}, "max_new_tokens",
     "greater_than_equal"),
    ("negative temperature", {"prompt": "a", "temperature": -0.5}, "temperature",
     "greater_than_equal"),
    ("temperature as a bool", {"prompt": "a", "temperature": True}, "temperature", "float_type"),
    ("top_k zero", {"prompt": "a", "top_k": 0}, "top_k", "greater_than_equal"),
    ("top_k a float", {"prompt": "a", "top_k": 2.5}, "top_k", "int_type"),
    ("negative seed", {"prompt": "a", "seed": -1}, "seed", "greater_than_equal"),
    ("unknown field", {"prompt": "a", "stream": True}, "stream", "extra_forbidden"),
]


@pytest.mark.parametrize("body, field, kind", [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_422_json_naming_the_field(client, body, field, kind):
    before = metric(client, "companion_requests_total", code="422")
    if isinstance(body, bytes):
        r = client.post("/v1/generate", content=body, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/generate", json=body)
    assert r.status_code == 422
    out = r.json()
    assert out["field"] == field and out["detail"][0]["type"] == kind and out["error"]
    assert metric(client, "companion_requests_total", code="422") == before + 1
    ok = client.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 2, "seed": 0})
    assert ok.status_code == 200 and client.get("/health").status_code == 200


def test_oversize_and_unsized_bodies(client):
    big = b'{"prompt": "' + b"a" * serve.MAX_BODY_BYTES + b'"}'
    r = client.post("/v1/generate", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["field"] == "body"
    r = client.post("/v1/generate", content=iter([b'{"prompt": "a"}']),
                    headers={"content-type": "application/json"})  # chunked: no length
    assert r.status_code == 411 and r.json()["field"] == "body"
    assert client.get("/v1/generate").status_code == 405
    assert client.get("/nothing-here").status_code == 404
    assert client.post("/v1/generate", json={"prompt": "a", "max_new_tokens": 1}).status_code == 200


def test_same_text_alone_sequentially_and_concurrently_and_batched(server, client):
    # equal prompt lengths so that the server can batch them
    bodies = [{"prompt": f"The {w:>8} ", "max_new_tokens": 24 + i, "temperature": 0.9,
               "top_k": [None, 5][i % 2], "seed": 100 + i}
              for i, w in enumerate(["module", "class", "import", "list", "str", "int",
                                     "return", "yield"])]
    alone = [client.post("/v1/generate", json=b).json()["text"] for b in bodies]
    batches_before = metric(client, "companion_batches_total")
    result = asyncio.run(_concurrent(server.url, bodies))
    batches = metric(client, "companion_batches_total") - batches_before
    assert [r["text"] for r in result] == alone
    assert batches < len(bodies)  # they did share forward passes
    again = [client.post("/v1/generate", json=b).json()["text"] for b in bodies]
    assert again == alone


async def _concurrent(url, bodies):
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as c:
        responses = await asyncio.gather(*(c.post("/v1/generate", json=b) for b in bodies))
    return [r.json() for r in responses]


def test_load_test_and_metrics_agree(server, client):
    parsed = parse_metrics(client.get("/metrics").text)
    before = {code: parsed.get(("companion_requests_total", (("code", code),)), 0.0)
              for code in ("200", "422")}
    tokens_before = parsed[("companion_generated_tokens_total", ())]
    latency_before = parsed[("companion_request_latency_seconds_count", ())]
    payloads = [{"prompt": "def f(x): ", "max_new_tokens": 8, "seed": i} for i in range(12)]
    payloads += [{"prompt": "def f(x): ", "max_new_tokens": 999}] * 3
    result = asyncio.run(serve.load_test(server.url, payloads, concurrency=6))
    assert sorted(result.status_codes) == [200] * 12 + [422] * 3
    assert sum(result.completion_tokens) == 96 and result.requests_per_second > 0
    assert 0 < result.percentile(50) <= result.percentile(99) <= max(result.latencies)
    text = client.get("/metrics").text
    assert "# TYPE companion_request_latency_seconds histogram" in text
    assert "# TYPE companion_batch_size gauge" in text
    after = parse_metrics(text)
    assert after[("companion_requests_total", (("code", "200"),))] == before["200"] + 12
    assert after[("companion_requests_total", (("code", "422"),))] == before["422"] + 3
    assert after[("companion_generated_tokens_total", ())] == tokens_before + 96
    assert after[("companion_request_latency_seconds_count", ())] == latency_before + 15
    assert after[("companion_batch_size", ())] == 0.0


def test_sigterm_finishes_the_request_in_flight_then_exits(server):
    # last test of the module: it stops the shared server
    body = {"prompt": "The ", "max_new_tokens": 512, "temperature": 0.0}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(httpx.post, server.url + "/v1/generate", json=body, timeout=TIMEOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # wait until the request is being computed
            text = httpx.get(server.url + "/metrics", timeout=5).text
            if parse_metrics(text)[("companion_batch_size", ())] > 0:
                break
            time.sleep(0.01)
        server.process.send_signal(signal.SIGTERM)
        response = future.result(timeout=TIMEOUT)
    assert response.status_code == 200 and response.json()["completion_tokens"] == 512
    server.process.wait(timeout=30)
    assert "stopped cleanly" in server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=2)


def test_server_process_and_app_bad_input(local_model):
    model, vocab = local_model
    with pytest.raises(ValueError, match="max_batch_size"):
        serve.ServerProcess(max_batch_size=0)
    with pytest.raises(ValueError, match="vocab"):
        serve.create_app(model, vocab[:-1])
    with pytest.raises(TypeError, match="model"):
        serve.create_app("gpt", vocab)
    with pytest.raises(ValueError, match="max_wait_ms"):
        serve.create_app(model, vocab, max_wait_ms=-1.0)


def test_a_server_that_does_not_come_up_in_time_is_stopped():
    server = serve.ServerProcess(startup_timeout=0.0, stop_timeout=10.0)
    with pytest.raises(RuntimeError, match="did not come up within 0.0 s"):
        server.start()
    assert server.process.poll() is not None  # nothing left running
