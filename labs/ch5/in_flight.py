"""Exercise ch5.3: how many micro-batches' activations a stage holds at most.

A stage keeps a micro-batch's activations from its forward to its backward.
Write the largest number of micro-batches "in flight" (forward done, backward
not yet) on rank ``rank`` of a p-stage pipeline with m micro-batches, as a
formula, for "gpipe" and for "1f1b". Measure it first:

    python src/ch5/pipeline_memory.py --microbatches 2 4 8      # 4 ranks, saved-tensor bytes per stage

Check: python -m lessons_pkg.labs check ch5.3
"""


def peak_in_flight(schedule: str, p: int, m: int, rank: int) -> int:
    raise NotImplementedError("peak_in_flight(schedule, p, m, rank) for 'gpipe' and '1f1b'")
