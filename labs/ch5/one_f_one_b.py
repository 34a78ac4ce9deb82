"""Exercise ch5.2: the order in which one pipeline rank runs 1F1B (PipeDream-Flush).

Return rank ``rank``'s actions for p stages and m micro-batches as strings:
"F3" is the forward of micro-batch 3, "B0" the backward of micro-batch 0.
1F1B has three phases:

    warm-up:     rank r runs min(p - r - 1, m) forwards
    steady:      then one forward and one backward, alternating, while forwards remain
    cool-down:   the remaining backwards

For p = 4, m = 6, rank 0: F0 F1 F2 F3 B0 F4 B1 F5 B2 B3 B4 B5.

Check: python -m lessons_pkg.labs check ch5.2     (compared for p = 1..5, m = 1..8, every rank)
"""


def one_f_one_b_order(p: int, m: int, rank: int) -> list[str]:
    raise NotImplementedError("one_f_one_b_order(p, m, rank)")
