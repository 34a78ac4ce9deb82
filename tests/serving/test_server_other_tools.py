"""The server on checkpoints written by transformers' own Megatron converter answers what transformers answers.

The tiny GPT-2 (300 tokens: the converter pads them to 512 rows at TP=2) goes
through the converter (lessons_pkg.checkpoint.transformers_converter) into
TP2 x PP1 and TP2 x PP2 ``release`` checkpoints; the tokenizer is given on the
command line, as the converter ships none. Served at TP2 (plain python) and on
one process that reshards TP2 x PP2 on load. Greedy answers are compared exactly.
"""
from __future__ import annotations

import pytest
from conftest import expected_api

PROMPTS = ["Hello world", "The quick brown fox jumps over", "A server"]


@pytest.fixture(scope="module")
def converted(transformers_converter, tiny_gpt2_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("converter")
    return {(tp, pp): transformers_converter.to_megatron(tiny_gpt2_folder, str(root / f"tp{tp}pp{pp}"), tp, pp)
            for tp, pp in ((2, 1), (2, 2))}


# (TP2 x PP2 serving under torchrun: tests/serving/test_server_parallel.py; the converter's TP2 x PP2 files are
# read here by one rank, resharded on load)
@pytest.mark.parametrize("source, tp, pp, launcher", [((2, 1), 2, 1, "python"), ((2, 2), 1, 1, "python")],
                         ids=["tp2", "one-rank-resharding"])
def test_greedy_answers_equal_transformers(converted, server_factory, tiny_tokenizer_files, hf_greedy,
                                           tiny_tokenizer, source, tp, pp, launcher):
    vocab, merges = tiny_tokenizer_files
    server = server_factory(converted[source], tp=tp, pp=pp, launcher=launcher,
                            extra=("--vocab-file", vocab, "--merge-file", merges))
    r = server.put_api({"prompts": PROMPTS, "tokens_to_generate": 8, "top_k": 1})
    assert r.status_code == 200, r.text
    for i, p in enumerate(PROMPTS):
        assert (r.json()["text"][i], r.json()["segments"][i]) == expected_api(hf_greedy, tiny_tokenizer, p, 8)
    server.stop()
