"""src/ch6/generate.py end to end: plain python starts TP=2 ranks on a transformers folder; HF agrees.

(TP=2 x PP=2 runs the same code with two more processes: the engine's layouts are
tested in test_inference_parallel.py, and the notebook and ``make course-ch6-after``
run this script at TP=2 x PP=2; here two ranks keep the suite fast.)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from inference_reference import hf_greedy, tiny_model_weights, train_tokenizer

PROMPTS = ["The quick brown fox", "Hello"]
N = 8


def test_generate_script_tp2_matches_transformers(tmp_path, repo_root):
    from transformers import GPT2LMHeadModel

    from lessons_pkg.checkpoint.hf_io import save_hf_folder
    from lessons_pkg.data.tokenizer import build_tokenizer

    vocab_file, merge_file = train_tokenizer(str(tmp_path / "tokenizer"))
    tokenizer = build_tokenizer(vocab_file, merge_file)
    config, weights = tiny_model_weights(tokenizer.vocab_size)
    folder = str(tmp_path / "gpt2-tiny")
    save_hf_folder(folder, weights, config, vocab_file, merge_file)

    out_json = tmp_path / "out.json"
    cmd = [sys.executable, "src/ch6/generate.py", "--load", folder, "--tokens-to-generate", str(N), "--greedy",
           "--tensor-model-parallel-size", "2", "--timeout", "150",
           "--output-json", str(out_json)]
    for p in PROMPTS:
        cmd += ["--prompt", p]
    proc = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(out_json.read_text())

    hf = GPT2LMHeadModel.from_pretrained(folder).eval()     # transformers' own loader, not ours
    for i, prompt in enumerate(PROMPTS):
        expected = hf_greedy(hf, tokenizer.tokenize(prompt), N, tokenizer.eod)
        assert out["tokens"][i] == expected, f"prompt {i}"
        assert out["text"][i] == tokenizer.detokenize(expected)
        assert f"--- prompt {i} ---\n[rank 0] {out['text'][i]}\n" in proc.stdout
    assert "TP=2 x PP=1" in proc.stdout
    assert torch.equal(hf.transformer.wte.weight.detach(), weights["embedding.word_embeddings.weight"])


def test_generate_script_in_bfloat16_with_megatrons_model_flags(tmp_path, repo_root):
    """Megatron's model flags (checked against the folder) and --bf16 (parameters in bfloat16): the log-probs
    of the tokens it chose equal transformers' float32 ones on the same tokens within 2e-2 (bfloat16 keeps 8
    bits, relative rounding 4e-3 per operation; measured 1.8e-3 here), and a wrong size is one error line."""
    from transformers import GPT2LMHeadModel

    from lessons_pkg.checkpoint.hf_io import save_hf_folder
    from lessons_pkg.data.tokenizer import build_tokenizer

    vocab_file, merge_file = train_tokenizer(str(tmp_path / "tokenizer"))
    tokenizer = build_tokenizer(vocab_file, merge_file)
    config, weights = tiny_model_weights(tokenizer.vocab_size)
    folder = str(tmp_path / "gpt2-tiny")
    save_hf_folder(folder, weights, config, vocab_file, merge_file)
    sizes = ["--num-layers", str(config.num_layers), "--hidden-size", str(config.hidden_size),
             "--num-attention-heads", str(config.num_attention_heads), "--max-position-embeddings",
             str(config.max_position_embeddings), "--seq-length", str(config.max_position_embeddings),
             "--micro-batch-size", "1"]
    base = [sys.executable, "src/ch6/generate.py", "--load", folder, "--prompt", PROMPTS[0], "--tokens-to-generate",
            str(N), "--top_k", "5", "--random-seed", "7", "--logprobs", "--timeout", "150"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    out_json = tmp_path / "out.json"
    proc = subprocess.run([*base, *sizes, "--bf16", "--output-json", str(out_json)], cwd=repo_root,
                          capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(out_json.read_text())
    assert out["params_dtype"] == "torch.bfloat16"
    ids = torch.tensor([out["tokens"][0]])
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        want = torch.log_softmax(hf(ids).logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
    got = torch.tensor(out["logprobs"][0])
    assert got.shape == want.shape and (got - want).abs().max().item() <= 2e-2

    bad = [*sizes]
    bad[bad.index("--hidden-size") + 1] = "1024"
    proc = subprocess.run([*base, *bad], cwd=repo_root, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"hidden_size {config.hidden_size} (--hidden-size 1024)" in errors[0], proc.stderr
