"""Checkpoints written by other Megatron-LM versions read correctly; only allowlisted classes unpickle;
the lesson's parameter counts and file sizes for GPT-2 345M come out of the model's own shapes."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from lessons_pkg.checkpoint import megatron_format as mf
from lessons_pkg.checkpoint.reshard import Layout, partition_dim, read_full_checkpoint, stage_param_names
from lessons_pkg.tensor_parallel import GPTConfig, master_state_dict

CONFIG = GPTConfig(vocab_size=300, hidden_size=32, num_layers=2, num_attention_heads=4, max_position_embeddings=16)


def _old_qkv(t: torch.Tensor, version: float, heads: int) -> torch.Tensor:
    """One rank's QKV rows ``[np, 3, hn]`` written in the order of an older ``checkpoint_version``."""
    rest = t.shape[1:]
    x = t.reshape(heads, 3, -1, *rest)
    if version < 1.0:
        x = x.transpose(0, 1)                      # [3, np, hn]
    elif version < 2.0:
        x = x.transpose(1, 2)                      # [np, hn, 3]
    return x.reshape(t.shape).contiguous()


def write_old_megatron(root, version: float, tp: int = 2) -> dict:
    """A TP=``tp`` GPT checkpoint as a 2020 Megatron-LM wrote it: "transformer", "attention", old QKV order,
    args without our fields, numpy RNG states, vocabulary size only through the vocab file."""
    full = master_state_dict(CONFIG, seed=11)
    vocab_file = root / "vocab.json"
    vocab_file.write_text(json.dumps({f"t{i}": i for i in range(CONFIG.vocab_size)}))
    padded = 512  # 300 padded to a multiple of 128 x 2 (and of 128 x 1: the same)
    word = torch.cat([full[mf.WORD], torch.zeros(padded - CONFIG.vocab_size, CONFIG.hidden_size)])
    heads = CONFIG.num_attention_heads // tp
    (root / "latest_checkpointed_iteration.txt").write_text("5000")
    for t in range(tp):
        encoder = {}
        for key, value in full.items():
            if not key.startswith(("layers.", "final_layernorm.")):
                continue
            dim = partition_dim(key)
            if dim is not None:
                n = value.size(dim) // tp
                value = value.narrow(dim, t * n, n)
                if "query_key_value" in key:
                    value = _old_qkv(value, version, heads)
            encoder[key.replace("self_attention", "attention")] = value.clone()
        n = padded // tp
        model = {"language_model": {
            "embedding": {"word_embeddings": {"weight": word[t * n:(t + 1) * n].clone()},
                          "position_embeddings": {"weight": full[mf.POSITION].clone()}},
            "transformer": encoder}}
        args = argparse.Namespace(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                                  num_layers=CONFIG.num_layers, hidden_size=CONFIG.hidden_size,
                                  num_attention_heads=CONFIG.num_attention_heads, max_position_embeddings=16,
                                  padded_vocab_size=padded, vocab_file=str(vocab_file), tokenizer_type="GPT2BPETokenizer")
        folder = root / "iter_0005000" / f"mp_rank_{t:02d}"
        folder.mkdir(parents=True)
        torch.save({"model": model, "checkpoint_version": version, "iteration": 5000, "args": args,
                    "rng_state": [{"random_rng_state": (3, tuple(range(5)), None),
                                   "np_rng_state": np.random.get_state(), "torch_rng_state": torch.get_rng_state()}]},
                   folder / "model_optim_rng.pt")
    return full


@pytest.mark.parametrize("version", [0, 1.0, 2.0])
def test_older_megatron_checkpoints_read_as_the_same_model(tmp_path, version):
    full = write_old_megatron(tmp_path, version)
    got = read_full_checkpoint(str(tmp_path))
    assert got.iteration == 5000 and got.config.vocab_size == CONFIG.vocab_size  # from the vocab file
    assert sorted(got.state_dict) == sorted(full)
    for k in full:
        assert torch.equal(got.state_dict[k], full[k]), f"{k} (checkpoint_version {version})"


def test_safe_load_refuses_classes_outside_the_allowlist(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"args": argparse.Namespace(x=1), "payload": Exploit()}, path)
    with pytest.raises(ValueError, match=r"it pickles builtins.print, outside the allowlist"):
        mf.safe_load(str(path))
    torch.save({"args": argparse.Namespace(x=1), "state": np.random.get_state()}, path)
    assert mf.safe_load(str(path))["args"].x == 1  # Namespace and numpy RNG states are allowed


class Exploit:
    def __reduce__(self):
        return (print, ("arbitrary code ran while loading",))


def test_unsupported_megatron_models_are_named(tmp_path):
    args = argparse.Namespace(hidden_size=32, num_attention_heads=4, swiglu=True, position_embedding_type="rope",
                              normalization="RMSNorm", untie_embeddings_and_output_weights=True)
    with pytest.raises(ValueError, match="position_embedding_type 'rope'.*RMSNorm.*swiglu.*untie"):
        mf.check_supported(args, "ckpt")
    args = argparse.Namespace(hidden_size=32, num_attention_heads=4, squared_relu=True,
                              apply_residual_connection_post_layernorm=True)
    with pytest.raises(ValueError, match="squared_relu .*apply_residual_connection_post_layernorm"):
        mf.check_supported(args, "ckpt")


@pytest.mark.parametrize("saved, gelu", [
    ({}, "tanh"),                                                   # Megatron-LM's default: fused bias-GeLU
    ({"bias_gelu_fusion": True}, "tanh"),
    ({"bias_gelu_fusion": False}, "none"),                          # --no-bias-gelu-fusion: F.gelu
    ({"bias_gelu_fusion": False, "openai_gelu": True}, "tanh"),     # legacy --openai-gelu: the tanh formula
    ({"bias_gelu_fusion": False, "onnx_safe": True}, "none"),       # legacy --onnx-safe: erf_gelu
    ({"bias_gelu_fusion": False, "openai_gelu": True, "use_mcore_models": True}, "none"),   # mcore: F.gelu
    ({"bias_gelu_fusion": True, "onnx_safe": True, "use_legacy_models": False}, "tanh"),   # mcore: fused
])
def test_the_gelu_of_megatron_args(saved, gelu):
    assert mf.gelu_approximate(argparse.Namespace(**saved)) == gelu


def test_a_gelu_megatron_versions_disagree_on_is_refused():
    with pytest.raises(ValueError, match="onnx_safe and bias_gelu_fusion"):
        mf.gelu_approximate(argparse.Namespace(onnx_safe=True, bias_gelu_fusion=True))


# GPT-2 345M, as the lesson converts it: 24 layers, hidden 1024, 16 heads, 1024 positions, 50257 tokens
GPT2_345M = GPTConfig(vocab_size=50257, hidden_size=1024, num_layers=24, num_attention_heads=16,
                      max_position_embeddings=1024)


def _counts(tp, pp):
    layout = Layout(tp, pp)
    return [sum(int(np.prod(shape)) for _, shape in stage_param_names(GPT2_345M, layout, 0, p)[0]) for p in range(pp)]


def test_lesson_parameter_counts_per_rank_for_345m():
    # the numbers Megatron-LM prints in the lesson's logs (served at TP=1, TP=4 and TP=2 x PP=2)
    assert _counts(1, 1) == [354_871_296]
    assert _counts(4, 1) == [89_714_688]
    assert _counts(2, 2) == [102_483_968, 101_437_440]


def test_lesson_weights_only_file_sizes_for_345m():
    # `tree -h` of the lesson's converted checkpoints: 1.3G; 680M x 2; 489M 288M 288M 485M.
    # A weights-only float32 file is 4 bytes a parameter (plus a few KiB of index and args), and tree rounds
    # to the nearest MiB (GiB with one decimal); the measured files are in docs/benchmarks.md.
    mib = [[4 * n / 2**20 for n in _counts(tp, pp)] for tp, pp in ((1, 1), (2, 1), (1, 4))]
    assert round(mib[0][0] / 1024, 1) == 1.3
    assert [round(x) for x in mib[1]] == [679] and abs(mib[1][0] - 680) < 1   # 679.4 MiB + the file's header
    assert [round(x) for x in mib[2]] == [489, 288, 288, 485]
