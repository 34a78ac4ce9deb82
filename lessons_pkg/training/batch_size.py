"""The global batch size of each iteration: constant, or ramped up as Megatron's ``--rampup-batch-size`` does.

    --rampup-batch-size START INCREMENT SAMPLES

starts at ``START`` samples per iteration and adds ``INCREMENT`` every
``SAMPLES / ((global - START) / INCREMENT)`` consumed samples, reaching
``--global-batch-size`` once ``SAMPLES`` samples have been consumed (GPT-3's
warm-up of the batch size; Megatron-LM's ``RampupBatchsizeNumMicroBatchesCalculator``).
The batch size depends only on the consumed samples, so a resumed run (which
restores them from its checkpoint) continues the ramp where it stopped. Each
size must be a whole number of micro-batches on every data-parallel rank: what
changes is the number of micro-batches per iteration.
"""
from __future__ import annotations


def global_batch_size_at(consumed_samples: int, args) -> int:
    """The global batch size of the iteration that starts after ``consumed_samples`` samples."""
    ramp = getattr(args, "rampup_batch_size", None)
    if not ramp:
        return args.global_batch_size
    start, increment, samples = ramp
    steps_total = (args.global_batch_size - start) // increment
    if steps_total == 0 or consumed_samples > samples:
        return args.global_batch_size
    per_increment = samples / steps_total
    return min(args.global_batch_size, start + int(consumed_samples / per_increment) * increment)


def rampup_problems(args, data_parallel_size: int) -> list[str]:
    """What is wrong with ``--rampup-batch-size`` for this run (empty when nothing, or no ramp)."""
    ramp = getattr(args, "rampup_batch_size", None)
    if not ramp:
        return []
    start, increment, samples = ramp
    per = args.micro_batch_size * data_parallel_size
    problems = []
    if start < 1 or increment < 1 or samples < 1:
        return [f"--rampup-batch-size {start} {increment} {samples}: the start, the increment and the samples "
                "must be positive"]
    if start > args.global_batch_size:
        problems.append(f"--rampup-batch-size starts at {start}, above --global-batch-size "
                        f"({args.global_batch_size})")
    elif (args.global_batch_size - start) % increment:
        problems.append(f"--rampup-batch-size: global-batch-size ({args.global_batch_size}) minus the start "
                        f"({start}) is not a multiple of the increment ({increment})")
    for name, value in (("start", start), ("increment", increment)):
        if value % per:
            problems.append(f"--rampup-batch-size {name} ({value}) is not divisible by micro-batch-size "
                            f"({args.micro_batch_size}) x data-parallel size ({data_parallel_size}) = {per}")
    return problems
