"""Solution ch5.1. Bubble fraction (p - 1) / (v*m + p - 1) < 0.1  <=>  v*m > 9 (p - 1) = 27 at p = 4.

1F1B (v = 1): m > 27, so m = 28 (m = 27 gives exactly 10%, not under).
Interleaved (v = 2): 2m > 27, so m >= 14, and m must be a multiple of p = 4: m = 16.
The simulator and the measured timelines agree with the formula.
"""

FEWEST_MICROBATCHES_1F1B = 28
FEWEST_MICROBATCHES_INTERLEAVED = 16
