"""transformers <-> Megatron: the export loads in GPT2LMHeadModel, the import gives our model HF's logits.

Tolerance 1e-5 on logits of order 1: the two implementations compute the same
float32 sums in another order (fused QKV vs Conv1D, our attention vs HF's),
which moves a logit by a few ulps per layer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from ckpt_testing import CONFIG
from lessons_pkg.checkpoint import build_stage, convert, load_pretrained
from lessons_pkg.checkpoint.layout import read_tracker
from lessons_pkg.checkpoint.reshard import Layout, read_full_checkpoint
from lessons_pkg.tensor_parallel import GPTConfig
from lessons_pkg.tensor_parallel.hf import config_to_hf, from_hf_state_dict
from lessons_pkg.testing import run_on_ranks

TOL = 1e-5
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def quiet(*_args, **_kwargs):
    pass


def ids(batch=2, seq=12, vocab=CONFIG["vocab_size"], seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_export_loads_in_transformers_with_equal_logits(tp2pp2, tmp_path):
    from transformers import GPT2LMHeadModel

    out = tmp_path / "hf"
    convert.megatron_to_hf(tp2pp2, str(out), log=quiet)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(out))
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    ours = build_stage(load_pretrained(tp2pp2))  # one process, TP=1: the checkpoint's own weights
    x = ids()
    with torch.no_grad():
        want = ours(x)[..., : CONFIG["vocab_size"]]
        got = hf(x).logits
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err <= TOL, f"max |logit difference| {err}"
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)  # still tied after loading


def _hf_folder(tmp_path):
    from transformers import GPT2LMHeadModel

    torch.manual_seed(3)
    hf = GPT2LMHeadModel(config_to_hf(GPTConfig(**CONFIG))).eval()
    folder = tmp_path / "gpt2-small-random"
    hf.save_pretrained(folder)
    return folder, hf


def _pipeline_logits(root, hf_folder, seed):
    """Logits of the imported checkpoint on TP=2 x PP=2 ranks vs transformers' logits; max error on the last stage."""
    from transformers import GPT2LMHeadModel

    from lessons_pkg import parallel_state as ps
    from lessons_pkg.tensor_parallel import gather_from_tensor_model_parallel_region

    ps.initialize_model_parallel(2, 2)
    pp_rank, ranks = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_ranks()
    model = build_stage(load_pretrained(root), ps.get_tensor_model_parallel_group(), pp_rank, 2)
    x = ids(seed=seed)
    with torch.no_grad():
        if pp_rank == 0:
            torch.distributed.send(model(x).contiguous(), ranks[1])         # [b, s, h] to the next stage
            return None
        hidden = torch.empty(x.shape[0], x.shape[1], CONFIG["hidden_size"])
        torch.distributed.recv(hidden, ranks[0])
        logits = gather_from_tensor_model_parallel_region(model(hidden), ps.get_tensor_model_parallel_group())
        want = GPT2LMHeadModel.from_pretrained(hf_folder).eval()(x).logits
    return (logits[..., : CONFIG["vocab_size"]] - want).abs().max().item()


def test_import_at_tp2_pp2_gives_hf_logits(tmp_path):
    folder, hf = _hf_folder(tmp_path)
    out = tmp_path / "imported"
    convert.hf_to_megatron(str(folder), str(out), Layout(2, 2), log=quiet, progress=False)
    assert read_tracker(str(out)) == "release" and (out / "release" / "mp_rank_01_001" / "model_optim_rng.pt").is_file()
    full = read_full_checkpoint(str(out)).state_dict
    expected = from_hf_state_dict(hf.state_dict(), GPTConfig(**CONFIG))
    assert sorted(full) == sorted(expected) and all(torch.equal(full[k], expected[k]) for k in full)
    errors = run_on_ranks(_pipeline_logits, world_size=4, args=(str(out), str(folder), 1), timeout=120)
    last_stage = [e for e in errors if e is not None]
    assert len(last_stage) == 2 and max(last_stage) <= TOL, errors


def test_finetune_from_imported_weights_starts_at_hf_loss(tmp_path):
    """pretrain_gpt.py --load <imported GPT-2> --finetune: iteration 1's loss is transformers' loss on that batch.

    The import is TP2 x PP2 and the run TP=1, so this also reshards a ``release`` checkpoint on load.
    The dummy tokens of the padded vocabulary (zero rows) take no probability in our loss, so the
    number equals HF's, whose vocabulary has no padding.
    """
    folder, hf = _hf_folder(tmp_path)
    out = tmp_path / "imported"
    convert.hf_to_megatron(str(folder), str(out), Layout(2, 2), log=quiet, progress=False)
    log = tmp_path / "log.jsonl"
    cmd = [sys.executable, "src/ch6/pretrain_gpt.py", "--num-layers", "4", "--hidden-size", "32",
           "--num-attention-heads", "4", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
           "--train-iters", "1", "--lr", "1e-4", "--mock-data", "--vocab-size", "500", "--tokenizer-type",
           "NullTokenizer", "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-iters", "0",
           "--log-interval", "1", "--load", str(out), "--finetune", "--log-json", str(log)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resharding checkpoint" in result.stdout and "--finetune" in result.stdout
    loss = [r for r in map(json.loads, open(log)) if r["kind"] == "train"][0]["lm_loss"]
    sys.path.insert(0, os.path.join(ROOT, "src", "ch6"))
    from pretrain_gpt import MockGPTDataset

    data = MockGPTDataset(2, 16, 500, seed=1234)
    text = torch.stack([torch.as_tensor(data[i]["text"]) for i in range(2)])
    # tokens = sample[:-1], labels = sample[1:], as the trainer's get_batch cuts a sample of seq + 1 ids
    with torch.no_grad():
        logits = hf(text[:, :-1]).logits
        want = torch.nn.functional.cross_entropy(logits.reshape(-1, 500), text[:, 1:].reshape(-1)).item()
    # a loss of ~6 averaged over 32 tokens: float32 ulps of the two implementations' sums, as LOSS_TOL in tests/training
    assert abs(loss - want) <= 2e-5, f"iteration-1 loss {loss} vs transformers {want}"


# --- a tool written for Megatron-LM reads our files -------------------------------------------------
CONVERTER = os.path.join(ROOT, "build", "compat", "convert_megatron_gpt2_checkpoint.py")
CONVERTER_WHEEL = "transformers==4.46.3"  # the last releases that ship transformers' Megatron GPT-2 converter


def megatron_gpt2_converter():
    """transformers' ``convert_megatron_gpt2_checkpoint.py`` (removed in transformers 5), fetched from PyPI once."""
    import importlib.util
    import tempfile
    import zipfile

    if not os.path.isfile(CONVERTER):
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp,
                                  CONVERTER_WHEEL], capture_output=True, text=True, timeout=300)
            assert got.returncode == 0, f"could not fetch {CONVERTER_WHEEL} from PyPI: {got.stderr[-2000:]}"
            wheel = [f for f in os.listdir(tmp) if f.endswith(".whl")][0]
            with zipfile.ZipFile(os.path.join(tmp, wheel)) as z:
                source = z.read("transformers/models/megatron_gpt2/convert_megatron_gpt2_checkpoint.py")
        os.makedirs(os.path.dirname(CONVERTER), exist_ok=True)
        with open(CONVERTER + ".tmp", "wb") as f:
            f.write(source)
        os.replace(CONVERTER + ".tmp", CONVERTER)
    spec = importlib.util.spec_from_file_location("convert_megatron_gpt2_checkpoint", CONVERTER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_transformers_megatron_gpt2_converter_reads_our_checkpoint(tp2pp2, tmp_path):
    """transformers' own converter (written for Megatron-LM's files) on our TP=1 checkpoint gives our logits."""
    import argparse

    from transformers import GPT2Config, GPT2LMHeadModel

    from lessons_pkg.checkpoint import megatron_format as mf

    out = tmp_path / "tp1"
    convert.megatron_to_megatron(tp2pp2, str(out), Layout(1, 1), log=quiet, progress=False)
    converter = megatron_gpt2_converter()
    # the converter's own torch.load needs Namespace allowlisted under torch >= 2.6, as any Megatron file does
    with torch.serialization.safe_globals(mf.SAFE_GLOBALS):
        state = torch.load(out / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt", map_location="cpu")
    config = GPT2Config(activation_function="gelu_fast" if state["args"].bias_gelu_fusion else "gelu_new")
    hf_state = converter.convert_megatron_checkpoint(argparse.Namespace(), state, config)
    model = GPT2LMHeadModel(config).eval()
    # the converter also writes the causal-mask buffers (attn.bias, attn.masked_bias) of transformers 4
    masks = [k for k in hf_state if k.endswith((".attn.bias", ".attn.masked_bias"))]
    missing, unexpected = model.load_state_dict({k: v for k, v in hf_state.items() if k not in masks}, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    ours = build_stage(load_pretrained(str(out)))
    x = ids()
    with torch.no_grad():
        err = (model(x).logits[..., : CONFIG["vocab_size"]] - ours(x)[..., : CONFIG["vocab_size"]]).abs().max().item()
    assert config.vocab_size == 512 and config.n_layer == CONFIG["num_layers"]  # read from our args
    assert err <= TOL, f"max |logit difference| {err}"
