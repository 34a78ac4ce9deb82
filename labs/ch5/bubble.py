"""Exercise ch5.1: the fewest micro-batches that bring the pipeline bubble under 10% at p = 4.

The bubble is the idle fraction of a training step. Measure it for a few m:

    python src/ch5/pipeline_timeline.py --num-microbatches 8            # 4 ranks; draws the timeline
    python src/ch5/pipeline_timeline.py --num-microbatches 16 --cost-ms 0

or on the unit-time simulator (no processes):

    from lessons_pkg.labs.ch5 import bubble
    bubble("1f1b", 4, 8), bubble("interleaved", 4, 8, 2)

then write the smallest m for which the bubble is strictly below 10%, for 1F1B
(GPipe has the same bubble) and for the interleaved schedule with v = 2 model
chunks per rank (it only accepts m that are multiples of p). Can you also
derive both from the formula (p - 1) / (v*m + p - 1)?

Check: python -m lessons_pkg.labs check ch5.1
"""

FEWEST_MICROBATCHES_1F1B = None         # an int
FEWEST_MICROBATCHES_INTERLEAVED = None  # an int (v = 2)
