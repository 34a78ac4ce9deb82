"""Cut a stack of layers into pipeline chunks, and a small model to cut.

With ``p`` stages and ``v`` chunks per stage the layers form ``p * v``
consecutive virtual stages of equal size; rank ``r`` holds virtual stages
``r, r + p, r + 2p, ...`` (round-robin, as Megatron-LM assigns them)::

    8 layers, p=2, v=2:   virtual stage  0: layers 0-1 -> rank 0 chunk 0
                                         1: layers 2-3 -> rank 1 chunk 0
                                         2: layers 4-5 -> rank 0 chunk 1
                                         3: layers 6-7 -> rank 1 chunk 1
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def chunk_layer_ranges(num_layers: int, num_stages: int, num_chunks: int = 1) -> list[list[range]]:
    """``ranges[r][c]``: the layer indices of chunk ``c`` on rank ``r``."""
    virtual = num_stages * num_chunks
    if num_layers % virtual != 0:
        raise ValueError(
            f"number of layers ({num_layers}) is not divisible by pipeline stages ({num_stages}) "
            f"x model chunks per stage ({num_chunks}) = {virtual}"
        )
    size = num_layers // virtual
    return [[range((c * num_stages + r) * size, (c * num_stages + r + 1) * size) for c in range(num_chunks)]
            for r in range(num_stages)]


def chunks_for_rank(layers: Sequence[nn.Module], rank: int, num_stages: int, num_chunks: int = 1) -> list[nn.Sequential]:
    """The model chunks of pipeline rank ``rank``, each an ``nn.Sequential`` of its layers (shared, not copied)."""
    if not 0 <= rank < num_stages:
        raise ValueError(f"rank ({rank}) must be in [0, {num_stages})")
    ranges = chunk_layer_ranges(len(layers), num_stages, num_chunks)[rank]
    return [nn.Sequential(*(layers[i] for i in r)) for r in ranges]


class LinearTanh(nn.Module):
    """``tanh(x W^T + b)`` on ``[batch, seq, hidden]``: a layer with real compute and saved activations."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def toy_layers(num_layers: int, hidden: int, seed: int = 0) -> nn.ModuleList:
    """The full model every test and demo slices: ``num_layers`` x LinearTanh, same weights on every rank."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    layers = nn.ModuleList(LinearTanh(hidden) for _ in range(num_layers))
    torch.random.set_rng_state(generator_state)
    return layers
