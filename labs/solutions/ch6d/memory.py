"""Solution ch6d.2. 18 bytes/parameter; ZeRO-1 shards the 12 bytes of fp32 optimizer state: 6 + 12/DP.
TP=2 x PP=3 on 6 GPUs is DP=1: the distributed optimizer has no one to share with and saves nothing."""

BYTES = {"fp16 weight": 2, "fp32 gradient": 4, "fp32 master weight": 4, "adam m": 4, "adam v": 4}


def weight_and_optimizer_bytes(n_params: int, dp: int, distributed_optimizer: bool) -> float:
    if not distributed_optimizer:
        return n_params * sum(BYTES.values())
    sharded = BYTES["fp32 master weight"] + BYTES["adam m"] + BYTES["adam v"]
    return n_params * (BYTES["fp16 weight"] + BYTES["fp32 gradient"] + sharded / dp)
