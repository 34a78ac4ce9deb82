"""Chapter 6 (tensor parallelism): f and g by hand, a vocab-parallel lookup, the vocabulary's padding."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lessons_pkg.labs import Fail, Exercise, expect_close
from lessons_pkg.tensor_parallel import mappings
from lessons_pkg.tensor_parallel.layers import TPShape, VocabParallelEmbedding
from lessons_pkg.tensor_parallel.utils import vocab_size_with_padding
from lessons_pkg.testing import run_on_ranks

TP = 2          # ranks of the checks
TIMEOUT = 120   # s; a wrong collective (one rank waiting for another) fails instead of hanging
# float64 throughout: the ranks add partial products in another order than one matmul does (~1e-16 relative)
RTOL, ATOL = 1e-10, 1e-12
WHY = "float64; only the order of summing partial products differs"


def _mlp_weights(h: int = 8, f: int = 32):
    g = torch.Generator().manual_seed(0)
    w = {"w1": torch.randn(f, h, generator=g, dtype=torch.float64) * 0.3,
         "b1": torch.randn(f, generator=g, dtype=torch.float64) * 0.1,
         "w2": torch.randn(h, f, generator=g, dtype=torch.float64) * 0.3,
         "b2": torch.randn(h, generator=g, dtype=torch.float64) * 0.1}
    return w, torch.randn(3, 5, h, generator=g, dtype=torch.float64), torch.randn(3, 5, h, generator=g, dtype=torch.float64)


def _serial_mlp():
    w, x, dy = _mlp_weights()
    w = {k: v.clone().requires_grad_() for k, v in w.items()}
    x = x.clone().requires_grad_()
    y = F.linear(F.gelu(F.linear(x, w["w1"], w["b1"])), w["w2"], w["b2"])
    y.backward(dy)
    return y.detach(), x.grad, w["w1"].grad, w["w2"].grad


def _parallel_mlp_rank(f_apply, g_apply):
    """One rank of Megatron's MLP: f, column-parallel W1, GeLU, row-parallel W2, g. Returns its results."""
    tp, rank = dist.get_world_size(), dist.get_rank()
    w, x_full, dy = _mlp_weights()
    n = w["w1"].shape[0] // tp
    w1 = w["w1"][rank * n:(rank + 1) * n].clone().requires_grad_()   # rows: whole output features
    b1 = w["b1"][rank * n:(rank + 1) * n].clone()
    w2 = w["w2"][:, rank * n:(rank + 1) * n].clone().requires_grad_()  # the matching columns
    x = x_full.clone().requires_grad_()
    try:
        x_in = f_apply(x)
        partial = F.linear(F.gelu(F.linear(x_in, w1, b1)), w2)            # [b, s, h], a partial sum
        y = g_apply(partial) + w["b2"]
        y.backward(dy)
    except NotImplementedError as e:
        return ("todo", str(e))
    # numpy: tensors would cross the result queue as shared memory that dies with the rank
    return ("ok", (y.detach().numpy(), x.grad.numpy(), w1.grad.numpy(), w2.grad.numpy(), n))


def _compare_mlp(results) -> list[str]:
    y_ref, dx_ref, dw1_ref, dw2_ref = _serial_mlp()
    lines = []
    for rank, (status, value) in enumerate(results):
        if status == "todo":
            raise NotImplementedError(value)
        y, dx, dw1, dw2, n = value
        for name, got, ref in (("output", y, y_ref), ("input gradient", dx, dx_ref),
                               ("W1 gradient (rows of this rank)", dw1, dw1_ref[rank * n:(rank + 1) * n]),
                               ("W2 gradient (columns of this rank)", dw2, dw2_ref[:, rank * n:(rank + 1) * n])):
            line = expect_close(f"rank {rank}: {name}", got, ref, RTOL, ATOL, WHY)
            if rank == 0:
                lines.append(line)
    return lines + [f"the parallel MLP on {TP} ranks matches one process"]


def _rank_with_learner_g(g_cls):
    return _parallel_mlp_rank(lambda x: mappings.copy_to_tensor_model_parallel_region(x, None),
                              lambda t: g_cls.apply(t, None))


def _rank_with_learner_f(f_cls):
    return _parallel_mlp_rank(lambda x: f_cls.apply(x, None),
                              lambda t: mappings.reduce_from_tensor_model_parallel_region(t, None))


def check_g(module) -> list[str]:
    return _compare_mlp(run_on_ranks(_rank_with_learner_g, TP, args=(module.G,), timeout=TIMEOUT))


def check_f(module) -> list[str]:
    return _compare_mlp(run_on_ranks(_rank_with_learner_f, TP, args=(module.F,), timeout=TIMEOUT))


def _embedding_rank(partial_embedding):
    tp, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(1)
    vocab, h = 10, 4
    full = torch.randn(vocab, h, generator=g, dtype=torch.float64)
    ids = torch.tensor([[0, 4, 5, 9], [3, 3, 8, 1]])                    # both ranks' ids, one repeated
    n = vocab // tp
    shard = full[rank * n:(rank + 1) * n].clone().requires_grad_()
    status = None
    try:
        rows = partial_embedding(ids, shard, rank * n, (rank + 1) * n)
    except NotImplementedError as e:
        status = ("todo", str(e))
    except (IndexError, RuntimeError) as e:   # e.g. looking up another rank's id in this rank's rows
        status = ("error", f"{type(e).__name__}: {str(e).splitlines()[0]}")
    else:
        if tuple(rows.shape) != (2, 4, h):
            status = ("shape", tuple(rows.shape))
    ok = torch.tensor(0 if status else 1)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)          # every rank learns of a failure: none waits in a collective
    if not ok:
        return status or ("other", None)
    total = rows.clone()
    dist.all_reduce(total)                                               # g: each id's row is on one rank
    torch.autograd.backward(rows, torch.ones_like(rows))                 # g's backward: the gradient unchanged
    return ("ok", (total.detach().numpy(), shard.grad.numpy(), n))


def check_vocab_embedding(module) -> list[str]:
    ids_text = "[[0, 4, 5, 9], [3, 3, 8, 1]]"
    results = run_on_ranks(_embedding_rank, TP, args=(module.partial_embedding,), timeout=TIMEOUT)
    full = torch.randn(10, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64).requires_grad_()
    ids = torch.tensor([[0, 4, 5, 9], [3, 3, 8, 1]])
    ref = F.embedding(ids, full)
    ref.backward(torch.ones_like(ref))
    lines = []
    for rank, (status, value) in enumerate(results):
        if status == "todo":
            raise NotImplementedError(value)
        if status == "other":
            continue                                   # another rank failed; its line says how
        if status == "error":
            n = 10 // TP
            raise Fail(f"rank {rank}: partial_embedding({ids_text}, rows [{rank * n}, {(rank + 1) * n})) raised "
                       f"{value}: an id outside [vocab_start, vocab_end) is another rank's; look up a valid "
                       "local row for it (e.g. 0) and zero its result")
        if status == "shape":
            raise Fail(f"rank {rank}: partial_embedding returned shape {value}, expected (2, 4, 4) = ids.shape + (h,)")
        total, grad, n = value
        lines.append(expect_close(f"rank {rank}: all-reduced rows", total, ref.detach(), RTOL, ATOL, "float64"))
        lines.append(expect_close(f"rank {rank}: gradient of its shard", grad, full.grad[rank * n:(rank + 1) * n],
                                  RTOL, ATOL, "float64; a repeated id adds up"))
    return lines


def check_vocab_padding(module) -> list[str]:
    cases = [(50257, tp, 128) for tp in (1, 2, 3, 4, 8)] + [(v, tp, d) for v in (1, 100, 128, 129, 2048, 2049)
                                                           for tp in (1, 2, 3) for d in (1, 64, 128)]
    for vocab, tp, by in cases:
        got = module.padded_vocab_size(vocab, tp, by)
        want = vocab_size_with_padding(vocab, tp, by)[0]
        if got != want:
            raise Fail(f"padded_vocab_size({vocab}, tp={tp}, divisible_by={by}) = {got}, expected {want} "
                       f"(the next multiple of divisible_by x tp = {by * tp})")
    lines = [f"padded_vocab_size matches Megatron's rule on {len(cases)} cases: GPT-2's 50257 -> "
             + ", ".join(f"{vocab_size_with_padding(50257, tp)[0]} at TP={tp}" for tp in (1, 2, 4))]
    try:
        VocabParallelEmbedding(50257, 8, tp_group=TPShape(2))
        raise RuntimeError("VocabParallelEmbedding accepted an unpadded vocabulary at TP=2")  # the course's bug
    except ValueError as e:
        actual = str(e)
    pasted = (module.ERROR_WITHOUT_PADDING or "").strip()
    if pasted.startswith("ValueError:"):      # the last line as Python prints it: the same message
        pasted = pasted[len("ValueError:"):].strip()
    if pasted.startswith("Traceback"):
        raise Fail("ERROR_WITHOUT_PADDING holds the traceback's first line; paste its last line, the error itself "
                   "(ValueError: ...)")
    if len(pasted) < 20 or pasted not in actual:
        why = "it is empty" if not pasted else ("it is shorter than 20 characters" if len(pasted) < 20
                                                else f"it is not part of the message the layer raises: {actual}")
        raise Fail("ERROR_WITHOUT_PADDING must be the error you got (at least 20 characters of it) when building\n"
                   f"VocabParallelEmbedding(50257, 8) on 2 tensor ranks without padding; {why}")
    lines.append(f"the error you reproduced: {actual}")
    if module.WHY not in ("A", "B", "C"):
        raise Fail(f"WHY must be 'A', 'B' or 'C', got {module.WHY!r}")
    if module.WHY != "B":
        raise Fail(f"WHY = {module.WHY!r}: no. Look at what each rank holds: rows [r*n, (r+1)*n) of the table, "
                   "with n = V / tp. What must n be?")
    lines.append("and why: every rank must hold the same whole number of rows; Megatron pads to a multiple "
                 "of 128 x TP (so any TP works, odd ones too)")
    return lines


EXERCISES = [
    Exercise("ch6.1", "write the backward of g and see the parallel MLP match one process", "ch6/g_backward.py",
             "see g at work: python src/ch6/parallel_mlp.py   (2 ranks; --nproc 4)", check_g),
    Exercise("ch6.2", "write the backward of f (the other half of the pair)", "ch6/f_backward.py",
             "see f at work: python src/ch6/parallel_mlp.py --nproc 4", check_f),
    Exercise("ch6.3", "a vocab-parallel embedding lookup: this rank's rows, zeros for the others",
             "ch6/vocab_embedding.py", "see it: python src/ch6/vocab_parallel_embedding.py", check_vocab_embedding),
    Exercise("ch6.4", "pad the vocabulary, then break the padding and explain the error", "ch6/vocab_padding.py",
             "try: python src/ch6/vocab_parallel_embedding.py --nproc 4", check_vocab_padding),
]
