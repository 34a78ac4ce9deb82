"""Solution ch5.2."""


def one_f_one_b_order(p: int, m: int, rank: int) -> list[str]:
    warmup = min(p - rank - 1, m)
    order = [f"F{i}" for i in range(warmup)]
    for i in range(m - warmup):  # steady state: a new forward, then the oldest backward
        order += [f"F{warmup + i}", f"B{i}"]
    order += [f"B{i}" for i in range(m - warmup, m)]
    return order
