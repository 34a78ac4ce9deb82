# %% [markdown]
# ## Lab exercises
#
# Each with a checker that says pass or fail and why (`labs/README.md`; reference solutions in
# `labs/solutions/`, which the checkers never read):
#
# - `labs/ch6f/sp_memory.py`: the activation bytes of one layer, with and without sequence parallelism
#   (the paper's Table 2; the checker also measures a real layer);
# - `labs/ch6f/merge_attention.py`: merge two partial attention results by their log-sum-exp;
# - `labs/ch6f/chunks.py`: which tokens context-parallel rank r holds, and its causal work;
# - `labs/ch6f/ring_bytes.py`: the bytes one ring step sends (the checker runs ring attention on 2 ranks).
#
# ```
# python -m lessons_pkg.labs check ch6f        # or one of them: ch6f.2
# ```
#
# On a cluster: the same commands as here, with `torchrun --nproc_per_node 8 src/ch6/pretrain_gpt.py
# --tensor-model-parallel-size 4 --sequence-parallel --context-parallel-size 2 ...` and longer sequences.

# %%
shutil.rmtree(OUT)
print("scratch folder removed:", not os.path.exists(OUT))
