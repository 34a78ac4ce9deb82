"""Solution ch5.2.

Rank r must have sent enough micro-batches down the pipe to keep the p - r - 1
ranks after it busy until the first gradient comes back: p - r - 1 forwards of
warm-up (the last rank none), or m if there are fewer. From then on each
backward frees one micro-batch and the next forward takes its place (steady
state), and the last forwards are followed by the remaining backwards
(cool-down). At most warm-up + 1 = p - r micro-batches are ever in flight.
"""


def one_f_one_b_order(p: int, m: int, rank: int) -> list[str]:
    warmup = min(p - rank - 1, m)
    order = [f"F{i}" for i in range(warmup)]
    for i in range(m - warmup):  # steady state: a new forward, then the oldest backward
        order += [f"F{warmup + i}", f"B{i}"]
    order += [f"B{i}" for i in range(m - warmup, m)]
    return order
