# %% [markdown]
# ## Lab exercises
#
# Exercises for this chapter, each with a checker that says pass or fail and why (`labs/README.md`;
# reference solutions in `labs/solutions/`, which the checkers never read):
#
# - `labs/ch6e/merge.py`: merge a checkpoint's tensor-parallel shards back into one tensor (what
#   `src/ch6/checkpoint_util.py` does for every tensor), refusing replicas that disagree;
# - `labs/ch6e/top_p.py`: top-k and top-p filtering as Megatron's text generation applies them
#   (`src/ch6/generate.py --top_k/--top_p`);
# - `labs/ch6e/perplexity.py`: WikiText's adjusted, word-level perplexity (`src/ch6/evaluate_gpt.py`).
#
# ```
# python -m lessons_pkg.labs check ch6e        # or one of them: ch6e.1
# ```

# %%
# The end: remove the scratch folder with everything this notebook wrote (skip this cell to keep it).
shutil.rmtree(OUT)
print("scratch folder removed:", not os.path.exists(OUT))
