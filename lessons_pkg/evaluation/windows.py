"""What gets scored: a :class:`Sample`, and Megatron's ``--overlapping-eval`` windows over a long text.

A sample is token ids ``t_0 .. t_n`` and a mask over the labels ``t_1 .. t_n``:
the model reads ``t_0 .. t_{n-1}`` and its prediction at position ``j`` is
scored against ``t_{j+1}`` where ``mask[j]`` is 1.

A text longer than the model's ``seq_length`` is cut into windows of
``seq_length + 1`` tokens that start every ``overlap`` tokens
(``--overlapping-eval``, default ``seq_length``: no overlap). Window 0 scores
all its labels; every later window scores only its last ``overlap`` labels,
the ones no earlier window scored, with ``seq_length - overlap`` tokens of
context before them. Every token but the first is therefore scored exactly
once, and a smaller overlap buys more context per token for more windows::

    seq_length 8, overlap 4, 14 tokens (13 labels)
    window 0  tokens 0..8    labels 1..8   all scored      x x x x x x x x
    window 1  tokens 4..12   labels 5..12  last 4 scored   . . . . x x x x
    window 2  tokens 8..13   labels 9..13  last 4 scored   . . . . x _ _ _   (_ = beyond the text)
    window 3  tokens 12..13  label 13      nothing new     .

(Megatron's ``_LMDataset`` pads a short window with the end-of-document id;
the padding is never scored, so :func:`overlapping_windows` leaves it out. It
also counts windows as if the first one scored only ``overlap`` labels, which
can add windows like window 3 above that score nothing: they are dropped.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Sample:
    tokens: list[int]       # t_0 .. t_n
    mask: list[int]         # n entries: 1 where the prediction of t_{j+1} counts

    def __post_init__(self):
        if len(self.mask) != len(self.tokens) - 1:
            raise ValueError(f"a sample of {len(self.tokens)} tokens needs {len(self.tokens) - 1} mask entries, "
                             f"got {len(self.mask)}")


def num_windows(num_tokens: int, seq_length: int, overlap: int) -> int:
    """Megatron's count: the first window, then one per ``overlap`` labels left (at least one window)."""
    targets = max(num_tokens - 1 - overlap, 0)
    return max(math.ceil(targets / overlap) + 1, 1)


def overlapping_windows(tokens: list[int], seq_length: int, overlap: int | None = None) -> list[Sample]:
    """The windows of ``tokens`` for ``--overlapping-eval overlap`` (None: ``seq_length``, no overlap)."""
    overlap = seq_length if overlap is None else overlap
    if not 1 <= overlap <= seq_length:
        # Megatron clamps below at 1 and would silently skip tokens above seq_length
        raise ValueError(f"--overlapping-eval ({overlap}) must be between 1 and the sequence length ({seq_length})")
    if len(tokens) < 2:
        raise ValueError(f"a text of {len(tokens)} token(s) has nothing to predict")
    windows = []
    for i in range(num_windows(len(tokens), seq_length, overlap)):
        start = i * overlap
        window = tokens[start:start + seq_length + 1]
        mask = [1] * (len(window) - 1)
        if i > 0 and overlap != seq_length:
            # only the labels at positions seq_length - overlap .. seq_length - 1 are new
            for j in range(min(seq_length - overlap, len(mask))):
                mask[j] = 0
        if any(mask):
            windows.append(Sample(list(window), mask))
    return windows
