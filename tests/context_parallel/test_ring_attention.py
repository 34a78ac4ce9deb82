"""Context parallelism's pieces against the plain reference: the split, the online-softmax merge, ring attention.

The reference is full attention on the whole sequence in one process
(``full_attention``, scores -> masked softmax -> weighted sum, with its
log-sum-exp), from the same q, k, v. Ring attention on CP 2 and 4 ranks,
causal and not, must give every rank its tokens' outputs and log-sum-exps, and
the gradients of its q, k, v slices. Tolerance 1e-5 absolute / 1e-4 relative:
float32, the softmax normalised block by block (exp and log of partial sums)
instead of at once, a few ulps on O(1) values.
"""
from __future__ import annotations

import pytest
import torch

from lessons_pkg import parallel_state as ps
from lessons_pkg.context_parallel import (
    chunk_ids,
    full_attention,
    gather_sequence,
    local_positions,
    merge_partial_attention,
    rank_chunks,
    ring_attention,
    split_sequence,
)
from lessons_pkg.context_parallel.online_softmax import block_attention
from lessons_pkg.context_parallel.ring_attention import RingTrace, tracing
from lessons_pkg.testing import run_on_ranks

ATOL, RTOL = 1e-5, 1e-4
B, NH, S, HD = 2, 3, 16, 8


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def test_balanced_chunks_and_split():
    assert [chunk_ids(r, 2) for r in range(2)] == [(0, 3), (1, 2)]
    assert [chunk_ids(r, 4) for r in range(4)] == [(0, 7), (1, 6), (2, 5), (3, 4)]
    assert [rank_chunks(r, 2, "contiguous") for r in range(2)] == [(0, 1), (2, 3)]
    x = torch.arange(16).view(1, 16)
    assert split_sequence(x, 2, 1).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert split_sequence(x, 4, 0).tolist() == [[0, 1, 14, 15]]
    assert local_positions(16, 4, 3).tolist() == [[6, 7, 8, 9]]
    # every token on exactly one rank
    for cp in (2, 4):
        for layout in ("balanced", "contiguous"):
            held = sorted(t for r in range(cp) for t in split_sequence(x, cp, r, layout=layout).flatten().tolist())
            assert held == list(range(16))
    with pytest.raises(ValueError, match=r"sequence length \(12\) must be divisible by 2 x context-parallel size \(8\)"):
        split_sequence(torch.zeros(1, 12), 4, 0)


@pytest.mark.parametrize("causal", [True, False])
def test_merging_two_blocks_by_their_log_sum_exp_is_attention_over_both(causal):
    """The online-softmax identity: keys split in two blocks, merged = attention over all keys at once."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, NH, S, HD, generator=g) for _ in range(3))
    want, want_lse = full_attention(q, k, v, causal=False)
    a, b = block_attention(q, k[:, :, :5], v[:, :, :5]), block_attention(q, k[:, :, 5:], v[:, :, 5:])
    out, lse = merge_partial_attention(*a, *b)
    _close(out, want, "merged output")
    _close(lse, want_lse, "merged log-sum-exp")
    # and the plain reference is torch's attention
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    _close(full_attention(q, k, v, causal)[0], sdpa, "reference vs scaled_dot_product_attention")


def _ring(cp, causal, layout):
    ps.initialize_model_parallel(1, 1, context_parallel_size=cp)
    group, rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, NH, S, HD, generator=g) for _ in range(3))   # the whole sequence, on every rank
    dout = torch.randn(B, NH, S, HD, generator=g)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    want, want_lse = full_attention(*full, causal)
    want.backward(dout)

    local = [split_sequence(t, cp, rank, dim=2, layout=layout).clone().requires_grad_() for t in (q, k, v)]
    trace = RingTrace()
    with tracing(trace):
        out, lse = ring_attention(*local, group, causal, layout)
        out.backward(split_sequence(dout, cp, rank, dim=2, layout=layout))
    what = f"cp={cp} causal={causal} {layout}"
    _close(out, split_sequence(want.detach(), cp, rank, 2, layout), f"{what} output")
    _close(lse, split_sequence(want_lse, cp, rank, 2, layout), f"{what} log-sum-exp")
    for name, mine, ref in zip("qkv", local, full):
        _close(mine.grad, split_sequence(ref.grad, cp, rank, 2, layout), f"{what} d{name}")
    _close(gather_sequence(out.detach(), group, dim=2, layout=layout), want.detach(), f"{what} gathered output")
    return trace.pairs, trace.bytes_sent


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_ring_attention_equals_full_attention(cp, causal):
    results = run_on_ranks(_ring, cp, args=(cp, causal, "balanced"), timeout=120)
    pairs = [p for p, _ in results]
    # balanced: every rank computes the same number of chunk pairs (2 cp + 1 causal, 4 cp without a mask)
    assert pairs == [2 * cp + 1 if causal else 4 * cp] * cp
    # each rank sends (cp - 1) key+value blocks forward, then (cp - 1) blocks of k, v, dk, dv and one dk, dv
    block = B * NH * (S // cp) * HD * 4
    assert all(sent == 2 * block * (cp - 1) + 4 * block * (cp - 1) + 2 * block for _, sent in results)


def test_the_contiguous_split_is_right_but_unbalanced():
    """The plain split computes the same attention; its last rank does 4 cp - 1 chunk pairs, the first 3."""
    pairs = [p for p, _ in run_on_ranks(_ring, 4, args=(4, True, "contiguous"), timeout=120)]
    assert pairs == [4 * r + 3 for r in range(4)] and sum(pairs) == 4 * (2 * 4 + 1)


def test_bench_script_measures_memory_work_and_bytes():
    """scripts/bench_context_parallel.py on a short sequence: memory per rank ~1/cp, the balanced split's work
    equal on every rank and the contiguous one's 4r + 3, the bytes of (6 (cp - 1) + 2) blocks."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "bench_context_parallel.py")
    spec = importlib.util.spec_from_file_location("bench_context_parallel", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    seq, h = 128, 64
    rows = bench.run(seq=seq, hidden=h, heads=4, sizes=(1, 2))
    by = {(r["cp"], r["layout"]): r["ranks"] for r in rows}
    one = by[1, "balanced"][0]["peak"]
    for layout in ("balanced", "contiguous"):
        assert all(0.5 * one <= x["peak"] <= 0.6 * one for x in by[2, layout])
    assert [x["pairs"] for x in by[2, "balanced"]] == [5, 5]
    assert [x["pairs"] for x in by[2, "contiguous"]] == [3, 7]
    block = (seq // 2) * h * 4                      # keys (or values) of s/cp tokens, all heads, float32
    assert all(x["bytes"] == (6 * 1 + 2) * block for x in by[2, "balanced"])
    assert "chunk pairs" in bench.table(rows, seq, h, 4, times=False)
