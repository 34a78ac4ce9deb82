"""Process groups for tensor, context, data and pipeline parallelism, in Megatron-LM's rank order.

A job of ``world_size`` ranks is viewed as a 4-D grid ``pipeline x data x context x tensor``.
Tensor-parallel ranks are adjacent (they exchange the most data, so on a real
cluster they share a node and its NVLink), context-parallel ranks next (they
pass keys and values round a ring every layer), data-parallel ranks after
them, and pipeline stages are the slowest-varying index (Megatron's order
"tp-cp-dp-pp"):

    global_rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

Example, 8 ranks with TP=2, PP=2 (so DP=2, CP=1)::

    tensor groups    [0, 1] [2, 3] [4, 5] [6, 7]
    data groups      [0, 2] [1, 3] [4, 6] [5, 7]
    pipeline groups  [0, 4] [1, 5] [2, 6] [3, 7]
    embedding groups [0, 4] [1, 5] [2, 6] [3, 7]   (first and last stage, for tied embeddings)

With CP=2 (8 ranks, TP=2, CP=2, DP=2): context groups [0, 2] [1, 3] [4, 6] [5, 7],
data groups [0, 4] [1, 5] [2, 6] [3, 7]. Context-parallel ranks hold different
tokens of the same samples, so gradients are averaged over data x context
(``get_data_parallel_group(with_context_parallel=True)``: [0, 2, 4, 6] [1, 3, 5, 7]),
as Megatron does; samples are read per data-parallel rank.

Layers receive their group explicitly (``tp_group=...``); the accessors below
are how a training script finds the groups to hand them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

_DEFAULT_TIMEOUT_S = 300


@dataclass
class _Groups:
    tp_size: int
    pp_size: int
    dp_size: int
    tensor: dist.ProcessGroup
    pipeline: dist.ProcessGroup
    data: dist.ProcessGroup
    embedding: dist.ProcessGroup | None
    tensor_ranks: list[int]
    pipeline_ranks: list[int]
    data_ranks: list[int]
    embedding_ranks: list[int]
    cp_size: int = 1
    context: dist.ProcessGroup | None = None
    data_context: dist.ProcessGroup | None = None
    context_ranks: list[int] = field(default_factory=list)
    data_context_ranks: list[int] = field(default_factory=list)


_GROUPS: _Groups | None = None


def default_backend() -> str:
    """'nccl' when CUDA is present with one GPU per local rank, else 'gloo'.

    The environment variable ``LESSONS_BACKEND`` overrides the choice.
    """
    if os.environ.get("LESSONS_BACKEND"):
        return os.environ["LESSONS_BACKEND"]
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world:
        return "nccl"
    return "gloo"


def init_distributed(backend: str | None = None, timeout_s: float | None = None) -> None:
    """Initialise the default process group from torchrun's environment, once.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``. With
    nccl, each rank takes the GPU of its ``LOCAL_RANK``. ``timeout_s`` (default
    ``LESSONS_DIST_TIMEOUT`` or 300 s) bounds every collective, so a lost peer
    ends the job with an error instead of a hang.
    """
    if dist.is_initialized():
        return
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"torch.distributed is not initialised and the environment lacks {missing}: "
            "start this program with torchrun (e.g. `torchrun --nproc_per_node 2 script.py`)"
        )
    backend = backend or default_backend()
    if timeout_s is None:
        timeout_s = float(os.environ.get("LESSONS_DIST_TIMEOUT", _DEFAULT_TIMEOUT_S))
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if local_rank >= gpus:
            from lessons_pkg.errors import UserError

            raise UserError(f"the nccl backend needs one CUDA GPU per rank: LOCAL_RANK {local_rank}, "
                            f"{gpus} GPU(s) on this node; use gloo (the default without GPUs)")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))


def get_device() -> torch.device:
    """The device this rank computes on: its GPU under nccl, else the CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def check_parallel_sizes(world_size: int, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                         context_parallel_size: int = 1) -> int:
    """Return the data-parallel size, or raise ``ValueError`` naming the sizes that do not fit."""
    tp, pp, cp = tensor_model_parallel_size, pipeline_model_parallel_size, context_parallel_size
    for name, value in (("tensor_model_parallel_size", tp), ("pipeline_model_parallel_size", pp),
                        ("context_parallel_size", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if world_size % (tp * pp * cp) != 0:
        sizes = f"tensor_model_parallel_size ({tp}) x pipeline_model_parallel_size ({pp})"
        if cp > 1:
            sizes += f" x context_parallel_size ({cp})"
        raise ValueError(f"world size ({world_size}) is not divisible by {sizes} = {tp * pp * cp}")
    return world_size // (tp * pp * cp)


def rank_grid(world_size: int, tp: int, pp: int, cp: int = 1) -> dict[str, list[list[int]]]:
    """All tensor, context, data, data x context, pipeline and embedding groups as lists of global ranks."""
    dp = check_parallel_sizes(world_size, tp, pp, cp)

    def rank(t: int, d: int, p: int, c: int = 0) -> int:
        return t + tp * (c + cp * (d + dp * p))

    tensor = [[rank(t, d, p, c) for t in range(tp)] for p in range(pp) for d in range(dp) for c in range(cp)]
    context = [[rank(t, d, p, c) for c in range(cp)] for p in range(pp) for d in range(dp) for t in range(tp)]
    data = [[rank(t, d, p, c) for d in range(dp)] for p in range(pp) for c in range(cp) for t in range(tp)]
    data_context = [[rank(t, d, p, c) for d in range(dp) for c in range(cp)] for p in range(pp) for t in range(tp)]
    pipeline = [[rank(t, d, p, c) for p in range(pp)] for d in range(dp) for c in range(cp) for t in range(tp)]
    embedding = [[g[0], g[-1]] if pp > 1 else [g[0]] for g in pipeline]
    return {"tensor": tensor, "data": data, "pipeline": pipeline, "embedding": embedding, "context": context,
            "data_context": data_context}


def initialize_model_parallel(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    backend: str | None = None,
    context_parallel_size: int = 1,
) -> None:
    """Create the tensor, context, pipeline, data-parallel and embedding groups of this job.

    Initialises the default process group from torchrun's environment first if
    needed. Every rank must call this with the same sizes (``new_group`` is a
    collective call).
    """
    global _GROUPS
    if _GROUPS is not None:
        raise RuntimeError("model parallel groups are already initialised; call destroy_model_parallel() first")
    world_size = int(os.environ.get("WORLD_SIZE", "0")) if not dist.is_initialized() else dist.get_world_size()
    if not dist.is_initialized() and world_size == 0:
        raise ValueError("world size is 0: WORLD_SIZE is unset or 0; start the program with torchrun")
    # validate before creating anything
    cp = context_parallel_size
    check_parallel_sizes(world_size, tensor_model_parallel_size, pipeline_model_parallel_size, cp)
    init_distributed(backend)
    world_size, me = dist.get_world_size(), dist.get_rank()
    grid = rank_grid(world_size, tensor_model_parallel_size, pipeline_model_parallel_size, cp)

    mine: dict[str, tuple[dist.ProcessGroup | None, list[int]]] = {}
    kinds = ("tensor", "data", "pipeline", "embedding") + (("context", "data_context") if cp > 1 else ())
    for kind in kinds:
        for ranks in grid[kind]:
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if me in ranks:
                mine[kind] = (group, ranks)
    _GROUPS = _Groups(
        tp_size=tensor_model_parallel_size,
        pp_size=pipeline_model_parallel_size,
        dp_size=world_size // (tensor_model_parallel_size * pipeline_model_parallel_size * cp),
        tensor=mine["tensor"][0],
        pipeline=mine["pipeline"][0],
        data=mine["data"][0],
        embedding=mine["embedding"][0] if "embedding" in mine else None,
        tensor_ranks=mine["tensor"][1],
        pipeline_ranks=mine["pipeline"][1],
        data_ranks=mine["data"][1],
        embedding_ranks=mine["embedding"][1] if "embedding" in mine else [],
        cp_size=cp,
        context=mine["context"][0] if cp > 1 else None,
        data_context=mine["data_context"][0] if cp > 1 else mine["data"][0],
        context_ranks=mine["context"][1] if cp > 1 else [me],
        data_context_ranks=mine["data_context"][1] if cp > 1 else mine["data"][1],
    )


def model_parallel_is_initialized() -> bool:
    return _GROUPS is not None


def destroy_model_parallel() -> None:
    """Forget the groups (the default process group stays)."""
    global _GROUPS
    _GROUPS = None


def _groups() -> _Groups:
    if _GROUPS is None:
        raise RuntimeError("model parallel groups are not initialised: call initialize_model_parallel() first")
    return _GROUPS


# --- tensor parallel -------------------------------------------------------
def get_tensor_model_parallel_group() -> dist.ProcessGroup:
    return _groups().tensor


def get_tensor_model_parallel_world_size() -> int:
    return _groups().tp_size


def get_tensor_model_parallel_rank() -> int:
    return _groups().tensor_ranks.index(dist.get_rank())


def get_tensor_model_parallel_src_rank() -> int:
    """Global rank of tensor-parallel rank 0 in this rank's tensor group."""
    return _groups().tensor_ranks[0]


# --- pipeline parallel -----------------------------------------------------
def get_pipeline_model_parallel_group() -> dist.ProcessGroup:
    return _groups().pipeline


def get_pipeline_model_parallel_world_size() -> int:
    return _groups().pp_size


def get_pipeline_model_parallel_rank() -> int:
    return _groups().pipeline_ranks.index(dist.get_rank())


def get_pipeline_model_parallel_ranks() -> list[int]:
    """Global ranks of this rank's pipeline, stage 0 first."""
    return list(_groups().pipeline_ranks)


def get_pipeline_model_parallel_next_rank() -> int:
    ranks = _groups().pipeline_ranks
    return ranks[(ranks.index(dist.get_rank()) + 1) % len(ranks)]


def get_pipeline_model_parallel_prev_rank() -> int:
    ranks = _groups().pipeline_ranks
    return ranks[(ranks.index(dist.get_rank()) - 1) % len(ranks)]


def is_pipeline_first_stage() -> bool:
    return get_pipeline_model_parallel_rank() == 0


def is_pipeline_last_stage() -> bool:
    return get_pipeline_model_parallel_rank() == get_pipeline_model_parallel_world_size() - 1


# --- context parallel --------------------------------------------------------
def get_context_parallel_group() -> dist.ProcessGroup | None:
    """The ranks holding the other tokens of this rank's sequences (None when CP=1: no communication)."""
    return _groups().context


def get_context_parallel_world_size() -> int:
    return _groups().cp_size


def get_context_parallel_rank() -> int:
    return _groups().context_ranks.index(dist.get_rank())


def get_context_parallel_ranks() -> list[int]:
    return list(_groups().context_ranks)


# --- data parallel ---------------------------------------------------------
def get_data_parallel_group(with_context_parallel: bool = False) -> dist.ProcessGroup:
    """The data-parallel group; ``with_context_parallel``: data x context, over which gradients are averaged."""
    return _groups().data_context if with_context_parallel else _groups().data


def get_data_parallel_world_size(with_context_parallel: bool = False) -> int:
    g = _groups()
    return g.dp_size * g.cp_size if with_context_parallel else g.dp_size


def get_data_parallel_rank(with_context_parallel: bool = False) -> int:
    ranks = _groups().data_context_ranks if with_context_parallel else _groups().data_ranks
    return ranks.index(dist.get_rank())


def get_data_parallel_ranks(with_context_parallel: bool = False) -> list[int]:
    return list(_groups().data_context_ranks if with_context_parallel else _groups().data_ranks)


# --- embedding (first + last pipeline stage, for tied word embeddings) -----
def get_embedding_group() -> dist.ProcessGroup | None:
    """Group of the first and last pipeline stage holding this rank, or None if this rank is in neither."""
    return _groups().embedding


def get_embedding_ranks() -> list[int]:
    return list(_groups().embedding_ranks)
