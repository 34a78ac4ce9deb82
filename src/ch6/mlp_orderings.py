"""The four ways to split a two-layer MLP over tensor-parallel ranks, each made correct, on real processes.

    python src/ch6/mlp_orderings.py                          # 2 ranks; --nproc 4 for four
    torchrun --nproc_per_node 2 src/ch6/mlp_orderings.py     # the same under torchrun (or srun)

The MLP is ``GeLU(x W1^T + b1) W2^T + b2``; its input ``x`` and output are whole
on every rank, as in a transformer layer. Each linear layer can be column-parallel
(its output features split) or row-parallel (its input features split), and each
ordering needs the collectives of ``lessons_pkg.tensor_parallel.layers`` to be
correct. Forward and backward, the tensors ``[b, s, h]`` and ``[b, s, 4h]``::

    ordering                      forward                     backward
    column -> row                 all-reduce h                all-reduce h          Megatron's MLP
    column -> row, gather+scatter all-gather 4h, all-reduce h all-gather 4h, all-reduce h
    row -> column                 all-reduce 4h, all-gather h all-reduce 4h, all-gather h
    column -> column              all-gather 4h, all-gather h all-reduce 4h, all-reduce h
    row -> row                    all-reduce 4h, all-reduce h all-gather 4h, all-gather h

The second row is Megatron's ordering with the layers' defaults (``gather_output=True``,
``input_is_parallel=False``): the all-gather after the first layer and the split
before the second undo each other, so ``gather_output=False, input_is_parallel=True``
drops both; the script checks that the two give bit for bit the same result. The other
three orderings cannot drop the communication between the two layers: a row-parallel
first layer leaves partial sums, which must be added before the GeLU (it is not
additive), and a column-parallel second layer needs the whole intermediate activation.

Every rank counts the collectives (``lessons_pkg/tensor_parallel/instrument.py``) and
compares the output, the input's gradient and its shards of the four weight gradients
with the same MLP on one process. The script exits with status 1 if any differs.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lessons_pkg import parallel_state
from lessons_pkg.launch import add_nproc_argument, start_ranks
from lessons_pkg.tensor_parallel import ColumnParallelLinear, RowParallelLinear, shard_of
from lessons_pkg.tensor_parallel.instrument import CollectiveCounts, count_collectives
from lessons_pkg.utils import max_abs_error

# ordering -> (first layer, second layer): the class and the flags that make the pair correct
ORDERINGS = {
    "column -> row": ((ColumnParallelLinear, {"gather_output": False}),
                      (RowParallelLinear, {"input_is_parallel": True})),
    "column -> row, gather + scatter": ((ColumnParallelLinear, {"gather_output": True}),
                                        (RowParallelLinear, {"input_is_parallel": False})),
    "row -> column": ((RowParallelLinear, {"input_is_parallel": False}),
                      (ColumnParallelLinear, {"gather_output": True})),
    "column -> column": ((ColumnParallelLinear, {"gather_output": True}),
                         (ColumnParallelLinear, {"gather_output": True})),
    "row -> row": ((RowParallelLinear, {"input_is_parallel": False}),
                   (RowParallelLinear, {"input_is_parallel": False})),
}
NAMES = ("w1", "b1", "w2", "b2")
UNIT_ROUNDOFF = 2.0 ** -24  # float32
# another summation order, another rounding error of the same size: over 12 seeds on 2 and 4 ranks the
# largest error of a tensor (the bias gradients have only 16 and 64 elements) reached 2.6x the one-process one
ERROR_FACTOR = 4


@dataclass
class Outcome:
    ordering: str
    forward: CollectiveCounts
    backward: CollectiveCounts
    sent_bytes: int              # per rank, forward + backward, with ring algorithms
    errors: dict[str, float]     # tensor -> max |parallel - float64 reference|
    bounds: dict[str, float]     # tensor -> the bound it must stay within
    tensors: dict[str, torch.Tensor]

    @property
    def matches(self) -> bool:
        """Every error finite and within its bound (NaN or inf fail)."""
        return all(self.errors[k] <= self.bounds[k] for k in self.errors)  # inf > bound; NaN never <=


def full_weights(h: int, ffn: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The full MLP, the same on every rank: ``w1 [4h, h]``, ``b1 [4h]``, ``w2 [h, 4h]``, ``b2 [h]``."""
    g = torch.Generator().manual_seed(seed)
    return {"w1": torch.randn(ffn, h, generator=g) * 0.3, "b1": torch.randn(ffn, generator=g) * 0.1,
            "w2": torch.randn(h, ffn, generator=g) * 0.3, "b2": torch.randn(h, generator=g) * 0.1}


def serial_mlp(x, w1, b1, w2, b2):
    """The reference, on one process: ``GeLU(x W1^T + b1) W2^T + b2``."""
    return F.linear(F.gelu(F.linear(x, w1, b1), approximate="tanh"), w2, b2)


def serial_grads(full, x, dy, dtype):
    """Output and gradients (``x``, then NAMES) of the one-process MLP in ``dtype``."""
    params = {k: v.to(dtype, copy=True).requires_grad_() for k, v in full.items()}  # copies: full stays as it is
    x = x.to(dtype, copy=True).requires_grad_()
    y = serial_mlp(x, *(params[k] for k in NAMES))
    y.backward(dy.to(dtype))
    return {"output": y.detach(), "x grad": x.grad, **{f"{k} grad": params[k].grad for k in NAMES}}


def build(ordering: str, full: dict, group) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The two layers of ``ordering``, holding this rank's shards of ``full``."""
    (first, first_flags), (second, second_flags) = ORDERINGS[ordering]
    ffn, h = full["w1"].shape
    l1 = first(h, ffn, tp_group=group, **first_flags)
    l2 = second(ffn, h, tp_group=group, **second_flags)
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    with torch.no_grad():
        for layer, w, b in ((l1, "w1", "b1"), (l2, "w2", "b2")):
            layer.weight.copy_(shard_of(layer.weight, full[w], rank, tp))
            layer.bias.copy_(shard_of(layer.bias, full[b], rank, tp))
    return l1, l2


def forward(l1, l2, x):
    intermediate, _ = l1(x)                                         # [b, s, h] -> [b, s, 4h] or [b, s, 4h/tp]
    y, _ = l2(F.gelu(intermediate, approximate="tanh"))             # -> [b, s, h] or [b, s, h/tp], then whole
    return y


def run_ordering(ordering: str, full: dict, x_full: torch.Tensor, dy: torch.Tensor, group,
                 references: tuple[dict, dict]) -> Outcome:
    """Run one ordering forward and backward, count its collectives, compare with one process.

    ``references``: the float64 and the float32 one-process results (:func:`serial_grads`). The bound of
    each tensor: ERROR_FACTOR times the float32 one-process error against float64, plus one unit of
    rounding of the tensor's largest value. The parallel run adds the same products in another order
    (partial sums across ranks), which gives a rounding error of the same size as the one process's, not
    the same error; the added unit keeps a one-process result that happens to be exact from demanding
    exactness. A missing or wrong collective errs by the size of the values themselves (a million times
    the bound, tests/tensor_parallel/test_mlp_orderings.py).
    """
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    l1, l2 = build(ordering, full, group)
    x = x_full.clone().requires_grad_()
    with count_collectives(group) as fwd:
        y = forward(l1, l2, x)
    with count_collectives(group) as bwd:
        y.backward(dy)
    ref64, ref32 = references
    layers = {"w1": l1.weight, "b1": l1.bias, "w2": l2.weight, "b2": l2.bias}
    tensors = {"output": y.detach(), "x grad": x.grad, **{f"{k} grad": layers[k].grad for k in NAMES}}
    errors, bounds = {}, {}
    for name, value in tensors.items():
        param = layers.get(name.split()[0])
        shard = (lambda t: shard_of(param, t, rank, tp)) if param is not None else (lambda t: t)
        expected, serial = shard(ref64[name]), shard(ref32[name])
        errors[name] = max_abs_error(value, expected)
        bounds[name] = ERROR_FACTOR * max_abs_error(serial, expected) + UNIT_ROUNDOFF * expected.abs().max().item()
    sent = fwd.ring_bytes_sent(tp) + bwd.ring_bytes_sent(tp)
    return Outcome(ordering, fwd, bwd, sent, errors, bounds, tensors)


def run_all(group, batch: int = 2, seq: int = 4, hidden: int = 16, seed: int = 0) -> list[Outcome]:
    """Every ordering of :data:`ORDERINGS` on the ranks of ``group``, with the same weights and input."""
    full = full_weights(hidden, 4 * hidden, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_full = torch.randn(batch, seq, hidden, generator=g)           # [b, s, h], the same on every rank
    dy = torch.randn(batch, seq, hidden, generator=g)               # upstream gradient of the output
    references = (serial_grads(full, x_full, dy, torch.float64), serial_grads(full, x_full, dy, torch.float32))
    return [run_ordering(name, full, x_full, dy, group, references) for name in ORDERINGS]


def gather_then_scatter_is_identity(group, shape=(2, 4, 8)) -> bool:
    """All-gather this rank's block along the last dimension, split it again: the same block, bit for bit."""
    from lessons_pkg.tensor_parallel import gather_from_tensor_model_parallel_region as gather
    from lessons_pkg.tensor_parallel import scatter_to_tensor_model_parallel_region as scatter
    block = torch.randn(*shape, generator=torch.Generator().manual_seed(dist.get_rank(group)))
    return torch.equal(scatter(gather(block, group), group), block)


def describe(counts: CollectiveCounts) -> str:
    """``2: all_gather, all_reduce`` (how many, then which; ``0`` for none)."""
    names = sorted(name for name, n in counts.items() for _ in range(n))
    return f"{len(names)}: {', '.join(names)}" if names else "0"


def format_table(outcomes: list[Outcome]) -> str:
    base = outcomes[0].sent_bytes
    lines = [f"{'ordering':32s} {'collectives forward':28s} {'collectives backward':28s} "
             f"{'bytes sent/rank':>15s} {'x col->row':>10s}  matches one process"]
    for o in outcomes:
        ratio = f"{o.sent_bytes / base:.1f}x" if base else "-"
        lines.append(f"{o.ordering:32s} {describe(o.forward):28s} {describe(o.backward):28s} "
                     f"{o.sent_bytes:15d} {ratio:>10s}  {o.matches}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_nproc_argument(parser, default=2)
    start_ranks(parser.parse_args())  # plain python: start the ranks; under torchrun: already one
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=int(os.environ["WORLD_SIZE"]))
    group = parallel_state.get_tensor_model_parallel_group()
    tp, rank = dist.get_world_size(group), dist.get_rank(group)
    batch, seq, hidden = 2, 4, 16
    outcomes = run_all(group, batch, seq, hidden)
    by_name = {o.ordering: o for o in outcomes}
    plain, defaults = by_name["column -> row"], by_name["column -> row, gather + scatter"]
    identical = all(torch.equal(plain.tensors[k], defaults.tensors[k]) for k in plain.tensors)
    cancels = gather_then_scatter_is_identity(group)
    if rank == 0:
        print(f"MLP GeLU(x W1^T + b1) W2^T + b2, h={hidden}, 4h={4 * hidden}, x and output [b, s, h] = "
              f"[{batch}, {seq}, {hidden}] float32 on {tp} ranks")
        print(format_table(outcomes))
        print("bytes sent/rank: ring algorithms, forward + backward (an all-gather of N bytes sends "
              "(tp-1)/tp N, an all-reduce twice that)")
        print(f"matches: output, input gradient and this rank's shards of 4 weight gradients against one process "
              f"in float64, each within {ERROR_FACTOR} x the float32 one-process error + 1 rounding unit of its "
              f"largest value")
        print(f"all-gather then split of a block gives the block back, bit for bit: {cancels}")
        print(f"column -> row with and without the gather + scatter: output and every gradient equal "
              f"bit for bit: {identical}")
    ok = cancels and identical and all(o.matches for o in outcomes)
    if not ok:
        for o in outcomes:
            for name in o.errors:
                if not o.errors[name] <= o.bounds[name]:
                    print(f"{o.ordering}: {name} error {o.errors[name]:.3g} exceeds its bound {o.bounds[name]:.3g}")
    print(f"rank {rank}/{tp}: every ordering matches one process, and gather + scatter cancels: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    status = main()
    parallel_state.destroy_model_parallel()
    torch.distributed.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    sys.exit(status)
