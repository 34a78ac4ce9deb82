"""Megatron's parallel MLP on real processes: column-parallel h->4h, GeLU, row-parallel 4h->h.

    python src/ch6/parallel_mlp.py                            # 2 ranks (the lesson's); --nproc 1 or 4 for others
    torchrun --nproc_per_node 2 src/ch6/parallel_mlp.py       # the same under torchrun (or srun)

Rank r holds rows r*4h/tp .. of the first weight (whole output features, so
GeLU acts locally) and the matching columns of the second weight. The only
communication: one all-reduce in the forward pass (g, after the second
matmul) and one in the backward pass (f, for the input's gradient).

Every rank checks its output, the input's gradient and its shards of every
weight gradient against the same MLP computed on one process from the same
full weights; the script exits with status 1 if any differs.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel import GPTConfig, ParallelMLP, shard_of
from lessons_pkg.tensor_parallel.instrument import count_collectives
from lessons_pkg.utils import check_close, set_seed

RTOL, ATOL = 1e-4, 1e-5  # float32: the ranks sum partial products in another order than one matmul


def serial_mlp(x, w1, b1, w2, b2):
    """The reference: GeLU(x W1^T + b1) W2^T + b2 on one process."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    config = GPTConfig(hidden_size=16, num_attention_heads=4, num_layers=1)
    h, f = config.hidden_size, config.ffn_hidden_size

    set_seed(0)  # every rank draws the same full weights and input
    full = {"dense_h_to_4h.weight": torch.randn(f, h) * 0.2, "dense_h_to_4h.bias": torch.randn(f) * 0.1,
            "dense_4h_to_h.weight": torch.randn(h, f) * 0.2, "dense_4h_to_h.bias": torch.randn(h) * 0.1}
    x_full = torch.randn(2, 5, h)                       # [b, s, h]
    dy = torch.randn(2, 5, h)                           # upstream gradient of the output

    mlp = ParallelMLP(config)
    with torch.no_grad():
        for name, p in mlp.named_parameters():
            p.copy_(shard_of(p, full[name], rank, tp))
    n = f // tp
    print(f"holds dense_h_to_4h rows {rank * n}..{(rank + 1) * n - 1} {tuple(mlp.dense_h_to_4h.weight.shape)} "
          f"and dense_4h_to_h columns {rank * n}..{(rank + 1) * n - 1} {tuple(mlp.dense_4h_to_h.weight.shape)}")

    group = parallel_state.get_tensor_model_parallel_group()
    x = x_full.clone().requires_grad_()
    with count_collectives(group) as forward:
        out, bias = mlp(x)
        y = out + bias
    with count_collectives(group) as backward:
        y.backward(dy)
    if rank == 0:
        print(f"all-reduces on the tensor-parallel group: forward {forward['all_reduce']}, "
              f"backward {backward['all_reduce']} (none when tp = 1); all-gathers: "
              f"{forward['all_gather'] + backward['all_gather']}")

    ref_params = {k: v.clone().requires_grad_() for k, v in full.items()}
    x_ref = x_full.clone().requires_grad_()
    y_ref = serial_mlp(x_ref, *ref_params.values())
    y_ref.backward(dy)

    checks = {"output": (y, y_ref), "input grad": (x.grad, x_ref.grad)}
    for name, p in mlp.named_parameters():
        checks[f"{name} grad"] = (p.grad, shard_of(p, ref_params[name].grad, rank, tp))
    ok = all(check_close(a, b, RTOL, ATOL) for a, b in checks.values())
    print(f"output, input gradient and {len(checks) - 2} weight gradients match the single-process MLP "
          f"(rtol {RTOL:g}, atol {ATOL:g}): {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    sys.exit(status)
