"""Tensor-parallel layers, mappings, cross entropy and one transformer layer vs single-process references.

One ``run_on_ranks`` call per world size (1, 2, 4) runs every check, to keep
the suite fast; each check names itself in its assertion messages.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel import (
    ColumnParallelLinear,
    ParallelAttention,
    ParallelMLP,
    ParallelTransformerLayer,
    RowParallelLinear,
    VocabParallelEmbedding,
    gather_from_tensor_model_parallel_region,
    master_state_dict,
    scatter_to_tensor_model_parallel_region,
    shard_of,
    vocab_parallel_cross_entropy,
)
from lessons_pkg.tensor_parallel.cross_entropy import cross_entropy
from lessons_pkg.tensor_parallel.hf import to_hf_model
from lessons_pkg.tensor_parallel.instrument import count_collectives
from lessons_pkg.testing import run_on_ranks
from tp_reference import ATOL, RTOL, assert_shards_close, hf_grads, tiny_config


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _load_full(module, full: dict, rank: int, tp: int):
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(shard_of(p, full[name], rank, tp))


def check_linear_layers(rank: int, tp: int, group) -> None:
    g = torch.Generator().manual_seed(1)
    b, s, i, o = 2, 3, 8, 12
    full = {"weight": torch.randn(o, i, generator=g), "bias": torch.randn(o, generator=g)}
    x0 = torch.randn(b, s, i, generator=g)
    dy = torch.randn(b, s, o, generator=g)  # upstream gradient, so every output element matters

    x_ref = x0.clone().requires_grad_()
    ref = torch.nn.Linear(i, o)
    ref.load_state_dict(full)
    y_ref = ref(x_ref)
    y_ref.backward(dy)
    ref_grads = {"weight": ref.weight.grad, "bias": ref.bias.grad}

    # column parallel: gathered output, and the split output with the bias returned separately
    for gather, skip in ((True, False), (False, True)):
        layer = ColumnParallelLinear(i, o, gather_output=gather, skip_bias_add=skip, tp_group=group)
        assert layer.weight.shape == (o // tp, i)
        _load_full(layer, full, rank, tp)
        x = x0.clone().requires_grad_()
        y, bias = layer(x)
        if skip:
            y = y + bias
        if not gather:  # compare this rank's output columns with the reference's
            _close(y, y_ref.detach().chunk(tp, -1)[rank], "column output (split)")
            y.backward(dy.chunk(tp, -1)[rank])
        else:
            _close(y, y_ref.detach(), "column output (gathered)")
            y.backward(dy)
        _close(x.grad, x_ref.grad, f"column input grad gather={gather}")
        assert_shards_close(layer.named_parameters(), ref_grads, rank, tp, f"column gather={gather}")

    # row parallel: full input scattered inside, or the input already split
    for parallel_input in (False, True):
        layer = RowParallelLinear(i, o, input_is_parallel=parallel_input, tp_group=group)
        assert layer.weight.shape == (o, i // tp)
        _load_full(layer, full, rank, tp)
        x = x0.clone().requires_grad_()
        inp = x.chunk(tp, -1)[rank] if parallel_input else x
        y, bias = layer(inp)
        assert bias is None
        _close(y, y_ref.detach(), f"row output input_is_parallel={parallel_input}")
        y.backward(dy)
        expected_xgrad = x_ref.grad.chunk(tp, -1)[rank] if parallel_input else x_ref.grad
        got_xgrad = x.grad.chunk(tp, -1)[rank] if parallel_input else x.grad
        _close(got_xgrad, expected_xgrad, "row input grad")
        assert_shards_close(layer.named_parameters(), ref_grads, rank, tp, f"row input_is_parallel={parallel_input}")

    # initialisation: the full weight is the same whatever tp (Megatron's CPU init path)
    torch.manual_seed(5)
    layer = ColumnParallelLinear(i, o, tp_group=group)
    torch.manual_seed(5)
    expected = torch.nn.init.xavier_normal_(torch.empty(o, i))
    torch.testing.assert_close(layer.weight.detach(), expected.chunk(tp, 0)[rank], atol=0, rtol=0)


def check_mappings(rank: int, tp: int, group) -> None:
    x = torch.arange(2 * 4.0 * tp).view(2, 4 * tp).requires_grad_()
    part = scatter_to_tensor_model_parallel_region(x, group)          # forward split
    assert torch.equal(part, x.detach().chunk(tp, -1)[rank])
    (part * (rank + 1)).sum().backward()                               # backward all-gather
    expected = torch.cat([torch.full((2, 4), r + 1.0) for r in range(tp)], -1)
    assert torch.equal(x.grad, expected), "scatter backward must all-gather"

    y = torch.full((2, 3), float(rank + 1), requires_grad=True)
    full = gather_from_tensor_model_parallel_region(y, group)          # forward all-gather
    assert torch.equal(full, torch.cat([torch.full((2, 3), r + 1.0) for r in range(tp)], -1))
    w = torch.arange(full.numel(), dtype=torch.float32).view_as(full)
    (full * w).sum().backward()                                        # backward split
    assert torch.equal(y.grad, w.chunk(tp, -1)[rank]), "gather backward must keep this rank's slice"


def check_vocab_embedding(rank: int, tp: int, group) -> None:
    g = torch.Generator().manual_seed(2)
    vocab, h = 16, 6
    full_w = torch.randn(vocab, h, generator=g)
    ids = torch.tensor([[0, 15, 7, 8], [3, 12, 4, 11]])  # ids of every rank's range at tp 1, 2, 4
    dy = torch.randn(2, 4, h, generator=g)
    ref_w = full_w.clone().requires_grad_()
    y_ref = F.embedding(ids, ref_w)
    y_ref.backward(dy)

    emb = VocabParallelEmbedding(vocab, h, tp_group=group)
    assert (emb.vocab_start_index, emb.vocab_end_index) == (rank * vocab // tp, (rank + 1) * vocab // tp)
    _load_full(emb, {"weight": full_w}, rank, tp)
    y = emb(ids)
    _close(y, y_ref.detach(), "vocab embedding output")
    y.backward(dy)
    assert_shards_close(emb.named_parameters(), {"weight": ref_w.grad}, rank, tp, "vocab embedding")
    for bad in (vocab, -1):  # no rank owns them: refused on every rank, before the all-reduce
        with pytest.raises(ValueError, match=rf"token id {bad} is outside \[0, {vocab}\)"):
            emb(torch.tensor([[1, bad]]))


def check_cross_entropy(rank: int, tp: int, group) -> None:
    g = torch.Generator().manual_seed(3)
    b, s, vocab = 3, 4, 16 * tp
    full_logits = torch.randn(b, s, vocab, generator=g) * 4
    # targets in every rank's shard, first and last id of the vocabulary included
    target = (torch.arange(b * s) * (vocab // (b * s) + 1)).remainder(vocab).view(b, s)
    target[0, 0], target[-1, -1] = 0, vocab - 1
    assert set((target // (vocab // tp)).unique().tolist()) == set(range(tp)), "targets must reach every shard"
    dloss = torch.rand(b, s, generator=g)
    for smoothing in (0.0, 0.1):
        ref = full_logits.clone().requires_grad_()
        loss_ref = F.cross_entropy(ref.view(-1, vocab), target.view(-1), reduction="none",
                                   label_smoothing=smoothing).view(b, s)
        loss_ref.backward(dloss)

        mine = full_logits.chunk(tp, -1)[rank].clone().requires_grad_()
        before = mine.detach().clone()
        loss = vocab_parallel_cross_entropy(mine, target, label_smoothing=smoothing, tp_group=group)
        _close(loss, loss_ref.detach(), f"cross entropy loss (smoothing {smoothing})")
        loss.backward(dloss)
        _close(mine.grad, ref.grad.chunk(tp, -1)[rank], f"cross entropy grad (smoothing {smoothing})")
        assert torch.equal(mine.detach(), before), "vocab_parallel_cross_entropy modified the caller's logits"
        # the trainer's loss: this same function when TP > 1, F.cross_entropy when one rank has every logit
        theirs = full_logits.chunk(tp, -1)[rank].clone().requires_grad_()
        loss = cross_entropy(theirs, target, label_smoothing=smoothing, tp_group=group)
        _close(loss, loss_ref.detach(), f"trainer's cross entropy loss (smoothing {smoothing})")
        loss.backward(dloss)
        _close(theirs.grad, mine.grad, f"trainer's cross entropy grad (smoothing {smoothing})")

    # an explicit ignore index: loss 0 and gradient 0 there, as F.cross_entropy; any other stray id is refused
    ignored = target.clone()
    ignored[0, 1] = ignored[2, 3] = -100
    ref = full_logits.clone().requires_grad_()
    loss_ref = F.cross_entropy(ref.view(-1, vocab), ignored.view(-1), reduction="none", ignore_index=-100).view(b, s)
    loss_ref.backward(dloss)
    mine = full_logits.chunk(tp, -1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(mine, ignored, tp_group=group, ignore_index=-100)
    _close(loss, loss_ref.detach(), "cross entropy loss with ignore_index")
    loss.backward(dloss)
    _close(mine.grad, ref.grad.chunk(tp, -1)[rank], "cross entropy grad with ignore_index")
    theirs = full_logits.chunk(tp, -1)[rank].clone().requires_grad_()
    loss = cross_entropy(theirs, ignored, tp_group=group, ignore_index=-100)
    _close(loss, loss_ref.detach(), "trainer's cross entropy loss with ignore_index")
    loss.backward(dloss)
    _close(theirs.grad, mine.grad, "trainer's cross entropy grad with ignore_index")
    for bad, kwargs in ((vocab, {}), (-100, {}), (-1, {"ignore_index": -100})):
        stray = target.clone()
        stray[1, 2] = bad
        for loss_fn in (vocab_parallel_cross_entropy, cross_entropy):
            with pytest.raises(ValueError, match=rf"target: token id {bad} is outside \[0, {vocab}\)"):
                loss_fn(full_logits.chunk(tp, -1)[rank], stray, tp_group=group, **kwargs)


def check_transformer_pieces(rank: int, tp: int, group) -> None:
    """ParallelMLP, ParallelAttention and ParallelTransformerLayer vs transformers' GPT2Block."""
    config = tiny_config(num_layers=1)
    sd = master_state_dict(config, seed=7)
    hf = to_hf_model(sd, config)
    block = hf.transformer.h[0]
    x0 = torch.randn(2, 8, config.hidden_size, generator=torch.Generator().manual_seed(4))
    dy = torch.randn(2, 8, config.hidden_size, generator=torch.Generator().manual_seed(5))
    layer_sd = {k[len("layers.0."):]: v for k, v in sd.items() if k.startswith("layers.0.")}

    cases = [
        ("mlp", ParallelMLP(config, group), lambda x: block.mlp(x), lambda m, x: sum(m(x))),
        ("attention", ParallelAttention(config, group), lambda x: block.attn(x)[0], lambda m, x: sum(m(x))),
        ("layer", ParallelTransformerLayer(config, group), lambda x: block(x), lambda m, x: m(x)),
    ]
    for name, module, ref_fn, run in cases:
        prefix = {"mlp": "mlp.", "attention": "self_attention.", "layer": ""}[name]
        full = {k[len(prefix):]: v for k, v in layer_sd.items() if k.startswith(prefix)}
        _load_full(module, full, rank, tp)
        hf.zero_grad()
        x_ref = x0.clone().requires_grad_()
        y_ref = ref_fn(x_ref)
        y_ref.backward(dy)
        x = x0.clone().requires_grad_()
        y = run(module, x)
        _close(y, y_ref.detach(), f"{name} output")
        y.backward(dy)
        _close(x.grad, x_ref.grad, f"{name} input grad")
        ref_grads = hf_grads(hf, config)
        n = assert_shards_close(module.named_parameters(), ref_grads, rank, tp, name,
                                name_map=lambda n: f"layers.0.{prefix}{n}")
        assert n == len(full)


def check_communication_count(rank: int, tp: int, group) -> dict:
    """Count the all-reduces one transformer layer issues on the TP group, forward and backward."""
    config = tiny_config(num_layers=1)
    layer = ParallelTransformerLayer(config, group)
    calls = {"all_reduce": 0, "other": 0}
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def counting_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls["all_reduce" if group is tp_group else "other"] += 1
        return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

    def counting_all_gather(*args, **kwargs):
        calls["other"] += 1
        return real_all_gather(*args, **kwargs)

    tp_group = group
    x = torch.randn(2, 8, config.hidden_size, requires_grad=True)
    dist.all_reduce, dist.all_gather = counting_all_reduce, counting_all_gather
    try:
        y = layer(x)
        forward = dict(calls)
        calls.update(all_reduce=0, other=0)
        y.sum().backward()
        backward = dict(calls)
    finally:
        dist.all_reduce, dist.all_gather = real_all_reduce, real_all_gather

    # the demos count with lessons_pkg.tensor_parallel.instrument: it must agree with the count above
    with count_collectives(group) as demo_forward:
        y = layer(x)
    with count_collectives(group) as demo_backward:
        y.sum().backward()
    assert demo_forward["all_reduce"] == forward["all_reduce"], (demo_forward, forward)
    assert demo_backward["all_reduce"] == backward["all_reduce"], (demo_backward, backward)
    return {"forward": forward, "backward": backward}


def check_errors(rank: int, tp: int, group) -> None:
    if tp == 1:
        return
    with pytest.raises(ValueError, match=rf"output_size \({2 * tp + 1}\) is not divisible by "
                                         rf"tensor_model_parallel_size \({tp}\)"):
        ColumnParallelLinear(4, 2 * tp + 1, tp_group=group)
    with pytest.raises(ValueError, match=rf"input_size \({2 * tp + 1}\) is not divisible"):
        RowParallelLinear(2 * tp + 1, 4, tp_group=group)
    with pytest.raises(ValueError, match=rf"num_embeddings \(the padded vocabulary size\) \({4 * tp + 1}\)"):
        VocabParallelEmbedding(4 * tp + 1, 4, tp_group=group)
    with pytest.raises(ValueError, match=rf"num_attention_heads \({tp + 1}\) is not divisible by "
                                         rf"tensor_model_parallel_size \({tp}\)"):
        ParallelAttention(tiny_config(hidden_size=8 * (tp + 1), num_attention_heads=tp + 1), group)


def rank_main(tp: int) -> dict:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(0)
    check_mappings(rank, tp, group)
    check_linear_layers(rank, tp, group)
    check_vocab_embedding(rank, tp, group)
    check_cross_entropy(rank, tp, group)
    check_transformer_pieces(rank, tp, group)
    check_errors(rank, tp, group)
    return check_communication_count(rank, tp, group)


@pytest.mark.parametrize("world, tp", [(1, 1), (2, 2), (4, 4), (4, 2)])
def test_tensor_parallel_layers_match_serial(world, tp):
    # (4, 2): two tensor-parallel groups side by side (data parallel 2), so ranks within a group
    # must be found by their group rank, not their global rank
    counts = run_on_ranks(rank_main, world, args=(tp,), timeout=120)
    for rank_counts in counts:
        if tp == 1:  # a group of one rank communicates nothing
            assert rank_counts == {"forward": {"all_reduce": 0, "other": 0}, "backward": {"all_reduce": 0, "other": 0}}
        else:        # g of attention and of the MLP forward; their f backward; no other collective
            assert rank_counts == {"forward": {"all_reduce": 2, "other": 0}, "backward": {"all_reduce": 2, "other": 0}}


@pytest.mark.parametrize("sq, sk", [(7, 7), (3, 10)])
def test_attention_with_dropout_matches_sdpa_and_the_reference(sq, sk):
    """The CPU training path gives the step-by-step reference's outputs and gradients, dropout mask
    included (same random state, same mask), for square attention and for queries after cached keys;
    without dropout it gives SDPA's. Tolerance 1e-5: float32 sums of a few terms taken in another order."""
    from lessons_pkg.tensor_parallel.transformer import attention_reference, attention_with_dropout

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, sq, 8, generator=g, requires_grad=True)
    k, v = (torch.randn(2, 3, sk, 8, generator=g, requires_grad=True) for _ in range(2))
    dy = torch.randn(2, 3, sq, 8, generator=g)

    def run(fn):
        torch.manual_seed(11)
        out = fn()
        return (out, *torch.autograd.grad(out, (q, k, v), dy))

    pairs = {"dropout 0.5, against the reference": (run(lambda: attention_with_dropout(q, k, v, 0.5)),
                                                    run(lambda: attention_reference(q, k, v, 0.5, training=True)))}
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    pairs["no dropout, against SDPA"] = (run(lambda: attention_with_dropout(q, k, v, 0.0)),
                                         run(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)))
    no_dropout = pairs["no dropout, against SDPA"][0][0]
    assert not torch.allclose(pairs["dropout 0.5, against the reference"][0][0], no_dropout), "dropout changed nothing"
    torch.manual_seed(12)
    other_mask = attention_with_dropout(q, k, v, 0.5)
    assert not torch.allclose(other_mask, pairs["dropout 0.5, against the reference"][0][0]), \
        "another random state must give another dropout mask"
    for what, (ours, theirs) in pairs.items():
        for name, a, b in zip(("output", "grad q", "grad k", "grad v"), ours, theirs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}, {name}: {m}")



def test_one_rank_mappings_pass_tensors_through_without_a_copy():
    """At TP=1 f and g are identities both ways: no all-reduce and no clone (the clones took 0.46 ms an
    iteration of GPT-2 124M on an H200, docs/gpu/h200_profile_before.md), and the output can be changed in
    place as at TP > 1."""
    from lessons_pkg.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                      reduce_from_tensor_model_parallel_region)

    x = torch.randn(4, 8, requires_grad=True)
    for fn in (copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region):
        y = fn(x, None)
        assert y.data_ptr() == x.data_ptr() and torch.equal(y, x)
        g = torch.randn(4, 8)
        (grad,) = torch.autograd.grad(y, x, g)
        assert grad.data_ptr() == g.data_ptr()          # the gradient itself, not a copy
        z = fn(x * 2, None)
        z += 1                                          # in place on the output: allowed, as at TP > 1
        (grad,) = torch.autograd.grad(z.sum(), x)
        assert torch.equal(grad, torch.full_like(x, 2.0))


def test_plain_bias_gelu_keeps_a_half_precision_activation():
    """Under autocast a bf16 matmul output meets a float32 bias: the result stays bf16 (not promoted to
    float32, the bytes the GPU profile counted), and the bias still gets a float32 gradient, equal to
    the float32 computation's within bf16 rounding (the bf16 sum of 64 rows: 2^-8 relative each)."""
    from lessons_pkg.tensor_parallel.transformer import bias_gelu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g).to(torch.bfloat16).requires_grad_()
    b = torch.randn(32, generator=g, requires_grad=True)
    y = bias_gelu(x, b)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert b.grad.dtype == torch.float32
    b32 = b.detach().clone().requires_grad_()
    F.gelu(x.detach().float() + b32, approximate="tanh").sum().backward()
    assert torch.allclose(b.grad, b32.grad, rtol=2e-2, atol=2e-2), (b.grad - b32.grad).abs().max()
