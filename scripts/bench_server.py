"""Load test of the text-generation server on TP=2: many concurrent clients, batched vs one at a time.

    python scripts/bench_server.py [--load CKPT] [--requests 200] [--clients 32] [--tokens 16]

Starts the TP=2 server twice on free loopback ports: with ``--max-batch-size 32``
(requests batched) and with ``--max-batch-size 1`` (one request at a time, as
Megatron's lock does). Against each, ``--clients`` threads send ``--requests``
greedy ``PUT /api`` requests in total. Checks: every request answered with 200,
and every answer equal to the one-at-a-time answer of the same prompt (sent
alone, sequentially). Prints p50/p99 latency, throughput and the ratio, as a
markdown table for docs/benchmarks.md. Without ``--load`` it writes a random
GPT-2 folder of the course's sizes (4 layers, hidden 64, 4 heads, 64 positions)
with a locally trained 360-token BPE. Loopback only; every request and the
whole run are bounded in time.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

import requests  # noqa: E402

WORDS = ("the model was trained on words and a server answers requests with text; tensor parallelism splits "
         "matrices while pipeline parallelism splits layers across ranks of one job").split()


def make_prompts(n: int) -> list[str]:
    """``n`` distinct prompts of 2..12 words."""
    return [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(2 + i % 11)) + f" {i}" for i in range(n)]


def build_model(folder: str) -> str:
    from lessons_pkg.checkpoint.hf_io import save_hf_folder
    from lessons_pkg.data.tokenizer import build_tokenizer, train_byte_level_bpe
    from lessons_pkg.tensor_parallel.checkpointing import master_state_dict
    from lessons_pkg.tensor_parallel.config import GPTConfig

    corpus = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 10
    vocab, merges = train_byte_level_bpe(corpus, 360, os.path.join(folder, "tok"))
    tok = build_tokenizer(vocab, merges)
    config = GPTConfig(vocab_size=tok.vocab_size, hidden_size=64, num_layers=4, num_attention_heads=4,
                       max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0)
    path = os.path.join(folder, "gpt2-course-size")
    save_hf_folder(path, master_state_dict(config, seed=1), config, vocab, merges)
    return path


def run_load(url: str, prompts: list[str], n_requests: int, clients: int, tokens: int, timeout: float):
    def one(i: int):
        body = {"prompts": [prompts[i % len(prompts)]], "tokens_to_generate": tokens, "top_k": 1, "no_log": True}
        start = time.perf_counter()
        try:
            r = requests.put(url + "/api", json=body, timeout=timeout)
            ok, text = r.status_code == 200, (r.json()["text"][0] if r.status_code == 200 else r.text)
        except requests.RequestException as e:
            ok, text = False, repr(e)
        return i, ok, text, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(n_requests)))
    return results, time.perf_counter() - start


def summary(name: str, results, wall: float, tokens: int) -> dict:
    lat = sorted(r[3] for r in results)
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return {"server": name, "requests": len(results), "errors": sum(not r[1] for r in results),
            "p50_s": statistics.median(lat), "p99_s": p99, "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": len(results) * tokens / wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", default=None)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--distinct-prompts", type=int, default=40)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=600, help="seconds for one request")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args()
    from lessons_pkg.serving.process import ServerProcess

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        load = args.load or build_model(tmp)
        prompts = make_prompts(args.distinct_prompts)
        rows, reference = [], {}
        for name, mbs in (("one at a time (--max-batch-size 1)", 1),
                          (f"batched (--max-batch-size {args.max_batch_size})", args.max_batch_size)):
            server = ServerProcess(load, tp=2, extra=("--max-batch-size", str(mbs)), timeout=300)
            try:
                if not reference:   # each distinct prompt alone, sequentially: the answers to match
                    for prompt in prompts:
                        r = server.put_api({"prompts": [prompt], "tokens_to_generate": args.tokens, "top_k": 1,
                                            "no_log": True}, timeout=args.timeout)
                        r.raise_for_status()
                        reference[prompt] = r.json()["text"][0]
                before = requests.get(server.url + "/health").json()
                results, wall = run_load(server.url, prompts, args.requests, args.clients, args.tokens, args.timeout)
                after = requests.get(server.url + "/health").json()
            finally:
                server.stop()
                server.close()
            row = summary(name, results, wall, args.tokens)
            batches = after.get("batches", 0) - before.get("batches", 0)
            row["batches"] = batches
            row["mean_batch"] = (after["prompts_generated"] - before.get("prompts_generated", 0)) / max(batches, 1)
            row["engine_busy_s"] = after.get("busy_s", 0) - before.get("busy_s", 0)
            row["answers_equal_one_at_a_time"] = all(
                ok and text == reference[prompts[i % len(prompts)]] for i, ok, text, _ in results)
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratio = rows[1]["requests_per_s"] / rows[0]["requests_per_s"]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} at the end; TP=2 server (2 ranks), "
          f"{args.requests} greedy requests of {args.tokens} tokens from {args.clients} clients\n")
    print("| server | requests | errors | answers = one-at-a-time | p50 latency (s) | p99 latency (s) "
          "| throughput (req/s) | tokens/s | batches (mean prompts) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['requests']} | {r['errors']} | {r['answers_equal_one_at_a_time']} "
              f"| {r['p50_s']:.2f} | {r['p99_s']:.2f} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} "
              f"| {r['batches']} ({r['mean_batch']:.1f}) |")
    print(f"\nbatched / one at a time throughput: {ratio:.1f}x (goal >= 3x at {args.clients} clients)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "ratio": ratio}, f, indent=1)
    ok = all(r["errors"] == 0 and r["answers_equal_one_at_a_time"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
