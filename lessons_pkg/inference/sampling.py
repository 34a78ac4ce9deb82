"""Choosing the next token from the full-vocabulary logits of the last position.

Runs on ONE rank only, the sampler (tensor-parallel rank 0 of the last
pipeline stage), on logits gathered from every tensor-parallel rank and cut to
the real vocabulary (the padding Megatron adds for divisibility is never a
candidate). The chosen ids then reach every rank (``communication.py``), so
no two ranks ever need to draw the same random numbers.

The draw is the inverse of the cumulative distribution: one uniform
``u ~ U(0, 1)`` per sequence and step, and the token is the first id whose
cumulative probability exceeds ``u``. It consumes exactly ``b`` numbers of the
generator per step whatever the vocabulary size or the TP x PP layout, so a
seed gives the same tokens at every layout (the gathered probabilities agree
to ~1e-7; a token could differ only if ``u`` fell that close to a boundary).
"""
from __future__ import annotations

import torch


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """``logits [b, V]`` with every value below the k-th largest set to -inf (ties at the k-th are kept)."""
    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]                     # [b, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most likely tokens until their mass exceeds ``top_p`` (the token crossing it included).

    Megatron's rule: sort, cumulative softmax, drop a token when the mass of
    the tokens BEFORE it already exceeds ``top_p``; the most likely token always stays.
    """
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)         # [b, V]
    mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)                         # [b, V]
    drop_sorted = torch.zeros_like(mass, dtype=torch.bool)
    drop_sorted[:, 1:] = mass[:, :-1] > top_p                                   # the first token always stays
    drop = drop_sorted.scatter(-1, order, drop_sorted)                          # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def sample(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids ``[b]`` from full-vocabulary ``logits [b, V]`` (float32); ``top_k == 1`` is greedy."""
    if logits.dim() != 2:
        raise ValueError(f"expected logits [b, V], got {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the logits contain NaN or inf: the model's output is broken")
    if top_k == 1:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 1:
        logits = top_k_filter(logits, top_k)
    elif top_p > 0.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.double().softmax(dim=-1)                                     # [b, V]
    cdf = probs.cumsum(dim=-1)                                                  # [b, V], last column ~1
    u = torch.rand(logits.size(0), 1, dtype=torch.float64, generator=generator, device=logits.device)
    ids = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).squeeze(-1)     # first id with cdf > u
    return ids.clamp_(max=logits.size(-1) - 1)


def next_top_p(top_p: float, top_p_decay: float, top_p_bound: float) -> float:
    """Megatron's schedule: after each token ``top_p <- top_p * decay``, never below ``top_p_bound``."""
    if top_p > 0.0 and top_p_decay > 0.0:
        top_p = top_p * top_p_decay
        if top_p_bound > 0.0:
            top_p = max(top_p, top_p_bound)
    return top_p
