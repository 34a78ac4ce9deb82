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
])
def test_bad_values_are_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        text_generation_server.parse_args(["--load", "somewhere", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
