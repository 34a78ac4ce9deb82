# %% [markdown]
# ## 2. Context parallelism: one sequence over several ranks
#
# ### 2.1 The memory wall of long sequences
#
# Sequence parallelism still gathers the whole sequence for attention, and every activation of a layer
# grows with `s`. Step-by-step attention keeps the `[b, a, s, s]` probabilities: at `s = 4096` on the
# course model's layer (8 heads, float32) that is 512 MiB per layer for one sequence; flash attention
# (`F.scaled_dot_product_attention`) keeps none of them, but the rest still grows linearly with `s`, on
# every rank. Megatron's `--context-parallel-size cp` cuts the sequence itself: each rank keeps `s / cp`
# tokens *everywhere* (embedding, every layer, LM head, loss). Only attention needs the other tokens.
#
# ### 2.2 Attention one block of keys at a time
#
# A query's attention over all keys can be computed block by block, keeping only the output so far and
# the log of its softmax denominator, `lse = log sum_j exp(s_j)`. Two blocks' results merge exactly:
#
# `lse = log(exp(lse_a) + exp(lse_b))`, `out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b`
#
# (each block's output is normalised by its own denominator; the weights put them on the common one).
# Numerically, on random queries and keys cut at every place:

# %%
from lessons_pkg.context_parallel import block_attention, full_attention, merge_partial_attention

g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(2, 4, 32, 16, generator=g) for _ in range(3))
want, want_lse = full_attention(q, k, v, causal=False)
worst = 0.0
for cut in range(1, 32):
    out, lse = merge_partial_attention(*block_attention(q, k[:, :, :cut], v[:, :, :cut]),
                                       *block_attention(q, k[:, :, cut:], v[:, :, cut:]))
    worst = max(worst, (out - want).abs().max().item(), (lse - want_lse).abs().max().item())
print(f"31 cuts: merged by log-sum-exp = attention over all keys, largest difference < 1e-5: {worst < 1e-5}")

# %% [markdown]
# ### 2.3 Which tokens a rank holds: the balanced split
#
# With causal attention the last tokens attend to the most keys. Cutting the sequence into `cp` pieces
# would give the last rank `cp` blocks of work and the first one. Megatron cuts it into `2 cp` chunks and
# gives rank `r` chunks `r` and `2 cp - 1 - r`. Below: the causal attention of 8 chunks (query chunk down,
# key chunk across; a chunk sees earlier chunks fully and itself causally), each needed block coloured by
# the rank whose queries compute it.

# %%
from lessons_pkg.context_parallel.split import rank_chunks


def owners(cp, layout):
    owner = {}
    for r in range(cp):
        for c in rank_chunks(r, cp, layout):
            owner[c] = r
    return owner


fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
cp = 4
for ax, layout in zip(axes, ("contiguous", "balanced")):
    owner = owners(cp, layout)
    grid = torch.full((2 * cp, 2 * cp), float("nan"))
    for i in range(2 * cp):
        for j in range(i + 1):
            grid[i, j] = owner[i]
    ax.imshow(grid, cmap="tab10", vmin=0, vmax=9)
    work = [sum(i + 1 for i in range(2 * cp) if owner[i] == r) for r in range(cp)]
    ax.set_title(f"{layout}: chunk pairs per rank {work}", fontsize=9)
    ax.set_xlabel("key chunk")
    ax.set_ylabel("query chunk")
plt.suptitle("Causal attention at CP=4 in 8 chunks, coloured by the rank that computes each block", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# ### 2.4 The ring
#
# Each rank starts with its own keys and values. At every step it computes its queries' attention over the
# block it holds (chunk pair by chunk pair: earlier chunks fully, its own causally, later ones not at all),
# merges the result by log-sum-exp, and passes the block to the next rank while it computes; after `cp`
# steps every query has met every key. The backward runs the ring the other way: each block travels with
# the gradients of its keys and values accumulated so far, each rank adds its queries' part (from the saved
# final `lse`, as flash attention's backward does), and after `cp` steps every block's gradients are back
# with its owner (`lessons_pkg/context_parallel/ring_attention.py`). Against one process on the whole
# sequence, attention alone and the whole GPT, at CP=4 (`python src/ch6/context_parallel.py`: CP=2):

# %%
_ = torchrun("src/ch6/context_parallel.py", nproc_per_node=4)

# %% [markdown]
# ### 2.5 Measured: memory, work, bytes, and the ring's timeline
#
# `scripts/bench_context_parallel.py`: one layer of the course model on one sequence of 2048 tokens, at
# CP = 1, 2, 4, with the balanced and the contiguous split. Memory, bytes and chunk pairs are the same on
# any machine; the compute times per rank (in `docs/benchmarks.md`, and in the timeline below) are this
# machine's, whose 2 cores 4 ranks share at CP=4:

# %%
cp_bench = script_module("scripts/bench_context_parallel.py")
cp_rows = cp_bench.run(seq=2048)
print(cp_bench.table(cp_rows, 2048, times=False))   # bytes and counts: the same on every run
by = {(r["cp"], r["layout"]): r for r in cp_rows}
base = by[1, "balanced"]["ranks"][0]["peak"]
print("activations per rank within 10% of CP=1's / cp:",
      all(max(x["peak"] for x in by[c, "balanced"]["ranks"]) <= 1.1 * base / c for c in (2, 4)))
print("balanced split: every rank the same chunk pairs:",
      all(len({x["pairs"] for x in by[c, "balanced"]["ranks"]}) == 1 for c in (2, 4)))
last, mean = by[4, "contiguous"]["ranks"][-1]["pairs"], sum(x["pairs"] for x in by[4, "contiguous"]["ranks"]) / 4
print(f"contiguous split at CP=4: the last rank does {last / mean:.2f}x the mean work")
cp_bench.plot_timeline(by[2, "balanced"])
plt.show()
cp_bench.plot_work(cp_rows)
plt.show()

# %% [markdown]
# The timeline shows what the ring costs: at each step a rank computes one block while the next one
# arrives; on a GPU with NVLink the transfer hides behind the compute, here on gloo over loopback TCP it
# mostly does too (the grey waits are short). The contiguous split's last rank computes `4 cp - 1` chunk
# pairs against the first's 3: at large `cp` twice the mean, and every rank waits for it at each layer.
#
# ### 2.6 Training with `--context-parallel-size`
#
# The trainer splits every micro-batch's tokens and labels, the model finds its tokens' positions, the loss
# of each rank covers its tokens, and gradients are averaged over data x context parallel ranks (Megatron's
# groups: TP innermost, then CP, DP, PP). The same losses as one process (attention dropout must be 0: the
# ring has none):

# %%
cp1 = pretrain(f"{OUT}/cp1.jsonl", "--tensor-model-parallel-size", "1", nproc=1)          # one process
cp2 = pretrain(f"{OUT}/cp2.jsonl", "--tensor-model-parallel-size", "1", "--context-parallel-size", "2")
gap = max(abs(cp1[i] - cp2[i]) for i in cp1)
print(f"4 iterations | same losses with --context-parallel-size 2 (max difference < 2e-5): {gap < 2e-5}")
