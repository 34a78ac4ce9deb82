"""Command-line tools given a request they cannot honour: an error naming it, never a silent substitute.

(The catalogue of bad inputs and the tests that cover them: docs/bad_inputs.md.)
"""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load_script(relative):
    spec = importlib.util.spec_from_file_location(os.path.basename(relative)[:-3], os.path.join(ROOT, relative))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parallelformers_refuses_a_model_it_cannot_load(monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    script = load_script("src/ch6/parallelformers_inference.py")
    with pytest.raises(RuntimeError, match=r"--model /nonexistent: could not load it \("):
        script.load_model("/nonexistent")
    _, _, what = script.load_model("local")  # asked for by name: no message, no hub
    assert what.startswith("a 2-layer GPT-2") and capsys.readouterr().out == ""
