"""Exercise ch6d.2: bytes of weights and optimizer state per parameter.

Mixed-precision training with Adam keeps, for every parameter: the fp16 copy
the matmuls use, the gradient (Megatron accumulates it in fp32), the fp32
master copy the optimizer updates, and Adam's two moments in fp32. Fill in
BYTES, then write the bytes of one rank with N parameters when the
distributed optimizer (ZeRO-1, --use-distributed-optimizer) shards the
optimizer's fp32 state over DP data-parallel ranks, or does not.

(The lesson runs TP=2 x PP=3 on 6 GPUs "with the distributed optimizer":
what does it save there?)

Check: python -m lessons_pkg.labs check ch6d.2
"""

BYTES = {"fp16 weight": None, "fp32 gradient": None, "fp32 master weight": None, "adam m": None, "adam v": None}


def weight_and_optimizer_bytes(n_params: int, dp: int, distributed_optimizer: bool) -> float:
    raise NotImplementedError("weight_and_optimizer_bytes(n_params, dp, distributed_optimizer)")
