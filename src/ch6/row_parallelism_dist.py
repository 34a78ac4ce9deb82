"""Row parallelism on real processes: scatter X's columns, split A's rows, all-reduce Y.

    python src/ch6/row_parallelism_dist.py                            # 2 ranks (the lesson's); --nproc 1 or 4 for others
    torchrun --nproc_per_node 2 src/ch6/row_parallelism_dist.py       # the same under torchrun (or srun)

    rank r holds A[r*n:(r+1)*n, :]  (n = 4 / world_size rows)
    1. scatter:    rank 0 sends X[:, r*n:(r+1)*n] to rank r      X_r  (2, n)
    2. local:      P_r = X_r @ A_r                               (2, 4), a partial sum
    3. all-reduce: every rank receives sum_r P_r = Y             (2, 4)

Each rank checks Y against X @ A computed on one process.
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
    if X_FULL.shape[1] % world:
        raise SystemExit(f"error: X has {X_FULL.shape[1]} columns, which do not split over {world} ranks")
    n = X_FULL.shape[1] // world

    # 1. rank 0 cuts X into column blocks and scatters them, one per rank
    X_r = torch.empty(X_FULL.shape[0], n)                  # (2, n)
    blocks = [b.contiguous() for b in X_FULL.split(n, dim=1)] if rank == 0 else None
    dist.scatter(X_r, scatter_list=blocks, src=0)

    # 2. each rank multiplies its block of X by the matching rows of A
    A_r = A_FULL[rank * n:(rank + 1) * n, :]               # (n, 4)
    P_r = X_r @ A_r                                        # (2, 4)
    print(f"received X[:, {rank * n}:{(rank + 1) * n}], holds A[{rank * n}:{(rank + 1) * n}, :], partial sum =\n{P_r}")

    # 3. all-reduce adds the partial sums on every rank
    Y = P_r.clone()
    dist.all_reduce(Y, op=dist.ReduceOp.SUM)               # (2, 4)

    ok = torch.equal(Y, X_FULL @ A_FULL)
    if rank == 0:
        print(f"all-reduced Y =\n{Y}")
    print(f"row-parallel Y equals single-process X @ A: {ok}")
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
