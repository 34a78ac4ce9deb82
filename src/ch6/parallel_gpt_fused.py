"""The tensor-parallel GPT with and without the fused kernels, on real processes.

    python src/ch6/parallel_gpt_fused.py                 # 2 ranks; --nproc 1 or 4 for others
    torchrun --nproc_per_node 2 src/ch6/parallel_gpt_fused.py

Every rank builds the same full master weights, then two ParallelGPTs from
them: the plain one (F.gelu, masked torch.softmax, nn.LayerNorm) and one with
``use_fused_kernels=True`` (bias_gelu, scaled_upper_triang_masked_softmax,
layer_norm from ``lessons_pkg.kernels``). Both take the same SGD steps; the
per-step losses and, after the last step, every weight must agree within the
float32 bound, else the script exits with status 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from lessons_pkg import parallel_state
from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict
from lessons_pkg.utils import check_close

# float32: the kernels' exp/tanh approximations and summation orders differ
# from PyTorch's by ~1e-7 relative; a few steps of a 2-layer model keep that below 1e-5.
ATOL = RTOL = 1e-5
STEPS, LR = 3, 0.5


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    config = GPTConfig(vocab_size=200, hidden_size=64, num_layers=2, num_attention_heads=4,
                       max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0,
                       make_vocab_size_divisible_by=16)
    master = master_state_dict(config, seed=7)
    models = {}
    for fused in (False, True):
        models[fused] = ParallelGPT(dataclasses.replace(config, use_fused_kernels=fused))
        models[fused].load_master_state_dict(master)

    ids = torch.randint(0, config.vocab_size, (4, 25), generator=torch.Generator().manual_seed(0))
    ok = True
    for step in range(STEPS):  # the same batch each step: the loss must fall, identically for both
        losses = {}
        for fused, model in models.items():
            loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()     # [b, s] per-token loss -> mean
            model.zero_grad()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= LR * p.grad
            losses[fused] = loss.item()
        same = abs(losses[True] - losses[False]) <= ATOL + RTOL * abs(losses[False])
        ok &= same
        if rank == 0:
            print(f"step {step}: loss plain {losses[False]:.4f}, fused {losses[True]:.4f}; match: {same}")

    plain, fused = dict(models[False].named_parameters()), dict(models[True].named_parameters())
    weights_match = all(check_close(fused[n], plain[n], RTOL, ATOL) for n in plain)
    ok &= weights_match
    print(f"rank {rank}/{tp}: every weight shard after {STEPS} steps matches the plain model "
          f"(atol = rtol = {ATOL:g}): {weights_match}")
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    sys.exit(status)
