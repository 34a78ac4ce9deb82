"""Resharding real checkpoints: round trips are bit-identical, every layout holds the same model and Adam state.

The source checkpoints are written by the trainer's own ``save_checkpoint``
after two AdamW steps (see ckpt_testing.py). Their vocabulary (500) pads to
512 at TP 1, 2 and 4, so no layout has to drop a dummy row and every
comparison below is exact (``torch.equal``): resharding only copies and cuts
tensors, it computes nothing.
"""
from __future__ import annotations

import os

import pytest
import torch

from ckpt_testing import assert_identical, flatten, write_trained_checkpoint
from lessons_pkg.checkpoint import convert, megatron_format as mf
from lessons_pkg.checkpoint.layout import find_checkpoint
from lessons_pkg.checkpoint.reshard import Layout, SourceCheckpoint, read_full_checkpoint


def quiet(*_args, **_kwargs):
    pass


def reshard(src_dir, dst_dir, tp, pp, vp=1, **kw):
    convert.megatron_to_megatron(str(src_dir), str(dst_dir), Layout(tp, pp, vp), log=quiet, progress=False, **kw)
    return str(dst_dir)


def files_of(root) -> dict:
    files = find_checkpoint(str(root))
    return {(t, p): mf.safe_load(files.model_file(t, p)) for t in range(files.tp) for p in range(files.pp)}


@pytest.fixture(scope="module")
def zero_dp2(tmp_path_factory):
    """TP=2 x DP=2 with ZeRO-1: the Adam state is in distrib_optim_dp_rank_00X.pt slices."""
    return write_trained_checkpoint(tmp_path_factory.mktemp("zero"), tp=2, pp=1, dp=2, zero=True)


def test_megatron_tree_inside_the_files(tp2pp2):
    first, last = files_of(tp2pp2)[(0, 0)], files_of(tp2pp2)[(1, 1)]
    assert first["checkpoint_version"] == 3.0 and first["iteration"] == 2
    args = first["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.num_layers) == (2, 2, 4)
    assert (args.padded_vocab_size, args.true_vocab_size, args.ffn_hidden_size) == (512, 500, 128)
    lm = first["model"]["language_model"]
    assert lm["embedding"]["word_embeddings"]["weight"].shape == (256, 32)     # 512 rows / TP 2
    assert lm["embedding"]["position_embeddings"]["weight"].shape == (16, 32)
    assert "layers.1.self_attention.query_key_value.weight" in lm["encoder"]   # stage-local numbers
    assert "layers.2.input_layernorm.weight" not in lm["encoder"]
    assert "final_layernorm.weight" in last["model"]["language_model"]["encoder"]
    assert "embedding" not in last["model"]["language_model"]
    head = last["model"]["word_embeddings_for_head"]["weight"]
    assert torch.equal(head, files_of(tp2pp2)[(1, 0)]["model"]["language_model"]["embedding"]["word_embeddings"]["weight"])
    assert {"optimizer", "opt_param_scheduler", "rng_state", "consumed_train_samples"} <= set(first)


def test_round_trip_through_every_layout_is_bit_identical(tp2pp2, tmp_path):
    a = reshard(tp2pp2, tmp_path / "tp1", 1, 1)
    b = reshard(a, tmp_path / "tp4", 4, 1)
    c = reshard(b, tmp_path / "tp1pp2v2", 1, 2, vp=2)        # interleaved: 2 chunks of 1 layer per stage
    d = reshard(c, tmp_path / "back", 2, 2)
    original, back = files_of(tp2pp2), files_of(d)
    for rank in original:
        before = {k: v for k, v in original[rank].items() if k not in ("args", "rng_state")}
        after = {k: v for k, v in back[rank].items() if k != "args"}
        assert_identical(before, after, f"rank {rank} after TP2xPP2 -> TP1 -> TP4 -> TP1xPP2xV2 -> TP2xPP2")
    assert mf.model_keys(files_of(c)[(0, 1)]) == ["model0", "model1"]
    # the same full model and Adam state in every layout
    full = read_full_checkpoint(tp2pp2).state_dict
    for root in (a, b, c, d):
        other = read_full_checkpoint(root).state_dict
        assert all(torch.equal(full[k], other[k]) for k in full) and sorted(full) == sorted(other)


def test_zero1_slices_travel_as_the_plain_optimizer_would_hold_them(zero_dp2, tmp_path):
    # the same two steps with the plain optimizer at TP=2, DP=1: Adam is elementwise, so the moments are equal
    plain = write_trained_checkpoint(tmp_path / "plain", tp=2, pp=1, dp=1, zero=False)
    from_zero = files_of(reshard(zero_dp2, tmp_path / "from-zero", 2, 1))
    reference = files_of(plain)
    for rank in reference:
        assert_identical(reference[rank]["model"], from_zero[rank]["model"], f"weights of rank {rank}")
        assert from_zero[rank]["optimizer"]["param_names"] == reference[rank]["optimizer"]["param_names"]
        got, want = from_zero[rank]["optimizer"]["adam"]["state"], reference[rank]["optimizer"]["adam"]["state"]
        for i in want:
            for k in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(got[i][k], want[i][k]), f"rank {rank} param {i} {k}"


def test_dropping_dummy_rows_keeps_the_real_vocabulary(tp2pp2, tmp_path):
    # make_vocab_size_divisible_by 64 would pad 500 to 512 at TP 2 but the source says 128; a TP whose
    # padding is smaller than the source's keeps the real rows exactly and drops only dummy rows
    src = SourceCheckpoint.open(tp2pp2)
    from lessons_pkg.checkpoint.reshard import build_rank_state

    state = build_rank_state(src, Layout(1, 1), 0, 0, padded_vocab_size=504)
    word = state["model"]["language_model"]["embedding"]["word_embeddings"]["weight"]
    assert word.shape == (504, 32)
    full = read_full_checkpoint(tp2pp2).state_dict[mf.WORD]
    assert torch.equal(word[:500], full)


def test_weights_only_files_without_optimizer_and_rng(tp2pp2, tmp_path):
    out = reshard(tp2pp2, tmp_path / "weights", 1, 1, with_optim=False)
    state = files_of(out)[(0, 0)]
    assert "optimizer" not in state and "rng_state" not in state
    assert state["iteration"] == 2 and state["args"].true_vocab_size == 500
    n = sum(t.numel() for t in flatten(state["model"]).values())
    size = os.path.getsize(find_checkpoint(out).model_file(0, 0))
    assert 4 * n <= size <= 4 * n + 64 * 1024, "a weights-only float32 file is 4 bytes a parameter plus its index"
