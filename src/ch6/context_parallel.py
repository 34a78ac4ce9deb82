"""Context parallelism on real processes: one sequence split over ranks, attention computed as a ring.

    python src/ch6/context_parallel.py                        # CP=2 (2 ranks); --nproc 4 for CP=4
    torchrun --nproc_per_node 4 src/ch6/context_parallel.py   # the same under torchrun (or srun)

Each rank holds chunks r and 2 cp - 1 - r of every sequence (Megatron's
balanced split). The script checks, against one process on the whole sequence:

1. ring attention alone: this rank's outputs, log-sum-exps and the gradients
   of its q, k, v equal full causal attention's at its tokens;
2. the whole GPT: with every layer's attention a ring, this rank's per-token
   loss equals one process's at its tokens, and the gradients summed over the
   context-parallel ranks equal one process's.

It prints the chunk pairs each rank computed and the bytes it sent.
Exit status 1 if a check fails.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist

from lessons_pkg import parallel_state
from lessons_pkg.context_parallel import chunk_ids, full_attention, ring_attention, split_sequence
from lessons_pkg.context_parallel.ring_attention import RingTrace, tracing
from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict
from lessons_pkg.utils import check_close

RTOL, ATOL = 1e-4, 1e-5  # float32: the softmax normalised block by block, sums in another order


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    parser.add_argument("--seq", type=int, default=64, help="tokens of each sequence (divisible by 2 x ranks)")
    args = parser.parse_args()
    ranks = int(os.environ["WORLD_SIZE"]) if "RANK" in os.environ else (args.nproc or args.nproc_default)
    if args.seq < 2 * ranks or args.seq % (2 * ranks):
        parser.error(f"--seq ({args.seq}) must be a positive multiple of 2 x the ranks ({2 * ranks}): every rank "
                     "holds two equal chunks of each sequence")
    start_ranks(args)
    cp = int(os.environ["WORLD_SIZE"])
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=cp)
    group, rank = parallel_state.get_context_parallel_group(), parallel_state.get_context_parallel_rank()
    if cp == 1:
        print("context parallelism splits a sequence over ranks: run it with --nproc 2 or 4")
        return 1
    mine = lambda t, dim=1: split_sequence(t, cp, rank, dim)  # noqa: E731 - this rank's chunks of a sequence
    if rank == 0:
        print(f"{args.seq} tokens cut into {2 * cp} chunks; rank r holds chunks "
              + ", ".join(f"{r}: {list(chunk_ids(r, cp))}" for r in range(cp)))

    # 1. ring attention against full attention, outputs, log-sum-exp and gradients
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(2, 4, args.seq, 16, generator=g) for _ in range(4))   # [b, heads, s, hd]
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want, want_lse = full_attention(*full, causal=True)
    want.backward(dout)
    local = [mine(t, 2).clone().requires_grad_() for t in (q, k, v)]
    trace = RingTrace()
    with tracing(trace):
        out, lse = ring_attention(*local, group, causal=True)
        out.backward(mine(dout, 2))
    ok_attn = check_close(out, mine(want.detach(), 2), RTOL, ATOL) and check_close(lse, mine(want_lse, 2), RTOL, ATOL)
    ok_attn &= all(check_close(t.grad, mine(f.grad, 2), RTOL, ATOL) for t, f in zip(local, full))
    lines = [None] * cp   # every rank's line, printed in rank order by rank 0
    dist.all_gather_object(lines, f"rank {rank}: ring attention computed {trace.pairs} chunk pairs, sent "
                                  f"{trace.bytes_sent / 1024:.0f} KiB; outputs, log-sum-exp and q/k/v gradients "
                                  f"equal full attention's: {ok_attn}", group=group)
    if rank == 0:
        print("\n".join(lines))

    # 2. the whole GPT, each rank on its tokens, against one process on the whole sequences
    config = GPTConfig(vocab_size=250, hidden_size=64, num_layers=2, num_attention_heads=4,
                       max_position_embeddings=args.seq, hidden_dropout=0.0, attention_dropout=0.0)
    master = master_state_dict(config, seed=1234)
    ids = torch.randint(0, config.vocab_size, (2, args.seq + 1), generator=g)
    tokens, labels = ids[:, :-1], ids[:, 1:]
    model = ParallelGPT(config, cp_group=group)
    model.load_master_state_dict(master)
    loss = model(mine(tokens), labels=mine(labels))                          # [b, s/cp]: this rank's tokens
    loss.sum().backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, group=group)                                 # every rank's tokens' share
    own = [dist.new_group([r]) for r in range(cp)][rank]
    reference = ParallelGPT(config, tp_group=own)                            # one process, the whole sequences
    reference.load_master_state_dict(master)
    ref_loss = reference(tokens, labels=labels)
    ref_loss.sum().backward()
    ok_gpt = check_close(loss, mine(ref_loss.detach()), RTOL, ATOL)
    ok_gpt &= all(check_close(p.grad, r.grad, RTOL, ATOL) for p, r in zip(model.parameters(), reference.parameters()))
    ok = torch.tensor(float(ok_attn and ok_gpt))
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        print(f"GPT at CP={cp}: per-token loss at every rank's tokens and every gradient (summed over the "
              f"ranks) equal one process's: {bool(ok_gpt)}")
        print(f"CP={cp} equals one process (rtol {RTOL:g}, atol {ATOL:g}): {bool(ok.item())}")
    return 0 if ok.item() else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    sys.exit(status)
