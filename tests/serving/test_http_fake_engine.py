"""The HTTP, queue and streaming layer in one process, on a test double of the engine (tests/serving/serving_fake_engine.py).

The serving loop runs in a thread with a one-rank control channel; a real
werkzeug server listens on a free loopback port. What is checked: answers are
the engine's, cut to what each request asked; concurrent requests are batched
and each client gets its own answer; streaming; a client that disconnects
mid-stream cancels its prompts; an engine failure answers 500 and the next
request is fine; the web page is served.
"""
from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from serving_fake_engine import start_fake_server


@pytest.fixture(scope="module")
def served(tiny_tokenizer):
    url, engine, loop, stop = start_fake_server(tiny_tokenizer)
    yield url, engine, loop
    stop()


def test_api_answer_is_the_engines(served, tiny_tokenizer):
    url, engine, _ = served
    r = requests.put(url + "/api", json={"prompts": ["Hello world", "fox"], "tokens_to_generate": 3, "top_k": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"text", "segments", "logprobs"} and body["logprobs"] is None
    for i, p in enumerate(["Hello world", "fox"]):
        want = engine.expected(p, 3)
        assert body["text"][i] == tiny_tokenizer.detokenize(want)
        assert body["segments"][i] == [tiny_tokenizer.detokenize([t]) for t in want]


def test_bad_request_is_400_and_never_reaches_the_engine(served):
    url, engine, _ = served
    before = len(engine.calls)
    r = requests.put(url + "/api", data=b'{"prompts": ["a"], "top_k": 2, "top_p": 0.5}',
                     headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "top_k (2)" in r.json()["message"]
    r = requests.put(url + "/api", data=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["message"]
    r = requests.post(url + "/api", json={"prompts": ["a"]})
    assert r.status_code == 405 and "message" in r.json()
    r = requests.put(url + "/api", data=b"x" * (9 * 1024 * 1024), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "message" in r.json()
    assert len(engine.calls) == before


def test_concurrent_requests_are_batched_and_each_gets_its_own(served, tiny_tokenizer):
    url, engine, loop = served
    prompts = [f"Hello {i}" for i in range(16)]
    lengths = [1 + i % 5 for i in range(16)]
    before_calls, before_batches = len(engine.calls), loop.batches

    def ask(i):
        return requests.put(url + "/api", json={"prompts": [prompts[i]], "tokens_to_generate": lengths[i],
                                                "top_k": 1, "no_log": True}, timeout=30)

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(16)))
    for i, r in enumerate(answers):
        assert r.status_code == 200, r.text
        assert r.json()["text"] == [tiny_tokenizer.detokenize(engine.expected(prompts[i], lengths[i]))]
    calls = engine.calls[before_calls:]
    assert sum(len(p) for p, _ in calls) == 16            # nothing lost, nothing twice
    assert len(calls) < 16 and max(len(p) for p, _ in calls) > 1   # some requests shared a batch
    assert max(len(p) for p, _ in calls) <= 8             # --max-batch-size


def test_seeded_sampling_runs_alone(served):
    url, engine, _ = served
    before = len(engine.calls)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: requests.put(url + "/api", json={"prompts": ["a"], "tokens_to_generate": 2,
                                                                 "random_seed": 7, "no_log": True}), range(4)))
    assert [len(p) for p, _ in engine.calls[before:]] == [1, 1, 1, 1]


def test_engine_failure_is_500_then_next_request_is_fine(served, tiny_tokenizer):
    url, engine, _ = served
    engine.fail_next = True
    r = requests.put(url + "/api", json={"prompts": ["Hello"], "tokens_to_generate": 2})
    assert r.status_code == 500 and "fake engine failure" in r.json()["message"]
    r = requests.put(url + "/api", json={"prompts": ["Hello"], "tokens_to_generate": 2, "top_k": 1})
    assert r.status_code == 200 and r.json()["text"] == [tiny_tokenizer.detokenize(engine.expected("Hello", 2))]


def _events(response):
    for line in response.iter_lines():
        if line.startswith(b"data: "):
            yield line[6:].decode()


def test_openai_completion_and_stream_agree(served, tiny_tokenizer):
    url, engine, _ = served
    body = {"model": "fake", "prompt": "Hello world", "max_tokens": 6, "temperature": 0}
    whole = requests.post(url + "/v1/completions", json=body).json()
    gen = engine.expected("Hello world", 6)[len(tiny_tokenizer.tokenize("Hello world")):]
    assert whole["choices"][0]["text"] == tiny_tokenizer.detokenize(gen)
    assert whole["choices"][0]["finish_reason"] == "length"
    assert whole["usage"]["completion_tokens"] == 6
    with requests.post(url + "/v1/completions", json=dict(body, stream=True), stream=True) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = list(_events(r))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) > 2                              # it came in pieces
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    models = requests.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "fake"


def test_stop_string_cuts_the_text(served, tiny_tokenizer):
    url, engine, _ = served
    full = requests.post(url + "/v1/completions", json={"prompt": "fox", "max_tokens": 8, "temperature": 0}).json()
    text = full["choices"][0]["text"]
    stop = text[3:5]
    assert stop and text.find(stop) >= 0
    cut = requests.post(url + "/v1/completions", json={"prompt": "fox", "max_tokens": 8, "temperature": 0,
                                                       "stop": stop}).json()["choices"][0]
    assert cut["text"] == text[:text.find(stop)] and cut["finish_reason"] == "stop"
    with requests.post(url + "/v1/completions", json={"prompt": "fox", "max_tokens": 8, "temperature": 0,
                                                      "stop": stop, "stream": True}, stream=True) as r:
        chunks = [json.loads(e) for e in _events(r) if e != "[DONE]"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == cut["text"]


def test_disconnect_mid_stream_cancels_and_server_keeps_serving(served, tiny_tokenizer):
    url, engine, _ = served
    body = json.dumps({"prompt": "Hello", "max_tokens": 50, "temperature": 0, "stream": True}).encode()
    before, before_steps = len(engine.calls), len(engine.steps)
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        first = s.recv(4096)
        assert b"200" in first.split(b"\r\n")[0]
    # the engine ran 50 steps at 10 ms unless the callback cancelled the prompt
    # the next request is queued behind the streamed one, so when it is answered that call has ended
    r = requests.put(url + "/api", json={"prompts": ["fox"], "tokens_to_generate": 2, "top_k": 1}, timeout=10)
    assert r.status_code == 200 and r.json()["text"] == [tiny_tokenizer.detokenize(engine.expected("fox", 2))]
    assert engine.calls[before][0] == ["Hello"]
    # 50 steps of 10 ms unless the callback cancelled the prompt of the client that went away
    assert engine.steps[before_steps] < 50, "the disconnected client's prompt was not cancelled"


def test_web_page_and_health(served):
    url, _, _ = served
    page = requests.get(url + "/")
    assert page.status_code == 200 and "/v1/completions" in page.text and 'id="prompt"' in page.text
    health = requests.get(url + "/health").json()
    assert health["status"] == "ok" and health["max_batch_size"] == 8


def test_a_model_by_id_and_no_chat_endpoint(served):
    """GET /v1/models/{id} answers as OpenAI does; /v1/chat/completions is a JSON 404 naming /v1/completions."""
    url, _, _ = served
    r = requests.get(url + "/v1/models/fake")
    assert r.status_code == 200 and r.json()["id"] == "fake" and r.json()["object"] == "model"
    r = requests.get(url + "/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "'fake'" in r.json()["error"]["message"]
    r = requests.post(url + "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "base" in error["message"] and "/v1/completions" in error["message"]
