# %% [markdown]
# ## 1. Checkpoints that travel
#
# A checkpoint is saved in the layout it was trained with: here 2 tensor ranks x 2 pipeline stages,
# so 4 files, each holding a quarter of the model. To serve it on one GPU, evaluate it on 4, or keep
# training on 8, the files must be merged and split. The source notes do this with Megatron-LM's
# `tools/checkpoint_util.py` on GPT-2 345M; ours is `src/ch6/checkpoint_util.py` with the same
# arguments, and more (the optimizer travels too, and `transformers` folders go both ways).
#
# ### 1.1 What is on disk
#
# Megatron's layout: a tracker naming the newest complete iteration, one folder per iteration,
# one sub-folder per (tensor, pipeline) position: `mp_rank_{tp:02d}_{pp:03d}`. Our trainer also
# copies the tokenizer's two files next to the tracker, so the folder is self-contained.

# %%
def tree(root):
    """The files under ``root`` with their sizes, like ``tree -h``."""
    for p in sorted(pathlib.Path(root).rglob("*")):
        if p.is_file():
            print(f"{p.stat().st_size / 2**10:9.1f} KiB  {p.relative_to(root)}")


tree(CKPT)

# %% [markdown]
# Inside each `model_optim_rng.pt` is Megatron-LM's (legacy) GPT tree, so Megatron's own tools can
# read our files and we can read theirs: `model -> language_model -> embedding / encoder`, the
# layers under their **stage-local** numbers (stage 1's first layer is `layers.0`), the last stage's
# copy of the tied word embedding as `word_embeddings_for_head`, `checkpoint_version` 3.0 (QKV rows
# stored head by head: q, k, v of head 0, then of head 1, ...), and `args`, an `argparse.Namespace`
# with Megatron's argument names. Files are read with `torch.load(weights_only=True)` and an explicit
# allowlist (`Namespace`, numpy's RNG state): unpickling anything else could run arbitrary code.

# %%
from lessons_pkg.checkpoint import megatron_format as mf


def show(tree_, indent=0, depth=3):
    for key, value in tree_.items():
        if isinstance(value, dict) and depth:
            print(" " * indent + f"{key}/")
            show(value, indent + 2, depth - 1)
        elif hasattr(value, "shape"):
            print(" " * indent + f"{key}: {list(value.shape)}")


last = mf.safe_load(f"{CKPT}/iter_0000040/mp_rank_01_001/model_optim_rng.pt")   # TP rank 1, last stage
encoder = last["model"]["language_model"]["encoder"]
show({"model": {"language_model": {"encoder": {k: v for k, v in encoder.items() if k.startswith(("layers.0.", "final"))}},
                "word_embeddings_for_head": last["model"]["word_embeddings_for_head"]}})
print(sorted(k for k in last if k != "model"))
args = last["args"]
print(f"checkpoint_version {last['checkpoint_version']} | TP {args.tensor_model_parallel_size} x PP "
      f"{args.pipeline_model_parallel_size} | padded_vocab_size {args.padded_vocab_size} | true_vocab_size "
      f"{args.true_vocab_size}")

# %% [markdown]
# ### 1.2 Merging and splitting
#
# Every tensor of the model is one of three kinds, and that is all the converter needs to know:
#
# | kind | tensors | TP ranks hold | merge | split |
# |---|---|---|---|---|
# | column-parallel | `query_key_value`, `dense_h_to_4h` (weight and bias), word embedding | a slice of rows | concatenate rows | cut rows |
# | row-parallel | `self_attention.dense`, `dense_4h_to_h` (weights) | a slice of columns | concatenate columns | cut columns |
# | replicated | LayerNorms, row-parallel biases, position embedding | the whole tensor | check equal, keep one | copy |
#
# QKV needs no special case because it is stored head by head: a contiguous slice of rows is a set
# of whole heads. Pipeline stages only regroup layers (global layer `g` is `layers.{g % per_stage}`
# of stage `g // per_stage`). The vocabulary is padded to a multiple of 128 x TP; the real size travels
# in `args.true_vocab_size`, so the padding is recomputed for the target. The converter streams:
# it maps the source files and builds one target shard at a time, layer by layer.
#
# The source notes' conversions, on our checkpoint: merge TP=2 x PP=2 into one file, split into PP=4.

# %%
TP1, PP4 = f"{OUT}/ckpt-tp1", f"{OUT}/ckpt-pp4"
for save, tp, pp in ((TP1, 1, 1), (PP4, 1, 4)):
    out = run("src/ch6/checkpoint_util.py", "--model-type", "GPT", "--load-dir", CKPT, "--save-dir", save,
              "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp, "--no-progress")
    print("\n".join(l for l in out.splitlines() if "number of parameters" in l or "MiB" in l))

# %% [markdown]
# Every layout holds the same model. Gluing each one back to full size gives the same tensors, bit
# for bit (resharding only copies and cuts), so every layout computes the same logits:

# %%
import torch

from lessons_pkg.checkpoint import build_stage, load_pretrained
from lessons_pkg.checkpoint.reshard import read_full_checkpoint

original = read_full_checkpoint(CKPT).state_dict
for name, root in (("TP=1", TP1), ("PP=4", PP4)):
    other = read_full_checkpoint(root).state_dict
    print(f"{name}: every tensor identical to TP=2 x PP=2's: {all(torch.equal(original[k], other[k]) for k in original)}")

x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    logits = {name: build_stage(load_pretrained(root))(x) for name, root in (("TP2xPP2", CKPT), ("TP1", TP1), ("PP4", PP4))}
print("same logits from every layout:", all(torch.equal(logits["TP2xPP2"], v) for v in logits.values()))

# %% [markdown]
# ### 1.3 The source notes' numbers, from the model's shapes
#
# Megatron prints `number of parameters on (tensor, pipeline) model parallel rank (t, p): N` when it
# builds a model. For GPT-2 345M (24 layers, hidden 1024, 16 heads, 1024 positions, 50257 tokens) the
# notes' logs show 354,871,296 at TP=1, 89,714,688 per rank at TP=4, and 102,483,968 / 101,437,440
# for the first / last stage at TP=2 x PP=2. We build each rank's `ParallelGPT` on PyTorch's **meta
# device** (shapes, no memory) and count. A weights-only float32 file is 4 bytes a parameter: the
# notes' `tree -h` sizes (1.3G; 680M x 2; 489M, 288M, 288M, 485M) follow.

# %%
import matplotlib.pyplot as plt

from lessons_pkg.checkpoint.reshard import Layout, stage_param_names
from lessons_pkg.tensor_parallel import GPTConfig

GPT2_345M = GPTConfig(vocab_size=50257, hidden_size=1024, num_layers=24, num_attention_heads=16,
                      max_position_embeddings=1024)


def per_rank(tp, pp):
    return [sum(torch.Size(shape).numel() for _, shape in stage_param_names(GPT2_345M, Layout(tp, pp), 0, p)[0])
            for p in range(pp)]


notes = {(1, 1): [354_871_296], (4, 1): [89_714_688], (2, 2): [102_483_968, 101_437_440]}
for (tp, pp), expected in notes.items():
    counts = per_rank(tp, pp)
    print(f"TP={tp} x PP={pp}: {counts} per pipeline stage | the notes' numbers: {counts == expected}")

layouts = {"TP1": (1, 1), "TP2": (2, 1), "PP4": (1, 4)}
sizes = {name: [4 * n / 2**20 for n in per_rank(*lay)] for name, lay in layouts.items()}
fig, ax = plt.subplots(figsize=(7, 2.8))
for i, (name, mib) in enumerate(sizes.items()):
    left = 0
    for j, m in enumerate(mib):
        ax.barh(i, m, left=left, edgecolor="black", color=f"C{j}")
        ax.text(left + m / 2, i, f"{m:.0f} MiB", ha="center", va="center", fontsize=8)
        left += m
ax.set_yticks(range(len(sizes)), [f"{k}: {len(v)} file(s)" for k, v in sizes.items()])
ax.set_xlabel("MiB of float32 weights per file (GPT-2 345M)")
ax.set_title("The same 1.3 GiB, cut three ways: the first and last stage also carry the 50257 x 1024 embedding")
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 1.4 To and from `transformers`
#
# `--saver hf` writes a folder that `GPT2LMHeadModel.from_pretrained` loads (config, safetensors,
# tokenizer files); `--loader hf` reads one (GPT-2 from the hub, with network; any local folder) into
# a Megatron checkpoint at any layout, as a `release` checkpoint: the notes' "345m-init" starting
# point, which `pretrain_gpt.py --load ... --finetune` trains from. The two layouts differ (GPT-2's
# `Conv1D` stores matrices transposed, and its QKV rows are all q, then all k, then all v), so equal
# logits are the test that the conversion is right.

# %%
from transformers import GPT2LMHeadModel
from transformers.utils import logging as hf_logging

hf_logging.disable_progress_bar()  # no "Loading weights" bar in the output

HF = f"{OUT}/gpt2-hf"
run("src/ch6/checkpoint_util.py", "--loader", "megatron", "--saver", "hf", "--load-dir", CKPT, "--save-dir", HF)
print(sorted(os.listdir(HF)))
hf = GPT2LMHeadModel.from_pretrained(HF).eval()
with torch.no_grad():
    err = (hf(x).logits - logits["TP1"][..., :512]).abs().max().item()
print(f"transformers' logits vs ours: max difference {err:.1e} < 1e-5 (float32, another summation order): {err < 1e-5}")

BACK = f"{OUT}/from-hf-tp2pp2"
run("src/ch6/checkpoint_util.py", "--loader", "hf", "--saver", "megatron", "--load-dir", HF, "--save-dir", BACK,
    "--target-tensor-parallel-size", "2", "--target-pipeline-parallel-size", "2", "--no-progress")
back = read_full_checkpoint(BACK).state_dict
print("tracker:", open(f"{BACK}/latest_checkpointed_iteration.txt").read(),
      "| back at TP=2 x PP=2, every tensor identical:", all(torch.equal(original[k], back[k]) for k in original))

# %% [markdown]
# ### 1.5 Training on, at another layout
#
# Megatron's tool drops the optimizer. Ours carries Adam's moments and step (re-split like the
# weights), the scheduler, the iteration and the consumed samples, and `pretrain_gpt.py --load`
# accepts a checkpoint of any layout, resharding it as it loads. So the TP=2 x PP=2 run can continue
# on 2 processes at TP=1 x DP=2 with the distributed optimizer (ZeRO-1), and follows the run that
# continues at TP=2 x PP=2: the same data, the same updates, sums in another order (float32 rounding).

# %%
def continue_from(checkpoint, log, nproc, *layout):
    torchrun("src/ch6/pretrain_gpt.py", *PRETRAIN_ARGS, "--train-iters", "44", "--load", checkpoint,
             "--log-json", log, *layout, nproc_per_node=nproc, timeout=600, echo=False)
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, open(log)) if r["kind"] == "train"}


same = continue_from(CKPT, f"{OUT}/same.jsonl", 4, "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")
moved = continue_from(CKPT, f"{OUT}/moved.jsonl", 2, "--use-distributed-optimizer")
print("iterations", sorted(moved), "| same as at TP=2 x PP=2:", sorted(moved) == sorted(same))
gap = max(abs(moved[i] - same[i]) for i in same)
print(f"largest loss difference < 2e-5: {gap < 2e-5}")  # the value itself varies from run to run (0 to ~1e-6)

# %% [markdown]
# ### 1.6 Checkpoints written by other tools
#
# Our readers would prove little if they only ever read files our own writer made. So here a tool we
# did not write makes the checkpoint: `transformers`' own Megatron converter
# (`checkpoint_reshaping_and_interoperability.py`, shipped with transformers 4.x and gone in 5;
# `lessons_pkg.checkpoint.transformers_converter` installs 4.46.3 in a side folder, once, and runs the
# file as it is). It turns the `transformers` folder of 1.4 into a TP=2 `release` checkpoint in its own
# style: `args` as a `types.SimpleNamespace`, the real vocabulary as `orig_vocab_size`, a copy of the
# embedding for the head even with one stage. Our `checkpoint_util.py` merges it, `generate.py`
# answers from it on two ranks, and the converter reads our merged file back.
#
# Megatron-LM's own files record only `padded_vocab_size`; give `--vocab-file` (or `--true-vocab-size`)
# and the extra rows are dropped, provided Megatron's padding rule (`make_vocab_size_divisible_by` x
# TP) maps the tokenizer's size onto them. Megatron-LM's newer `torch_dist` format (`*.distcp` files)
# is not read: save with `--ckpt-format torch`, as the notes do.

# %%
from lessons_pkg.checkpoint import transformers_converter

# installs transformers 4.46.3 into a side folder the first time (build/compat/; a few seconds), silently here
side = transformers_converter.install(log=lambda *a: None)
print("transformers' converter ready in a side folder:", os.path.isfile(os.path.join(side, transformers_converter.CONVERTER)))
THEIRS = transformers_converter.to_megatron(HF, f"{OUT}/converter-tp2", tp=2, pp=1)
state = mf.safe_load(f"{THEIRS}/release/mp_rank_00/model_optim_rng.pt")
print(f"written by transformers {transformers_converter.TRANSFORMERS.split('==')[1]}: args is a "
      f"{type(state['args']).__name__}, orig_vocab_size {state['args'].orig_vocab_size}, tracker "
      f"{open(f'{THEIRS}/latest_checkpointed_iteration.txt').read()!r}, files {sorted(os.listdir(f'{THEIRS}/release'))}")

MERGED = f"{OUT}/converter-tp1"
out = run("src/ch6/checkpoint_util.py", "--load-dir", THEIRS, "--save-dir", MERGED, "--target-tensor-parallel-size",
          "1", "--verify", "--no-progress")
print("\n".join(l.strip() for l in out.splitlines() if "vocabulary:" in l))
print("merged to TP=1, every tensor equal to the converter's, bit for bit:", "bit for bit: True" in out)

PROMPT, N = "The history of", 12
run("src/ch6/generate.py", "--load", THEIRS, "--vocab-file", VOCAB, "--merge-file", MERGES, "--greedy",
    "--tensor-model-parallel-size", "2", "--prompt", PROMPT, "--tokens-to-generate", N,
    "--output-json", f"{OUT}/theirs.json")
ours = json.load(open(f"{OUT}/theirs.json"))["tokens"][0]
tokenizer = load_pretrained(HF).tokenizer
ids = torch.tensor([tokenizer.tokenize(PROMPT)])
with torch.no_grad():
    want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N, do_sample=False,
                       pad_token_id=tokenizer.eod, eos_token_id=tokenizer.eod)[0].tolist()
print("generate.py (TP=2, on the converter's files) answers what GPT2LMHeadModel.generate answers:", ours == want)

BACK_HF = transformers_converter.to_transformers(MERGED, f"{OUT}/converter-back", HF)
hf_logging.set_verbosity_error()  # transformers 5 reports the converter's extra causal-mask buffers (masked_bias)
again = GPT2LMHeadModel.from_pretrained(BACK_HF).state_dict()
print("the converter reads our merged file back, every tensor identical to the original:",
      all(torch.equal(again[k], v) for k, v in hf.state_dict().items()))
