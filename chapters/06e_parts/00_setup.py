# %% [markdown]
# # Chapter 6, part 5: after training — checkpoints that travel, generating text, serving, evaluating
#
# Parts 1 to 4 trained a GPT with tensor, pipeline and data parallelism. This part is what comes
# after, as chapter 6's **source notes** do it with Megatron-LM's tools. (The source notes: the lecture
# notes on Megatron-LM that this course rebuilds as code that runs, here Chinese notes on merging and
# splitting its checkpoints, its text-generation server and its LAMBADA evaluation. You do not need
# them: what this part takes from them, commands, logs and numbers, is quoted where it is used.)
#
# 1. **Checkpoints that travel**: Megatron's checkpoint format inside the files, merged and split
#    across TP/PP layouts (`checkpoint_util.py`), to and from `transformers`, and training resumed at a
#    new layout;
# 2. **Generating text** from a TP x PP model with a key/value cache (`generate.py`);
# 3. **Serving** it behind Megatron's REST API, an OpenAI-style API and a web page
#    (`text_generation_server.py`);
# 4. **Evaluating** it Megatron's way: LAMBADA accuracy and WikiText perplexity (`evaluate_gpt.py`).
#
# Everything runs on your machine's CPU processes (gloo) and unchanged on GPUs. First, a model to
# work with: the data pipeline of part 3 and a short TP=2 x PP=2 pretraining run of part 4, on 4
# processes. Its checkpoint, `CKPT`, is what the rest of the notebook converts, generates from,
# serves and evaluates.

# %%
import os
import pathlib

# run from the repository root, whether the notebook was opened from chapters/ or not
if pathlib.Path.cwd().name == "chapters":
    os.chdir(pathlib.Path.cwd().parent)
ROOT = os.getcwd()

import atexit
import json
import shutil
import subprocess
import sys
import tempfile
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notebook widgets are not needed here

from lessons_pkg.launch import torchrun

OUT = tempfile.mkdtemp(prefix="06e-")  # everything this notebook writes goes here
atexit.register(shutil.rmtree, OUT, ignore_errors=True)  # and is removed when the kernel shuts down


def run(script, *args, timeout=300):
    """``python script args...``, as in a terminal; returns its output (stdout), raises with stderr on failure."""
    result = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(result.stdout + result.stderr)
    return result.stdout


corpus = f"{OUT}/corpus.jsonl"
run("src/ch6/megatron_datasets.py", "--source", "offline", "--num-samples", "300", "--output", corpus, "--show", "0")
run("src/ch6/train_tokenizer.py", "--input", corpus, "--output-dir", OUT, "--tokenizer", "train", "--vocab-size", "512")
run("src/ch6/preprocess_data.py", "--input", corpus, "--output-prefix", f"{OUT}/nb", "--vocab-file",
    f"{OUT}/vocab.json", "--merge-file", f"{OUT}/merges.txt", "--tokenizer-type", "GPT2BPETokenizer",
    "--json-keys", "text", "--append-eod", "--workers", "1")
VOCAB, MERGES = f"{OUT}/vocab.json", f"{OUT}/merges.txt"
print("documents:", sum(1 for _ in open(corpus)), "| vocabulary:", len(json.load(open(VOCAB))))

# %%
CKPT = f"{OUT}/ckpt-tp2pp2"
PRETRAIN_ARGS = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "2e-3", "--min-lr", "2e-4",
    "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.1", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--weight-decay", "0.01", "--clip-grad", "1.0", "--data-path", f"{OUT}/nb_text_document", "--vocab-file", VOCAB,
    "--merge-file", MERGES, "--split", "90,8,2", "--log-interval", "10", "--eval-interval", "1000", "--eval-iters", "0",
]
trained = torchrun("src/ch6/pretrain_gpt.py", *PRETRAIN_ARGS, "--train-iters", "40", "--save", CKPT,
                   "--log-json", f"{OUT}/pretrain.jsonl", "--tensor-model-parallel-size", "2",
                   "--pipeline-model-parallel-size", "2", nproc_per_node=4, timeout=600, echo=False)
losses = [r["lm_loss"] for r in map(json.loads, open(f"{OUT}/pretrain.jsonl")) if r["kind"] == "train"]
print(f"trained 40 iterations at TP=2 x PP=2 | loss went down by more than 0.5: {losses[-1] < losses[0] - 0.5}")
print("checkpoint:", os.path.relpath(CKPT, OUT), "| latest:", open(f"{CKPT}/latest_checkpointed_iteration.txt").read())
