"""Column parallelism on real processes: broadcast X, split A's columns, all-gather Y.

    python src/ch6/column_parallelism_dist.py                            # 2 ranks (the lesson's); --nproc 1 or 4 for others
    torchrun --nproc_per_node 2 src/ch6/column_parallelism_dist.py       # the same under torchrun (or srun)

A here has 4 columns (the warm-up's A with two more), so it splits over 1, 2 or 4 ranks:

    rank r holds A[:, r*n:(r+1)*n]  (n = 4 / world_size columns)
    1. broadcast: rank 0 sends X to every rank          X  -> every rank
    2. local:     Y_r = X @ A_r                         (2, n)
    3. all-gather: every rank receives every Y_r        [Y_0 | Y_1 | ...] = Y  (2, 4)

Each rank checks the gathered Y against X @ A computed on one process.
"""
import argparse
import sys

import torch
import torch.distributed as dist

from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg.parallel_state import init_distributed

X_FULL = torch.tensor([[0., 1., 2., 3.],
                       [4., 5., 6., 7.]])                 # (2, 4)
A_FULL = torch.tensor([[10., 14., 18., 22.],
                       [11., 15., 19., 23.],
                       [12., 16., 20., 24.],
                       [13., 17., 21., 25.]])             # (4, 4)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    if A_FULL.shape[1] % world:
        raise SystemExit(f"error: A has {A_FULL.shape[1]} columns, which do not split over {world} ranks")
    n = A_FULL.shape[1] // world

    # 1. only rank 0 starts with X; broadcast gives every rank a copy
    X = X_FULL.clone() if rank == 0 else torch.empty_like(X_FULL)
    dist.broadcast(X, src=0)

    # 2. each rank multiplies by its own block of columns
    A_r = A_FULL[:, rank * n:(rank + 1) * n]               # (4, n)
    Y_r = X @ A_r                                          # (2, n)
    print(f"holds A[:, {rank * n}:{(rank + 1) * n}], computes Y[:, {rank * n}:{(rank + 1) * n}] =\n{Y_r}")

    # 3. all-gather the column blocks and concatenate them
    blocks = [torch.empty_like(Y_r) for _ in range(world)]
    dist.all_gather(blocks, Y_r)
    Y = torch.cat(blocks, dim=1)                           # (2, 4)

    ok = torch.equal(Y, X_FULL @ A_FULL)
    if rank == 0:
        print(f"gathered Y =\n{Y}")
    print(f"column-parallel Y equals single-process X @ A: {ok}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
