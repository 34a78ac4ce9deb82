"""Exercise ch5.3: how many micro-batches' activations a rank of interleaved 1F1B holds at most.

With interleaving (notebook 05, section 7; Megatron-LM's schedule) each rank
holds v model chunks, and every micro-batch passes each rank v times, once per
chunk. Each pass keeps that chunk's activations until its backward. Write the
largest number of (micro-batch, chunk) pairs in flight (forward run, backward
not yet) on rank ``rank`` of p stages, m micro-batches (a multiple of p) and
v >= 2 chunks per rank, as a formula.

Measure it first:

    python src/ch5/pipeline_memory.py --microbatches 4 8 16     # 4 ranks; the 'interleaved v=2' rows

(there a chunk is one Linear + tanh layer, and one micro-batch through it saves
1.00 MiB: its input and its output), or count on the simulator:

    from lessons_pkg.pipeline.schedules import interleaved_one_f_one_b, simulate, format_table
    print(format_table(simulate(interleaved_one_f_one_b(4, 8, 2))))

How many forwards does rank r run before its first backward, what happens after
that, and when can m be too small to matter? Then compare with 1F1B, which holds
min(m, p - r) micro-batches of a whole stage (v chunks' worth).

Check: python -m lessons_pkg.labs check ch5.3     (compared for p = 1..5, v = 2..4, m = p..4p, every rank)
"""


def peak_in_flight(p: int, m: int, v: int, rank: int) -> int:
    raise NotImplementedError("peak_in_flight(p, m, v, rank): (micro-batch, chunk) pairs in flight at most")
