"""evaluate_gpt.py on a checkpoint written by transformers' own Megatron converter equals transformers' numbers.

The trained model of conftest.py (340 tokens: the converter pads them to 512
rows at TP=2) is saved as a transformers folder, converted to TP=2 ``release``
files by the converter (lessons_pkg.checkpoint.transformers_converter), and
evaluated by ``evaluate_gpt.py`` on 2 ranks with the tokenizer given on the
command line. Tolerances as in test_parallel_eval.py: the count of correct
answers exactly (the reference's logit margins are checked > 1e-4 there), the
losses at rel 1e-5 (float32 sums split over two ranks agree to a few ulps).
"""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

from lessons_pkg.testing import run_on_ranks

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "src", "ch6", "evaluate_gpt.py")
SEQ = 16


@pytest.fixture(scope="module")
def converted(transformers_converter, world, tmp_path_factory) -> str:
    from lessons_pkg.checkpoint.hf_io import save_hf_folder

    root = tmp_path_factory.mktemp("converter")
    save_hf_folder(str(root / "hf"), world.trained.state_dict, world.config, world.vocab, world.merges)
    return transformers_converter.to_megatron(str(root / "hf"), str(root / "tp2"), tp=2, pp=1)


def _main(argv: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import evaluate_gpt

    evaluate_gpt.main(argv)


def _evaluate(world, converted, out, *task) -> dict:
    run_on_ranks(_main, 2, args=([*task, "--load", converted, "--vocab-file", world.vocab, "--merge-file",
                                  world.merges, "--tensor-model-parallel-size", "2", "--seq-length", str(SEQ),
                                  "--micro-batch-size", "4", "--results-json", str(out), "--no-progress"],),
                 timeout=120)
    with open(out) as f:
        return json.load(f)


def test_lambada_and_wikitext_equal_transformers(world, converted, tmp_path):
    from lessons_pkg.evaluation.detokenizer import wikitext_detokenizer
    from lessons_pkg.evaluation.reference import lambada_reference, text_reference
    from lessons_pkg.evaluation.tasks import prepare_task
    from lessons_pkg.tensor_parallel.hf import to_hf_model

    model = to_hf_model(world.trained.state_dict, world.config)
    got = _evaluate(world, converted, tmp_path / "lambada.json", "--task", "LAMBADA", "--strict-lambada",
                    "--valid-data", world.lambada)
    cut = prepare_task("LAMBADA", world.lambada, world.tokenizer, SEQ, strict=True).lambada
    ref = lambada_reference(model, cut.contexts, cut.targets, SEQ)
    assert got["number_correct"] == sum(ref["correct"]) >= world.expected_correct
    assert got["total_examples"] == len(ref["correct"])

    got = _evaluate(world, converted, tmp_path / "wiki.json", "--task", "WIKITEXT103", "--valid-data", world.text,
                    "--overlapping-eval", "5")
    with open(world.text, encoding="utf-8") as f:
        tokens = world.tokenizer.tokenize(wikitext_detokenizer(f.read()))
    nll, count = text_reference(model, tokens, SEQ, 5)
    assert got["num_tokenized_tokens"] - 1 == count
    assert got["avg_loss"] == pytest.approx(nll / count, rel=1e-5)
    assert math.isfinite(got["ppl"]) and got["ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
