"""The configuration of the tensor-parallel GPT (Megatron-LM's argument names)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 50257                  # the real vocabulary; padded per TP size, see padded_vocab_size()
    hidden_size: int = 768
    num_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 1024
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5
    make_vocab_size_divisible_by: int = 128
    use_fused_kernels: bool = False          # lessons_pkg.kernels: bias+GeLU, masked softmax, LayerNorm
    recompute_activations: bool = False      # torch.utils.checkpoint around each layer
    sequence_parallel: bool = False          # split LayerNorm/dropout/residual along the sequence (TP > 1)
    attention_softmax_in_fp32: bool = False  # the step-by-step attention's softmax in float32 (16-bit runs)
    attention_backend: str = "auto"          # auto: F.scaled_dot_product_attention; unfused/local: step by step
    gelu_approximate: str = "tanh"           # F.gelu's approximate=: "tanh" (GPT-2, Megatron's fused bias-GeLU)
                                             #   or "none" (exact erf: Megatron run with --no-bias-gelu-fusion)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) is not divisible by "
                             f"num_attention_heads ({self.num_attention_heads})")
        if self.attention_backend not in ("auto", "unfused", "local"):
            raise ValueError(f"attention_backend {self.attention_backend!r}: 'auto', 'unfused' or 'local'")
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"gelu_approximate {self.gelu_approximate!r}: 'tanh' or 'none' (F.gelu's values)")
        if self.use_fused_kernels and self.gelu_approximate != "tanh":
            raise ValueError("use_fused_kernels with gelu_approximate 'none': the fused bias-GeLU kernel computes "
                             "the tanh GeLU only")

    @property
    def ffn_hidden_size(self) -> int:
        return 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tensor_model_parallel_size: int) -> int:
        from lessons_pkg.tensor_parallel.utils import vocab_size_with_padding

        return vocab_size_with_padding(self.vocab_size, tensor_model_parallel_size,
                                       self.make_vocab_size_divisible_by)[0]


def init_method_normal(std: float):
    """``N(0, std)``: Megatron's initialisation of every weight but the output projections."""
    def init_(tensor: torch.Tensor) -> torch.Tensor:
        return nn.init.normal_(tensor, mean=0.0, std=std)
    return init_


def scaled_init_method_normal(std: float, num_layers: int):
    """``N(0, std / sqrt(2 num_layers))`` for the layers that write into the residual stream (GPT-2's scheme)."""
    return init_method_normal(std / math.sqrt(2.0 * num_layers))
