"""Load a trained model for inference or evaluation, whatever wrote it and whatever its layout.

    pre = load_pretrained("outputs/ch6/pretrain/checkpoints")   # Megatron checkpoint, any TP x PP (x virtual)
    pre = load_pretrained("gpt2-folder")                          # a transformers GPT-2 folder
    model = build_stage(pre, tp_group, pp_rank, pp_size)          # this rank's ParallelGPT stage, eval mode

:class:`Pretrained` holds the full-size ("master") weights, keyed as
:func:`lessons_pkg.tensor_parallel.master_state_dict` keys them (real
vocabulary, TP=1, global layer numbers), the :class:`GPTConfig`, the tokenizer
when the checkpoint names or ships one, and the saved iteration and arguments.
Every rank can then cut its own shard with :meth:`ParallelGPT.load_master_state_dict`.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field

import torch

from lessons_pkg.errors import CheckpointError
from lessons_pkg.tensor_parallel.config import GPTConfig


@dataclass
class Pretrained:
    config: GPTConfig
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    tokenizer: object | None = None       # lessons_pkg.data.tokenizer.GPT2BPETokenizer, when known
    iteration: int | None = None
    args: argparse.Namespace | None = None
    source: str = "megatron"              # "megatron" or "hf"
    path: str = ""


def is_hf_folder(path: str) -> bool:
    """A ``transformers`` model folder: ``config.json`` beside ``model.safetensors`` or ``pytorch_model.bin``."""
    return os.path.isfile(os.path.join(path, "config.json")) and any(
        os.path.isfile(os.path.join(path, n)) for n in ("model.safetensors", "pytorch_model.bin"))


def load_tokenizer(path: str | None = None, args: argparse.Namespace | None = None, vocab_file: str | None = None,
                   merge_file: str | None = None, tokenizer_type: str | None = None):
    """The tokenizer Megatron's flags name, else the one shipped in ``path``, else the one ``args`` name.

    Explicit ``vocab_file``/``merge_file`` win (an error if they do not exist);
    then ``vocab.json``/``merges.txt`` inside ``path`` (our checkpoints and
    ``transformers`` folders carry them); then the files the saved arguments
    name, if they still exist. ``None`` when there is none.
    """
    from lessons_pkg.data.tokenizer import build_tokenizer

    tokenizer_type = tokenizer_type or "GPT2BPETokenizer"
    if vocab_file or merge_file:
        for flag, f in (("--vocab-file", vocab_file), ("--merge-file", merge_file)):
            if not f or not os.path.isfile(f):
                raise CheckpointError(f"{flag} {f!r}: no such file (both --vocab-file and --merge-file are needed)")
        return build_tokenizer(vocab_file, merge_file, tokenizer_type)
    if path:
        v, m = os.path.join(path, "vocab.json"), os.path.join(path, "merges.txt")
        if os.path.isfile(v) and os.path.isfile(m):
            return build_tokenizer(v, m, tokenizer_type)
    if args is not None:
        v, m = getattr(args, "vocab_file", None), getattr(args, "merge_file", None)
        if v and m and os.path.isfile(v) and os.path.isfile(m):
            return build_tokenizer(v, m, getattr(args, "tokenizer_type", None) or tokenizer_type)
    return None


def load_pretrained(path: str, vocab_file: str | None = None, merge_file: str | None = None,
                    tokenizer_type: str | None = None, true_vocab_size: int | None = None) -> Pretrained:
    """Read a Megatron checkpoint root (any layout) or a ``transformers`` folder into full-size weights.

    The real vocabulary of a Megatron checkpoint is resolved as
    :mod:`lessons_pkg.checkpoint.vocab` says: ``true_vocab_size`` (``--true-vocab-size``),
    then what the saved args record, then the tokenizer found here (whose size
    must map onto the padded size by Megatron's rule).
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {path!r}: no such folder")
    if is_hf_folder(path):
        from lessons_pkg.checkpoint.hf_io import load_hf_folder

        config, state_dict = load_hf_folder(path)
        if true_vocab_size is not None and true_vocab_size != config.vocab_size:
            raise CheckpointError(f"--true-vocab-size {true_vocab_size}, but the transformers model {path} has "
                             f"vocab_size {config.vocab_size}")
        tokenizer = load_tokenizer(path, None, vocab_file, merge_file, tokenizer_type)
        return Pretrained(config, state_dict, tokenizer, None, None, "hf", path)
    from lessons_pkg.checkpoint.layout import find_checkpoint
    from lessons_pkg.checkpoint.megatron_format import read_args, safe_load
    from lessons_pkg.checkpoint.reshard import VocabHints, read_full_checkpoint

    files = find_checkpoint(path)
    args = read_args(safe_load(files.model_file(0, 0), mmap=True).get("args", {}), files.model_file(0, 0))
    tokenizer, source = _find_tokenizer(path, args, vocab_file, merge_file, tokenizer_type)
    hints = VocabHints(true_vocab_size, tokenizer.vocab_size if tokenizer is not None else None, source)
    full = read_full_checkpoint(path, hints)
    return Pretrained(full.config, full.state_dict, tokenizer, full.iteration, full.args, "megatron", path)


def _find_tokenizer(path, args, vocab_file, merge_file, tokenizer_type):
    """``load_tokenizer``'s choice, and words saying where it came from (for vocabulary messages)."""
    tokenizer = load_tokenizer(path, args, vocab_file, merge_file, tokenizer_type)
    if tokenizer is None:
        return None, ""
    if vocab_file:
        return tokenizer, f"the tokenizer of --vocab-file {vocab_file}"
    if os.path.isfile(os.path.join(path, "vocab.json")):
        return tokenizer, f"the tokenizer shipped in {path} (vocab.json)"
    return tokenizer, f"the tokenizer of args.vocab_file {getattr(args, 'vocab_file', None)}"


def stage_layers(num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
    """``(layer_offset, num_layers)`` of pipeline stage ``pp_rank`` (layers split evenly, as Megatron does)."""
    if num_layers % pp_size:
        raise CheckpointError(f"num_layers ({num_layers}) is not divisible by pipeline-model-parallel-size ({pp_size})")
    per = num_layers // pp_size
    return pp_rank * per, per


def build_stage(pre: Pretrained, tp_group=None, pp_rank: int = 0, pp_size: int = 1, dtype=None, **config_overrides):
    """This rank's :class:`ParallelGPT` stage (its TP shard of stage ``pp_rank``), weights loaded, eval mode.

    ``dtype`` (e.g. ``torch.float16`` for ``--fp16``): the parameters' dtype, float32 when None.
    ``config_overrides`` change the configuration (e.g. ``use_fused_kernels=True``);
    dropout is irrelevant in eval mode.
    """
    from dataclasses import replace

    from lessons_pkg.tensor_parallel import ParallelGPT

    config = replace(pre.config, **config_overrides) if config_overrides else pre.config
    offset, n = stage_layers(config.num_layers, pp_rank, pp_size)
    model = ParallelGPT(config, tp_group, pre_process=pp_rank == 0, post_process=pp_rank == pp_size - 1,
                        layer_offset=offset, num_layers=n)
    model.load_master_state_dict(pre.state_dict)
    if dtype is not None:
        model.to(dtype)
    return model.eval()
