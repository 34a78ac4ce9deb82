"""The plain reference: one process, ``transformers``' ``GPT2LMHeadModel``, no windows library, no parallelism.

What :mod:`lessons_pkg.evaluation.loop` must reproduce at any TP x PP x DP:
the number of LAMBADA passages whose every target token is the argmax, the
sum of the targets' ``-log p``, and the WikiText sum of ``-log p`` with each
token scored once with the context ``--overlapping-eval`` allows. Written from
the definitions, one example at a time, so it shares no code with the fast path
but the tokenization.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def _log_probs(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits[0]             # [n, V]
    return F.log_softmax(logits.double(), dim=-1)              # [n, V]


@torch.no_grad()
def lambada_reference(model, contexts: list[list[int]], targets: list[list[int]], seq_length: int) -> dict:
    """Per passage: ``nll`` (sum over target tokens), ``correct`` (all argmax right), ``margin`` (smallest
    gap between the argmax and the runner-up logit over the target positions: how far from a tie)."""
    nll, correct, margins = [], [], []
    for context, target in zip(contexts, targets):
        ids = (context + target)[-(seq_length + 1):]            # keep the end, as the passage is truncated
        logits = model(torch.tensor([ids[:-1]])).logits[0]     # [n, V]
        positions = range(len(ids) - 1 - len(target), len(ids) - 1)
        lp = F.log_softmax(logits.double(), dim=-1)
        nll.append(-sum(float(lp[p, ids[p + 1]]) for p in positions))
        correct.append(all(int(logits[p].argmax()) == ids[p + 1] for p in positions))
        top2 = logits[list(positions)].topk(2, dim=-1).values
        margins.append(float((top2[:, 0] - top2[:, 1]).min()))
    return {"nll": nll, "correct": correct, "margin": margins}


@torch.no_grad()
def text_reference(model, tokens: list[int], seq_length: int, overlap: int) -> tuple[float, int]:
    """``(sum of -log p, tokens scored)``: token ``k >= 1`` is predicted from the window that first reaches it,
    which starts at the latest multiple of ``overlap`` that leaves ``k`` within ``seq_length`` of it."""
    total, count = 0.0, 0
    cache: dict[int, torch.Tensor] = {}
    for k in range(1, len(tokens)):
        # window w covers tokens [w * overlap, w * overlap + seq_length]; window 0 scores 1..seq_length, later
        # windows their last `overlap` labels: k belongs to the first window whose span reaches it
        w = 0 if k <= seq_length else -(-(k - seq_length) // overlap)
        start = w * overlap
        if start not in cache:
            cache = {start: _log_probs(model, tokens[start:start + seq_length])}
        total -= float(cache[start][k - 1 - start, tokens[k]])
        count += 1
    return total, count
