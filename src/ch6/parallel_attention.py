"""Megatron's parallel self-attention on real processes: heads split across ranks.

    python src/ch6/parallel_attention.py                            # 2 ranks (the lesson's); --nproc 1 or 4 for others
    torchrun --nproc_per_node 2 src/ch6/parallel_attention.py       # the same under torchrun (or srun)

The fused QKV weight [3h, h] stores its rows head by head ([q k v] of head 0,
then of head 1, ...), so rank r's contiguous block of rows (column-parallel)
holds the queries, keys and values of heads r*heads/tp .. (r+1)*heads/tp - 1.
Each rank runs causal attention for its heads only; the output projection is
row-parallel and one all-reduce sums the ranks' contributions.

The reference is ordinary multi-head attention on one process
(torch's scaled_dot_product_attention) with the full weights; outputs and every
gradient must match, else the script exits with status 1.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel import GPTConfig, ParallelAttention, shard_of
from lessons_pkg.tensor_parallel.instrument import count_collectives
from lessons_pkg.utils import check_close, set_seed

RTOL, ATOL = 1e-4, 1e-5  # float32: the ranks sum partial products in another order than one matmul


def serial_attention(x, w_qkv, b_qkv, w_out, b_out, heads):
    """Causal multi-head attention on one process; w_qkv rows are [head][q, k, v][head_dim]."""
    b, s, h = x.shape
    qkv = F.linear(x, w_qkv, b_qkv).view(b, s, heads, 3, h // heads)        # [b, s, heads, 3, hd]
    q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))           # [b, heads, s, hd]
    context = F.scaled_dot_product_attention(q, k, v, is_causal=True)       # [b, heads, s, hd]
    return F.linear(context.transpose(1, 2).reshape(b, s, h), w_out, b_out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    config = GPTConfig(hidden_size=32, num_attention_heads=4, num_layers=1, attention_dropout=0.0)
    h, heads = config.hidden_size, config.num_attention_heads

    set_seed(0)
    full = {"query_key_value.weight": torch.randn(3 * h, h) * 0.2, "query_key_value.bias": torch.randn(3 * h) * 0.1,
            "dense.weight": torch.randn(h, h) * 0.2, "dense.bias": torch.randn(h) * 0.1}
    x_full = torch.randn(2, 6, h)                                             # [b, s, h]
    dy = torch.randn(2, 6, h)                                                 # upstream gradient of the output

    attn = ParallelAttention(config)
    with torch.no_grad():
        for name, p in attn.named_parameters():
            p.copy_(shard_of(p, full[name], rank, tp))
    per_rank = heads // tp
    print(f"holds heads {list(range(rank * per_rank, (rank + 1) * per_rank))}: query_key_value "
          f"{tuple(attn.query_key_value.weight.shape)}, dense {tuple(attn.dense.weight.shape)}")

    x = x_full.clone().requires_grad_()
    with count_collectives(group) as forward:
        out, bias = attn(x)
        y = out + bias
    with count_collectives(group) as backward:
        y.backward(dy)
    if rank == 0:
        print(f"all-reduces on the tensor-parallel group: forward {forward['all_reduce']}, "
              f"backward {backward['all_reduce']} (none when tp = 1)")

    ref = {k: v.clone().requires_grad_() for k, v in full.items()}
    x_ref = x_full.clone().requires_grad_()
    y_ref = serial_attention(x_ref, *ref.values(), heads)
    y_ref.backward(dy)

    checks = {"output": (y, y_ref), "input grad": (x.grad, x_ref.grad)}
    for name, p in attn.named_parameters():
        checks[name] = (p.grad, shard_of(p, ref[name].grad, rank, tp))
    ok = all(check_close(a, b, RTOL, ATOL) for a, b in checks.values())
    print(f"output, input gradient and {len(checks) - 2} weight gradients match single-process attention "
          f"(rtol {RTOL:g}, atol {ATOL:g}): {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    sys.exit(status)
