"""A whole tensor-parallel GPT on real processes, with its LM head tied to the word embedding.

    python src/ch6/parallel_gpt.py                            # 2 ranks (the lesson's); --nproc 1 or 4 for others
    torchrun --nproc_per_node 2 src/ch6/parallel_gpt.py       # the same under torchrun (or srun)

Every rank builds the same full-size master weights from one seed and keeps
its shards. The LM head reuses the vocab-parallel word embedding E_r
[V/tp, h]: logits_r = x E_r^T are this rank's vocabulary slice [b, s, V/tp],
exactly what vocab-parallel cross entropy consumes, so the logits are never
gathered. The reference is transformers' GPT2LMHeadModel on one process with
the same weights (and the same padded vocabulary). A few SGD steps are taken on
both; each step's loss must match, else the script exits with status 1.
"""
import argparse
import dataclasses
import os
import sys

import torch
import torch.nn.functional as F

from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict
from lessons_pkg.tensor_parallel.checkpointing import pad_word_embeddings
from lessons_pkg.utils import check_close
from lessons_pkg.tensor_parallel.hf import to_hf_model

RTOL, ATOL = 1e-4, 1e-5  # float32: partial sums over ranks add up in a different order
STEPS, LR = 4, 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    config = GPTConfig(vocab_size=250, hidden_size=32, num_layers=2, num_attention_heads=4,
                       max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                       make_vocab_size_divisible_by=16)
    master = master_state_dict(config, seed=1234)             # full size, the same on every rank and any tp
    model = ParallelGPT(config)
    model.load_master_state_dict(master)

    tied = model.embedding.word_embeddings.weight
    print(f"vocabulary {config.vocab_size} padded to {model.padded_vocab_size}; this rank's word embedding "
          f"(= LM head) rows [{rank * tied.size(0)}, {(rank + 1) * tied.size(0)}) {tuple(tied.shape)}")

    # the single-process reference: transformers' GPT-2 with the same (padded) weights
    serial = to_hf_model(pad_word_embeddings(master, model.padded_vocab_size),
                         dataclasses.replace(config, vocab_size=model.padded_vocab_size))

    torch.manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, 17))
    ids, labels = tokens[:, :-1], tokens[:, 1:]                # predict the next token

    logits = model(ids)
    if rank == 0:
        print(f"logits on each rank: {tuple(logits.shape)} = [batch, seq, padded vocab / tp]")
    ok = check_close(logits, serial(ids).logits.chunk(tp, -1)[rank], RTOL, ATOL)

    losses = []
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt_ref = torch.optim.SGD(serial.parameters(), lr=LR)
    for step in range(STEPS):
        loss = model(ids, labels=labels).mean()                # per-token loss [b, s] -> mean
        opt.zero_grad()
        loss.backward()
        opt.step()
        ref_logits = serial(ids).logits
        loss_ref = F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten())
        opt_ref.zero_grad()
        loss_ref.backward()
        opt_ref.step()
        same = check_close(loss, loss_ref, RTOL, ATOL)
        ok &= same
        losses.append(loss.item())
        if rank == 0:
            print(f"step {step}: loss equals the single-process loss: {same}")
    went_down = all(a > b for a, b in zip(losses, losses[1:]))  # NaN compares false: a NaN loss fails
    ok &= went_down
    if rank == 0:
        print(f"loss went down at every step: {went_down}")

    # after training, the merged shards are the single-process model's weights
    full = model.full_state_dict()
    wte_ref = serial.transformer.wte.weight[: config.vocab_size]
    ok &= check_close(full["embedding.word_embeddings.weight"], wte_ref, RTOL, ATOL)
    print(f"logits, {STEPS} training losses and the trained (tied) embedding match the single-process "
          f"GPT-2 (rtol {RTOL:g}, atol {ATOL:g}): {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    sys.exit(status)
