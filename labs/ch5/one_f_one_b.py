"""Exercise ch5.2: the order in which one rank of a 1F1B pipeline (PipeDream-Flush) runs its work.

Return the actions of rank ``rank`` in a pipeline of p stages training m
micro-batches, as strings: "F3" is the forward of micro-batch 3 on this rank's
stage, "B0" the backward of micro-batch 0. What the order must achieve (the
checker measures each):

    it runs     every F and B once, each B after its F; the p ranks' orders together never leave a
                rank waiting for a message that never comes
    memory      rank r never holds more than min(m, p - r) micro-batches' activations
                (forward run, backward not yet), whatever m: this is why 1F1B exists
    time        the step takes no longer than GPipe's: 2(m + p - 1) unit steps when a forward and a
                backward each take one

How many forwards must rank r run before its first backward, so that the ranks
after it are never starved? And once a backward has freed a micro-batch, what
should come next?

The checker runs your orders for p = 2 on 2 processes through the course's
executor (``lessons_pkg.pipeline.forward_backward``): the losses and every
gradient must be those of one process, and saved-tensor hooks measure what each
rank holds. Then it checks p = 1..5, m = 1..8 on the unit-time simulator.

Try your orders on the simulator first (a table per pipeline, '.' = idle):

    python labs/ch5/one_f_one_b.py 4 6      # p = 4 stages, m = 6 micro-batches

Check: python -m lessons_pkg.labs check ch5.2
"""


def one_f_one_b_order(p: int, m: int, rank: int) -> list[str]:
    raise NotImplementedError("one_f_one_b_order(p, m, rank)")


if __name__ == "__main__":
    import sys

    from lessons_pkg.pipeline.schedules import Action, Schedule, format_table, in_flight, simulate

    p, m = (int(a) for a in sys.argv[1:3])
    orders = [[Action(a[0], int(a[1:])) for a in one_f_one_b_order(p, m, r)] for r in range(p)]
    schedule = Schedule("yours", p, m, 1, orders)
    grid = simulate(schedule)  # raises if the orders deadlock
    print(format_table(grid))
    print(f"{len(grid[0])} unit steps (GPipe: {2 * (m + p - 1)}); in flight per rank: "
          f"{[in_flight(schedule, r) for r in range(p)]} (at most {[min(m, p - r) for r in range(p)]})")
