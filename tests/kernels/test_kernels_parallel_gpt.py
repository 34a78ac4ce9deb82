"""ParallelGPT gives the same outputs and gradients with and without the fused kernels, at TP = 1, 2 and 4.

Both models are built from the same full master weights; the unfused model is
the reference (plain PyTorch: F.gelu, masked torch.softmax, nn.LayerNorm). The
test also checks, from the autograd graph, that the fused model really ran
the three kernels and the reference none of them.

Tolerance: float32; the kernels use other exp/tanh approximations and
summation orders than PyTorch (each ~1e-7 relative), which two layers of
matmuls spread to ~1e-6 on logits of magnitude ~1: atol = rtol = 1e-5.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from lessons_pkg import parallel_state
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict
from lessons_pkg.testing import run_on_ranks

ATOL = RTOL = 1e-5
# the graph nodes of the fused ops' C++ autograd Functions (csrc/autograd.cpp)
FUSED_NODES = {"lessons_kernels::BiasGeLU", "lessons_kernels::ScaledUpperTriangMaskedSoftmax",
               "lessons_kernels::LayerNorm"}


def graph_node_names(t: torch.Tensor) -> set[str]:
    """The names of the autograd nodes behind ``t``: ``MmBackward0``, ..., ``lessons_kernels::LayerNorm``."""
    seen, stack, names = set(), [t.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        # a C++ Function's node is "torch::autograd::CppNode<lessons_kernels::(anonymous namespace)::LayerNorm>"
        names.add(node.name().removeprefix("torch::autograd::CppNode<").removesuffix(">")
                  .replace("(anonymous namespace)::", ""))
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def check_fused_equals_unfused(tp: int) -> None:
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    group = parallel_state.get_tensor_model_parallel_group()
    config = GPTConfig(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4, max_position_embeddings=16,
                       hidden_dropout=0.0, attention_dropout=0.0, make_vocab_size_divisible_by=8)
    sd = master_state_dict(config, seed=5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    results = {}
    for fused in (False, True):
        model = ParallelGPT(dataclasses.replace(config, use_fused_kernels=fused), tp_group=group)
        model.load_master_state_dict(sd)
        logits = model(inputs)                                   # [b, s, padded V / tp]
        loss = model(inputs, labels=labels).mean()
        names = graph_node_names(loss)
        if fused:
            assert FUSED_NODES <= names, f"fused model did not run {FUSED_NODES - names}"
        else:
            assert not FUSED_NODES & names, f"reference model ran fused kernels {FUSED_NODES & names}"
        loss.backward()
        results[fused] = (logits.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()})

    (logits0, loss0, grads0), (logits1, loss1, grads1) = results[False], results[True]
    torch.testing.assert_close(logits1, logits0, atol=ATOL, rtol=RTOL, msg=lambda m: f"tp={tp} logits: {m}")
    torch.testing.assert_close(loss1, loss0, atol=ATOL, rtol=RTOL, msg=lambda m: f"tp={tp} loss: {m}")
    assert grads0.keys() == grads1.keys() and len(grads0) > 0
    for name in grads0:
        assert grads1[name] is not None, f"tp={tp}: no gradient for {name} with fused kernels"
        torch.testing.assert_close(grads1[name], grads0[name], atol=ATOL, rtol=RTOL,
                                   msg=lambda m, name=name: f"tp={tp} grad {name}: {m}")


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_parallel_gpt_fused_kernels_match_plain_pytorch(tp):
    run_on_ranks(check_fused_equals_unfused, tp, args=(tp,), timeout=180)


def test_fused_kernels_under_bf16_autocast_match_the_unfused_model():
    """--bf16 with --use-fused-kernels: under autocast the matmuls give bf16 while biases and LayerNorm
    weights stay float32; the fused path must take that mix (the same code path as on a GPU, where
    the kernels then run in bf16; the CPU kernels run it in float32).

    Tolerance: both models run the same bf16 matmuls; they differ by where values are rounded to bf16
    (8 bits of mantissa, relative 4e-3 per rounding), so losses agree to 1e-2 relative and every
    gradient to 5e-2 of its norm."""
    config = GPTConfig(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4,
                       max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0,
                       make_vocab_size_divisible_by=8)
    master = master_state_dict(config, seed=1)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for fused in (False, True):
        model = ParallelGPT(dataclasses.replace(config, use_fused_kernels=fused))
        model.load_master_state_dict(master)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).mean()
        if fused:
            assert FUSED_NODES <= graph_node_names(loss)
        loss.backward()
        results[fused] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-2, atol=0)
    for name, reference in results[False][1].items():
        got = results[True][1][name]
        assert got.dtype == torch.float32 and torch.isfinite(got).all(), name
        assert (got - reference).norm() <= 5e-2 * reference.norm() + 1e-6, name
