"""Chapter 6f (long sequences): activation memory per layer, the online-softmax merge, the balanced split,
bytes per ring step.

Built on what the chapter measures and runs: lessons_pkg.pipeline.memory (a real layer's saved tensors),
lessons_pkg.context_parallel (split, online softmax, ring attention on two gloo ranks).
"""
from __future__ import annotations

import torch

from lessons_pkg.labs import Exercise, Fail


def _paper(s, b, h, a, t, sp, A, M):
    unsplit = s * b * h * (4 * A + 2 * M)
    split = s * b * h * 12 * A + a * s * s * b * (2 * A + M)
    return (unsplit / t if sp else unsplit) + split / t


def _measured_layer_bytes(s: int, b: int, h: int, a: int) -> int:
    """Bytes a real ParallelTransformerLayer (one process, float32, dropout 0.1) keeps for backward."""
    from lessons_pkg.pipeline.memory import SavedTensorMeter
    from lessons_pkg.tensor_parallel import GPTConfig
    from lessons_pkg.tensor_parallel.transformer import ParallelTransformerLayer

    config = GPTConfig(vocab_size=64, hidden_size=h, num_layers=1, num_attention_heads=a, max_position_embeddings=s,
                       hidden_dropout=0.1, attention_dropout=0.1)
    torch.manual_seed(0)
    layer = ParallelTransformerLayer(config, tp_group=None)
    x = torch.randn(b, s, h, requires_grad=True)
    with SavedTensorMeter(exclude=layer.parameters()) as meter:
        layer(x).sum().backward()
    return meter.peak


def check_sp_memory(module) -> list[str]:
    f = module.activation_bytes
    lines = []
    for s, b, h, a in ((1024, 4, 1024, 16), (2048, 1, 4096, 32), (512, 8, 768, 12)):
        for t in (1, 2, 4, 8):
            for sp in ((False, True) if t > 1 else (False,)):
                want = _paper(s, b, h, a, t, sp, 2, 1)
                got = f(s, b, h, a, t, sp)
                if not isinstance(got, (int, float)) or abs(got - want) > 1e-9 * want:
                    raise Fail(f"s={s} b={b} h={h} a={a} t={t} sequence_parallel={sp}: you give {got!r}, the paper's "
                               f"count is {want:.6g} bytes ({want / (s * b * h):.4g} s b h)")
    lines.append("the paper's three rows (16-bit activations, 1-byte masks) on 3 shapes, t = 1, 2, 4, 8")
    s, b, h, a = 128, 2, 128, 8
    measured = _measured_layer_bytes(s, b, h, a)
    got = f(s, b, h, a, 1, False, 4, 4)
    if abs(got - measured) > 0.01 * measured:
        raise Fail(f"float32 (4-byte activations, 4-byte dropout noise), s={s} b={b} h={h} a={a}: you give {got!r} "
                   f"bytes; a real layer keeps {measured} (SavedTensorMeter)")
    lines.append(f"and with this course's element sizes your count is within 1% of a real layer's saved tensors "
                 f"({measured / 2**20:.2f} MiB measured)")
    return lines


def check_merge(module) -> list[str]:
    from lessons_pkg.context_parallel.online_softmax import block_attention, full_attention

    g = torch.Generator().manual_seed(0)
    for cut in (1, 5, 11):
        q, k, v = (torch.randn(2, 3, 12, 8, generator=g) for _ in range(3))
        want, want_lse = full_attention(q, k, v, causal=False)
        out, lse = module.merge(*block_attention(q, k[:, :, :cut], v[:, :, :cut]),
                                *block_attention(q, k[:, :, cut:], v[:, :, cut:]))
        if not torch.allclose(lse, want_lse, atol=1e-5, rtol=1e-5):
            raise Fail(f"keys split at {cut} of 12: the merged log-sum-exp differs from that of all keys at once "
                       f"(max error {(lse - want_lse).abs().max():.3g}): lse = log(exp(lse_a) + exp(lse_b))")
        if not torch.allclose(out, want, atol=1e-5, rtol=1e-4):
            raise Fail(f"keys split at {cut} of 12: the merged output differs from attention over all keys "
                       f"(max error {(out - want).abs().max():.3g}); each block's out is normalised by its own "
                       "exp(lse): weigh it by exp(lse_block - lse)")
    out_b, lse_b = block_attention(q, k, v)
    garbage = torch.full_like(out_b, float("nan"))
    out, lse = module.merge(garbage, torch.full_like(lse_b, float("-inf")), out_b, lse_b)
    if not (torch.allclose(out, out_b) and torch.equal(lse, lse_b)):
        raise Fail("a block no query saw (lse = -inf, its out anything, here NaN) must leave the other block's "
                   "result unchanged")
    return ["merging two key blocks by their log-sum-exp equals attention over all keys, for three cuts",
            "and an empty block (lse = -inf) changes nothing"]


def check_chunks(module) -> list[str]:
    from lessons_pkg.context_parallel.split import split_sequence

    for cp in (1, 2, 4, 8):
        for seq in (16 * cp, 48 * cp):
            positions = torch.arange(seq).unsqueeze(0)
            for rank in range(cp):
                want = split_sequence(positions, cp, rank).flatten().tolist()
                got = module.rank_tokens(rank, cp, seq)
                if list(got) != want:
                    raise Fail(f"cp={cp}, seq_length={seq}, rank {rank}: you give {list(got)[:6]}..., it holds "
                               f"{want[:6]}... (chunks {rank} and {2 * cp - 1 - rank} of {2 * cp})")
    for cp in (2, 4, 8):
        pairs = [module.causal_chunk_pairs(r, cp) for r in range(cp)]
        if pairs != [2 * cp + 1] * cp:
            raise Fail(f"cp={cp}: you count {pairs} chunk pairs per rank; with the balanced split every rank has "
                       f"the same work (query chunk i needs key chunks 0 .. i)")
    return ["rank_tokens matches Megatron's balanced split for cp = 1, 2, 4, 8",
            "and every rank computes 2 cp + 1 chunk pairs: the split balances causal attention"]


def _forward_bytes(b, heads, seq, d):
    from lessons_pkg import parallel_state as ps
    from lessons_pkg.context_parallel.ring_attention import RingTrace, ring_attention, tracing

    ps.initialize_model_parallel(1, 1, context_parallel_size=2)
    q = torch.randn(b, heads, seq // 2, d)
    trace = RingTrace()
    with torch.no_grad(), tracing(trace):
        ring_attention(q, q.clone(), q.clone(), ps.get_context_parallel_group())
    return trace.bytes_sent


def check_ring_bytes(module) -> list[str]:
    from lessons_pkg.testing import run_on_ranks

    for cp in (2, 4, 8):
        if module.forward_sends(cp) != cp - 1:
            raise Fail(f"cp={cp}: you count {module.forward_sends(cp)} sending steps; after the last of the {cp} "
                       "steps every rank has seen every block")
    b, heads, seq, d = 2, 4, 32, 16
    measured = run_on_ranks(_forward_bytes, 2, args=(b, heads, seq, d), timeout=60)[0]
    got = module.ring_step_bytes(b, heads, seq, d, 2, 4) * module.forward_sends(2)
    if got != measured:
        raise Fail(f"b={b}, {heads} heads, s={seq}, d={d}, cp=2, float32: your forward sends {got} bytes; ring attention "
                   f"on 2 ranks sent {measured}")
    for cp in (4, 8):
        want = 2 * b * heads * (seq // cp) * d * 4
        if module.ring_step_bytes(b, heads, seq, d, cp, 4) != want:
            raise Fail(f"cp={cp}: one step sends the keys and values of s / cp tokens: {want} bytes, you give "
                       f"{module.ring_step_bytes(b, heads, seq, d, cp, 4)}")
    return [f"one forward at cp=2 sends {measured} bytes per rank, as ring attention measured on 2 ranks",
            "and your per-step bytes hold for cp = 4 and 8"]


EXERCISES = [
    Exercise("ch6f.1", "activation memory of one layer, with and without sequence parallelism", "ch6f/sp_memory.py",
             "measure it: python scripts/bench_sequence_parallel.py", check_sp_memory),
    Exercise("ch6f.2", "merge two partial attention results by their log-sum-exp", "ch6f/merge_attention.py",
             "see it in the ring: python src/ch6/context_parallel.py", check_merge),
    Exercise("ch6f.3", "which tokens a context-parallel rank holds (the balanced split)", "ch6f/chunks.py",
             "python src/ch6/context_parallel.py --nproc 4", check_chunks),
    Exercise("ch6f.4", "bytes one ring step sends", "ch6f/ring_bytes.py",
             "measure it: python scripts/bench_context_parallel.py --seq 2048", check_ring_bytes),
]
