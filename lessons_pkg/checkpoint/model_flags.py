"""Megatron-LM's model flags on the commands that load a checkpoint (server, generation, evaluation).

Megatron-LM's inference scripts repeat the model's sizes on the command line
and name its precision::

    torchrun ... tools/run_text_generation_server.py --load CKPT --num-layers 24 --hidden-size 1024 \\
        --num-attention-heads 16 --max-position-embeddings 1024 --seq-length 1024 --micro-batch-size 1 --fp16 ...

Our commands read the sizes from the checkpoint, so the flags are optional;
each size given must equal the checkpoint's, and a mismatch is an error that
names both (Megatron itself would fail to load the weights). ``--fp16`` and
``--bf16`` put the parameters, and with them every activation and the
key/value cache, in that dtype, as Megatron's inference does ("using
torch.float16 for parameters"); losses and sampling probabilities are still
computed in float32. On a CPU that is slower than float32, but it is what was
asked for.
"""
from __future__ import annotations

import argparse

from lessons_pkg.errors import CheckpointError

SIZES = ("num_layers", "hidden_size", "num_attention_heads", "max_position_embeddings")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_model_arguments(parser: argparse.ArgumentParser, seq_length: bool = True,
                        micro_batch_size: bool = True) -> None:
    """Add the sizes, ``--use-checkpoint-args`` and ``--fp16``/``--bf16``; ``seq_length``/``micro_batch_size``:
    also those two, for commands that have no meaning of their own for them (inference has no micro-batches)."""
    g = parser.add_argument_group("Megatron-LM's model flags (optional: the checkpoint has the sizes; "
                                  "each one given must match it)")
    for name in SIZES:
        g.add_argument(_flag(name), type=int, default=None, metavar="N")
    if seq_length:
        g.add_argument("--seq-length", type=int, default=None, metavar="N",
                       help="at most the model's max-position-embeddings (prompt and generated tokens must fit those)")
    if micro_batch_size:
        g.add_argument("--micro-batch-size", type=int, default=None, metavar="N",
                       help="accepted for Megatron's scripts (>= 1); the prompts of one request are one batch, "
                            "as in Megatron's server")
    g.add_argument("--use-checkpoint-args", action="store_true",
                   help="take the sizes from the checkpoint (what these commands always do)")
    precision = g.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="parameters and activations in float16")
    precision.add_argument("--bf16", action="store_true", help="parameters and activations in bfloat16")


def check_model_arguments(args: argparse.Namespace, config, where: str, seq_length: bool = True,
                          micro_batch_size: bool = True) -> None:
    """Each size given on the command line equals the checkpoint's ``config``; else one error naming them all.

    ``seq_length``/``micro_batch_size``: check those too (pass what ``add_model_arguments`` was given)."""
    diffs = [f"{name} {getattr(config, name)} ({_flag(name)} {getattr(args, name)})" for name in SIZES
             if getattr(args, name, None) is not None and getattr(args, name) != getattr(config, name)]
    seq = getattr(args, "seq_length", None) if seq_length else None
    if seq is not None and not 1 <= seq <= config.max_position_embeddings:
        diffs.append(f"max_position_embeddings {config.max_position_embeddings} (--seq-length {seq} must be "
                     "between 1 and it)")
    mbs = getattr(args, "micro_batch_size", None) if micro_batch_size else None
    if mbs is not None and mbs < 1:
        diffs.append(f"--micro-batch-size must be >= 1, got {mbs}")
    if diffs:
        raise CheckpointError(f"{where} holds another model than the command line describes: " + ", ".join(diffs))


def params_dtype(args: argparse.Namespace):
    """``torch.float16`` for ``--fp16``, ``torch.bfloat16`` for ``--bf16``, else None (the checkpoint's float32)."""
    import torch

    return torch.float16 if getattr(args, "fp16", False) else torch.bfloat16 if getattr(args, "bf16", False) else None
