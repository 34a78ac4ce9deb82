"""text_generation_server.py's argument checks: bad values end in one argparse line (exit 2), before any rank starts."""
from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "ch6"))

import text_generation_server  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port must be between 1 and 65535, got 70000"),
    (["--port", "0"], "--port must be between 1 and 65535, got 0"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1, got 0"),
    (["--true-vocab-size", "0"], "--true-vocab-size must be >= 1, got 0"),
    (["--top_k", "3", "--top_p", "0.9"], "the /api defaults: cannot set both top_k (3) and top_p (0.9)"),
    (["--temperature", "0"], "the /api defaults: temperature must be > 0 and <= 100.0, got 0.0"),
    (["--out-seq-length", "-1"], "the /api defaults: tokens_to_generate must be >= 0, got -1"),
    (["--fp16", "--bf16"], "argument --bf16: not allowed with argument --fp16"),
])
def test_bad_values_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        text_generation_server.parse_args(["--load", "somewhere", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_megatron_flags_become_the_defaults_of_api_requests():
    """--out-seq-length (below Megatron's 64), --temperature, --top_k/--top_p fill the fields a PUT /api request
    omits; a request's own fields win, and one that picks top_k or top_p takes neither default. Megatron's
    script passes --out-seq-length 1024: that only caps requests, their default stays 64."""
    from lessons_pkg.serving.schema import parse_api_request

    class Tokenizer:
        eod, vocab_size = 0, 300

        def tokenize(self, text):
            return [1, 2]

    args = text_generation_server.parse_args(["--load", "x", "--out-seq-length", "5", "--temperature", "0.7",
                                              "--top_p", "0.9"])
    defaults = text_generation_server.api_defaults(args)
    assert defaults == {"tokens_to_generate": 5, "temperature": 0.7, "top_p": 0.9}
    got = parse_api_request({"prompts": ["a"]}, Tokenizer(), 64, defaults).sampling
    assert (got["tokens_to_generate"], got["temperature"], got["top_p"], got["top_k"]) == (5, 0.7, 0.9, 0)
    got = parse_api_request({"prompts": ["a"], "tokens_to_generate": 2, "top_k": 1}, Tokenizer(), 64, defaults).sampling
    assert (got["tokens_to_generate"], got["temperature"], got["top_p"], got["top_k"]) == (2, 0.7, 0.0, 1)
    assert parse_api_request({"prompts": ["a"]}, Tokenizer(), 128).sampling["tokens_to_generate"] == 64  # Megatron's
    lesson = text_generation_server.parse_args(["--load", "x", "--out-seq-length", "1024", "--top_p", "0.9"])
    assert text_generation_server.api_defaults(lesson) == {"top_p": 0.9}
