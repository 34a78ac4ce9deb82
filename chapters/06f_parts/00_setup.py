# %% [markdown]
# # Chapter 6, part 6: long sequences — sequence parallelism and context parallelism
#
# Tensor parallelism (chapter 6) splits the weights of every layer and the activations *inside* its two
# matmul blocks. What it leaves whole is what lies between them: the LayerNorms, the dropouts, the
# residual stream. And nothing it does helps with the one activation that grows with the square of the
# sequence, attention's. This chapter takes the two remaining splits Megatron-LM makes:
#
# 1. **Sequence parallelism** (Korthikanti et al., 2022): the regions between the matmul blocks hold
#    only their rank's tokens, `[b, s/t, h]`; the all-reduces of tensor parallelism become all-gathers
#    and reduce-scatters of the same size. Megatron's `--sequence-parallel`.
# 2. **Context parallelism**: one long sequence split over ranks end to end, attention computed as a
#    ring (keys and values passed from rank to rank), Megatron's `--context-parallel-size`.
#
# Each runs here as a real multi-process job on CPU (gloo), checked against one process with the same
# weights, measured, and drawn.

# %%
import os
import pathlib

if pathlib.Path.cwd().name == "chapters":
    os.chdir(pathlib.Path.cwd().parent)
ROOT = os.getcwd()

import atexit
import importlib.util
import inspect
import json
import shutil
import sys
import tempfile
import warnings

import matplotlib.pyplot as plt
import torch

from lessons_pkg.launch import torchrun

warnings.filterwarnings("ignore", category=FutureWarning)  # torch 2.13 renamed two collectives; both work
OUT = tempfile.mkdtemp(prefix="06f-")  # everything this notebook writes goes here
atexit.register(shutil.rmtree, OUT, ignore_errors=True)


def script_module(path):
    """Import a script of scripts/ as a module (its functions, without running its main)."""
    spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


print("torch", torch.__version__, "| scratch folder ready:", os.path.isdir(OUT))
