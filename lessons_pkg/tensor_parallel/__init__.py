"""Megatron-LM tensor parallelism (chapter 6), one idea per module.

    utils          exact division, last-dim split, vocabulary ranges and padding
    mappings       f, g, scatter, gather (and their sequence-parallel pair): communication as autograd functions
    sequence_parallel  the regions split along the sequence: gradient sum, checks, the gathering matmul
    random         the model-parallel random stream (per-rank dropout masks on the split sequence)
    layers         ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
    cross_entropy  vocab_parallel_cross_entropy: the loss without gathering the logits
    config         GPTConfig and Megatron's initialisations
    dropout        dropout with 15-bit masks: a quarter of F.dropout's mask time on the CPU
    transformer    ParallelMLP, ParallelAttention, ParallelTransformerLayer
    gpt            ParallelGPT (whole model or one pipeline stage), tied LM head
    checkpointing  full-size master weights: from a seed, to a shard, back to full
    hf             conversion to and from transformers' GPT2LMHeadModel
    replace        parallelize(): shard an unmodified transformers GPT-2 (Parallelformers' idea)
"""
from lessons_pkg.tensor_parallel.checkpointing import gather_full, master_state_dict, shard_of
from lessons_pkg.tensor_parallel.config import GPTConfig, init_method_normal, scaled_init_method_normal
from lessons_pkg.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from lessons_pkg.tensor_parallel.gpt import ParallelGPT
from lessons_pkg.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, TPShape, VocabParallelEmbedding
from lessons_pkg.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from lessons_pkg.tensor_parallel.transformer import ParallelAttention, ParallelMLP, ParallelTransformerLayer
from lessons_pkg.tensor_parallel.utils import divide, vocab_size_with_padding

__all__ = [
    "ColumnParallelLinear", "GPTConfig", "ParallelAttention", "ParallelGPT", "ParallelMLP",
    "ParallelTransformerLayer", "RowParallelLinear", "VocabParallelEmbedding", "copy_to_tensor_model_parallel_region",
    "divide", "gather_from_tensor_model_parallel_region", "gather_full", "init_method_normal", "master_state_dict",
    "parallelize", "reduce_from_tensor_model_parallel_region", "scaled_init_method_normal",
    "scatter_to_tensor_model_parallel_region", "shard_of", "TPShape", "vocab_parallel_cross_entropy", "vocab_size_with_padding",
]


def __getattr__(name):
    if name == "parallelize":  # needs nothing from transformers, but keep the import graph small
        from lessons_pkg.tensor_parallel.replace import parallelize

        return parallelize
    raise AttributeError(f"module 'lessons_pkg.tensor_parallel' has no attribute {name!r}")
