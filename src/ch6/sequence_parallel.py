"""Sequence parallelism on real processes: the same GPT, the LayerNorms and dropouts split along the sequence.

    python src/ch6/sequence_parallel.py                        # 2 ranks (TP=2); --nproc 4 for TP=4
    torchrun --nproc_per_node 4 src/ch6/sequence_parallel.py   # the same under torchrun (or srun)

Every rank builds the same master weights and keeps its shards, twice: a
tensor-parallel GPT, and the same with ``sequence_parallel=True``. Both take
a training step's forward and backward on the same batch; the sequence-
parallel model's LayerNorm and bias gradients are summed over the tensor
group. The script checks and prints:

* the shape of the residual stream on each rank: ``[b, s, h]`` against ``[b, s/t, h]``;
* the per-token loss and every parameter's gradient: equal to the
  tensor-parallel model's and to one process's (TP=1, same weights);
* the collectives of one layer, counted: 2 all-reduces forward and backward,
  against 2 all-gathers + 2 reduce-scatters forward, 4 + 2 backward;
* the activation memory of the whole model kept for backward, per rank.

Exit status 1 if any check fails.
"""
import argparse
import dataclasses
import os
import sys

import torch
import torch.distributed as dist

from lessons_pkg import parallel_state
from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg.pipeline.memory import SavedTensorMeter
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict, shard_of
from lessons_pkg.tensor_parallel.instrument import count_collectives
from lessons_pkg.tensor_parallel.sequence_parallel import allreduce_sequence_parallel_grads
from lessons_pkg.utils import check_close

RTOL, ATOL = 1e-4, 1e-5  # float32: the ranks' partial sums add up in another order


def forward_backward(model, ids, labels, meter_exclude):
    """Loss [b, s], the residual stream's shape on this rank, activation bytes kept for backward."""
    shapes = []
    hook = model.layers[0].register_forward_pre_hook(lambda _m, inputs: shapes.append(tuple(inputs[0].shape)))
    with SavedTensorMeter(exclude=meter_exclude) as meter:
        loss = model(ids, labels=labels)
        loss.mean().backward()
    hook.remove()
    return loss.detach(), shapes[0], meter.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    world = int(os.environ["WORLD_SIZE"])
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
    tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
    group = parallel_state.get_tensor_model_parallel_group()
    if tp == 1:
        print("sequence parallelism splits the sequence over tensor-parallel ranks: run it with --nproc 2 or 4")
        return 1
    config = GPTConfig(vocab_size=250, hidden_size=64, num_layers=2, num_attention_heads=4,
                       max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0,
                       make_vocab_size_divisible_by=16)
    master = master_state_dict(config, seed=1234)
    torch.manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, 65))
    ids, labels = tokens[:, :-1], tokens[:, 1:]                   # [b, s] = [4, 64]

    runs = {}
    for name, sp in (("tensor parallel", False), ("+ sequence parallel", True)):
        model = ParallelGPT(dataclasses.replace(config, sequence_parallel=sp))
        model.load_master_state_dict(master)
        loss, shape, peak = forward_backward(model, ids, labels, list(model.parameters()))
        if sp:
            allreduce_sequence_parallel_grads([model], group)   # LayerNorms and biases saw s/t tokens each
        runs[name] = (model, loss, shape, peak)

    # one process: TP=1 on every rank alike (a group of one), padded like the TP models
    own = [dist.new_group([r]) for r in range(world)][dist.get_rank()]
    reference = ParallelGPT(dataclasses.replace(config, make_vocab_size_divisible_by=16 * tp), tp_group=own)
    reference.load_master_state_dict(master)
    ref_loss, _, _ = forward_backward(reference, ids, labels, list(reference.parameters()))
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}

    ok = True
    for name, (model, loss, shape, peak) in runs.items():
        same_loss = check_close(loss, ref_loss, RTOL, ATOL)
        same_grads = all(check_close(p.grad, shard_of(p, ref_grads[n], rank, tp), RTOL, ATOL)
                         for n, p in model.named_parameters())
        ok &= same_loss and same_grads
        if rank == 0:
            print(f"{name:>20}: residual stream on each rank {list(shape)}, activations kept for backward "
                  f"{peak / 2**20:.2f} MiB; loss and every gradient equal one process's: {same_loss and same_grads}")

    layer_counts = {}
    for name, sp in (("tensor parallel", False), ("+ sequence parallel", True)):
        layer = runs[name][0].layers[0]
        x = torch.randn(4, 64 // tp if sp else 64, config.hidden_size, requires_grad=True)
        with count_collectives(group) as fwd:
            y = layer(x)
        with count_collectives(group) as bwd:
            y.sum().backward()
        layer_counts[name] = (dict(fwd), dict(bwd), fwd.ring_bytes_sent(tp), bwd.ring_bytes_sent(tp))
    if rank == 0:
        for name, (fwd, bwd, sent_f, sent_b) in layer_counts.items():
            print(f"{name:>20}: one layer's collectives forward {fwd}, backward {bwd}; each rank sends "
                  f"{sent_f / 1024:.0f} KiB forward, {sent_b / 1024:.0f} KiB backward")
    tp_run, sp_run = layer_counts["tensor parallel"], layer_counts["+ sequence parallel"]
    expected = ({"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2},
                {"all_gather_into_tensor": 4, "reduce_scatter_tensor": 2})
    comm_ok = sp_run[:2] == expected and tp_run[:2] == ({"all_reduce": 2}, {"all_reduce": 2}) \
        and sp_run[2] == tp_run[2]
    less = runs["+ sequence parallel"][3] < runs["tensor parallel"][3]
    ok &= comm_ok and less
    if rank == 0:
        print(f"2 all-reduces became 2 all-gathers + 2 reduce-scatters, the same bytes forward: {comm_ok}")
        print(f"sequence parallelism keeps less activation memory per rank: {less}")
        print(f"TP={tp} with sequence parallelism equals one process (rtol {RTOL:g}, atol {ATOL:g}): {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()
    sys.exit(status)
