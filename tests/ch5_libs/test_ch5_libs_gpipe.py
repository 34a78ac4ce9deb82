"""torchgpipe GPipe demo (src/ch5/gpipe.py): the pipeline equals the single-process GPT-2, the script trains."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torchgpipe import GPipe
from transformers import GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src" / "ch5"))
from gpipe import TOLERANCE, check_balance, compare_with_reference, even_balance  # noqa: E402
from gpipe import main as gpipe_main  # noqa: E402
from gpt2_sequential import sequential_from_hf, tiny_config  # noqa: E402

warnings.filterwarnings("ignore", message="TypedStorage is deprecated")


@pytest.mark.parametrize("balance, chunks", [([6], 1), ([6], 4), ([3, 3], 4), ([2, 2, 1, 1], 1), ([2, 2, 1, 1], 4), ([1, 2, 2, 1], 3)])
def test_gpipe_matches_gpt2_outputs_and_gradients(balance, chunks):
    torch.manual_seed(0)
    # dropout 0.1 as in GPT-2: compare_with_reference must switch it off in both models to compare
    reference = GPT2LMHeadModel(tiny_config(101, n_positions=32, n_embd=32, n_layer=4, n_head=4, dropout=0.1))
    seq = sequential_from_hf(reference)
    pipe = GPipe(seq, balance=balance, devices=["cpu"] * len(balance), chunks=chunks)  # checkpoint='except_last'
    ids = torch.randint(0, 101, (6, 16))
    logits_error, grad_error = compare_with_reference(pipe, seq, reference, ids)
    # float32; micro-batching changes only reduction order (observed <= ~1e-7), TOLERANCE = 1e-5
    assert logits_error < TOLERANCE
    assert grad_error < TOLERANCE
    assert all(p.grad is None for p in pipe.parameters())  # it leaves no gradients behind


def test_compare_with_reference_detects_a_wrong_weight():
    torch.manual_seed(0)
    reference = GPT2LMHeadModel(tiny_config(101, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    seq = sequential_from_hf(reference)
    with torch.no_grad():
        seq[2].mlp.c_fc.weight[0, 0] += 1e-3
    pipe = GPipe(seq, balance=[2, 2], devices=["cpu", "cpu"], chunks=2)
    logits_error, grad_error = compare_with_reference(pipe, seq, reference, torch.randint(0, 101, (4, 16)))
    assert logits_error > TOLERANCE or grad_error > TOLERANCE


def test_even_balance():
    assert even_balance(6, 4) == [2, 2, 1, 1]
    assert even_balance(14, 4) == [4, 4, 3, 3]
    assert even_balance(6, 1) == [6]
    with pytest.raises(ValueError, match=r"partitions \(7\) must be between 1 and the number of layers \(6\)"):
        even_balance(6, 7)


@pytest.mark.parametrize("balance", [[2, 2], [3, 3, 1], [3, 0, 3]])
def test_bad_balance_raises_a_clear_error(balance):
    with pytest.raises(ValueError, match=rf"balance \[{', '.join(map(str, balance))}\] must be positive and sum "
                                         r"to the model's 6 layers \(embedding \+ 4 blocks \+ head\)"):
        check_balance(balance, 6)


def test_gpipe_script_trains_and_verifies():
    cmd = [sys.executable, "src/ch5/gpipe.py", "--steps", "30", "--log-interval", "10", "--partitions", "2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stdout + result.stderr
    checks = [line for line in result.stdout.splitlines() if line.startswith("check:")]
    assert len(checks) == 4 and all(line.endswith(": True") for line in checks), result.stdout
    assert "balance [3, 3]" in result.stdout


def test_gpipe_main_rejects_a_bad_balance():
    with pytest.raises(ValueError, match=r"balance \[2, 2\] must be positive and sum to the model's 6 layers"):
        gpipe_main(["--balance", "2", "2", "--steps", "1"])


def test_requests_that_cannot_be_honoured_stop_with_an_error(monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(GPT2LMHeadModel, "from_pretrained", offline)
    assert gpipe_main(["--model-name", "gpt2", "--steps", "1"]) == 2
    assert "error: --model-name gpt2: could not load it (OSError" in capsys.readouterr().err
    assert gpipe_main(["--chunks", "9", "--batch-size", "4"]) == 2
    assert "error: --chunks (9) must not exceed --batch-size (4)" in capsys.readouterr().err
