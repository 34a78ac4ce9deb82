"""Vocab-parallel cross entropy on real processes: the loss without gathering the logits.

    python src/ch6/vocab_parallel_cross_entropy.py                            # 2 ranks (the lesson's); --nproc 1 or 4 for others
    torchrun --nproc_per_node 2 src/ch6/vocab_parallel_cross_entropy.py       # the same under torchrun (or srun)

Each rank holds the logits of its vocabulary slice, [b, s, V/tp]. Three
all-reduces of [b, s] tensors (max, target logit, sum of exponentials) give
every rank the exact per-token loss; the backward pass needs no communication
at all. With label smoothing, a fourth all-reduce adds the sum of the logits.

Each rank checks the loss and its slice of the gradient against
torch.nn.functional.cross_entropy on the full logits, with and without label
smoothing, and that its logits were not modified; exit status 1 if not.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel import vocab_parallel_cross_entropy
from lessons_pkg.tensor_parallel.instrument import count_collectives
from lessons_pkg.utils import check_close, set_seed

RTOL, ATOL = 1e-5, 1e-6  # float32: log/exp of sums taken in a different order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    b, s, vocab = 2, 4, 32
    set_seed(0)
    logits = torch.randn(b, s, vocab) * 3                     # the full logits [b, s, V]
    target = torch.tensor([[0, 5, 9, 14], [17, 22, 27, 31]])  # [b, s]: ids in every rank's slice
    n = vocab // tp
    print(f"holds logits[..., {rank * n}:{(rank + 1) * n}], owns targets "
          f"{target[(target >= rank * n) & (target < (rank + 1) * n)].tolist()}")

    all_ok = True
    for smoothing in (0.0, 0.1):
        mine = logits[..., rank * n:(rank + 1) * n].clone().requires_grad_()   # [b, s, V/tp]
        before = mine.detach().clone()
        with count_collectives(group) as forward:
            loss = vocab_parallel_cross_entropy(mine, target, label_smoothing=smoothing)  # [b, s]
        with count_collectives(group) as backward:
            loss.sum().backward()

        full = logits.clone().requires_grad_()
        loss_ref = F.cross_entropy(full.view(-1, vocab), target.view(-1), reduction="none",
                                   label_smoothing=smoothing).view(b, s)
        loss_ref.sum().backward()
        ok = (check_close(loss, loss_ref, RTOL, ATOL)
              and check_close(mine.grad, full.grad[..., rank * n:(rank + 1) * n], RTOL, ATOL)
              and torch.equal(mine.detach(), before))
        all_ok &= ok
        if rank == 0:
            print(f"label_smoothing={smoothing}: all-reduces forward {forward['all_reduce']}, "
                  f"backward {backward['all_reduce']} (none when tp = 1)")
        print(f"label_smoothing={smoothing}: loss and gradient match F.cross_entropy on the full logits, "
              f"logits untouched: {ok}")
    return 0 if all_ok else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    sys.exit(status)
