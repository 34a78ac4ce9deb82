"""Solution ch5.3.

Megatron's interleaved schedule warms up with 2 (p - r - 1) + (v - 1) p forwards
on rank r: the first rank must push p micro-batches through all v - 1 earlier
chunks before the first micro-batch can come back through its last chunk. The
steady state then adds one forward before each backward, so one more pair is in
flight, unless all m v forwards are already done. On rank 0 with p = 4, v = 2
that is 11 pairs = 5.5 stages' worth, against 1F1B's 4: interleaving buys its
smaller bubble with activation memory.
"""


def peak_in_flight(p: int, m: int, v: int, rank: int) -> int:
    warmup = min(2 * (p - rank - 1) + (v - 1) * p, m * v)
    return min(warmup + 1, m * v)
