"""Merge, split and convert checkpoints, with Megatron-LM's ``tools/checkpoint_util.py`` arguments.

The lesson's three conversions of a TP=2 x PP=2 GPT-2 345M checkpoint::

    python src/ch6/checkpoint_util.py --model-type GPT --load-dir ckpt-tp2pp2 --save-dir ckpt-tp1 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1
    python src/ch6/checkpoint_util.py --model-type GPT --load-dir ckpt-tp2pp2 --save-dir ckpt-tp2 \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 1
    python src/ch6/checkpoint_util.py --model-type GPT --load-dir ckpt-tp2pp2 --save-dir ckpt-pp4 \\
        --target-tensor-parallel-size 1 --target-pipeline-parallel-size 4

and to and from ``transformers``::

    python src/ch6/checkpoint_util.py --loader megatron --saver hf --load-dir ckpt-tp2pp2 --save-dir gpt2-hf
    python src/ch6/checkpoint_util.py --loader hf --saver megatron --load-dir gpt2 --save-dir 345m-init \\
        --target-tensor-parallel-size 2 --target-pipeline-parallel-size 2      # "gpt2": the hub, with network

Unlike Megatron's tool, the optimizer state (Adam moments, step; ZeRO-1 slices
glued back), the scheduler, the iteration and the consumed samples travel with
the weights (``--no-save-optim`` drops them), so ``pretrain_gpt.py --load``
continues training at the new layout. The conversion streams layer by layer,
and writes the output atomically: nothing appears under ``--save-dir`` until it
is complete, and an existing checkpoint is replaced only with ``--overwrite``.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--model-type", choices=("GPT",), default="GPT", help="only GPT models (Megatron's legacy layout)")
    p.add_argument("--loader", choices=("megatron", "hf"), default="megatron")
    p.add_argument("--saver", choices=("megatron", "hf"), default="megatron")
    p.add_argument("--load-dir", required=True, help="a Megatron checkpoint folder, or a transformers folder/hub name")
    p.add_argument("--save-dir", required=True)
    p.add_argument("--target-tensor-parallel-size", type=int, default=None,
                   help="default: the source's (megatron loader) or 1 (hf loader)")
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None,
                   help="default: the source's (megatron loader) or 1 (hf loader)")
    p.add_argument("--target-virtual-pipeline-parallel-size", type=int, default=1,
                   help="model chunks per pipeline rank (for the interleaved schedule)")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="the real vocabulary size, for a checkpoint that does not record it (Megatron's flag)")
    p.add_argument("--vocab-file", default=None,
                   help="the tokenizer's vocab.json: its size is the real vocabulary when the checkpoint records "
                        "none (Megatron's flag); shipped with the output together with --merge-file")
    p.add_argument("--merge-file", default=None, help="the tokenizer's merges.txt, shipped with the output")
    p.add_argument("--no-save-optim", action="store_true", help="write the weights only (Megatron's tool's output)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --save-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", action="store_true",
                   help="(course) then check the output holds the same model (exit 1 if not)")
    return p


def _overlap(load_dir: str, save_dir: str) -> str | None:
    """How ``save_dir`` overlaps ``load_dir`` ("is", "is inside", "holds"), or None when they are apart
    (or ``load_dir`` is not a local path: a hub name)."""
    if not os.path.exists(load_dir):
        return None
    load, save = os.path.realpath(load_dir), os.path.realpath(save_dir)
    if load == save:
        return "is"
    if save.startswith(load + os.sep):
        return "is inside"
    if load.startswith(save + os.sep):
        return "holds"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from lessons_pkg.checkpoint import convert
    from lessons_pkg.checkpoint.reshard import Layout, SourceCheckpoint, VocabHints
    from lessons_pkg.checkpoint.vocab import vocab_file_size
    from lessons_pkg.errors import UserError

    if args.true_vocab_size is not None and args.true_vocab_size < 1:
        raise UserError(f"--true-vocab-size must be >= 1, got {args.true_vocab_size}")
    for flag in ("vocab_file", "merge_file"):
        path = getattr(args, flag)
        if path is not None and not os.path.isfile(path):
            raise UserError(f"--{flag.replace('_', '-')} {path}: no such file")
    vocab = VocabHints(args.true_vocab_size,
                       vocab_file_size(args.vocab_file) if args.vocab_file else None,
                       f"--vocab-file {args.vocab_file}")
    tokenizer = (args.vocab_file, args.merge_file)
    for flag in ("target_tensor_parallel_size", "target_pipeline_parallel_size",
                 "target_virtual_pipeline_parallel_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    overlap = _overlap(args.load_dir, args.save_dir)
    if overlap:  # even with --overwrite: replacing --save-dir would delete (part of) the source
        raise UserError(f"--save-dir {args.save_dir} {overlap} --load-dir {args.load_dir}: write the conversion "
                        "to a folder outside the source")
    if args.loader == "hf" and args.saver == "hf":
        raise UserError("--loader hf --saver hf is a copy: nothing to convert")
    if args.loader == "megatron":
        if args.saver == "hf":
            summary = convert.megatron_to_hf(args.load_dir, args.save_dir, args.overwrite, vocab,
                                             tokenizer=tokenizer)
        else:
            src_layout = SourceCheckpoint.open(args.load_dir, vocab).layout
            target = Layout(args.target_tensor_parallel_size or src_layout.tp,
                            args.target_pipeline_parallel_size or src_layout.pp,
                            args.target_virtual_pipeline_parallel_size)
            summary = convert.megatron_to_megatron(args.load_dir, args.save_dir, target, not args.no_save_optim,
                                                   args.overwrite, vocab, progress=not args.no_progress,
                                                   tokenizer=tokenizer)
    else:
        target = Layout(args.target_tensor_parallel_size or 1, args.target_pipeline_parallel_size or 1,
                        args.target_virtual_pipeline_parallel_size)
        summary = convert.hf_to_megatron(args.load_dir, args.save_dir, target, args.overwrite,
                                         progress=not args.no_progress)
    for name, size in summary["files"].items():
        print(f"  {size / 2**20:10.1f} MiB  {name}")
    if "seconds" in summary:
        print(f"done in {summary['seconds']:.1f} s")
    if args.verify and not convert.verify(args.load_dir, args.save_dir, args.loader, args.saver, vocab):
        return 1
    return 0


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
