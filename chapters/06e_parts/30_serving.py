# %% [markdown]
# ## Serving
#
# The source notes serve the trained model with Megatron-LM's REST server (`PUT /api`, Flask) and
# queries it with `curl` and with `tools/text_generation_cli.py`. Ours is
# `src/ch6/text_generation_server.py`, built on the engine above and on `lessons_pkg/serving/`
# (one idea per file: `schema.py` what a request may ask, `control.py` + `follower.py` how rank 0
# tells the other ranks what to compute, `batcher.py` the request queue, `app.py` the routes,
# `server.py` rank 0's loop). It keeps Megatron's interface, so Megatron's clients work, and adds an
# OpenAI-compatible `POST /v1/completions` (with streaming), a web page at `/`, and batching of
# concurrent requests.
#
# ### What each rank does while rank 0 waits for requests
#
# Only global rank 0 (TP rank 0 of the first pipeline stage) listens for HTTP. Its request
# threads validate a request (every bad request is answered 400 *before* the other ranks hear of
# it, so no bad request can leave them out of step) and put it in a queue. Rank 0's main thread
# takes a batch from the queue and broadcasts it as one *work item* on a gloo group of its own;
# the other ranks sit in that broadcast, then all ranks run the engine together and agree on the
# outcome (an error on any rank: 500 for that request, and everyone is ready for the next one):
#
# ```
# rank 0                                   ranks 1..3
# HTTP threads: validate, queue, wait      wait in broadcast_object_list(...)   <- idle: a "ping" every 5 s
# main thread:  send(WorkItem)      ---->  receive() -> WorkItem
#               engine.generate(...) <-->  engine.generate(...)   (TP all-reduces, PP sends)
#               agree(error | None) <-->  agree(error | None)
#               answer each client
# ```
#
# Below: the TP=2 x PP=2 server on the checkpoint trained above (4 processes), the notes' `curl`
# command, an OpenAI-style request, a streamed answer, and a clean stop.

# %%
import json
import os
import signal
import socket
import subprocess
import sys
import time

import requests

from lessons_pkg.checkpoint import build_stage, load_pretrained
from lessons_pkg.inference import InferenceEngine, SamplingParams
from lessons_pkg.launch import free_port


port = free_port()
url = f"http://localhost:{port}"
server_log = open(os.path.join(OUT, "server.log"), "w+")
server = subprocess.Popen(
    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
     "src/ch6/text_generation_server.py", "--load", CKPT, "--vocab-file", VOCAB, "--merge-file", MERGES,
     "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--port", str(port)],
    cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
    env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))

# while the 4 ranks start: the same checkpoint in this process, the reference for the server's answers
pre = load_pretrained(CKPT, VOCAB, MERGES)
tok = pre.tokenizer
engine = InferenceEngine(build_stage(pre), tok)
prompts = ["The history of", "In 1990, the city"]

deadline = time.monotonic() + 120
while True:
    try:
        health = requests.get(url + "/health", timeout=2).json()
        break
    except requests.ConnectionError:
        if server.poll() is not None or time.monotonic() > deadline:
            server_log.seek(0)
            raise RuntimeError("the server did not start:\n" + server_log.read()[-3000:])
        time.sleep(0.5)
server_log.seek(0)
startup = server_log.read()
for line in sorted(line for line in startup.splitlines() if "number of parameters" in line):
    print(line)                                  # one line per rank: each holds its TP shard of its stage
print("ranks (pids) of the job:", len(health["rank_pids"]), "| TP x PP =",
      health["tensor_model_parallel_size"], "x", health["pipeline_model_parallel_size"])

# %% [markdown]
# The notes' command (its answer in the notes: `{"logprobs":null,"segments":[["Hello"," world",","]],"text":["Hello world,"]}`):
# the prompt's tokens and one generated token, as text and as per-token segments.

# %%
cmd = ["curl", "-s", f"{url}/api", "-X", "PUT", "-H", "Content-Type: application/json",
       "-d", '{"prompts":["Hello world"], "tokens_to_generate":1}']
answer = json.loads(subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout)
print("keys:", sorted(answer), "| logprobs:", answer["logprobs"])
print("text starts with the prompt:", answer["text"][0].startswith("Hello world"))
print("segments = prompt tokens + 1:", len(answer["segments"][0]) == len(tok.tokenize("Hello world")) + 1)

bad = requests.put(f"{url}/api", json={"prompts": ["Hello world"], "top_k": 5, "top_p": 0.9})
print("a bad request:", bad.status_code, bad.json()["message"])

# greedy answers from 4 ranks = the single-process engine's on the same checkpoint
greedy = requests.put(f"{url}/api", json={"prompts": prompts, "tokens_to_generate": 12, "top_k": 1}).json()
local = engine.generate(prompts, SamplingParams(tokens_to_generate=12, top_k=1))
print("TP2 x PP2 server = one process (greedy):", greedy["text"] == local["text"])

# %% [markdown]
# OpenAI's completions API, whole and streamed (server-sent events: `data: {...}` chunks, then
# `data: [DONE]`); the web page at `/` reads the same stream.

# %%
body = {"model": health["model"], "prompt": prompts[0], "max_tokens": 16, "temperature": 0}
whole = requests.post(f"{url}/v1/completions", json=body).json()
reason, used = whole["choices"][0]["finish_reason"], whole["usage"]["completion_tokens"]
print("object:", whole["object"], "| usage keys:", sorted(whole["usage"]))
print("finish_reason agrees with the tokens generated:", (reason == "length") == (used == 16))
chunks = []
with requests.post(f"{url}/v1/completions", json=dict(body, stream=True), stream=True) as r:
    for line in r.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            chunks.append(json.loads(line[6:])["choices"][0]["text"])
print("streamed in", "several" if len(chunks) > 2 else "few", "chunks; joined = the whole answer:",
      "".join(chunks) == whole["choices"][0]["text"])

# %% [markdown]
# A clean stop: SIGTERM to rank 0 (the serving process) makes it answer what is queued, send
# `stop` to the other ranks (each leaves its loop and exits 0), close its socket and exit; torchrun
# then ends with status 0 and the port is free. (SIGTERM or Ctrl-C to torchrun stops all ranks too.)

# %%
os.kill(health["rank_pids"][0], signal.SIGTERM)
status = server.wait(timeout=60)
server_log.seek(0)
log = server_log.read()
print("torchrun exit status:", status)
print("followers that received stop:", sum(f"rank {r}: stop received" in log for r in range(1, 4)), "of 3")
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    print("port free again: True")
