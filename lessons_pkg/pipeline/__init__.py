"""Pipeline parallelism from scratch: schedules, the executor, timelines and activation memory.

Modules (each one idea, read in this order):
    schedules   GPipe, 1F1B and interleaved 1F1B as pure functions, with a unit-time clock
    rounds      grouping a rank's messages into rounds that cannot deadlock (Megatron's pairing)
    p2p         sending any tensor between stages (a header carries dtype and shape)
    executor    forward_backward(): runs a schedule on this rank's model chunks
    partition   cutting a stack of layers into p x v chunks, round-robin; a toy model
    timeline    recording when each forward/backward ran, and drawing it
    memory      measuring the activations saved for backward
"""
from lessons_pkg.pipeline.executor import forward_backward, serial_forward_backward
from lessons_pkg.pipeline.schedules import Schedule, get_schedule, gpipe, interleaved_one_f_one_b, one_f_one_b

__all__ = ["forward_backward", "serial_forward_backward", "Schedule", "get_schedule", "gpipe", "one_f_one_b", "interleaved_one_f_one_b"]
