"""Generation speed: our KV-cache engine against transformers' generate, and the cost per token with/without cache.

    python scripts/bench_generation.py                       # both models, batch 1 and 8, 2 threads
    python scripts/bench_generation.py --quick               # fewer tokens and contexts (a smoke run)
    python scripts/bench_generation.py --plot docs/generation_cache.png   # the run docs/benchmarks.md records
    python scripts/bench_generation.py --device cuda         # on a GPU (float32; what scripts/gpu_check.sh runs)

For each model (the course's: 4 layers, hidden 64, vocabulary 2048, 64
positions; GPT-2 124M's sizes: 12 layers, hidden 768, vocabulary 50257, 1024
positions; random weights) and batch size, both generators get the same
weights (ours converted to ``GPT2LMHeadModel`` by ``tensor_parallel.hf``), the
same random prompts, the same threads, greedy decoding of exactly
``--tokens`` new tokens (no early stop), ``transformers`` with its cache
(``use_cache=True``). Runs alternate (ours, theirs, ours, ...) so that load
from other jobs hits both alike; the best of ``--repeats`` is kept. Tokens/s
count generated tokens (the prompt's prefill is inside the timed call). The
generated tokens of both must be identical (else exit status 1).

Then the cost of ONE new token as the context grows, on our model at TP=1:
with the cache (a forward of one position over a cache of L - 1 positions)
and without (a forward over all L positions, what generation without a cache
pays per token). Written to ``--json`` and drawn to ``--plot``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from lessons_pkg.inference import InferenceEngine, KVCache, SamplingParams  # noqa: E402
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict  # noqa: E402
from lessons_pkg.tensor_parallel.hf import to_hf_model  # noqa: E402

MODELS = {
    "course": dict(vocab_size=2048, hidden_size=64, num_layers=4, num_attention_heads=4, max_position_embeddings=64),
    "gpt2-124M": dict(vocab_size=50257, hidden_size=768, num_layers=12, num_attention_heads=12,
                      max_position_embeddings=1024),
}


DEVICE = torch.device("cpu")


def build(name: str, seed: int = 0):
    config = GPTConfig(**MODELS[name], hidden_dropout=0.0, attention_dropout=0.0)
    weights = master_state_dict(config, seed=seed)
    ours = ParallelGPT(config)
    ours.load_master_state_dict(weights)
    return config, ours.eval().to(DEVICE), to_hf_model(weights, config).to(DEVICE)


CLOCK = time.perf_counter


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)   # a GPU runs kernels asynchronously: wait for them before reading the clock


def time_once(fn) -> tuple[float, object]:
    _sync()
    start = CLOCK()
    out = fn()
    _sync()
    return CLOCK() - start, out


def bench_generate(name: str, batch: int, prompt_len: int, tokens: int, repeats: int) -> dict:
    config, ours, hf = build(name)
    engine = InferenceEngine(ours, None, eod=config.vocab_size - 1)
    prompts = torch.randint(0, config.vocab_size - 1, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    prompts = prompts.to(DEVICE)
    params = SamplingParams(tokens_to_generate=tokens, top_k=1, use_eod_token_for_early_termination=False)

    def run_ours():
        return engine.generate_ids(prompts.tolist(), params).tokens

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, use_cache=True,
                              max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=config.vocab_size - 1)
        return out.tolist()

    run_ours(), run_hf()                                        # warm-up (allocations, lazy imports)
    t_ours, t_hf = [], []
    for _ in range(repeats):                                    # alternate: load hits both alike
        t, a = time_once(run_ours)
        t_ours.append(t)
        t, b = time_once(run_hf)
        t_hf.append(t)
    same = a == b
    generated = batch * tokens
    result = dict(model=name, batch=batch, prompt_tokens=prompt_len, new_tokens=tokens, same_tokens=same,
                  ours_tok_s=generated / min(t_ours), hf_tok_s=generated / min(t_hf),
                  ours_s=sorted(t_ours), hf_s=sorted(t_hf))
    result["ratio"] = result["ours_tok_s"] / result["hf_tok_s"]
    return result


def bench_context(name: str, lengths: list[int], repeats: int) -> list[dict]:
    """ms for one new token at context length L: cached (one position) vs recomputed (all L positions)."""
    config, model, _ = build(name)
    ids = torch.randint(0, config.vocab_size, (1, max(lengths)), generator=torch.Generator().manual_seed(2))
    ids = ids.to(DEVICE)
    rows = []
    with torch.inference_mode():
        for length in lengths:
            cache = KVCache.for_model(model, 1, length)
            model(ids[:, : length - 1], kv_cache=cache, last_position_only=True)   # fill L - 1 positions

            def cached():
                cache.length = length - 1                        # forget the last step's position
                return model(ids[:, length - 1: length], kv_cache=cache)

            def recomputed():
                return model(ids[:, :length], last_position_only=True)

            timings = {}
            for label, fn in (("cached", cached), ("recomputed", recomputed)):
                fn()
                timings[label] = min(time_once(fn)[0] for _ in range(repeats)) * 1e3
            rows.append(dict(model=name, context=length, cached_ms=timings["cached"],
                             recomputed_ms=timings["recomputed"]))
            print(f"  context {length:5d}: with cache {timings['cached']:8.2f} ms/token, "
                  f"without {timings['recomputed']:9.2f} ms/token", flush=True)
    return rows


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]
        x = [r["context"] for r in mine]
        ax.plot(x, [r["recomputed_ms"] for r in mine], "o-", label=f"{name}: without cache (all L positions)")
        ax.plot(x, [r["cached_ms"] for r in mine], "s-", label=f"{name}: with cache (one position)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context length L (tokens)")
    ax.set_ylabel("ms per generated token (batch 1)")
    ax.set_title("Cost of one new token as the context grows")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def machine() -> str:
    if DEVICE.type == "cuda":
        return f"{torch.cuda.get_device_name(DEVICE)}, torch {torch.__version__} (CUDA {torch.version.cuda}), float32"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return (f"{os.cpu_count()} vCPU {model}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {', '.join(f'{x:.1f}' for x in load) if load else '?'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N (float32 on both)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (on a GPU: the host's threads)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--contexts", type=int, nargs="+", default=[16, 64, 256, 1024], help="for gpt2-124M")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: elapsed time; cpu: this process's CPU time (with --threads 1 on a machine shared with "
                        "other jobs, the elapsed time the run would take alone)")
    p.add_argument("--quick", action="store_true", help="8 tokens, contexts 16 and 64, 1 repeat")
    p.add_argument("--json", default="outputs/bench_generation.json")
    p.add_argument("--plot", default="outputs/generation_cache.png",
                   help="the figure (docs/generation_cache.png is the one docs/benchmarks.md shows: name it to "
                        "update that)")
    args = p.parse_args(argv)
    global CLOCK, DEVICE
    try:
        DEVICE = torch.device(args.device)
    except RuntimeError as error:
        p.error(f"--device {args.device!r} is not a device torch knows: {error}")
    if DEVICE.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device!r}: only cpu and cuda are supported")
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device!r}: this torch ({torch.__version__}) sees no CUDA device")
    if DEVICE.type == "cuda" and DEVICE.index is not None and DEVICE.index >= torch.cuda.device_count():
        p.error(f"--device {args.device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if DEVICE.type == "cuda" and args.clock == "cpu":
        p.error("--clock cpu measures this process's CPU time, not the GPU's: use --clock wall with --device cuda")
    if args.quick:
        args.tokens, args.contexts, args.repeats = 8, [16, 64], 1
    torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    print(f"machine: {machine()}; clock: {args.clock}", flush=True)

    results = []
    for name in args.models:
        for batch in args.batches:
            r = bench_generate(name, batch, args.prompt_tokens, args.tokens, args.repeats)
            results.append(r)
            print(f"{name:10s} batch {batch}: ours {r['ours_tok_s']:8.1f} tok/s, transformers {r['hf_tok_s']:8.1f} "
                  f"tok/s, ratio {r['ratio']:.2f}x, same tokens: {r['same_tokens']}", flush=True)
    context_rows = []
    for name in args.models:
        lengths = [n for n in (args.contexts if name == "gpt2-124M" else [8, 16, 32, 64])
                   if n <= MODELS[name]["max_position_embeddings"]]
        print(f"cost per token vs context length, {name}:")
        context_rows += bench_context(name, lengths, args.repeats)
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(machine=machine(), clock=args.clock, threads=args.threads, generate=results,
                       context=context_rows), f, indent=1)
    print(f"results written to {args.json}")
    plot(context_rows, args.plot)
    ok = all(r["same_tokens"] for r in results)
    print(f"every run generated the same tokens as transformers: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
