"""The distributed evaluation equals a plain transformers computation on the same weights, at every layout.

Layouts (world, TP, PP): TP1; TP2; TP1 x DP2; TP2 x DP2; TP2 x PP2. Micro-batches of 3 over
15 passages make padding, uneven DP shares and a short last micro-batch happen. The model is
the one trained in conftest.py, so the counts are not zero: the 8 passages that follow the
rule are right and the 4 that break it wrong, strict or not.

Tolerances: numbers of correct answers are compared exactly; before that, the reference's gap
between the best and second-best logit at every target position is checked to exceed 1e-4, far
above float32 rounding (~1e-6 on these logits), so no argmax can flip between layouts. Sums of
-log p are compared at rtol 1e-5 / atol 1e-5: float32 forwards whose reductions are split
differently across ranks agree to a few ulps (~1e-6 relative), summed over a few hundred tokens.
"""
from __future__ import annotations

import math

import pytest

from lessons_pkg import parallel_state as ps
from lessons_pkg.evaluation.detokenizer import wikitext_detokenizer
from lessons_pkg.evaluation.reference import lambada_reference, text_reference
from lessons_pkg.evaluation.tasks import prepare_task, run_task
from lessons_pkg.testing import run_on_ranks

SEQ, OVERLAP, MBS = 16, 5, 3
LAYOUTS = [(1, 1, 1), (2, 2, 1), (2, 1, 1), (4, 2, 1), (4, 2, 2)]


def _variants(world):
    return {"strict": ("LAMBADA", world.lambada, dict(strict=True)),
            "last-token": ("LAMBADA", world.lambada, dict(strict=False)),
            "wikitext": ("WIKITEXT103", world.text, dict(overlap=OVERLAP))}


def _job(world, tp: int, pp: int) -> dict:
    ps.initialize_model_parallel(tp, pp)
    out = {}
    for name, (task, path, kw) in _variants(world).items():
        metrics, totals = run_task(world.trained, prepare_task(task, path, world.tokenizer, SEQ, **kw), MBS)
        out[name] = (metrics, totals.per_sample)
    return out


@pytest.fixture(scope="module")
def reference(world) -> dict:
    from lessons_pkg.tensor_parallel.hf import to_hf_model

    model = to_hf_model(world.trained.state_dict, world.config)
    ref = {}
    for name, (task, path, kw) in _variants(world).items():
        if task == "LAMBADA":
            cut = prepare_task(task, path, world.tokenizer, SEQ, **kw).lambada
            ref[name] = lambada_reference(model, cut.contexts, cut.targets, SEQ)
            assert min(ref[name]["margin"]) > 1e-4, "a near-tie in the reference: the exact count would be fragile"
        else:
            with open(path, encoding="utf-8") as f:
                tokens = world.tokenizer.tokenize(wikitext_detokenizer(f.read()))
            ref[name] = text_reference(model, tokens, SEQ, OVERLAP)
    return ref


def test_trained_model_scores_the_expected_passages(reference, world):
    """The reference itself: the 8 rule passages right, the 4 broken ones wrong (strict and last-token)."""
    n = world.expected_correct
    for name in ("strict", "last-token"):
        assert reference[name]["correct"][:n + 4] == [True] * n + [False] * 4, name


@pytest.mark.parametrize("world_size,tp,pp", LAYOUTS, ids=lambda v: str(v))
def test_layout_equals_transformers(world, reference, world_size, tp, pp):
    ranks = run_on_ranks(_job, world_size, args=(world, tp, pp), timeout=120)
    for other in ranks[1:]:                                   # every rank ends with the same totals
        assert other == ranks[0]
    result = ranks[0]
    for name in ("strict", "last-token"):
        metrics, per_sample = result[name]
        ref = reference[name]
        assert [bool(c) for _, _, _, c in per_sample] == ref["correct"], name
        assert metrics["number_correct"] == sum(ref["correct"]) >= world.expected_correct
        assert [i for i, *_ in per_sample] == list(range(len(ref["nll"])))
        assert [nll for _, nll, _, _ in per_sample] == pytest.approx(ref["nll"], rel=1e-5, abs=1e-5)
        assert metrics["perplexity"] == pytest.approx(math.exp(sum(ref["nll"]) / len(ref["nll"])), rel=1e-5)
        assert math.isfinite(metrics["perplexity"])
    assert result["strict"][0]["target_tokens"] > result["last-token"][0]["target_tokens"]  # unseen words: 2+ tokens
    metrics, _ = result["wikitext"]
    nll, count = reference["wikitext"]
    assert metrics["num_tokenized_tokens"] - 1 == count
    assert metrics["avg_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["adjusted_ppl"] == pytest.approx(math.exp(nll / (metrics["num_original_tokens"] - 1)), rel=1e-5)
    assert math.isfinite(metrics["ppl"]) and metrics["ppl"] > 1
