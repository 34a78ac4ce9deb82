"""Megatron-LM's vocabulary padding rule, for transformers' converter when no Megatron-LM checkout is given.

transformers' ``checkpoint_reshaping_and_interoperability.py`` imports
``_vocab_size_with_padding`` from Megatron-LM's ``megatron.training.tokenizer.tokenizer``,
a package NVIDIA does not publish on PyPI. This folder is put on the
converter's path (after megatron-core, which is installed from PyPI) by
:mod:`lessons_pkg.checkpoint.transformers_converter` only; nothing else
imports it. The rule, as Megatron-LM states it: round the tokenizer's size up
to a multiple of ``make_vocab_size_divisible_by x tensor_model_parallel_size``.
Written here independently of ``lessons_pkg.tensor_parallel.utils``, so the
converter's padding is not our own code checking itself.
"""
import math


def _vocab_size_with_padding(orig_vocab_size, args, logging_enabled=True):
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    after = int(math.ceil(orig_vocab_size / multiple) * multiple)
    if getattr(args, "rank", 0) == 0 and logging_enabled:
        print(f" > padded vocab (size: {orig_vocab_size}) with {after - orig_vocab_size} dummy tokens "
              f"(new size: {after})", flush=True)
    return after
