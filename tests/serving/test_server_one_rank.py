"""The real server on one rank (a process on a free loopback port): Megatron's API, OpenAI's, the CLI, bad requests.

Greedy answers are compared with ``transformers``' ``generate`` on the same
weights (token for token, through the per-token segments).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import requests
from conftest import ROOT, expected_api

PROMPTS = ["Hello world", "The quick brown fox jumps", "A"]


def test_lesson_curl_command(one_rank_server):
    r = subprocess.run(["curl", "-s", f"{one_rank_server.url}/api", "-X", "PUT", "-H",
                        "Content-Type: application/json", "-d", '{"prompts":["Hello world"], "tokens_to_generate":1}'],
                       capture_output=True, text=True, timeout=60)
    body = json.loads(r.stdout)
    assert set(body) == {"text", "segments", "logprobs"} and body["logprobs"] is None
    assert body["text"][0].startswith("Hello world") and body["segments"][0][:2] == ["Hello", " world"]
    assert len(body["segments"][0]) == 3          # the prompt's two tokens and one generated


def test_greedy_batch_equals_transformers(one_rank_server, hf_greedy, tiny_tokenizer):
    r = one_rank_server.put_api({"prompts": PROMPTS, "tokens_to_generate": 8, "top_k": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    for i, p in enumerate(PROMPTS):
        assert (body["text"][i], body["segments"][i]) == expected_api(hf_greedy, tiny_tokenizer, p, 8)


def test_scoring_and_logprobs(one_rank_server):
    r = one_rank_server.put_api({"prompts": PROMPTS, "tokens_to_generate": 0, "logprobs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    for i in range(len(PROMPTS)):
        assert len(body["logprobs"][i]) == len(body["segments"][i]) - 1
        assert all(lp <= 0 for lp in body["logprobs"][i])


BAD = [
    (b"{", "JSON"),
    (b"null", "request body must be a JSON object, got null"),
    (b"5", "request body must be a JSON object, got 5"),
    (b'{"prompts": "Hello"}', "prompts must be a list"),
    (b'{"prompts": []}', "prompts is empty"),
    (json.dumps({"prompts": ["a"] * 129}).encode(), "129"),
    (b'{"prompts": ["Hello"], "tokens_to_generate": "3"}', 'tokens_to_generate must be an integer, got "3"'),
    (b'{"prompts": ["Hello"], "tokens_to_generate": 64}', "beyond the model's 64 positions"),
    (b'{"prompts": ["Hello"], "top_k": 3, "top_p": 0.9}', "top_k (3) and top_p (0.9)"),
    (b'{"prompts": ["Hello"], "temperature": -1}', "temperature"),
    (b'{"prompts": ["Hello"], "top_k": 299, "tokens_to_generate": 1}', None),     # valid: control
    (b'{"prompts": ["Hello"], "top_k": 300}', "top_k (300)"),
    (b'{"prompts": [""]}', "add_BOS"),
    (b'{"prompts": ["a", "b"], "beam_width": 2}', "one prompt"),
]


@pytest.mark.parametrize("raw, message", BAD)
def test_bad_requests_are_400_and_the_server_keeps_serving(one_rank_server, raw, message):
    r = requests.put(one_rank_server.url + "/api", data=raw, headers={"Content-Type": "application/json"}, timeout=60)
    if message is None:
        assert r.status_code == 200, r.text
        return
    assert r.status_code == 400, r.text
    assert message in r.json()["message"]
    ok = one_rank_server.put_api({"prompts": ["Hello"], "tokens_to_generate": 1, "top_k": 1})
    assert ok.status_code == 200


def test_openai_completions_and_stream(one_rank_server, hf_greedy, tiny_tokenizer):
    url = one_rank_server.url
    model = requests.get(url + "/v1/models").json()["data"][0]["id"]
    body = {"model": model, "prompt": PROMPTS[:2], "max_tokens": 6, "temperature": 0}
    whole = requests.post(url + "/v1/completions", json=body, timeout=60).json()
    for i, p in enumerate(PROMPTS[:2]):
        ids = hf_greedy(p, 6)
        n = len(tiny_tokenizer.tokenize(p))
        gen = [t for t in ids[n:] if t != tiny_tokenizer.eod]
        assert whole["choices"][i]["text"] == tiny_tokenizer.detokenize(gen)
    streamed = {0: "", 1: ""}
    with requests.post(url + "/v1/completions", json=dict(body, stream=True), stream=True, timeout=60) as r:
        lines = [line.decode() for line in r.iter_lines() if line.startswith(b"data: ")]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        c = json.loads(line[6:])["choices"][0]
        streamed[c["index"]] += c["text"]
    assert [streamed[0], streamed[1]] == [c["text"] for c in whole["choices"]]
    bad = requests.post(url + "/v1/completions", json={"prompt": "a", "logprobs": 6}, timeout=60)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "logprobs"


def test_disconnect_mid_stream_then_a_correct_answer(one_rank_server, hf_greedy, tiny_tokenizer):
    body = json.dumps({"prompt": "Hello", "max_tokens": 60, "temperature": 0, "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", one_rank_server.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        assert b" 200 " in s.recv(65536).split(b"\r\n")[0]
    r = one_rank_server.put_api({"prompts": ["The quick brown fox jumps"], "tokens_to_generate": 8, "top_k": 1})
    assert (r.json()["text"][0], r.json()["segments"][0]) == expected_api(
        hf_greedy, tiny_tokenizer, "The quick brown fox jumps", 8)


def test_cli_against_the_live_server(one_rank_server, hf_greedy, tiny_tokenizer):
    stdin = "Hello world\nthree\n4\nHello\n100\n"     # a bad number, a good round, one the server refuses
    r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "ch6", "text_generation_cli.py"),
                        f"127.0.0.1:{one_rank_server.port}"], input=stdin, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert "must be an integer >= 0, got 'three'" in r.stdout
    # the CLI sends Megatron's default sampling (temperature 1): check the shape, not the tokens
    response = r.stdout.split("Megatron Response: \n", 1)[1].splitlines()[0]
    assert response.startswith("Hello world")
    assert "error 400: prompts[0] has 1 tokens; with tokens_to_generate=100" in r.stdout


def test_cli_without_a_server():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # bound, not listening: connections are refused
        r = subprocess.run([sys.executable, os.path.join(ROOT, "src", "ch6", "text_generation_cli.py"),
                            f"127.0.0.1:{port}"], input="Hello\n1\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "error: cannot reach the server" in r.stdout and "Traceback" not in r.stderr


def test_megatron_server_script_flags(server_factory, tiny_megatron_checkpoint, tiny_tokenizer_files, hf_model,
                                      tiny_tokenizer):
    """Megatron-LM's examples/run_text_generation_server_345M.sh, the lesson's server command, with only the sizes
    scaled down: its model flags are checked against the checkpoint, --fp16 puts the parameters in float16,
    --out-seq-length caps what a request may generate (and, below Megatron's 64, is the default), and
    --temperature / --top_p become the defaults of requests that omit them.

    Tolerance 5e-3 on log-probs of a float16 model against transformers' float32 one: float16 keeps 11 bits
    (relative rounding 5e-4 per operation); measured 2.5e-4 through the 4 layers, and a wrong weight is off by
    far more. /health names the parameters' dtype, so a server that ignored --fp16 fails too."""
    import torch

    vocab, merges = tiny_tokenizer_files
    megatron_345m = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
                     "--max-position-embeddings", "64", "--tokenizer-type", "GPT2BPETokenizer", "--fp16",
                     "--micro-batch-size", "1", "--seq-length", "64", "--out-seq-length", "5", "--temperature", "1.0",
                     "--vocab-file", vocab, "--merge-file", merges, "--top_p", "0.9", "--seed", "42"]
    server = server_factory(tiny_megatron_checkpoint, extra=tuple(megatron_345m))
    assert requests.get(server.url + "/health", timeout=30).json()["params_dtype"] == "torch.float16"
    body = server.put_api({"prompts": ["Hello world"]}).json()           # the script's defaults: 5 tokens, top_p 0.9
    assert len(body["segments"][0]) == 2 + 5
    too_many = server.put_api({"prompts": ["Hello world"], "tokens_to_generate": 6})
    assert too_many.status_code == 400
    assert too_many.json()["message"] == "tokens_to_generate (6) is more than this server's --out-seq-length (5)"
    prompts = PROMPTS[:2]                                                # of more than one token: scored
    scored = server.put_api({"prompts": prompts, "tokens_to_generate": 0, "logprobs": True}).json()
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tiny_tokenizer.tokenize(prompt)])
        with torch.no_grad():
            want = torch.log_softmax(hf_model(ids).logits[0, :-1].float(), -1).gather(1, ids[0, 1:, None])[:, 0]
        got = torch.tensor(scored["logprobs"][i])
        assert got.shape == want.shape and (got - want).abs().max().item() <= 5e-3, (prompt, got, want)


def test_megatron_model_flags_that_are_not_the_checkpoint_are_one_line(tiny_megatron_checkpoint):
    flags = ["--num-layers", "24", "--hidden-size", "1024", "--seq-length", "1024", "--max-position-embeddings", "64"]
    proc = subprocess.run([sys.executable, "src/ch6/text_generation_server.py", "--load", tiny_megatron_checkpoint,
                           *flags], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    message = ("holds another model than the command line describes: num_layers 4 (--num-layers 24), hidden_size 32 "
               "(--hidden-size 1024), max_position_embeddings 64 (--seq-length 1024 must be between 1 and it)")
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
