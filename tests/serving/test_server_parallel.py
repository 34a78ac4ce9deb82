"""The real server on TP=2 and on TP2 x PP2 ranks (torchrun jobs on a free loopback port).

* greedy answers equal ``transformers``' on the same weights, for a batch of prompts of different lengths;
* OpenAI's ``logprobs: k`` (the top k from the vocab-parallel logits), whole and streamed (the sampler's
  per-step copy, sent to rank 0 when PP=2), equal ``transformers``';
* concurrent clients are batched and each gets its own (HF-equal) answer;
* an error inside generation (on the last pipeline stage only, when PP=2) answers 500, and the next request is right;
* SIGTERM to a plain-python server (which started its own ranks) stops every rank within seconds, port freed;
* a rank killed with SIGKILL brings the whole torchrun job down (no hang) and frees the port;
* SIGTERM to torchrun itself (what Ctrl-C or a cluster's scheduler sends) stops every rank, port freed.
(SIGTERM to rank 0 alone is shown by the notebook part chapters/06e_parts/30_serving.py.)
"""
from __future__ import annotations

import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import assert_logprobs_close, expected_api, hf_openai_logprobs

PROMPTS = ["Hello world", "The quick brown fox jumps over", "A server"]
FAULT = "<<fail here>>"


@pytest.fixture(scope="module", params=[(2, 1, "python"), (2, 2, "torchrun")], ids=["tp2", "tp2pp2"])
def server(request, server_factory, tiny_gpt2_folder):
    """TP=2 as plain ``python`` (the script starts its own ranks), TP2 x PP2 under torchrun."""
    tp, pp, launcher = request.param
    return server_factory(tiny_gpt2_folder, tp=tp, pp=pp, launcher=launcher,
                          extra=("--inject-fault-prompt", FAULT, "--heartbeat", "1"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            s.listen()
            return True
        except OSError:
            return False


def test_greedy_batch_equals_transformers(server, hf_greedy, tiny_tokenizer):
    health = requests.get(server.url + "/health").json()
    assert health["tensor_model_parallel_size"] * health["pipeline_model_parallel_size"] == len(health["rank_pids"])
    r = server.put_api({"prompts": PROMPTS, "tokens_to_generate": 8, "top_k": 1})
    assert r.status_code == 200, r.text
    for i, p in enumerate(PROMPTS):
        assert (r.json()["text"][i], r.json()["segments"][i]) == expected_api(hf_greedy, tiny_tokenizer, p, 8)


def test_concurrent_clients_each_get_their_answer(server, hf_greedy, tiny_tokenizer):
    jobs = [(PROMPTS[i % 3] + " " * (i // 3), 2 + i % 4) for i in range(8)]

    def ask(job):
        return server.put_api({"prompts": [job[0]], "tokens_to_generate": job[1], "top_k": 1, "no_log": True})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, n), r in zip(jobs, answers):
        assert r.status_code == 200, r.text
        assert (r.json()["text"][0], r.json()["segments"][0]) == expected_api(hf_greedy, tiny_tokenizer, prompt, n)


def test_openai_logprobs_equal_transformers(server, hf_model, tiny_tokenizer):
    prompt, k = PROMPTS[1], 3
    want = hf_openai_logprobs(hf_model, tiny_tokenizer, prompt, 5, k)
    body = {"prompt": prompt, "max_tokens": 5, "temperature": 0, "logprobs": k, "echo": True}
    r = requests.post(server.url + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert_logprobs_close(r.json()["choices"][0]["logprobs"], want)
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    with requests.post(server.url + "/v1/completions", json=dict(body, stream=True), stream=True, timeout=60) as s:
        for line in s.iter_lines():
            if line.startswith(b"data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"] or {}
                for key in joined:
                    joined[key] += lp.get(key) or []
    assert_logprobs_close(joined, want)


def test_generation_error_is_500_then_a_correct_answer(server, hf_greedy, tiny_tokenizer):
    r = server.put_api({"prompts": [FAULT], "tokens_to_generate": 4, "top_k": 1})
    assert r.status_code == 500
    assert "injected fault" in r.json()["message"]
    r = server.put_api({"prompts": PROMPTS[:1], "tokens_to_generate": 5, "top_k": 1})
    assert r.status_code == 200
    assert (r.json()["text"][0], r.json()["segments"][0]) == expected_api(hf_greedy, tiny_tokenizer, PROMPTS[0], 5)


def test_beam_search_answers(server):
    r = server.put_api({"prompts": ["Hello"], "tokens_to_generate": 4, "beam_width": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["text"]) == 2 and len(body["scores"]) == 2 and body["scores"][0] >= body["scores"][1]


def test_stop(server, request):
    """TP=2 (plain python): SIGTERM to it stops every rank. TP2xPP2 (torchrun): a follower killed with SIGKILL
    brings the whole job down (no hang)."""
    pids = requests.get(server.url + "/health").json()["rank_pids"]
    start = time.monotonic()
    if request.node.callspec.id == "tp2":
        server.stop(signal.SIGTERM, timeout=20)
        assert "server stopped (every rank ended)" in server.output(), server.output()[-3000:]
        assert server.proc.returncode == 0
    else:
        os.kill(pids[-1], signal.SIGKILL)
        try:
            server.proc.wait(30)
        except Exception:
            pytest.fail(f"the job outlived a dead rank by 30 s:\n{server.output()[-3000:]}")
        assert server.proc.returncode != 0
    took = time.monotonic() - start
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), "a rank outlived the job"
    assert took < 20
    assert _port_free(server.port)


def test_sigterm_to_torchrun_stops_every_rank(server_factory, tiny_gpt2_folder):
    """A TP=2 server under torchrun, SIGTERM to torchrun (not to a rank): torchrun passes it to the
    ranks, and every rank is gone within 20 s with the port free, before anything is killed by force."""
    server = server_factory(tiny_gpt2_folder, tp=2, launcher="torchrun")
    pids = requests.get(server.url + "/health").json()["rank_pids"]
    assert len(pids) == 2 and all(_alive(p) for p in pids)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(20)
    except Exception:
        pytest.fail(f"torchrun outlived SIGTERM by 20 s:\n{server.output()[-3000:]}")
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(p) for p in pids), f"a rank outlived torchrun:\n{server.output()[-3000:]}"
    assert time.monotonic() - start < 20
    assert _port_free(server.port)
