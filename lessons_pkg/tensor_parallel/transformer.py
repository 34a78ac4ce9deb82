"""The tensor-parallel transformer layer: ParallelMLP, ParallelAttention, ParallelTransformerLayer.

Each sub-block is "column-parallel, local work, row-parallel" (Megatron-LM):
the column-parallel layer's ``f`` and the row-parallel layer's ``g`` are the
only communication, so one layer costs 2 all-reduces forward (the ``g`` of
attention and of the MLP) and 2 backward (their ``f``). Everything between
them (GeLU, the attention of this rank's heads) is local.

Activations are ``[batch, seq, hidden]``. LayerNorms, biases of the row-
parallel layers and the residual stream are replicated on every rank.
Dropout on replicated tensors draws the same mask on every rank as long as
the ranks were seeded alike (they consume the random generator identically);
attention dropout therefore uses correlated masks across ranks (Megatron uses
a per-rank generator there): still a valid dropout, documented here.

``config.use_fused_kernels`` swaps in ``lessons_pkg.kernels`` (imported only
then): bias+GeLU, the scaled causal softmax and LayerNorm. The plain PyTorch
code beside each call is the reference and the default. Attention itself is
``F.scaled_dot_product_attention`` by default (one fused call, no
``[b, heads, s, s]`` tensor kept), except for training with attention dropout
on the CPU (:func:`attention_with_dropout`); :func:`attention_reference` spells
out the same computation (scores, causal softmax, weighted sum) and serves the
fused kernels and the tests. Dropout is :mod:`lessons_pkg.tensor_parallel.dropout`
(``F.dropout`` off the CPU).

``cp_group`` (context parallelism, :mod:`lessons_pkg.context_parallel`): the
layer holds this rank's tokens of a sequence split over the group, and its
attention is ring attention over the group (no attention dropout).

``config.sequence_parallel`` (:mod:`lessons_pkg.tensor_parallel.sequence_parallel`):
a layer takes and returns this rank's tokens ``[b, s/tp, h]``; its
column-parallel layers all-gather the sequence and its row-parallel layers
reduce-scatter it (2 all-gathers and 2 reduce-scatters per layer instead of 2
all-reduces); the hidden dropout draws each rank's own mask from the
model-parallel stream (:mod:`lessons_pkg.tensor_parallel.random`), as the
ranks hold different tokens.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lessons_pkg.context_parallel.ring_attention import ring_attention
from lessons_pkg.tensor_parallel.config import GPTConfig, init_method_normal, scaled_init_method_normal
from lessons_pkg.tensor_parallel.dropout import dropout as apply_dropout
from lessons_pkg.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, resolve_tp_group
from lessons_pkg.tensor_parallel.random import model_parallel_generator
from lessons_pkg.tensor_parallel.sequence_parallel import check_sequence_parallel, mark_sequence_parallel
from lessons_pkg.tensor_parallel.utils import divide


def _kernel_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a fused kernel runs ``x`` in: its own, or float32 where the kernel has no such variant
    (the CPU kernels have no bfloat16/float16 ones; autocast runs such ops in float32 too)."""
    if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return x.dtype


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, fused: bool = False, approximate: str = "tanh") -> torch.Tensor:
    """GeLU(x + bias): the tanh approximation (GPT-2's ``gelu_new``, Megatron's fused ``bias_gelu``) by default.

    ``approximate="none"`` is the exact erf GeLU, what Megatron-LM computes when
    run with ``--no-bias-gelu-fusion`` (its unfused path calls ``F.gelu``); the
    fused kernel computes the tanh form only, so the config refuses the pair.

    Under autocast ``x`` (a matmul's output) is bf16/fp16 while ``bias`` (a
    parameter) stays float32. The plain path adds it in ``x``'s dtype (as a
    bf16 ``addmm`` would), so the 4h activations stay bf16 instead of being
    promoted to float32, read and written at twice the bytes; the bias's
    gradient is summed in that dtype too and reaches the float32 parameter
    through the cast. The fused kernel gets both in one dtype: ``x``'s on a
    GPU, float32 on the CPU (which has no half-precision kernels).
    """
    if fused:
        from lessons_pkg import kernels

        if approximate != "tanh":
            raise ValueError(f"bias_gelu(fused=True, approximate={approximate!r}): the kernel computes the tanh GeLU")
        dtype = _kernel_dtype(x)
        return kernels.bias_gelu(x.to(dtype), bias.to(dtype)).to(x.dtype)
    return F.gelu(x + bias.to(x.dtype), approximate=approximate)


def scaled_causal_softmax(scores: torch.Tensor, scale: float, fused: bool = False, in_fp32: bool = False
                          ) -> torch.Tensor:
    """softmax(scale * scores) with future positions masked; ``scores`` ``[b*heads, sq, sk]``.

    The ``sq`` queries are the LAST ``sq`` of the ``sk`` positions (``sq < sk``
    when earlier keys come from a key/value cache): query i sees keys
    ``0 .. sk - sq + i``. The fused kernel handles the square case only.
    ``in_fp32`` (``--attention-softmax-in-fp32``): 16-bit scores are masked and
    normalised in float32, the probabilities returned in the scores' dtype.
    """
    if in_fp32 and scores.dtype in (torch.float16, torch.bfloat16):
        return scaled_causal_softmax(scores.float(), scale, fused).to(scores.dtype)
    sq, sk = scores.shape[-2:]
    if fused and sq == sk:
        from lessons_pkg import kernels

        dtype = _kernel_dtype(scores)
        return kernels.scaled_upper_triang_masked_softmax(scores.to(dtype), scale).to(scores.dtype)
    future = causal_mask(sq, sk, scores.device).logical_not()
    return torch.softmax((scores * scale).masked_fill(future, float("-inf")), dim=-1)


def causal_mask(sq: int, sk: int, device=None) -> torch.Tensor:
    """``[sq, sk]`` bool, True where query i (position ``sk - sq + i``) may see key j (``j <= sk - sq + i``)."""
    return torch.ones(sq, sk, dtype=torch.bool, device=device).tril(sk - sq)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float = 0.0,
                        training: bool = False, fused: bool = False, softmax_in_fp32: bool = False) -> torch.Tensor:
    """The attention of the paper, step by step: ``softmax(q k^T / sqrt(d), causal) v`` (the documented reference).

    ``q [b, nh, sq, hd]``, ``k, v [b, nh, sk, hd]`` with ``sq <= sk`` (the queries
    are the last ``sq`` positions). Used with the fused kernels and by the
    tests; the default path calls ``F.scaled_dot_product_attention``, which
    computes the same without materialising ``[b, nh, sq, sk]``.
    """
    b, nh, sq, hd = q.shape
    sk = k.size(2)
    scores = torch.matmul(q, k.transpose(-1, -2))                          # [b, nh, sq, sk]
    probs = scaled_causal_softmax(scores.reshape(b * nh, sq, sk), hd ** -0.5, fused,
                                  softmax_in_fp32).view(b, nh, sq, sk)
    probs = apply_dropout(probs, dropout, training)
    return torch.matmul(probs, v)                                          # [b, nh, sq, hd]


def attention_with_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout: float,
                           softmax_in_fp32: bool = False) -> torch.Tensor:
    """Causal attention with dropout on the probabilities: the training path on the CPU.

    ``F.scaled_dot_product_attention`` has a fused CPU kernel only without dropout. With dropout it
    runs its step-by-step "math" path, whose "safe softmax" adds three passes over the
    ``[b, nh, sq, sk]`` scores (``isneginf``, ``all``, ``where``: a row with every key masked gives 0,
    which a causal mask never has), and draws its dropout mask with ``bernoulli_``. Here the mask enters
    the scores' matrix multiply as a ``-inf`` bias (``baddbmm``), the scale is applied to q, sk/hd times
    smaller than the scores, and the dropout is :func:`~lessons_pkg.tensor_parallel.dropout.dropout`
    (15-bit masks, a quarter of ``bernoulli_``'s time). The same maths as SDPA (tested without dropout)
    and as :func:`attention_reference`, dropout mask included (tested: same random state, same mask).
    ``q [b, nh, sq, hd]`` are the last ``sq`` of the ``sk`` positions. ``softmax_in_fp32``: 16-bit
    scores are normalised in float32.
    """
    b, nh, sq, hd = q.shape
    sk = k.size(2)
    bias = torch.zeros(sq, sk, dtype=q.dtype, device=q.device).masked_fill_(
        causal_mask(sq, sk, q.device).logical_not(), float("-inf"))        # [sq, sk]: 0 or -inf
    scores = torch.baddbmm(bias, (q * hd ** -0.5).reshape(b * nh, sq, hd),
                           k.reshape(b * nh, sk, hd).transpose(1, 2))       # [b*nh, sq, sk]
    if softmax_in_fp32 and scores.dtype in (torch.float16, torch.bfloat16):
        probs = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = apply_dropout(probs, dropout, True)
    return torch.matmul(probs.view(b, nh, sq, sk), v)                      # [b, nh, sq, hd]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that can call the fused kernel; replicated on every tensor-parallel rank."""

    def __init__(self, hidden_size: int, eps: float, fused: bool = False):
        super().__init__(hidden_size, eps=eps)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from lessons_pkg import kernels

            dtype = _kernel_dtype(x)  # x and the float32 weights in one dtype, as under autocast
            return kernels.layer_norm(x.to(dtype), self.weight.to(dtype), self.bias.to(dtype), self.eps).to(x.dtype)
        return super().forward(x)


class ParallelMLP(nn.Module):
    """h -> 4h (column-parallel) -> GeLU -> 4h -> h (row-parallel), no gather or scatter between.

    GeLU is not additive, so the 4h activations must be split by columns (each
    rank owns whole output features and applies GeLU to them locally); the
    row-parallel layer then consumes exactly that split. Returns
    ``(output, output_bias)``: the bias is added by the caller, fused with
    dropout and the residual.
    """

    def __init__(self, config: GPTConfig, tp_group: dist.ProcessGroup | None = None):
        super().__init__()
        self.fused = config.use_fused_kernels
        self.gelu = config.gelu_approximate  # F.gelu's approximate=: "tanh" (GPT-2) or "none" (exact)
        sp = config.sequence_parallel
        self.dense_h_to_4h = ColumnParallelLinear(
            config.hidden_size, config.ffn_hidden_size, gather_output=False, skip_bias_add=True,
            init_method=init_method_normal(config.init_method_std), tp_group=tp_group, sequence_parallel=sp)
        self.dense_4h_to_h = RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, input_is_parallel=True, skip_bias_add=True,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers), tp_group=tp_group,
            sequence_parallel=sp)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        intermediate, bias = self.dense_h_to_4h(x)                           # [b, s, h] -> [b, s, 4h/tp] (SP: from s/tp)
        intermediate = bias_gelu(intermediate, bias, self.fused, self.gelu)  # local: whole columns on this rank
        return self.dense_4h_to_h(intermediate)                              # [b, s, 4h/tp] -> [b, s, h] (all-reduce)
                                                                             #   (SP: reduce-scatter to [b, s/tp, h])


class ParallelAttention(nn.Module):
    """Causal self-attention with the heads split across ranks.

    The fused QKV projection is column-parallel. Its full weight ``[3h, h]``
    stores the rows head by head, ``[head 0: q k v | head 1: q k v | ...]``
    (Megatron's layout), so rank r's contiguous rows are the q, k and v of its
    ``heads / tp`` heads. Attention per head needs nothing from other heads;
    the output projection is row-parallel and sums the ranks' contributions.
    Returns ``(output, output_bias)``.

    Generation passes ``kv_cache`` (one layer's view of a
    :class:`lessons_pkg.inference.KVCache`): the new tokens' k and v are
    appended to it and the queries attend to every cached position. Each rank
    caches only its own ``heads / tp`` heads, ``[b, heads/tp, positions, hd]``.
    """

    def __init__(self, config: GPTConfig, tp_group: dist.ProcessGroup | None = None,
                 cp_group: dist.ProcessGroup | None = None):
        super().__init__()
        tp_group, tp_size, _ = resolve_tp_group(tp_group)
        self.cp_group = cp_group if cp_group is not None and dist.get_world_size(cp_group) > 1 else None
        if self.cp_group is not None and config.attention_dropout > 0:
            raise ValueError(f"context parallelism computes attention as a ring, without dropout: attention_dropout "
                             f"must be 0, got {config.attention_dropout} (--attention-dropout 0)")
        self.fused = config.use_fused_kernels
        self.head_dim = config.head_dim
        self.num_heads_per_partition = divide(config.num_attention_heads, tp_size, what="num_attention_heads")
        self.attention_dropout = config.attention_dropout
        self.softmax_in_fp32 = config.attention_softmax_in_fp32
        self.unfused = config.attention_backend in ("unfused", "local")
        self.sequence_parallel = config.sequence_parallel
        self.query_key_value = ColumnParallelLinear(
            config.hidden_size, 3 * config.hidden_size, gather_output=False,
            init_method=init_method_normal(config.init_method_std), tp_group=tp_group,
            sequence_parallel=config.sequence_parallel)
        self.dense = RowParallelLinear(
            config.hidden_size, config.hidden_size, input_is_parallel=True, skip_bias_add=True,
            init_method=scaled_init_method_normal(config.init_method_std, config.num_layers), tp_group=tp_group,
            sequence_parallel=config.sequence_parallel)

    def forward(self, x: torch.Tensor, kv_cache=None) -> tuple[torch.Tensor, torch.Tensor]:
        if kv_cache is not None and (self.sequence_parallel or self.cp_group is not None):
            raise ValueError("a key/value cache (generation) needs the whole sequence on every rank: build the "
                             "model without sequence or context parallelism for inference (the same weights)")
        nh, hd = self.num_heads_per_partition, self.head_dim
        qkv, _ = self.query_key_value(x)                            # [b, s, h] -> [b, s, 3h/tp] (SP: from s/tp)
        b, s = qkv.shape[:2]
        qkv = qkv.view(b, s, nh, 3, hd)                             # this rank's heads, each [q k v]
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(3))        # 3 x [b, nh, s, hd] (backward: one stack)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)                            # 2 x [b, nh, cached + s, hd]
        context = self.core_attention(q, k, v)                      # [b, nh, s, hd]
        context = context.transpose(1, 2).reshape(b, s, nh * hd)    # [b, s, h/tp]
        return self.dense(context)                                  # [b, s, h/tp] -> [b, s, h] (all-reduce)
                                                                    #   (SP: reduce-scatter to [b, s/tp, h])

    def core_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention of ``q [b, nh, sq, hd]`` (the last ``sq`` positions) over ``k, v [b, nh, sk, hd]``."""
        if self.cp_group is not None:   # this rank's two chunks of the sequence, the other ranks' round the ring
            return ring_attention(q, k, v, self.cp_group, causal=True)[0]
        dropout = self.attention_dropout if self.training else 0.0
        if self.fused or self.unfused:
            return attention_reference(q, k, v, dropout, self.training, fused=self.fused,
                                       softmax_in_fp32=self.softmax_in_fp32)
        if dropout > 0 and q.device.type == "cpu":  # SDPA has no fused CPU kernel with dropout
            return attention_with_dropout(q, k, v, dropout, self.softmax_in_fp32)
        # SDPA's kernels accumulate the softmax in float32 whatever q's dtype: attention_softmax_in_fp32 holds
        sq, sk = q.size(2), k.size(2)
        if sq == sk:    # training, scoring, a prompt without cache: the square causal mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        if sq == 1:     # one new token: it sees every cached position, no mask
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
        # several new tokens after cached ones (is_causal would align the mask top-left: wrong here)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(sq, sk, q.device), dropout_p=dropout)


class ParallelTransformerLayer(nn.Module):
    """Pre-LN GPT block: ``x + Attn(LN(x))``, then ``x + MLP(LN(x))``, each with dropout.

    With ``config.sequence_parallel`` it maps ``[b, s/tp, h] -> [b, s/tp, h]``
    (this rank's tokens); its LayerNorms are tagged ``sequence_parallel``.
    """

    def __init__(self, config: GPTConfig, tp_group: dist.ProcessGroup | None = None,
                 cp_group: dist.ProcessGroup | None = None):
        super().__init__()
        fused, eps = config.use_fused_kernels, config.layernorm_epsilon
        _, tp_size, _ = resolve_tp_group(tp_group)
        self.sequence_parallel = config.sequence_parallel
        if self.sequence_parallel:
            check_sequence_parallel(tp_size)
        self.hidden_dropout = config.hidden_dropout
        self.input_layernorm = LayerNorm(config.hidden_size, eps, fused)
        self.self_attention = ParallelAttention(config, tp_group, cp_group)
        self.post_attention_layernorm = LayerNorm(config.hidden_size, eps, fused)
        self.mlp = ParallelMLP(config, tp_group)
        if self.sequence_parallel:  # they see only this rank's tokens: partial gradients
            for norm in (self.input_layernorm, self.post_attention_layernorm):
                mark_sequence_parallel(norm.weight, norm.bias)

    def _bias_dropout_add(self, x: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        generator = None
        if self.sequence_parallel and self.training and self.hidden_dropout > 0:
            generator = model_parallel_generator(x.device)   # each rank its own tokens' mask
        return residual + apply_dropout(x + bias, self.hidden_dropout, self.training, generator)

    def forward(self, x: torch.Tensor, kv_cache=None) -> torch.Tensor:
        attn, attn_bias = self.self_attention(self.input_layernorm(x), kv_cache)  # [b, s, h]
        x = self._bias_dropout_add(attn, attn_bias, x)
        mlp, mlp_bias = self.mlp(self.post_attention_layernorm(x))      # [b, s, h]
        return self._bias_dropout_add(mlp, mlp_bias, x)
