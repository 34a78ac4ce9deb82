"""Checkpoints written by other tools, read by ours; ours read by theirs.

transformers' own Megatron converter (4.46.3, the real file, see
``lessons_pkg.checkpoint.transformers_converter``) turns a transformers GPT-2 with
a 2000-token vocabulary (padded to 2048 by Megatron's rule) into TP2 x PP2 and
TP2 x PP1 ``release`` checkpoints; ``checkpoint_util.py`` reshards, exports and
verifies them, ``generate.py`` answers from them, and the converter reads our
reshards back. A Megatron-LM-shaped ``release`` file (its key names, old QKV
order, ``args`` with ``padded_vocab_size`` only) needs a tokenizer to know its
vocabulary. The server and evaluation on converter checkpoints are tested in
tests/serving/test_server_other_tools.py and tests/evaluation/test_evaluate_other_tools.py.

Tolerance: none. Every comparison is ``torch.equal``: a conversion moves
tensors, it computes nothing, and the logits compared come from one
implementation (transformers') on weights that must be the same bits.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from lessons_pkg.checkpoint import megatron_format as mf
from lessons_pkg.checkpoint.pretrained import load_pretrained
from lessons_pkg.tensor_parallel.hf import config_from_hf, from_hf_state_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "src", "ch6"))

import checkpoint_util  # noqa: E402

from lessons_pkg.errors import run_cli  # noqa: E402

VOCAB = 2000
PADDED = 2048  # 2000 up to a multiple of make_vocab_size_divisible_by (128) x TP, for TP 1, 2 and 4


def util(capsys, *argv):
    code = run_cli(checkpoint_util.main, ["--no-progress", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def tokenizer_files(folder):
    return os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")


def original(model) -> dict[str, torch.Tensor]:
    """The transformers model's weights in our names (what every reader must give back)."""
    return from_hf_state_dict({k: v.detach() for k, v in model.state_dict().items()}, config_from_hf(model.config))


def assert_same_hf_model(folder, model):
    """A transformers folder holds exactly ``model``'s weights (every tensor, same shapes) and config sizes."""
    from transformers import GPT2LMHeadModel

    got = GPT2LMHeadModel.from_pretrained(folder).eval()
    assert got.config.vocab_size == VOCAB and got.config.n_layer == model.config.n_layer
    want = model.state_dict()
    have = got.state_dict()
    assert sorted(have) == sorted(want)
    for k in want:
        assert torch.equal(have[k], want[k]), k
    return got


@pytest.fixture(scope="module")
def converted(transformers_converter, gpt2_2000, tmp_path_factory):
    """The converter's TP2 x PP2 and TP2 x PP1 checkpoints of the 2000-token GPT-2."""
    folder, _ = gpt2_2000
    root = tmp_path_factory.mktemp("converted")
    return {(tp, pp): transformers_converter.to_megatron(folder, str(root / f"tp{tp}pp{pp}"), tp, pp)
            for tp, pp in ((2, 2), (2, 1))}


def test_converter_output_is_what_we_expect_to_read(converted):
    """The facts the readers rely on, as the converter writes them (if it changed, these would say so)."""
    state = mf.safe_load(os.path.join(converted[2, 2], "release", "mp_rank_00_000", "model_optim_rng.pt"))
    assert isinstance(state["args"], types.SimpleNamespace)
    assert (state["args"].orig_vocab_size, state["args"].make_vocab_size_divisible_by) == (VOCAB, 128)
    assert not hasattr(state["args"], "padded_vocab_size") or state["args"].padded_vocab_size == PADDED
    rows = state["model"]["language_model"]["embedding"]["word_embeddings"]["weight"].shape[0]
    assert rows == PADDED // 2
    with open(os.path.join(converted[2, 2], "latest_checkpointed_iteration.txt")) as f:
        assert f.read().strip() == "release"


@pytest.mark.parametrize("layout", [(2, 2), (2, 1)], ids=["tp2pp2", "tp2pp1"])
def test_converter_checkpoints_read_as_the_original_model(converted, gpt2_2000, layout):
    folder, model = gpt2_2000
    want = original(model)
    for tokenizer in ((None, None), tokenizer_files(folder)):   # orig_vocab_size alone is enough; a tokenizer agrees
        got = load_pretrained(converted[layout], *tokenizer)
        assert got.config.vocab_size == VOCAB
        assert sorted(got.state_dict) == sorted(want)
        for k in want:
            assert torch.equal(got.state_dict[k], want[k]), k


def test_reshards_read_back_by_the_converter(converted, gpt2_2000, tmp_path, capsys, transformers_converter):
    """TP2xPP2 (the converter's) -> 1x1 -> 4x1 -> 2x2 with checkpoint_util; the converter reads each back."""
    folder, model = gpt2_2000
    source = converted[2, 2]
    for tp, pp in ((1, 1), (4, 1), (2, 2)):
        save = tmp_path / f"tp{tp}pp{pp}"
        code, out, err = util(capsys, "--load-dir", source, "--save-dir", save, "--target-tensor-parallel-size", tp,
                              "--target-pipeline-parallel-size", pp, "--verify")
        assert code == 0, err
        first = source == converted[2, 2]
        assert f"vocabulary: {VOCAB} tokens (from args.{'orig' if first else 'true'}_vocab_size" in out, out
        assert "bit for bit: True" in out
        assert (save / "latest_checkpointed_iteration.txt").read_text() == "release"
        back = transformers_converter.to_transformers(str(save), str(tmp_path / f"hf-{tp}x{pp}"), folder)
        assert_same_hf_model(back, model)
        source = save


def test_hf_export_gives_the_original_logits(converted, gpt2_2000, tmp_path, capsys):
    folder, model = gpt2_2000
    code, out, err = util(capsys, "--saver", "hf", "--load-dir", converted[2, 2], "--save-dir", tmp_path / "hf")
    assert code == 0, err
    exported = assert_same_hf_model(tmp_path / "hf", model)
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = exported(x).logits, model(x).logits
    assert got.shape == want.shape == (2, 16, VOCAB)
    assert torch.equal(got, want)


def test_generate_tp2_on_a_converter_checkpoint_equals_transformers(converted, gpt2_2000, tmp_path):
    """src/ch6/generate.py as plain python (it starts 2 ranks) on the converter's TP2 x PP1 files."""
    from lessons_pkg.data.tokenizer import build_tokenizer

    folder, model = gpt2_2000
    vocab_file, merge_file = tokenizer_files(folder)
    tokenizer = build_tokenizer(vocab_file, merge_file)
    prompts, n = ["Return the value of", "A list"], 8
    out_json = tmp_path / "out.json"
    cmd = [sys.executable, "src/ch6/generate.py", "--load", converted[2, 1], "--vocab-file", vocab_file,
           "--merge-file", merge_file, "--tokens-to-generate", str(n), "--greedy", "--tensor-model-parallel-size",
           "2", "--timeout", "150", "--output-json", str(out_json)]
    for p in prompts:
        cmd += ["--prompt", p]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out_json.read_text())["tokens"]
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([tokenizer.tokenize(prompt)])
        with torch.no_grad():
            want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                  pad_token_id=tokenizer.eod, eos_token_id=tokenizer.eod)[0].tolist()
        assert got[i] == want, f"prompt {prompt!r}"


def test_pretrain_gpt_finetunes_from_a_converter_checkpoint(converted, gpt2_2000, tmp_path):
    """pretrain_gpt.py --load <the converter's TP2 files> --finetune on 2 ranks (TP=2), one iteration at lr 0
    (AdamW then changes nothing, weight decay included): the checkpoint it saves holds the original model's
    weights, so the trainer read the converter's file (its head copy at PP=1, its padding) correctly."""
    from lessons_pkg.checkpoint.reshard import read_full_checkpoint
    from lessons_pkg.launch import torchrun

    _, model = gpt2_2000
    save = tmp_path / "finetuned"
    torchrun("src/ch6/pretrain_gpt.py", "--tensor-model-parallel-size", "2", "--num-layers", "4", "--hidden-size",
             "64", "--num-attention-heads", "4", "--seq-length", "32", "--max-position-embeddings", "64",
             "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "1", "--lr", "0",
             "--mock-data", "--vocab-size", str(VOCAB), "--eval-iters", "0", "--load", converted[2, 1],
             "--finetune", "--save", str(save), nproc_per_node=2, timeout=180, echo=False, cwd=ROOT)
    got, want = read_full_checkpoint(str(save)).state_dict, original(model)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


# --- a checkpoint as Megatron-LM itself writes it ----------------------------------------------------
def _megatron_lm_qkv(w: torch.Tensor, heads: int, version: float) -> torch.Tensor:
    """Our QKV rows ([np, 3, hn] order) in the order Megatron-LM wrote for ``checkpoint_version``."""
    x = w.reshape(heads, 3, -1, *w.shape[1:])
    if version < 1.0:
        x = x.transpose(0, 1)        # [3, np, hn]
    elif version < 2.0:
        x = x.transpose(1, 2)        # [np, hn, 3]
    return x.reshape(w.shape).contiguous()


def write_megatron_lm_release(root, model, version: float, **saved_args) -> None:
    """GPT-2 weights as in NVIDIA's released GPT-2 345M file: ``release/mp_rank_00/model_optim_rng.pt``,
    "language_model" / "transformer" / "attention" names, the QKV order of ``checkpoint_version``, and
    ``args`` (an argparse.Namespace) that record only ``padded_vocab_size`` and a ``vocab_file`` on the
    cluster it was trained on."""
    config = config_from_hf(model.config)
    full = original(model)
    word = torch.cat([full[mf.WORD], torch.zeros(PADDED - VOCAB, config.hidden_size)])
    encoder = {}
    for key, value in full.items():
        if key.startswith(("layers.", "final_layernorm.")):
            if "query_key_value" in key:
                value = _megatron_lm_qkv(value, config.num_attention_heads, version)
            encoder[key.replace("self_attention", "attention")] = value.clone()
    args = argparse.Namespace(
        num_layers=config.num_layers, hidden_size=config.hidden_size, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, seq_length=config.max_position_embeddings,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1, padded_vocab_size=PADDED,
        make_vocab_size_divisible_by=128, tokenizer_type="GPT2BPETokenizer",
        vocab_file="/gpfs/fs1/projects/gpt2/gpt2-vocab.json", merge_file="/gpfs/fs1/projects/gpt2/gpt2-merges.txt",
        **saved_args)
    state = {"iteration": 0, "checkpoint_version": version, "args": args,
             "model": {"language_model": {"embedding": {"word_embeddings": {"weight": word},
                                                        "position_embeddings": {"weight": full[mf.POSITION]}},
                                          "transformer": encoder}}}
    os.makedirs(os.path.join(root, "release", "mp_rank_00"))
    torch.save(state, os.path.join(root, "release", "mp_rank_00", "model_optim_rng.pt"))
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")


@pytest.mark.parametrize("version", [0, 3.0])
def test_megatron_lm_release_needs_a_tokenizer_for_its_vocabulary(gpt2_2000, tmp_path, capsys, version):
    folder, model = gpt2_2000
    src = tmp_path / "345m-like"
    write_megatron_lm_release(str(src), model, version)
    vocab_file, merge_file = tokenizer_files(folder)

    # with the tokenizer: 2000 tokens, which Megatron's rule at TP=1 pads to the file's 2048 rows
    code, out, err = util(capsys, "--saver", "hf", "--load-dir", src, "--save-dir", tmp_path / "hf",
                          "--vocab-file", vocab_file, "--merge-file", merge_file)
    assert code == 0, err
    assert f"vocabulary: {VOCAB} tokens (from --vocab-file {vocab_file}" in out
    assert_same_hf_model(tmp_path / "hf", model)
    assert os.path.isfile(tmp_path / "hf" / "vocab.json")   # the tokenizer given travels with the export
    assert load_pretrained(str(src), vocab_file, merge_file).config.vocab_size == VOCAB

    # without: nothing says where the padding starts; the export keeps every row, and says so in one line
    code, out, err = util(capsys, "--saver", "hf", "--load-dir", src, "--save-dir", tmp_path / "hf-padded")
    assert code == 0, err
    lines = [line for line in out.splitlines() if "records no real vocabulary size" in line]
    assert len(lines) == 1 and f"keeping all {PADDED} rows" in lines[0] and "--vocab-file" in lines[0]
    with open(tmp_path / "hf-padded" / "config.json") as f:
        assert json.load(f)["vocab_size"] == PADDED

    # --true-vocab-size says it too
    code, out, err = util(capsys, "--load-dir", src, "--save-dir", tmp_path / "tp2", "--true-vocab-size", VOCAB,
                          "--target-tensor-parallel-size", "2", "--verify")
    assert code == 0 and "bit for bit: True" in out, err
    assert load_pretrained(str(tmp_path / "tp2")).config.vocab_size == VOCAB


def test_a_megatron_lm_model_without_bias_gelu_fusion_runs_the_exact_gelu(gpt2_2000, tmp_path, capsys):
    """Megatron-LM run with --no-bias-gelu-fusion computes F.gelu (erf), not its fused tanh bias-GeLU; its
    args say ``bias_gelu_fusion=False``. Our model of that file must equal transformers' GPT-2 with
    ``activation_function="gelu"`` on the same weights (and not the tanh GPT-2), its HF export must be that
    model, and the trainer must refuse to fine-tune it as a tanh model.

    Tolerance 1e-6 on the logits (|logits| < 1 here): two float32 implementations of one network (ours and
    transformers', the same ops in the same order: 0.0 measured); the tanh GeLU's logits differ by more than
    20 times that (1.3e-4 measured), so the check can tell the two GeLUs apart."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lessons_pkg.checkpoint.pretrained import build_stage
    from lessons_pkg.launch import torchrun

    folder, model = gpt2_2000
    # at GPT-2's initial scale (std 0.02) the GeLU's inputs are tiny and both GeLUs are ~x/2: scale the MLP's
    # weights by 20 so its inputs spread over [-10, 10], where the two GeLUs differ by up to 4.7e-4, and its
    # output by 20 again so that difference reaches the logits
    weights = {k: v * 20 if k.endswith(("mlp.c_fc.weight", "mlp.c_proj.weight")) else v
               for k, v in model.state_dict().items()}
    tanh_model, exact_model = (
        GPT2LMHeadModel(GPT2Config(**{**model.config.to_dict(), "activation_function": act})).eval()
        for act in ("gelu_new", "gelu"))
    for m in (tanh_model, exact_model):
        m.load_state_dict(weights)
    src = tmp_path / "exact-gelu"
    write_megatron_lm_release(str(src), tanh_model, 3.0, bias_gelu_fusion=False, openai_gelu=False)
    vocab_file, merge_file = tokenizer_files(folder)

    pre = load_pretrained(str(src), vocab_file, merge_file)
    assert pre.config.gelu_approximate == "none"
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = build_stage(pre)(x)[..., :VOCAB]
        exact, tanh = exact_model(x).logits, tanh_model(x).logits
    assert (ours - exact).abs().max().item() <= 1e-6
    assert (ours - tanh).abs().max().item() > 2e-5      # the GeLU the file asks for makes a difference here

    code, out, err = util(capsys, "--saver", "hf", "--load-dir", src, "--save-dir", tmp_path / "hf",
                          "--vocab-file", vocab_file, "--merge-file", merge_file)
    assert code == 0, err
    exported = GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.activation_function == "gelu"
    with torch.no_grad():
        assert torch.equal(exported(x).logits, exact)     # same weights, same transformers code: same bits

    # the fused kernel computes the tanh GeLU only: asking for it on this model is an error, not a substitute
    with pytest.raises(ValueError, match="tanh GeLU only"):
        build_stage(pre, use_fused_kernels=True)

    common = ["--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
              "--max-position-embeddings", "64", "--micro-batch-size", "1", "--global-batch-size", "1",
              "--train-iters", "1", "--lr", "0", "--mock-data", "--vocab-size", str(VOCAB), "--eval-iters", "0",
              "--load", str(src), "--finetune"]
    # the trainer's load check (a run without the flag would be refused with this line; one run is launched)
    from dataclasses import replace

    from lessons_pkg.training.checkpointing import _check_model_args

    with pytest.raises(ValueError, match=r"GeLU approximate='none' \(this run: 'tanh'; run with --no-bias-gelu-fusion\)"):
        _check_model_args(pre.args, replace(pre.config, gelu_approximate="tanh"), "ckpt")
    torchrun("src/ch6/pretrain_gpt.py", *common, "--no-bias-gelu-fusion", "--save", str(tmp_path / "ft"),
             nproc_per_node=1, timeout=120, echo=False, cwd=ROOT)
    from lessons_pkg.checkpoint.reshard import read_full_checkpoint
    saved = read_full_checkpoint(str(tmp_path / "ft"))
    assert saved.config.gelu_approximate == "none"      # what it saves says so too


def test_a_tokenizer_that_cannot_be_the_models_is_refused(gpt2_2000, tmp_path, capsys):
    """A 300-token tokenizer pads to 384 at TP=1, not the file's 2048 rows: refused, naming sizes and rule."""
    from lessons_pkg.data.python_docs import stdlib_docstrings
    from lessons_pkg.data.tokenizer import train_byte_level_bpe

    folder, model = gpt2_2000
    write_megatron_lm_release(str(tmp_path / "src"), model, 3.0)
    small = train_byte_level_bpe(itertools.islice(stdlib_docstrings(), 300), 300, str(tmp_path / "tok300"))
    code, _, err = util(capsys, "--load-dir", tmp_path / "src", "--save-dir", tmp_path / "out",
                        "--vocab-file", small[0], "--merge-file", small[1])
    assert code == 2
    message = err.strip().splitlines()[-1]
    assert "300" in message and str(PADDED) in message and "make_vocab_size_divisible_by" in message, message
    assert not os.path.exists(tmp_path / "out")
    # generate.py, the server and evaluate_gpt.py share load_pretrained's check: one line, no traceback
    proc = subprocess.run([sys.executable, "src/ch6/generate.py", "--load", str(tmp_path / "src"), "--vocab-file",
                           small[0], "--merge-file", small[1], "--prompt", "x", "--tokens-to-generate", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "make_vocab_size_divisible_by" in proc.stderr


# --- args of every plain kind; torch_dist folders -----------------------------------------------------
@pytest.mark.parametrize("kind", [argparse.Namespace, types.SimpleNamespace, dict])
def test_args_of_any_attribute_bag_kind_are_read(kind):
    values = dict(hidden_size=64, padded_vocab_size=PADDED)
    args = mf.read_args(kind(**values), "ckpt.pt")
    assert isinstance(args, argparse.Namespace) and vars(args) == values


def test_args_of_another_kind_are_an_error_naming_it(tmp_path, capsys, converted):
    with pytest.raises(ValueError, match=r"ckpt\.pt: its 'args' is a builtins\.list"):
        mf.read_args([1, 2], "ckpt.pt")
    # end to end: a file whose args are a tuple gets one line from checkpoint_util, no traceback
    src = tmp_path / "src"
    os.makedirs(src / "release" / "mp_rank_00")
    torch.save({"args": (1, 2), "model": {}}, src / "release" / "mp_rank_00" / "model_optim_rng.pt")
    (src / "latest_checkpointed_iteration.txt").write_text("release")
    code, _, err = util(capsys, "--load-dir", src, "--save-dir", tmp_path / "out")
    assert code == 2 and "its 'args' is a builtins.tuple" in err and "Traceback" not in err, err


def test_a_torch_dist_checkpoint_is_refused_with_the_workaround(tmp_path, capsys):
    """Megatron-LM's newer format: an iteration folder of metadata.json and *.distcp files."""
    iteration = tmp_path / "ckpt" / "iter_0000100"
    iteration.mkdir(parents=True)
    (iteration / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
    (iteration / "__0_0.distcp").write_bytes(b"\0" * 16)
    (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").write_text("100")
    code, _, err = util(capsys, "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "out")
    assert code == 2 and "torch_dist" in err and "--ckpt-format torch" in err, err
    with pytest.raises(ValueError, match="torch_dist"):
        load_pretrained(str(tmp_path / "ckpt"))
