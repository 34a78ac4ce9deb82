"""The executor on 1, 2 and 4 ranks equals single-process training of the same model.

For every schedule and m, each rank builds the full model from the same seed,
keeps a serial reference of it, and runs its own chunks through
``forward_backward``. Compared: the microbatch losses (last stage), the
gradient of every parameter (each rank checks the parameters it holds) and
the gradient of the input microbatches (first stage).
"""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lessons_pkg import parallel_state
from lessons_pkg.pipeline import forward_backward
from lessons_pkg.pipeline.schedules import interleaved_one_f_one_b
from lessons_pkg.pipeline.partition import LinearTanh, chunk_layer_ranges, chunks_for_rank, toy_layers
from lessons_pkg.testing import RankError, run_on_ranks

HIDDEN, SEQ, MB_SIZE, LAYERS = 8, 3, 2, 8

# float32; the pipeline runs the same operations per microbatch as the reference,
# only the order in which microbatch gradients are summed (and where 1/m is applied) differs
ATOL, RTOL = 1e-6, 1e-5


def _batch(m, seed, vocab=None):
    g = torch.Generator().manual_seed(seed)
    if vocab is None:
        xs = [torch.randn(MB_SIZE, SEQ, HIDDEN, generator=g, requires_grad=True) for _ in range(m)]
        ts = [torch.randn(MB_SIZE, SEQ, HIDDEN, generator=g) for _ in range(m)]
    else:
        xs = [torch.randint(vocab, (MB_SIZE, SEQ), generator=g) for _ in range(m)]
        ts = [torch.randint(HIDDEN, (MB_SIZE, SEQ), generator=g) for _ in range(m)]
    return xs, ts


def _mse(y, t):
    return F.mse_loss(y, t)


def _cross_entropy(y, t):
    return F.cross_entropy(y.flatten(0, 1), t.flatten())  # [b, s, h] logits over h classes


class EmbedTanh(nn.Module):
    """First layer of the token model: token ids [b, s] -> [b, s, h]."""

    def __init__(self, vocab):
        super().__init__()
        self.embedding = nn.Embedding(vocab, HIDDEN)
        self.layer = LinearTanh(HIDDEN)

    def forward(self, ids):
        return self.layer(self.embedding(ids))


def _token_layers(seed):
    torch.manual_seed(seed)
    return nn.ModuleList([EmbedTanh(vocab=11)] + [LinearTanh(HIDDEN) for _ in range(LAYERS - 1)])


def _check_one(schedule, p, m, v, layers, group, seed, vocab=None, loss_fn=_mse, tensor_shape=None):
    """Run one case through the pipeline and through the serial reference; assert equality."""
    rank = dist.get_rank(group)
    reference = copy.deepcopy(layers)
    xs, ts = _batch(m, seed, vocab)
    ref_xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in xs]

    # serial reference: mean of the microbatch losses, one backward
    ref_losses = []
    for x, t in zip(ref_xs, ts):
        y = x
        for layer in reference:
            y = layer(y)
        ref_losses.append(loss_fn(y, t))
    torch.stack(ref_losses).mean().backward()

    chunks = chunks_for_rank(layers, rank, p, v)
    losses = forward_backward(chunks, schedule, xs if rank == 0 else None, ts if rank == p - 1 else None,
                              loss_fn, group=group, num_microbatches=m, tensor_shape=tensor_shape)
    case = f"{schedule} p={p} m={m} v={v} rank={rank}"
    if rank == p - 1:
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses).detach(), atol=ATOL, rtol=RTOL, msg=case)
    else:
        assert losses is None, case
    mine = [i for r in chunk_layer_ranges(len(layers), p, v)[rank] for i in r]
    for i in mine:
        for (name, a), b in zip(layers[i].named_parameters(), reference[i].parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=ATOL, rtol=RTOL, msg=f"{case} layer {i} {name}")
    if rank == 0 and vocab is None:
        for x, rx in zip(xs, ref_xs):
            torch.testing.assert_close(x.grad, rx.grad, atol=ATOL, rtol=RTOL, msg=f"{case} input grad")

    # forward only (evaluation): the same losses, and no gradient touched
    grads = [q.grad.clone() for chunk in chunks for q in chunk.parameters()]
    eval_losses = forward_backward(chunks, schedule, xs if rank == 0 else None, ts if rank == p - 1 else None,
                                   loss_fn, group=group, num_microbatches=m, forward_only=True, tensor_shape=tensor_shape)
    if rank == p - 1:
        torch.testing.assert_close(torch.stack(eval_losses), torch.stack(ref_losses).detach(), atol=ATOL, rtol=RTOL, msg=case)
    assert all(torch.equal(g, q.grad) for g, q in zip(grads, (q for chunk in chunks for q in chunk.parameters())))
    return case


def _all_cases(p):
    group = dist.new_group(list(range(p)))
    done = []
    for m in (1, 4, 8):
        for schedule, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", 1), ("interleaved", 2)):
            if schedule == "interleaved" and m % p != 0:
                with pytest.raises(ValueError, match=f"m={m}.*p={p}"):
                    forward_backward([nn.Identity()] * v, schedule, None, None, _mse, group=group, num_microbatches=m)
                done.append(f"{schedule} p={p} m={m} v={v}: error")
                continue
            layers = toy_layers(LAYERS, HIDDEN, seed=m)
            done.append(_check_one(schedule, p, m, v, layers, group, seed=100 + m))
    # first stage takes token ids (LongTensor), last stage a cross entropy
    done.append(_check_one("1f1b", p, 4, 1, _token_layers(7), group, seed=5, vocab=11, loss_fn=_cross_entropy))
    # activations of known shape: no headers travel (Megatron's tensor_shape)
    for schedule, v in (("1f1b", 1), ("interleaved", 2)):
        done.append(_check_one(schedule, p, 4, v, toy_layers(LAYERS, HIDDEN, seed=9), group, seed=9,
                               tensor_shape=(MB_SIZE, SEQ, HIDDEN)))
    if p > 1:
        done += _as_on_nccl(p, group)
    return done


def _as_on_nccl(p, group):
    """The executor's branch for backends other than gloo (NCCL on GPUs), taken on gloo by naming it so."""
    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        with pytest.raises(ValueError, match="on the nccl backend pass tensor_shape="):
            forward_backward(chunks_for_rank(toy_layers(LAYERS, HIDDEN, seed=3), dist.get_rank(group), p, 2),
                             "interleaved", None, None, _mse, group=group, num_microbatches=4)
        case = _check_one("interleaved", p, 4, 2, toy_layers(LAYERS, HIDDEN, seed=3), group, seed=3,
                          tensor_shape=(MB_SIZE, SEQ, HIDDEN))
        # activations in bfloat16 (as under autocast) arrive as the float32 the receiver was told of
        bf16 = [nn.Sequential(c, _ToBFloat16()) for c in
                chunks_for_rank(toy_layers(LAYERS, HIDDEN, seed=3), dist.get_rank(group), p, 2)]
        xs, ts = _batch(4, 3)
        forward_backward(bf16, "interleaved", xs if dist.get_rank(group) == 0 else None,
                         ts if dist.get_rank(group) == p - 1 else None, lambda y, t: _mse(y.float(), t),
                         group=group, num_microbatches=4, tensor_shape=(MB_SIZE, SEQ, HIDDEN),
                         tensor_dtype=torch.float32)
    finally:
        dist.get_backend = real
    return [f"{case} (nccl branch)"]


class _ToBFloat16(nn.Module):
    def forward(self, x):
        return x.to(torch.bfloat16)


@pytest.mark.parametrize("p", [1, 2, 4])
def test_pipeline_equals_serial(p):
    results = run_on_ranks(_all_cases, p, args=(p,), timeout=120)
    assert all(len(r) == 15 + (p > 1) for r in results)  # + the nccl-branch case


def _with_parallel_state(tp, pp):
    """Pipelines beside data or tensor parallelism: the default group comes from parallel_state."""
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    ranks = parallel_state.get_pipeline_model_parallel_ranks()
    layers = toy_layers(LAYERS, HIDDEN, seed=3)
    reference = copy.deepcopy(layers)
    # a different batch for each data-parallel replica; the tensor-parallel ranks of a stage share theirs
    xs, ts = _batch(4, seed=parallel_state.get_data_parallel_rank())
    chunks = chunks_for_rank(layers, stage, pp, 2)
    losses = forward_backward(chunks, "interleaved", xs, ts, _mse)  # group: parallel_state's pipeline group
    ref_losses = []
    for x, t in zip(xs, ts):
        y = x.detach()
        for layer in reference:
            y = layer(y)
        ref_losses.append(_mse(y, t))
    torch.stack(ref_losses).mean().backward()
    if stage == pp - 1:
        torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses).detach(), atol=ATOL, rtol=RTOL)
    for i in [i for r in chunk_layer_ranges(LAYERS, pp, 2)[stage] for i in r]:
        for a, b in zip(layers[i].parameters(), reference[i].parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=ATOL, rtol=RTOL)
    parallel_state.destroy_model_parallel()
    return ranks


@pytest.mark.parametrize("tp,pp,expected", [
    (1, 2, [[0, 2], [1, 3], [0, 2], [1, 3]]),  # data parallel 2 x pipeline 2
    (2, 2, [[0, 2], [1, 3], [0, 2], [1, 3]]),  # tensor parallel 2 x pipeline 2
])
def test_pipeline_groups_beside_data_and_tensor_parallel(tp, pp, expected):
    assert run_on_ranks(_with_parallel_state, 4, args=(tp, pp), timeout=60) == expected


def _wrong_modules():
    group = dist.new_group([0, 1])
    with pytest.raises(ValueError, match=r"runs 2 model chunk\(s\) per rank but this rank was given 1 module"):
        forward_backward([nn.Identity()], interleaved_one_f_one_b(2, 2, 2), None, None, _mse, group=group, num_microbatches=2)
    with pytest.raises(ValueError, match=r"runs 1 model chunk\(s\) per rank but this rank was given 2 module"):
        forward_backward([nn.Identity(), nn.Identity()], "1f1b", None, None, _mse, group=group, num_microbatches=2)
    with pytest.raises(ValueError, match="give microbatches, targets or num_microbatches"):
        forward_backward([nn.Identity()], "1f1b", None, None, _mse, group=group)
    # no rank exits while the other may still be connecting the group's mesh (a make test run failed
    # once with "Gloo connectFullMesh failed ... Connection closed by peer" on rank 1)
    dist.barrier(group=group)
    return True


def test_wrong_number_of_modules_raises():
    assert run_on_ranks(_wrong_modules, 2, timeout=30) == [True, True]


def test_layers_not_divisible_raises():
    with pytest.raises(ValueError, match=r"number of layers \(6\) is not divisible by pipeline stages \(2\) x model chunks per stage \(2\) = 4"):
        chunks_for_rank(toy_layers(6, 4), 0, 2, 2)


def _mismatched_schedules():
    """Rank 1 runs its forwards in another microbatch order than rank 0 sends them."""
    from lessons_pkg.pipeline.schedules import Action, Schedule

    group = dist.new_group([0, 1])
    rank = dist.get_rank(group)
    orders = [[Action("F", 0), Action("F", 1), Action("B", 0), Action("B", 1)],
              [Action("F", 1), Action("F", 0), Action("B", 1), Action("B", 0)]]
    schedule = Schedule("mismatched", 2, 2, 1, orders)
    chunks = chunks_for_rank(toy_layers(2, HIDDEN), rank, 2)
    xs, ts = _batch(2, seed=0)
    forward_backward(chunks, schedule, xs, ts, _mse, group=group)


def test_schedules_that_do_not_pair_up_fail_naming_the_messages():
    with pytest.raises(RankError, match=r"rank 1 expected message <activation of microbatch 1 from virtual stage 0> "
                                        r"from rank 0 but received <activation of microbatch 0 from virtual stage 0>"):
        run_on_ranks(_mismatched_schedules, 2, timeout=30)
