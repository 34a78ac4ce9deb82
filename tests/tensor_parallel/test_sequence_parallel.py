"""Sequence parallelism against one process from the same weights: mappings, the whole ParallelGPT, dropout.

The reference is ParallelGPT at TP=1 in the same process (its vocabulary padded
as the TP model pads it, so the dummy rows enter the softmax alike), on the
whole sequence: the parallel model must give the same per-token loss, the same
logits (this rank's vocabulary slice) and, after the sequence-parallel
gradients are summed over the tensor group, the same gradient of every
parameter. Tolerances are tp_reference's (ATOL 1e-5, RTOL 1e-4): float32 sums
split over ranks in another order, ~100x below any real bug.

With dropout, every dropout call of the parallel model is recorded (the noise
``keep / (1 - p)`` it multiplied by) and the reference replays the masks: the
ranks' sequence slices glued along the sequence for the hidden dropouts, the
ranks' heads glued along the heads for attention dropout. Then the same
comparison holds exactly as without dropout; and the sequence-parallel masks
of different ranks differ (each rank's own stream), as they must.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from lessons_pkg import parallel_state as ps
from lessons_pkg.tensor_parallel import ParallelGPT, master_state_dict
from lessons_pkg.tensor_parallel import gpt as gpt_module
from lessons_pkg.tensor_parallel import transformer as transformer_module
from lessons_pkg.tensor_parallel.dropout import dropout as real_dropout
from lessons_pkg.tensor_parallel.instrument import count_collectives
from lessons_pkg.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from lessons_pkg.tensor_parallel.random import model_parallel_manual_seed
from lessons_pkg.tensor_parallel.sequence_parallel import (
    allreduce_sequence_parallel_grads,
    linear_with_sequence_gather,
    linear_with_sequence_gather_reference,
    sequence_parallel_params,
)
from lessons_pkg.testing import run_on_ranks
from tp_reference import ATOL, RTOL, assert_shards_close, tiny_config

B, S = 2, 8


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _slice(x, tp, rank, dim=1):
    return x.chunk(tp, dim)[rank]


# --- the mappings and the gathering matmul --------------------------------------------------------
def _mappings(tp):
    ps.initialize_model_parallel(tp)
    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    g = torch.Generator().manual_seed(0)
    full = torch.randn(B, S, 6, generator=g)                  # the same on every rank
    grad_full = torch.randn(B, S, 6, generator=g)
    partial = [torch.randn(B, S, 6, generator=g) for _ in range(tp)]   # rank r's partial sums

    # all-gather forward, reduce-scatter backward
    x = _slice(full, tp, rank).clone().requires_grad_()
    y = gather_from_sequence_parallel_region(x, group)
    assert torch.equal(y, full)
    y.backward(grad_full * (rank + 1))                        # rank r's partial gradient: (r + 1) g
    _close(x.grad, _slice(grad_full, tp, rank) * sum(range(1, tp + 1)), "all-gather's backward (reduce-scatter)")

    # reduce-scatter forward, all-gather backward
    p = partial[rank].clone().requires_grad_()
    z = reduce_scatter_to_sequence_parallel_region(p, group)
    _close(z, _slice(sum(partial), tp, rank), "reduce-scatter forward")
    z.backward(_slice(grad_full, tp, rank))
    assert torch.equal(p.grad, grad_full), "reduce-scatter's backward (all-gather)"

    # the gathering matmul equals the plain composition, outputs and every gradient
    w = torch.randn(10 // tp * tp, 6, generator=g)
    w_r, b_r = _slice(w, tp, rank, 0).clone(), torch.randn(w.size(0), generator=g).chunk(tp)[rank].clone()
    results = []
    for fn in (linear_with_sequence_gather, linear_with_sequence_gather_reference):
        xs, ws, bs = (t.clone().requires_grad_() for t in (_slice(full, tp, rank), w_r, b_r))
        out = fn(xs, ws, bs, group)                           # [b, s/tp, 6] -> [b, s, 10/tp]
        assert out.shape == (B, S, w_r.size(0))
        (out * torch.arange(out.numel()).view_as(out).sin()).sum().backward()
        results.append((out.detach(), xs.grad, ws.grad, bs.grad))
    for what, a, b in zip(("output", "input grad", "weight grad", "bias grad"), *results):
        _close(a, b, f"linear_with_sequence_gather {what}")

    # under bf16 autocast (the GPU trainer's mode; here on the CPU): the matmul in bf16 like F.linear's,
    # float32 gradients for the float32 weight and bias; bf16 rounding (8 bits of mantissa) bounds the error
    results = []
    for fn in (linear_with_sequence_gather, linear_with_sequence_gather_reference):
        xs, ws, bs = (t.clone().requires_grad_() for t in (_slice(full, tp, rank), w_r, b_r))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(xs, ws, bs, group)
        assert out.dtype == torch.bfloat16
        out.float().sum().backward()
        assert ws.grad.dtype == bs.grad.dtype == torch.float32
        results.append((out.float().detach(), xs.grad, ws.grad, bs.grad))
    for what, a, b in zip(("output", "input grad", "weight grad", "bias grad"), *results):
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2, msg=lambda m: f"bf16 {what}: {m}")


@pytest.mark.parametrize("tp", [2, 4])
def test_mappings_and_gathering_matmul(tp):
    run_on_ranks(_mappings, tp, args=(tp,), timeout=120)


# --- the whole model ----------------------------------------------------------------------------
class _Recorder:
    """Stands in for ``apply_dropout``: the same draw (a mask depends on shape and stream only), recorded."""

    def __init__(self):
        self.noises = []

    def __call__(self, x, p, training=True, generator=None):
        if not training or p == 0.0:
            return x
        noise = real_dropout(torch.ones_like(x), p, True, generator)   # keep / (1 - p'), the draw dropout makes
        self.noises.append(noise)
        return x * noise


class _Replayer:
    def __init__(self, noises):
        self.noises = list(noises)

    def __call__(self, x, p, training=True, generator=None):
        if not training or p == 0.0:
            return x
        noise = self.noises.pop(0)
        assert noise.shape == x.shape, (noise.shape, x.shape)
        return x * noise


def _patch(monkey):
    saved = transformer_module.apply_dropout, gpt_module.apply_dropout
    transformer_module.apply_dropout = gpt_module.apply_dropout = monkey
    return saved


def _unpatch(saved):
    transformer_module.apply_dropout, gpt_module.apply_dropout = saved


def _own_group():
    """A group of this rank alone (every rank creates every one, as new_group requires)."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]
    return groups[dist.get_rank()]


def _batch(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (B, S + 1), generator=g)
    return ids[:, :-1], ids[:, 1:], torch.rand(B, S, generator=g)


def _gpt(tp, dropout, recompute):
    ps.initialize_model_parallel(tp)
    group, rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    torch.manual_seed(5)                  # the default stream: alike on every rank (attention dropout)
    model_parallel_manual_seed(5, rank)   # the sequence-parallel stream: one per rank
    config = tiny_config(num_layers=2, make_vocab_size_divisible_by=8 * tp, hidden_dropout=dropout,
                         attention_dropout=dropout, recompute_activations=recompute)
    sd = master_state_dict(config, seed=11)
    ids, labels, w = _batch(config)

    model = ParallelGPT(dataclasses.replace(config, sequence_parallel=True, make_vocab_size_divisible_by=8),
                        tp_group=group)                       # pads to a multiple of 8 x tp, as the reference
    model.load_master_state_dict(sd)
    recorder = _Recorder()
    saved = _patch(recorder)
    try:
        logits = model(ids)                                   # [b, s, padded V / tp]: the whole sequence
        loss = model(ids, labels=labels)                      # [b, s]
        (loss * w).sum().backward()
    finally:
        _unpatch(saved)
    allreduce_sequence_parallel_grads([model], group)
    tagged = {n for n, p in model.named_parameters() if getattr(p, "sequence_parallel", False)}
    expected = {"embedding.position_embeddings.weight", "final_layernorm.weight", "final_layernorm.bias"} | {
        f"layers.{i}.{n}" for i in range(2) for n in (
            "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
            "post_attention_layernorm.bias", "self_attention.dense.bias", "mlp.dense_4h_to_h.bias")}
    assert tagged == expected, tagged ^ expected

    per_forward = 1 + 3 * config.num_layers                   # embedding, then attention + 2 hidden per layer
    if recompute and dropout:
        # backward recomputed each layer (the last first): it must have drawn that layer's forward masks again
        loss_pass, again = recorder.noises[per_forward:2 * per_forward], recorder.noises[2 * per_forward:]
        layers = [loss_pass[1 + 3 * i:4 + 3 * i] for i in range(config.num_layers)]
        expected_again = [n for layer in reversed(layers) for n in layer]
        assert len(again) == len(expected_again)
        for i, (a, e) in enumerate(zip(again, expected_again)):
            assert torch.equal(a, e), f"recomputed dropout call {i} drew another mask than its forward"
        recorder.noises = recorder.noises[:2 * per_forward]
    # every rank's masks, glued into the whole model's: hidden [b, s/tp, h] along s; attention
    # [b * heads/tp, s, s] along the heads
    noises = []
    hidden = [n.size(-1) == config.hidden_size for n in recorder.noises]
    for noise, is_hidden in zip(recorder.noises, hidden):
        parts = [torch.empty_like(noise) for _ in range(tp)]
        dist.all_gather(parts, noise.contiguous(), group=group)
        if is_hidden:
            assert not torch.equal(parts[0], parts[1]), "two ranks drew the same sequence-parallel mask"
            noises.append(torch.cat(parts, dim=1))                          # [b, s, h]
        else:
            heads = [p.view(B, -1, S, S) for p in parts]                    # [b, heads/tp, s, s] each
            noises.append(torch.cat(heads, dim=1).flatten(0, 1))            # [b * heads, s, s]
    n_hidden = sum(hidden)
    assert n_hidden == (0 if dropout == 0 else 2 * (1 + 2 * config.num_layers))  # 2 forwards x (embedding + 2/layer)
    assert len(noises) == (0 if dropout == 0 else 2 * per_forward)

    reference = ParallelGPT(dataclasses.replace(config, recompute_activations=False),  # TP=1, no SP, no recompute
                            tp_group=_own_group())
    reference.load_master_state_dict(sd)
    saved = _patch(_Replayer(noises))
    try:
        logits_ref = reference(ids)
        loss_ref = reference(ids, labels=labels)
        (loss_ref * w).sum().backward()
    finally:
        _unpatch(saved)
    what = f"tp={tp} dropout={dropout} recompute={recompute}"
    _close(logits, _slice(logits_ref.detach(), tp, rank, -1), f"logits {what}")
    _close(loss, loss_ref.detach(), f"per-token loss {what}")
    ref_grads = {n: p.grad for n, p in reference.named_parameters()}
    assert_shards_close(model.named_parameters(), ref_grads, rank, tp, what)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("dropout", [0.0, 0.1], ids=["no-dropout", "dropout"])
def test_sequence_parallel_gpt_equals_one_process(tp, dropout):
    run_on_ranks(_gpt, tp, args=(tp, dropout, False), timeout=120)


def test_sequence_parallel_gpt_with_recompute():
    run_on_ranks(_gpt, 2, args=(2, 0.1, True), timeout=120)


# --- communication per layer ------------------------------------------------------------------------
def _collectives(tp):
    ps.initialize_model_parallel(tp)
    group = ps.get_tensor_model_parallel_group()
    config = tiny_config(num_layers=1)
    counts = {}
    for sp in (False, True):
        layer = transformer_module.ParallelTransformerLayer(dataclasses.replace(config, sequence_parallel=sp), group)
        x = torch.randn(B, S // tp if sp else S, config.hidden_size, requires_grad=True)
        with count_collectives(group) as forward:
            y = layer(x)
        with count_collectives(group) as backward:
            y.sum().backward()
        counts[sp] = (dict(forward), dict(backward), forward.ring_bytes_sent(tp), backward.ring_bytes_sent(tp))
    return counts


@pytest.mark.parametrize("tp", [2, 4])
def test_collectives_per_layer(tp):
    """Per layer, forward: 2 all-reduces become 2 all-gathers + 2 reduce-scatters. Backward: 2 all-reduces
    become 2 reduce-scatters + 4 all-gathers (the 2 of the reduce-scatters' backward, and the matmul inputs
    gathered again, as they were kept as slices)."""
    counts = run_on_ranks(_collectives, tp, args=(tp,), timeout=120)[0]
    assert counts[False][:2] == ({"all_reduce": 2}, {"all_reduce": 2})
    assert counts[True][:2] == ({"all_gather_into_tensor": 2, "reduce_scatter_tensor": 2},
                                {"all_gather_into_tensor": 4, "reduce_scatter_tensor": 2})
    # bytes each rank sends (ring algorithms): forward the same as the all-reduces' (4 (t-1)/t [b, s, h]
    # either way); backward half as much again, for the two matmul inputs gathered a second time
    full = B * S * tiny_config().hidden_size * 4                       # one [b, s, h] float32 tensor
    assert counts[False][2] == counts[False][3] == round(2 * 2 * (tp - 1) / tp * full)
    assert counts[True][2] == counts[False][2]
    assert counts[True][3] == round(6 * (tp - 1) / tp * full)


# --- what cannot be done is refused ----------------------------------------------------------------------
def _refusals():
    ps.initialize_model_parallel(2)
    config = dataclasses.replace(tiny_config(), sequence_parallel=True)
    model = ParallelGPT(config)
    with pytest.raises(ValueError, match=r"sequence length \(7\) must be divisible by the tensor-parallel size \(2\)"):
        model(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="generation"):
        model(torch.zeros(1, 8, dtype=torch.long), last_position_only=True)
    assert sequence_parallel_params([model])


def test_refusals_name_the_values():
    run_on_ranks(_refusals, 2, timeout=60)
    with pytest.raises(ValueError, match=r"needs --tensor-model-parallel-size > 1, got 1"):
        ParallelGPT(dataclasses.replace(tiny_config(), sequence_parallel=True))


# --- the memory claim, measured --------------------------------------------------------------------------
def test_activation_memory_follows_the_paper_s_formula():
    """scripts/bench_sequence_parallel.py on a small layer: the bytes autograd keeps per rank are the paper's
    count (float32 element sizes) within 1% (the LayerNorms' per-token mean and 1/std, [b, s] floats each,
    are not in it), at TP 1, 2 and 4 with and without sequence parallelism; and sequence parallelism keeps
    less than tensor parallelism alone at every t > 1."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_sequence_parallel.py")
    spec = importlib.util.spec_from_file_location("bench_sequence_parallel", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(hidden=128, heads=8, seq=128, batch=2, sizes=[1, 2, 4])
    assert [(r["tp"], r["sp"]) for r in rows] == [(1, False), (2, False), (2, True), (4, False), (4, True)]
    for r in rows:
        assert 1.0 <= r["peak"] / r["predicted"] <= 1.01, (r["tp"], r["sp"], r["peak"], r["predicted"])
    by = {(r["tp"], r["sp"]): r for r in rows}
    for t in (2, 4):
        assert by[t, True]["peak"] < by[t, False]["peak"]
        assert by[t, True]["forward"] == by[t, False]["forward"]           # the same bytes forward
    assert "formula" in bench.table(rows, 128, 8, 128, 2)
