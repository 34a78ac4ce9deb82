"""Chapter 6e (after training): merge a checkpoint's tensor ranks, top-p sampling, WikiText's adjusted perplexity.

Built on what src/ch6/checkpoint_util.py, generate.py and evaluate_gpt.py use:
lessons_pkg.checkpoint.reshard, lessons_pkg.inference.sampling and
lessons_pkg.evaluation.metrics.
"""
from __future__ import annotations

import math

import torch

from lessons_pkg.checkpoint.reshard import glue, split
from lessons_pkg.evaluation.loop import Totals
from lessons_pkg.evaluation.metrics import wikitext_metrics
from lessons_pkg.inference.sampling import top_k_filter, top_p_filter
from lessons_pkg.labs import Exercise, Fail
from lessons_pkg.tensor_parallel import GPTConfig, master_state_dict


def check_merge(module) -> list[str]:
    config = GPTConfig(vocab_size=256, hidden_size=32, num_layers=1, num_attention_heads=4, max_position_embeddings=16)
    full = master_state_dict(config, 0)
    for tp in (2, 4):
        for key, tensor in full.items():
            shards = [split(key, tensor, tp, r) for r in range(tp)]
            got = module.merge_tensor_ranks(key, [s.clone() for s in shards])
            if not isinstance(got, torch.Tensor) or got.shape != tensor.shape or not torch.equal(got, tensor):
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise Fail(f"TP={tp}, {key}: shards of shape {tuple(shards[0].shape)} merged into {shape}, "
                           f"not the original {tuple(tensor.shape)} tensor")
    key = "layers.0.input_layernorm.weight"
    broken = [full[key].clone(), full[key].clone() + 1e-3]
    try:
        module.merge_tensor_ranks(key, broken)
    except ValueError as e:
        message = str(e)
    else:
        raise Fail(f"{key} differs between tensor ranks 0 and 1 (a replicated tensor that is not): "
                   "merge_tensor_ranks must raise ValueError instead of picking one")
    try:
        glue(key, broken, "check")
    except ValueError:
        pass
    return [f"every one of {len(full)} tensors merges back exactly from TP=2 and TP=4 shards",
            f"and an inconsistent replica is refused: {message}"]


def check_top_p(module) -> list[str]:
    g = torch.Generator().manual_seed(0)
    cases = [(torch.randn(4, 50, generator=g) * s, p) for s in (0.5, 2.0, 6.0) for p in (0.05, 0.5, 0.9, 0.99)]
    cases.append((torch.tensor([[3.0, 1.0, 0.2, -1.0]]), 0.01))  # the top token alone already exceeds p
    for logits, p in cases:
        got = module.top_p_filter(logits.clone(), p)
        want = top_p_filter(logits, p)
        if not torch.equal(torch.isinf(got), torch.isinf(want)):
            kept, should = int((~torch.isinf(got)).sum()), int((~torch.isinf(want)).sum())
            raise Fail(f"top_p={p}: you keep {kept} tokens over the batch, Megatron's rule keeps {should} "
                       "(keep tokens until their mass exceeds p, the one that crosses it included)")
        if not torch.equal(got[~torch.isinf(got)], logits[~torch.isinf(want)]):
            raise Fail(f"top_p={p}: the kept logits were changed; only the dropped ones become -inf")
    logits = torch.randn(3, 40, generator=g)
    for k in (1, 5, 40):
        if not torch.equal(module.top_k_filter(logits.clone(), k), top_k_filter(logits, k)):
            raise Fail(f"top_k={k}: differs from keeping the k largest logits (others -inf)")
    return [f"top_p_filter matches Megatron's rule on {len(cases)} cases; top_k_filter on 3"]


def check_adjusted_ppl(module) -> list[str]:
    lines = []
    for nll_sum, tokenized, original in ((5400.0, 1200, 1000), (30.0, 11, 11), (800.0, 300, 150), (90000.0, 10001, 8000)):
        t = Totals(examples=1, tokens=tokenized - 1, nll=nll_sum)
        want = wikitext_metrics(t, tokenized, original)
        got = module.adjusted_perplexity(nll_sum, tokenized, original)
        if not math.isfinite(got) or abs(got - want["adjusted_ppl"]) > 1e-9 * want["adjusted_ppl"]:
            raise Fail(f"nll {nll_sum}, {tokenized} tokens, {original} words: you give {got!r}, expected "
                       f"{want['adjusted_ppl']:.6g} (token perplexity {want['ppl']:.6g}); "
                       f"{'note Megatron caps the exponent at 20' if want['capped'] else ''}")
        lines.append(f"{tokenized} tokens / {original} words: token ppl {want['ppl']:.4g}, "
                     f"word-level (adjusted) ppl {want['adjusted_ppl']:.4g}{' (capped)' if want['capped'] else ''}")
    return lines


EXERCISES = [
    Exercise("ch6e.1", "merge a checkpoint's tensor-parallel shards into one tensor", "ch6e/merge.py",
             "the tool: python src/ch6/checkpoint_util.py --help", check_merge),
    Exercise("ch6e.2", "top-k and top-p (nucleus) filtering, Megatron's rule", "ch6e/top_p.py",
             "use it: python src/ch6/generate.py --help  (--top_p, --top_k)", check_top_p),
    Exercise("ch6e.3", "WikiText's adjusted (word-level) perplexity", "ch6e/perplexity.py",
             "the evaluation: python src/ch6/evaluate_gpt.py --help", check_adjusted_ppl),
]
