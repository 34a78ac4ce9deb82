"""The whole ParallelGPT with context parallelism against one process from the same weights.

Layouts (world): CP=2 (2), CP=4 (4), CP=2 x TP=2 (4), CP=2 x TP=2 with sequence parallelism (4). Each
rank feeds its tokens (chunks r and 2 cp - 1 - r of every sequence); the reference is ParallelGPT at
TP=1 on the whole sequences in one process. The per-token loss and logits must be the reference's at this
rank's tokens; the gradients, summed over the context-parallel group (each rank's loss covers only its
tokens: the trainer averages them over data x context), the reference's. Tolerances as in tp_reference
(1e-5 / 1e-4): float32 sums in another order, the softmax normalised block by block.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist

from lessons_pkg import parallel_state as ps
from lessons_pkg.context_parallel import split_sequence
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict, shard_of
from lessons_pkg.tensor_parallel.sequence_parallel import allreduce_sequence_parallel_grads
from lessons_pkg.testing import run_on_ranks

ATOL, RTOL = 1e-5, 1e-4
B, S = 2, 16


def _close(a, b, what):
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


def _cp_gpt(tp, cp, sp):
    ps.initialize_model_parallel(tp, 1, context_parallel_size=cp)
    tp_group, tp_rank = ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank()
    cp_group, cp_rank = ps.get_context_parallel_group(), ps.get_context_parallel_rank()
    config = GPTConfig(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4,
                       max_position_embeddings=S, hidden_dropout=0.0, attention_dropout=0.0,
                       make_vocab_size_divisible_by=8)
    sd = master_state_dict(config, seed=3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, S + 1), generator=g)
    tokens, labels, w = ids[:, :-1], ids[:, 1:], torch.rand(B, S, generator=g)

    model = ParallelGPT(dataclasses.replace(config, sequence_parallel=sp), tp_group, cp_group=cp_group)
    model.load_master_state_dict(sd)
    mine = lambda t: split_sequence(t, cp, cp_rank)                          # noqa: E731  [b, s] -> [b, s/cp]
    logits = model(mine(tokens))                                             # [b, s/cp, V/tp]
    loss = model(mine(tokens), labels=mine(labels))                          # [b, s/cp]
    (loss * mine(w)).sum().backward()
    if sp:
        allreduce_sequence_parallel_grads([model], tp_group)
    for p in model.parameters():                                             # every rank's tokens' share
        dist.all_reduce(p.grad, group=cp_group)

    own = [dist.new_group([r]) for r in range(dist.get_world_size())][dist.get_rank()]
    reference = ParallelGPT(dataclasses.replace(config, make_vocab_size_divisible_by=8 * tp), own)
    reference.load_master_state_dict(sd)
    ref_logits = reference(tokens)
    ref_loss = reference(tokens, labels=labels)
    (ref_loss * w).sum().backward()
    what = f"tp={tp} cp={cp} sp={sp}"
    _close(logits, mine(ref_logits.detach()).chunk(tp, -1)[tp_rank], f"{what} logits")
    _close(loss, mine(ref_loss.detach()), f"{what} per-token loss")
    ref = {n: p.grad for n, p in reference.named_parameters()}
    for n, p in model.named_parameters():
        _close(p.grad, shard_of(p, ref[n], tp_rank, tp), f"{what} grad {n}")


@pytest.mark.parametrize("tp, cp, sp", [(1, 2, False), (1, 4, False), (2, 2, False), (2, 2, True)],
                         ids=["cp2", "cp4", "cp2-tp2", "cp2-tp2-sp"])
def test_context_parallel_gpt_equals_one_process(tp, cp, sp):
    run_on_ranks(_cp_gpt, tp * cp, args=(tp, cp, sp), timeout=120)


def _refusals():
    ps.initialize_model_parallel(1, 1, context_parallel_size=2)
    group = ps.get_context_parallel_group()
    config = GPTConfig(vocab_size=100, hidden_size=32, num_layers=1, num_attention_heads=4, max_position_embeddings=S)
    with pytest.raises(ValueError, match=r"attention_dropout must be 0, got 0.1"):
        ParallelGPT(config, cp_group=group)
    model = ParallelGPT(dataclasses.replace(config, attention_dropout=0.0), cp_group=group)
    with pytest.raises(ValueError, match="generation"):
        model(torch.zeros(1, 8, dtype=torch.long), last_position_only=True)


def test_refusals_name_the_values():
    run_on_ranks(_refusals, 2, timeout=60)
    with pytest.raises(ValueError, match=r"world size \(6\) is not divisible by .* x context_parallel_size \(4\) = 4"):
        ps.check_parallel_sizes(6, 1, 1, 4)


def test_groups_in_megatron_s_order_with_data_parallelism():
    """8 ranks, TP=2 x CP=2 x DP=2 (the docstring's example): TP innermost, then CP, then DP; gradients
    are averaged over data x context, whose groups hold each tensor rank's four copies of the shard."""
    grid = ps.rank_grid(8, tp=2, pp=1, cp=2)
    assert grid["tensor"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert grid["context"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid["data"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert grid["data_context"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    # with PP=2 the stages are outermost: stage 1 is ranks 8..15
    grid = ps.rank_grid(16, tp=2, pp=2, cp=2)
    assert grid["pipeline"][0] == [0, 8] and grid["context"][-1] == [13, 15]


def test_the_demo_refuses_a_sequence_it_cannot_split(repo_root):
    """src/ch6/context_parallel.py --seq 30 on 2 ranks: one argparse line, exit 2, before any rank starts."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "src/ch6/context_parallel.py", "--seq", "30"], cwd=repo_root,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "--seq (30) must be a positive multiple of 2 x the ranks (4)" in run.stderr
