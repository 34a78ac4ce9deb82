"""src/ch6/evaluate_gpt.py: bad --valid-data is an error naming the line; the stand-in says so; one run end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lessons_pkg.testing import RankError, run_on_ranks

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "src", "ch6", "evaluate_gpt.py")


@pytest.fixture(scope="module")
def hf_folder(world, tmp_path_factory) -> str:
    from lessons_pkg.checkpoint.hf_io import save_hf_folder

    folder = str(tmp_path_factory.mktemp("hf") / "tiny-gpt2")
    save_hf_folder(folder, world.trained.state_dict, world.config, world.vocab, world.merges)
    return folder


def _main(argv: list[str]) -> None:
    sys.path.insert(0, os.path.dirname(SCRIPT))
    import evaluate_gpt

    evaluate_gpt.main(argv)


def _fails_with(argv: list[str], message: str) -> None:
    with pytest.raises(RankError, match=message):
        run_on_ranks(_main, 1, args=(argv,), timeout=60)


def test_bad_valid_data_is_an_error(hf_folder, tmp_path):
    base = ["--task", "LAMBADA", "--load", hf_folder, "--valid-data"]
    _fails_with(base + [str(tmp_path / "nope.jsonl")], "nope.jsonl': no such file")
    (tmp_path / "empty.jsonl").write_text("")
    _fails_with(base + [str(tmp_path / "empty.jsonl")], "empty.jsonl' is empty")
    (tmp_path / "bad.jsonl").write_text('{"text": "a b c"}\n{"text": "a b c"\n')
    _fails_with(base + [str(tmp_path / "bad.jsonl")], r"bad.jsonl:2: not a JSON object")
    # a standin needs to know the training data: an HF folder does not say, so it must be given
    _fails_with(base + ["standin"], "needs the training data and split")


def test_standin_run_says_it_is_a_standin(world, hf_folder, corpus, tmp_path, capsys):
    prefix, _ = corpus
    out = tmp_path / "r.json"
    run_on_ranks(_main, 1, args=(["--task", "WIKITEXT103", "--load", hf_folder, "--valid-data", "standin",
                                  "--data-path", prefix, "--split", "80,10,10", "--eval-data-dir", str(tmp_path),
                                  "--seq-length", "16", "--results-json", str(out), "--no-progress"],), timeout=60)
    result = json.loads(out.read_text())
    assert result["standin"] is True and result["valid_data"].endswith("standin_heldout.txt")
    assert result["num_tokenized_tokens"] > 1 and result["ppl"] > 1


def test_end_to_end_two_ranks_equals_reference(world, hf_folder, tmp_path):
    """The plain `python` entry point: it starts 2 ranks itself (TP=2), reads a transformers folder."""
    from lessons_pkg.evaluation.reference import lambada_reference
    from lessons_pkg.evaluation.tasks import prepare_task
    from lessons_pkg.tensor_parallel.hf import to_hf_model

    out = tmp_path / "lambada.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--task", "LAMBADA", "--strict-lambada", "--valid-data", world.lambada,
         "--load", hf_folder, "--tensor-model-parallel-size", "2", "--micro-batch-size", "4", "--seq-length", "16",
         "--results-json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=180, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cut = prepare_task("LAMBADA", world.lambada, world.tokenizer, 16, strict=True).lambada
    ref = lambada_reference(to_hf_model(world.trained.state_dict, world.config), cut.contexts, cut.targets, 16)
    result = json.loads(out.read_text())
    assert result["number_correct"] == sum(ref["correct"]) >= world.expected_correct
    assert result["tensor_model_parallel_size"] == 2 and result["total_examples"] == len(ref["correct"])
    line = (f" validation results on LAMBADA | number correct: {float(sum(ref['correct'])):.4E} | "
            f"total examples: {float(len(ref['correct'])):.4E} | ")
    assert line in proc.stdout


def test_nproc_is_not_passed_on_to_the_ranks():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    from evaluate_gpt import _without_nproc

    assert _without_nproc(["--nproc", "4", "--task", "LAMBADA", "--nproc=2", "--load", "x"]) == \
        ["--task", "LAMBADA", "--load", "x"]


def test_the_lessons_lambada_script_runs_as_written(world, hf_folder, tmp_path):
    """The lesson's eval_gpt2_lambada.sh (Megatron-LM's evaluate_zeroshot_gpt.sh) with only the sizes scaled:
    ``python -m torch.distributed.launch`` (which adds --local-rank), the model's sizes (checked against the
    checkpoint), --fp16 (parameters in float16), --log-interval, --no-load-optim, --no-load-rng. The float16
    model's count of right answers is the float32 reference's within 1: float16 rounding (relative 5e-4)
    could flip an answer whose two best tokens are that close, and no more than one is allowed for it."""
    from lessons_pkg.evaluation.reference import lambada_reference
    from lessons_pkg.evaluation.tasks import prepare_task
    from lessons_pkg.launch import free_port
    from lessons_pkg.tensor_parallel.hf import to_hf_model

    c, out = world.config, tmp_path / "lambada.json"
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "1", "--master_port", str(free_port()),
           SCRIPT, "--task", "LAMBADA", "--valid-data", world.lambada, "--tokenizer-type", "GPT2BPETokenizer",
           "--strict-lambada", "--vocab-file", world.vocab, "--merge-file", world.merges, "--load", hf_folder,
           "--tensor-model-parallel-size", "1", "--num-layers", str(c.num_layers), "--hidden-size",
           str(c.hidden_size), "--num-attention-heads", str(c.num_attention_heads), "--micro-batch-size", "8",
           "--seq-length", "16", "--max-position-embeddings", str(c.max_position_embeddings), "--log-interval", "10",
           "--fp16", "--no-load-optim", "--no-load-rng", "--results-json", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["params_dtype"] == "torch.float16"          # the model that was run, not the flag
    cut = prepare_task("LAMBADA", world.lambada, world.tokenizer, 16, strict=True).lambada
    ref = lambada_reference(to_hf_model(world.trained.state_dict, world.config), cut.contexts, cut.targets, 16)
    assert abs(result["number_correct"] - sum(ref["correct"])) <= 1 and result["total_examples"] == len(ref["correct"])
