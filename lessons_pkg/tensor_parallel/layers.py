"""Megatron-LM's tensor-parallel layers: column- and row-parallel linear, vocab-parallel embedding.

Every layer holds only this rank's shard of the full weight and tags each
sharded parameter with ``tensor_model_parallel = True`` and ``partition_dim``
(the dimension of the full weight it was cut along), so checkpoint code can
cut and glue weights without knowing the layer. Layers take ``tp_group=``
(default: the tensor-parallel group of :mod:`lessons_pkg.parallel_state`, read
once here) and keep it.

Initialisation follows Megatron's CPU path: ``init_method`` fills the FULL
weight, then each rank keeps its slice. Ranks seeded alike therefore hold
slices of one and the same matrix, whatever the tensor-parallel size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from lessons_pkg.tensor_parallel.sequence_parallel import linear_with_sequence_gather, mark_sequence_parallel
from lessons_pkg.tensor_parallel.utils import check_token_ids, divide, vocab_range

InitMethod = Callable[[torch.Tensor], object]


@dataclass(frozen=True)
class TPShape:
    """A stand-in for a tensor-parallel group when only shapes matter: its size and this rank, no communication.

    ``ParallelGPT(config, TPShape(4, 1))`` on the meta device builds rank 1's
    shard of a TP=4 model without a process group (parameter counts, converters).
    Calling ``forward`` on such a model is an error.
    """
    size: int
    rank: int = 0


def resolve_tp_group(tp_group: dist.ProcessGroup | TPShape | None) -> tuple[dist.ProcessGroup | None, int, int]:
    """``(group, world_size, rank)`` of the tensor-parallel group a layer will use.

    ``None`` means the group of :mod:`lessons_pkg.parallel_state`, or a single
    process (no communication) when neither ``parallel_state`` nor
    ``torch.distributed`` is initialised.
    """
    if isinstance(tp_group, TPShape):
        if not 0 <= tp_group.rank < tp_group.size:
            raise ValueError(f"TPShape rank {tp_group.rank} is not within size {tp_group.size}")
        return tp_group, tp_group.size, tp_group.rank
    if tp_group is None:
        if parallel_state.model_parallel_is_initialized():
            tp_group = parallel_state.get_tensor_model_parallel_group()
        elif dist.is_initialized():
            raise RuntimeError(
                "tp_group is None but torch.distributed is initialised without model-parallel groups: "
                "call parallel_state.initialize_model_parallel(...) or pass tp_group="
            )
        else:
            return None, 1, 0
    return tp_group, dist.get_world_size(tp_group), dist.get_rank(tp_group)


def _init_shard(shard: torch.Tensor, full_shape: tuple[int, ...], partition_dim: int, rank: int,
                init_method: InitMethod) -> None:
    """Fill ``shard`` with this rank's slice of a full weight initialised by ``init_method``."""
    full = torch.empty(full_shape, dtype=shard.dtype)
    init_method(full)
    n = shard.size(partition_dim)
    with torch.no_grad():
        shard.copy_(full.narrow(partition_dim, rank * n, n))


def mark_partitioned(param: nn.Parameter, partition_dim: int) -> None:
    """Tag ``param`` as this rank's slice of a full weight cut along ``partition_dim`` (read by checkpointing)."""
    param.tensor_model_parallel = True
    param.partition_dim = partition_dim


class ColumnParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split by rows (the output features) across ranks.

    ::

        full A [out, in]           rank r holds          output on rank r
        +----------------+
        |   rank 0 rows  |         A_r [out/tp, in]      Y_r = X A_r^T + b_r   [b, s, out/tp]
        +----------------+
        |   rank 1 rows  |         b_r [out/tp]
        +----------------+

    The input ``X`` is replicated; its gradient is the sum of every rank's part,
    hence ``f`` (identity forward, all-reduce backward) in front of the matmul.
    ``gather_output=True`` all-gathers ``[b, s, out/tp] -> [b, s, out]``;
    ``skip_bias_add=True`` returns the bias instead of adding it (so a later
    op can fuse it, e.g. bias + GeLU). Returns ``(output, output_bias)``.

    ``sequence_parallel=True``: the input arrives as this rank's tokens
    ``[b, s/tp, in]`` and is all-gathered along the sequence in place of ``f``
    (its backward a reduce-scatter; :mod:`lessons_pkg.tensor_parallel.sequence_parallel`).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, gather_output: bool = True,
                 skip_bias_add: bool = False, init_method: InitMethod = nn.init.xavier_normal_,
                 tp_group: dist.ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.tp_size, self.tp_rank = resolve_tp_group(tp_group)
        self.input_size, self.output_size = input_size, output_size
        self.output_size_per_partition = divide(output_size, self.tp_size, what="output_size")
        self.gather_output, self.skip_bias_add = gather_output, skip_bias_add
        if sequence_parallel and gather_output:
            raise ValueError("a sequence-parallel ColumnParallelLinear keeps its output split: gather_output=False")
        self.sequence_parallel = sequence_parallel and self.tp_size > 1

        self.weight = nn.Parameter(torch.empty(self.output_size_per_partition, input_size))
        _init_shard(self.weight, (output_size, input_size), 0, self.tp_rank, init_method)
        mark_partitioned(self.weight, 0)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size_per_partition))
            mark_partitioned(self.bias, 0)
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = None if self.skip_bias_add else self.bias
        if self.sequence_parallel:                      # all-gather [b, s/tp, in] -> [b, s, in], then the matmul
            y = linear_with_sequence_gather(x, self.weight, bias, self.tp_group)  # -> [b, s, out/tp]
            return y, (self.bias if self.skip_bias_add else None)
        x = copy_to_tensor_model_parallel_region(x, self.tp_group)            # f
        y = F.linear(x, self.weight, bias)                                    # [b, s, in] -> [b, s, out/tp]
        if self.gather_output:
            y = gather_from_tensor_model_parallel_region(y, self.tp_group)   # [b, s, out/tp] -> [b, s, out]
        return y, (self.bias if self.skip_bias_add else None)

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size} (this rank: {self.output_size_per_partition}), "
                f"tp={self.tp_size}, gather_output={self.gather_output}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))


class RowParallelLinear(nn.Module):
    """``Y = X A^T + b`` with ``A`` split by columns (the input features) across ranks.

    ::

        full A [out, in]           rank r holds                 partial output on rank r
        +-------+-------+
        |rank 0 |rank 1 |          A_r [out, in/tp]             Y_r = X_r A_r^T   [b, s, out]
        | cols  | cols  |          (b is NOT split)             Y = sum_r Y_r + b  (all-reduce = g)
        +-------+-------+

    ``input_is_parallel=True`` means the input already arrives split
    ``[b, s, in/tp]`` (from a column-parallel layer without gather); otherwise
    it is scattered here. The bias is added once, after the all-reduce.
    Returns ``(output, output_bias)``.

    ``sequence_parallel=True``: the partial sums are reduce-scattered along the
    sequence in place of ``g``, ``[b, s, out] -> [b, s/tp, out]`` (its backward an
    all-gather); the bias then meets only this rank's tokens, so its gradient
    is partial (tagged ``sequence_parallel``, summed over the tensor group by
    the trainer).
    """

    def __init__(self, input_size: int, output_size: int, bias: bool = True, input_is_parallel: bool = False,
                 skip_bias_add: bool = False, init_method: InitMethod = nn.init.xavier_normal_,
                 tp_group: dist.ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.tp_size, self.tp_rank = resolve_tp_group(tp_group)
        self.input_size, self.output_size = input_size, output_size
        self.input_size_per_partition = divide(input_size, self.tp_size, what="input_size")
        self.input_is_parallel, self.skip_bias_add = input_is_parallel, skip_bias_add
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a sequence-parallel RowParallelLinear takes its input split: input_is_parallel=True")
        self.sequence_parallel = sequence_parallel and self.tp_size > 1

        self.weight = nn.Parameter(torch.empty(output_size, self.input_size_per_partition))
        _init_shard(self.weight, (output_size, input_size), 1, self.tp_rank, init_method)
        mark_partitioned(self.weight, 1)
        self.bias = nn.Parameter(torch.zeros(output_size)) if bias else None  # replicated on every rank
        if self.sequence_parallel:
            mark_sequence_parallel(self.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x, self.tp_group)    # [b, s, in] -> [b, s, in/tp]
        partial = F.linear(x, self.weight)                                    # [b, s, in/tp] -> [b, s, out]
        if self.sequence_parallel:   # sum over ranks, keep this rank's tokens: [b, s, out] -> [b, s/tp, out]
            y = reduce_scatter_to_sequence_parallel_region(partial, self.tp_group)
        else:
            y = reduce_from_tensor_model_parallel_region(partial, self.tp_group)  # g: sum over ranks
        if self.skip_bias_add or self.bias is None:
            return y, self.bias
        return y + self.bias, None

    def extra_repr(self) -> str:
        return (f"in={self.input_size} (this rank: {self.input_size_per_partition}), out={self.output_size}, "
                f"tp={self.tp_size}, input_is_parallel={self.input_is_parallel}"
                + (", sequence_parallel=True" if self.sequence_parallel else ""))


class VocabParallelEmbedding(nn.Module):
    """An embedding table split by vocabulary rows: rank r owns ids ``[r*n, (r+1)*n)``.

    ::

        full table [V, h]       ids 3, 9 with V=12, tp=2:
        +-------------+         rank 0 (ids 0..5):  row of 3,  zeros for 9
        | ids 0..5    | rank 0  rank 1 (ids 6..11): zeros for 3, row of 9
        +-------------+         all-reduce (g):     row of 3,  row of 9
        | ids 6..11   | rank 1
        +-------------+

    ``num_embeddings`` must already be padded to a multiple of tp (see
    :func:`~lessons_pkg.tensor_parallel.utils.vocab_size_with_padding`).
    ``sequence_parallel=True`` ends in a reduce-scatter instead:
    ``[b, s] -> [b, s/tp, h]``, this rank's tokens only.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, init_method: InitMethod = nn.init.xavier_normal_,
                 tp_group: dist.ProcessGroup | None = None, sequence_parallel: bool = False):
        super().__init__()
        self.tp_group, self.tp_size, self.tp_rank = resolve_tp_group(tp_group)
        self.sequence_parallel = sequence_parallel and self.tp_size > 1
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.num_embeddings_per_partition = divide(
            num_embeddings, self.tp_size, what="num_embeddings (the padded vocabulary size)")
        self.vocab_start_index, self.vocab_end_index = vocab_range(self.num_embeddings_per_partition, self.tp_rank)

        self.weight = nn.Parameter(torch.empty(self.num_embeddings_per_partition, embedding_dim))
        _init_shard(self.weight, (num_embeddings, embedding_dim), 0, self.tp_rank, init_method)
        mark_partitioned(self.weight, 0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # an id no rank owns would silently become a zero vector at tp > 1: refuse it
        check_token_ids(input_ids, self.num_embeddings, "VocabParallelEmbedding input")
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)                        # [b, s] -> [b, s, h]
        outside = (input_ids < self.vocab_start_index) | (input_ids >= self.vocab_end_index)
        local_ids = (input_ids - self.vocab_start_index).masked_fill(outside, 0)
        rows = F.embedding(local_ids, self.weight)                            # [b, s] -> [b, s, h]
        rows = rows.masked_fill(outside.unsqueeze(-1), 0.0)                   # ids of other ranks -> 0
        if self.sequence_parallel:                                            # [b, s, h] -> [b, s/tp, h]
            return reduce_scatter_to_sequence_parallel_region(rows, self.tp_group)
        return reduce_from_tensor_model_parallel_region(rows, self.tp_group)  # g: each id found on one rank

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, this rank: ids "
                f"[{self.vocab_start_index}, {self.vocab_end_index}), tp={self.tp_size}")
