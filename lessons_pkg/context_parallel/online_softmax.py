"""Attention in blocks: each block's result with its log-sum-exp, and the rule that merges two of them.

For one query, attention over keys ``K = K_a ∪ K_b`` is

    out = sum_j softmax(s)_j v_j,    s_j = q . k_j / sqrt(d),    lse = log sum_j exp(s_j)

Split the sum over the two blocks: with ``lse_a``, ``out_a`` the same over ``K_a``
alone (and ``b`` likewise), ``exp(lse) = exp(lse_a) + exp(lse_b)`` and

    out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

since ``out_a`` is normalised by ``exp(lse_a)``. So a query can see the keys one
block at a time, keeping only ``(out, lse)``: the "online softmax" of flash
attention, and what lets ring attention never hold more than one block of
another rank's keys. :func:`merge_partial_attention` is the rule;
:func:`block_attention` computes one block's ``(out, lse)`` step by step;
:func:`full_attention` is the plain reference (the whole sequence at once).
"""
from __future__ import annotations

import torch

FULL, CAUSAL = "full", "causal"


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str = FULL
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [b, nh, sq, hd], lse [b, nh, sq])`` of ``q [b, nh, sq, hd]`` over ``k, v [b, nh, sk, hd]``.

    ``mask``: ``"full"`` (every key), or ``"causal"`` for a diagonal block (query i sees keys ``<= i``;
    ``sq == sk``, the two blocks being the same positions). Computed in float32; ``out`` in q's dtype.
    """
    scale = q.size(-1) ** -0.5
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale      # [b, nh, sq, sk]
    if mask == CAUSAL:
        sq, sk = scores.shape[-2:]
        if sq != sk:
            raise ValueError(f"a causal (diagonal) block must be square, got {sq} queries and {sk} keys")
        future = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
    elif mask != FULL:
        raise ValueError(f"mask must be 'full' or 'causal', got {mask!r}")
    lse = torch.logsumexp(scores, dim=-1)                                       # [b, nh, sq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, v.float()).to(q.dtype), lse


def merge_partial_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over two key blocks from each block's ``(out, lse)``: ``(out, lse)`` over both."""
    lse = torch.logaddexp(lse_a, lse_b)                                         # [b, nh, sq]
    wa = torch.exp(lse_a - lse).unsqueeze(-1).to(out_a.dtype)
    wb = torch.exp(lse_b - lse).unsqueeze(-1).to(out_b.dtype)
    return wa * out_a + wb * out_b, lse


def full_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference: ``(out, lse)`` of the whole sequence at once, ``[b, nh, s, hd]`` in."""
    return block_attention(q, k, v, CAUSAL if causal else FULL)
