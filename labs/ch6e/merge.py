"""Exercise ch6e.1: merge the tensor ranks' shards of one checkpoint tensor.

A TP=t checkpoint holds, for every tensor of the model (Megatron's names,
e.g. "layers.0.self_attention.query_key_value.weight"), t shards. Return the
full tensor. Which tensors were split by rows, which by columns, which are
replicated? (Column-parallel layers split their output features, row-parallel
ones their input features; look at lessons_pkg/tensor_parallel/layers.py.)
A replicated tensor whose shards differ means a broken checkpoint: raise ValueError.

Check: python -m lessons_pkg.labs check ch6e.1
"""
import torch


def merge_tensor_ranks(key: str, shards: list[torch.Tensor]) -> torch.Tensor:
    raise NotImplementedError("merge_tensor_ranks(key, shards)")
