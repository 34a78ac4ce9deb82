# %% [markdown]
# ## Generating text
#
# The source notes serve their trained GPT through Megatron-LM's text generation. Ours is
# `lessons_pkg.inference` (one idea per file: `kv_cache.py`, `communication.py`,
# `sampling.py`, `log_probs.py`, `tokenization.py`, `engine.py`, `beam_search.py`) and the
# one-shot command `src/ch6/generate.py`.
#
# ### Why a key/value cache
#
# A GPT predicts token t+1 from tokens 1..t. Without a cache, each new token runs the model
# over the whole sequence again: generating n tokens after a prompt of p costs
# (p+1) + (p+2) + ... + (p+n) position-forwards, quadratic in n. But attention is causal: the
# keys and values of a position never change once computed. Keep them (the cache) and each new
# token costs ONE position: its query attends to the cached keys and values, and its own k, v are
# appended. The engine does exactly this: one forward over the prompt ("prefill"), then one
# forward of one column per generated token.
#
# Below we count the positions that pass through the model's embedding with the engine (cache)
# and with a naive loop that recomputes everything, on the model `make course` trained, and
# check that both choose the same tokens.

# %%
import json
import os

import torch

from lessons_pkg.checkpoint import build_stage, load_pretrained
from lessons_pkg.inference import InferenceEngine, KVCache, SamplingParams
from lessons_pkg.tensor_parallel.hf import to_hf_model

pre = load_pretrained(CKPT, VOCAB, MERGES)
model = build_stage(pre)                              # TP = PP = 1: the whole model in this process
engine = InferenceEngine(model, pre.tokenizer)
tok = pre.tokenizer
prompts = ["The history of", "In 1990, the city"]
N = 24

positions = []
hook = model.embedding.register_forward_hook(lambda m, inputs, out: positions.append(inputs[0].numel()))
cached = engine.generate(prompts[:1], SamplingParams(tokens_to_generate=N, top_k=1,
                                                     use_eod_token_for_early_termination=False))
with_cache = sum(positions)

positions.clear()
ids = tok.tokenize(prompts[0])
with torch.no_grad():
    for _ in range(N):                                # no cache: the whole sequence, every token
        logits = model(torch.tensor([ids]))[0, -1, : pre.config.vocab_size]
        ids.append(int(logits.argmax()))
without_cache = sum(positions)
hook.remove()

p = len(tok.tokenize(prompts[0]))
print(f"prompt of {p} tokens, {N} new tokens")
print(f"positions through the model with the cache:    {with_cache} (= p + n - 1 = {p + N - 1}: {with_cache == p + N - 1})")
print(f"positions through the model without the cache: {without_cache} (= sum of p..p+n-1 = "
      f"{sum(range(p, p + N))}: {without_cache == sum(range(p, p + N))})")
print("same tokens with and without the cache:", cached["tokens"][0] == ids)

# %% [markdown]
# The time per token follows the positions. `scripts/bench_generation.py` measures it on
# GPT-2 124M's sizes (random weights) at contexts up to 1024: with the cache the cost of a new
# token stays nearly flat (one position, plus attention over L cached keys), without it the cost
# grows with L. Its plot (and its numbers, with the machine, in `docs/benchmarks.md`):

# %%
from IPython.display import Image, display

plot = os.path.join(ROOT, "docs", "generation_cache.png")
if os.path.exists(plot):
    display(Image(filename=plot, width=560))
else:
    print("run `python scripts/bench_generation.py --plot docs/generation_cache.png` to draw it")

# %% [markdown]
# ### What each rank holds
#
# Under tensor parallelism a rank computes the q, k, v of its own `heads / tp` heads (its slice
# of the column-parallel QKV projection), so it caches exactly those heads. Under pipeline
# parallelism a stage caches only its own layers. One rank's cache is
# `2 (k, v) x layers/pp x batch x heads/tp x positions x head_dim` numbers, allocated once for the
# prompt plus the tokens to generate and never beyond `max_position_embeddings` (a request that
# would go past it is refused, naming the numbers). For the course model at TP=2 x PP=2, a batch
# of 2 prompts and 64 positions:

# %%
c = pre.config
tp, pp, batch, length = 2, 2, 2, c.max_position_embeddings
for stage in range(pp):
    for t in range(tp):
        shape = (c.num_layers // pp, batch, c.num_attention_heads // tp, length, c.head_dim)
        kib = 2 * torch.Size(shape).numel() * 4 / 1024
        print(f"rank (tp {t}, pp {stage}): layers {stage * shape[0]}..{stage * shape[0] + shape[0] - 1}, "
              f"heads {t * shape[2]}..{t * shape[2] + shape[2] - 1}: k and v {list(shape)} = {kib:.0f} KiB")
whole = KVCache.for_model(model, batch, length)
print("the four ranks together hold the single-process cache, no more:",
      4 * 2 * torch.Size(shape).numel() * 4 == whole.nbytes())
try:
    engine.generate(prompts, SamplingParams(tokens_to_generate=c.max_position_embeddings, top_k=1))
except ValueError as e:
    print("refused:", e)

# %% [markdown]
# ### How the tensor-parallel ranks agree on a sampled token
#
# Each TP rank of the last stage holds the logits of its own vocabulary slice. Sampling needs the
# whole distribution, so the last stage **gathers** the last position's slices (`[b, V/tp]` each,
# small) onto its TP rank 0, **the sampler**, which cuts the vocabulary padding, applies
# temperature, top-k or top-p, and draws with its own generator seeded by `random_seed`: one
# uniform number per prompt and step, whatever the layout. Then **one all-reduce** (MAX) over
# every rank of the model delivers the ids: the sampler contributes them, everyone else zeros.
# The same message carries rank 0's cancel flags (the server's clients that went away) and an
# error flag, so every rank stops at the same step. No two ranks ever draw random numbers that
# must agree, so the same seed gives the same tokens at TP=1, TP=2, TP=4 and TP=2 x PP=2
# (`tests/inference` checks it). The first stage embeds the token; the hidden state of the new
# position travels stage to stage by point-to-point sends.
#
# Log-probabilities of prompt and generated tokens never need the gathered logits: they are the
# training loss's vocab-parallel cross entropy with the sign flipped (three all-reduces of
# `[b, s]` numbers).
#
# ### The trained model at TP=1 and at TP=2 x PP=2, against `transformers`
#
# Greedy generation in this process (TP=1), then `src/ch6/generate.py` on four ranks
# (TP=2 x PP=2, started with `torchrun`), then `transformers`' `GPT2LMHeadModel.generate` on the
# same weights. Log-probabilities are compared with `transformers`' within 2e-5 (float32 sums in
# another order: the measured differences are ~1e-6).

# %%
greedy = SamplingParams(tokens_to_generate=N, top_k=1, logprobs=True)
ours = engine.generate(prompts, greedy)

out_json = os.path.join(OUT, "generate_tp2_pp2.json")
args = ["--load", CKPT, "--vocab-file", VOCAB, "--merge-file", MERGES, "--tokens-to-generate", str(N), "--greedy",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--output-json", out_json]
for prompt in prompts:
    args += ["--prompt", prompt]
torchrun(os.path.join(ROOT, "src/ch6/generate.py"), *args, nproc_per_node=4, timeout=300)
with open(out_json) as f:
    parallel = json.load(f)

hf = to_hf_model(pre.state_dict, pre.config)
eod = tok.eod
worst = 0.0
same_hf = True
for i, prompt in enumerate(prompts):
    ids = tok.tokenize(prompt)
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      do_sample=False, max_new_tokens=N, eos_token_id=eod, pad_token_id=eod)[0].tolist()
    gen = ref[len(ids):]
    ref = ids + (gen[: gen.index(eod) + 1] if eod in gen else gen)
    same_hf &= ours["tokens"][i] == ref
    with torch.no_grad():
        lp = hf(torch.tensor([ref])).logits[0, :-1].double().log_softmax(-1)
    lp = lp.gather(-1, torch.tensor(ref[1:])[:, None])[:, 0]
    worst = max(worst, float((torch.tensor(ours["logprobs"][i], dtype=torch.float64) - lp).abs().max()))
print("TP=1 and TP=2 x PP=2 generate the same tokens:", ours["tokens"] == parallel["tokens"])
print("... and the same as transformers' generate:", same_hf)
print(f"log-probabilities vs transformers: max error < 2e-5: {worst < 2e-5}")  # the value varies (~1e-6)
