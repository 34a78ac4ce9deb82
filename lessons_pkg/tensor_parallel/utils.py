"""Small helpers of tensor parallelism: exact division, splitting a tensor, vocabulary ranges and padding."""
from __future__ import annotations

import torch


def divide(numerator: int, denominator: int, what: str = "size", by: str = "tensor_model_parallel_size") -> int:
    """``numerator // denominator``, or a ``ValueError`` naming both when it does not divide."""
    if numerator % denominator != 0:
        raise ValueError(f"{what} ({numerator}) is not divisible by {by} ({denominator})")
    return numerator // denominator


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int) -> tuple[torch.Tensor, ...]:
    """Split ``[..., n]`` into ``num_partitions`` views ``[..., n / num_partitions]``."""
    last = divide(tensor.size(-1), num_partitions, what="last dimension", by="the number of partitions")
    return torch.split(tensor, last, dim=-1)


def vocab_range(partition_vocab_size: int, rank: int) -> tuple[int, int]:
    """The ids ``[start, end)`` owned by ``rank`` when each rank holds ``partition_vocab_size`` of them."""
    start = rank * partition_vocab_size
    return start, start + partition_vocab_size


def check_token_ids(ids: torch.Tensor, size: int, what: str, ignore_index: int | None = None) -> None:
    """Raise ``ValueError`` naming an id of ``ids`` outside ``[0, size)`` (``ignore_index`` excepted).

    Cheap: a min/max over the ``[b, s]`` ids (nothing over the vocabulary), and
    one device synchronisation on a GPU. Every rank of a tensor-parallel group
    sees the same ids, so all of them raise together, before any collective.
    """
    if ids.numel() == 0:
        return
    kept = ids if ignore_index is None else ids[ids != ignore_index]
    if kept.numel() == 0:
        return
    low, high = torch.aminmax(kept)
    if low < 0 or high >= size:
        bad = int(low) if low < 0 else int(high)
        also = f" (and not the ignore index {ignore_index})" if ignore_index is not None else ""
        raise ValueError(f"{what}: token id {bad} is outside [0, {size}){also}; the vocabulary has {size} ids")


def vocab_size_with_padding(
    vocab_size: int, tensor_model_parallel_size: int = 1, make_vocab_size_divisible_by: int = 128
) -> tuple[int, int]:
    """Pad the vocabulary as Megatron-LM does; return ``(padded_size, number_of_dummy_tokens)``.

    The padded size is the next multiple of ``make_vocab_size_divisible_by x tp``,
    so every rank holds the same number of rows and that number is a multiple of
    ``make_vocab_size_divisible_by`` (a friendly size for matrix-multiply kernels).
    GPT-2's 50257 becomes 50304 at TP=1, 50432 at TP=2, 50688 at TP=4.
    """
    for name, value in (("vocab_size", vocab_size), ("tensor_model_parallel_size", tensor_model_parallel_size),
                        ("make_vocab_size_divisible_by", make_vocab_size_divisible_by)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    multiple = make_vocab_size_divisible_by * tensor_model_parallel_size
    padded = -(-vocab_size // multiple) * multiple  # ceil to a multiple
    return padded, padded - vocab_size


def mask_vocab_padding(logits: torch.Tensor, vocab_size: int, tp_rank: int) -> torch.Tensor:
    """This rank's logits ``[..., V_pad/tp]`` with the dummy tokens (global id >= ``vocab_size``) set to -inf.

    The dummy rows exist only so the vocabulary splits evenly; no text contains
    them. Megatron lets their logits into the softmax; we mask them out of the
    loss, sampling and scoring, so they take no probability. It matters for
    imported weights: GPT-2's real logits are mostly well below 0, while a
    zero-filled dummy row scores exactly 0 for every input.
    """
    partition = logits.size(-1)
    start = tp_rank * partition
    if start + partition <= vocab_size:
        return logits
    ids = torch.arange(start, start + partition, device=logits.device)
    return logits.masked_fill(ids >= vocab_size, float("-inf"))
