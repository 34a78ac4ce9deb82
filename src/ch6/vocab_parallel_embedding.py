"""Vocab-parallel embedding on real processes, and Megatron's padded vocabulary.

    python src/ch6/vocab_parallel_embedding.py                            # 2 ranks (the lesson's); --nproc 1 or 4 for others
    torchrun --nproc_per_node 2 src/ch6/vocab_parallel_embedding.py       # the same under torchrun (or srun)

1. Padding: Megatron pads the vocabulary to a multiple of
   make_vocab_size_divisible_by (128) x tp, so every rank holds the same number
   of rows. The table for GPT-2's 50257 tokens is computed, not typed in.
2. Rank r owns the ids [r V/tp, (r+1) V/tp). It looks up the ids it owns, writes
   zeros for the others, and one all-reduce (g) puts every row in place.

Each rank checks the embedding output and its shard of the weight gradient
against torch.nn.functional.embedding on the full table; exit status 1 if not.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel import VocabParallelEmbedding, shard_of, vocab_size_with_padding
from lessons_pkg.utils import set_seed

GPT2_VOCAB = 50257


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    if rank == 0:
        for size in (1, 2, 4, 8):
            padded, dummy = vocab_size_with_padding(GPT2_VOCAB, size, 128)
            print(f"GPT-2 vocabulary at TP={size}: padded to {padded} ({dummy} dummy tokens), "
                  f"{padded // size} rows per rank")

    # a small vocabulary that needs padding: 50 tokens, multiple of 4 x tp
    vocab, dummy = vocab_size_with_padding(50, tp, make_vocab_size_divisible_by=4)
    h = 8
    set_seed(0)
    table = torch.randn(vocab, h)                                        # the full padded table [V, h]
    ids = torch.tensor([[0, 7, 13, 25], [31, 38, 44, 49]])              # [b, s], ids of every rank
    dy = torch.randn(2, 4, h)

    emb = VocabParallelEmbedding(vocab, h)
    with torch.no_grad():
        emb.weight.copy_(shard_of(emb.weight, table, rank, tp))
    mine = ids[(ids >= emb.vocab_start_index) & (ids < emb.vocab_end_index)].tolist()
    print(f"owns ids [{emb.vocab_start_index}, {emb.vocab_end_index}) of the padded {vocab} ({dummy} dummy); "
          f"looks up {mine}, zeros for the rest")
    y = emb(ids)                                                         # [b, s] -> [b, s, h]
    y.backward(dy)

    ref_table = table.clone().requires_grad_()
    y_ref = F.embedding(ids, ref_table)
    y_ref.backward(dy)
    # each row is found on exactly one rank and the others add zeros: the result is exact
    ok = torch.equal(y, y_ref) and torch.equal(emb.weight.grad, shard_of(emb.weight, ref_table.grad, rank, tp))
    print(f"embedding output and weight gradient equal the single-process lookup exactly: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    sys.exit(status)
