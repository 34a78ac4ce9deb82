# %% [markdown]
# ## 1. Sequence parallelism
#
# ### 1.1 What tensor parallelism leaves whole
#
# A GPT layer with tensor parallelism over `t` ranks (chapter 6):
#
# ```
# x [b, s, h] -LN-> f -> column-parallel QKV -> attention of h/t heads -> row-parallel proj -> g -> dropout -> + x
#             -LN-> f -> column-parallel h->4h -> GeLU -> row-parallel 4h->h            -> g -> dropout -> +
# ```
#
# `f` and `g` are the only communication (an all-reduce each, in the backward and in the forward). Between
# a `g` and the next `f` every rank holds the whole `[b, s, h]`, and computes the same LayerNorm, dropout
# and addition on it as every other rank. Korthikanti et al. count the bytes a layer keeps for its
# backward (16-bit activations, 1-byte dropout masks, `a` heads):
#
# | | bytes per layer |
# |---|---|
# | one device | `s b h (34 + 5 a s / h)` |
# | tensor parallel | `s b h (10 + 24 / t + 5 a s / (h t))` |
# | tensor + sequence parallel | `s b h (34 / t + 5 a s / (h t))` |
#
# The `10` that does not shrink with `t`: the inputs of the two LayerNorms (4), the two dropout masks (2),
# and the inputs of the first matmul of each block (4), which the matmuls keep for their weight gradients.
#
# ### 1.2 The idea: split the rest along the sequence
#
# LayerNorm, dropout and the residual add work token by token. So each rank can keep only its own
# `s/t` tokens there. Where a block begins, the column-parallel matmul needs every token: an
# **all-gather** along the sequence. Where it ends, the row-parallel matmul's partial sums are summed and
# each rank keeps its tokens: a **reduce-scatter**. A ring all-reduce *is* a reduce-scatter followed by an
# all-gather, so the bytes on the wire stay the same; the tokens in between are no longer replicated:
#
# ```
# [b, s/t, h] -LN-> all-gather -> [b, s, h] -> column-parallel ... row-parallel -> reduce-scatter -> [b, s/t, h] -dropout-> +
# ```
#
# Each of the two is an autograd function whose backward is the other, like `f` and `g`:

# %%
from lessons_pkg.tensor_parallel import mappings

print(inspect.getsource(mappings._GatherFromSequenceParallelRegion))
print(inspect.getsource(mappings._ReduceScatterToSequenceParallelRegion))

# %% [markdown]
# Four more pieces make the whole model work (`lessons_pkg/tensor_parallel/sequence_parallel.py`):
#
# - the parameters used on the split stream (LayerNorm weights and biases, the row-parallel biases, the
#   position embedding) see only `s/t` tokens, so their gradients are partial: the trainer sums them over
#   the tensor group after backward (`allreduce_sequence_parallel_grads`);
# - dropout on the split stream must draw a *different* mask on each rank (the ranks hold different
#   tokens): a second random stream seeded `seed + 2718 + tensor rank` (Megatron's "model-parallel RNG",
#   `lessons_pkg/tensor_parallel/random.py`); recomputed layers restore it before they recompute;
# - the vocab-parallel embedding ends in a reduce-scatter, and the LM head all-gathers the sequence so
#   vocab-parallel cross entropy sees every token;
# - the column-parallel matmuls keep only their rank's slice of the input for backward and gather it again
#   there (`linear_with_sequence_gather`): otherwise their input would still be kept whole.
#
# ### 1.3 On real processes, against one process
#
# `src/ch6/sequence_parallel.py` builds the same GPT twice on every rank (tensor parallel; tensor +
# sequence parallel) from the same master weights, and a one-process model beside them; here at TP=4
# (`python src/ch6/sequence_parallel.py` runs it at TP=2):

# %%
_ = torchrun("src/ch6/sequence_parallel.py", nproc_per_node=4)

# %% [markdown]
# The backward sends half as much again as the all-reduces did: the two gathered matmul inputs are
# gathered a second time for their weight gradients, the price of not keeping them (Megatron pays it too,
# and hides it behind the input-gradient matmul on a GPU).
#
# ### 1.4 The memory, measured against the formula
#
# `scripts/bench_sequence_parallel.py` runs one layer at TP 1, 2 and 4, with and without sequence
# parallelism, and counts every byte autograd keeps (`SavedTensorMeter`, saved-tensor hooks). Here
# activations and dropout noise are float32 (4 bytes each), so the paper's terms give
# `s b h (72 + 12 a s / h)`, of which `24 s b h` is what tensor parallelism leaves whole:

# %%
bench = script_module("scripts/bench_sequence_parallel.py")
rows = bench.run(hidden=256, heads=8, seq=512, batch=2, sizes=[1, 2, 4])
print(bench.table(rows, 256, 8, 512, 2))
print("measured = formula within 0.1% everywhere:",
      all(abs(r["peak"] / r["predicted"] - 1) < 1e-3 for r in rows))
bench.plot(rows)
plt.show()

# %% [markdown]
# At `s = 512` with attention dropout, the `12 a s / h` term (`[b, a, s, s]` softmax output, dropout noise
# and dropped probabilities) dominates, and tensor parallelism already splits it by heads. The saving of
# sequence parallelism, `24 s b h (1 - 1/t)`, is the part no other split reaches; Megatron pairs it with
# recomputing only the attention (the paper's "selective recomputation"), which removes the `s^2` term.
#
# ### 1.5 Training: the same run
#
# `pretrain_gpt.py --sequence-parallel` trains the same model: the same losses as without it, up to the
# float32 rounding of sums taken in another order. (It is the flag that the TP=4 and TP=2 training
# commands of chapter 6's source notes end with: the Korean tutorial on Megatron-LM that chapter 6
# rebuilds as code that runs.)

# %%
def pretrain(log, *extra, nproc=2):
    """pretrain_gpt.py on mock data, TP=2 unless ``extra`` says otherwise; the training losses by iteration."""
    torchrun("src/ch6/pretrain_gpt.py", "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
             "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4",
             "--lr", "1e-3", "--mock-data", "--vocab-size", "500", "--hidden-dropout", "0", "--attention-dropout",
             "0", "--log-interval", "2", "--eval-iters", "0", "--log-json", log, "--tensor-model-parallel-size",
             "2", *extra, nproc_per_node=nproc, echo=False)
    return {r["iteration"]: r["lm_loss"] for r in map(json.loads, open(log)) if r["kind"] == "train"}


without = pretrain(f"{OUT}/tp2.jsonl")
with_sp = pretrain(f"{OUT}/tp2-sp.jsonl", "--sequence-parallel", "--attention-softmax-in-fp32")
gap = max(abs(without[i] - with_sp[i]) for i in without)
print(f"4 iterations at TP=2 | same losses with --sequence-parallel (max difference < 2e-5): {gap < 2e-5}")
