"""src/ch6/checkpoint_util.py: bad input gets one clear message naming the values, and nothing is written."""
from __future__ import annotations

import errno
import os
import shutil
import sys

import pytest
import torch

from lessons_pkg.checkpoint import megatron_format as mf
from lessons_pkg.checkpoint.layout import read_tracker

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "src", "ch6"))

import checkpoint_util  # noqa: E402

from lessons_pkg.errors import run_cli  # noqa: E402


def run(capsys, *argv):
    code = run_cli(checkpoint_util.main, ["--no-progress", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def nothing_written(save_dir) -> bool:
    parent = os.path.dirname(os.path.abspath(save_dir))
    leftovers = [n for n in os.listdir(parent) if ".tmp-" in n or ".old-" in n]
    return not os.path.exists(save_dir) and not leftovers


@pytest.fixture
def src(tp2pp2, tmp_path):
    """A private copy of the session's TP2 x PP2 checkpoint, free to break."""
    return shutil.copytree(tp2pp2, tmp_path / "src")


def test_lesson_conversions_print_parameters_per_rank(capsys, tp2pp2, tmp_path):
    code, out, _ = run(capsys, "--model-type", "GPT", "--load-dir", tp2pp2, "--save-dir", tmp_path / "pp4",
                       "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "4", "--verify")
    assert code == 0 and "bit for bit: True" in out
    for p in range(4):
        assert f"number of parameters on (tensor, pipeline) model parallel rank (0, {p}): " in out
    assert "iter_0000002/mp_rank_00_003/model_optim_rng.pt" in out
    assert (tmp_path / "pp4" / "latest_checkpointed_iteration.txt").read_text() == "2"


@pytest.mark.parametrize("argv, message", [
    (["--target-tensor-parallel-size", "3"], "target tensor-parallel size 3 does not divide num_attention_heads (4)"),
    (["--target-pipeline-parallel-size", "3"], "3 stages do not divide num_layers (4)"),
    (["--target-pipeline-parallel-size", "2", "--target-virtual-pipeline-parallel-size", "4"],
     "8 stages do not divide num_layers (4)"),
    (["--target-tensor-parallel-size", "0"], "--target-tensor-parallel-size must be >= 1, got 0"),
    (["--true-vocab-size", "600"], "--true-vocab-size is 600, but the word embedding has only 512 rows"),
])
def test_bad_targets(capsys, tp2pp2, tmp_path, argv, message):
    save = tmp_path / "out"
    code, _, err = run(capsys, "--load-dir", tp2pp2, "--save-dir", save, *argv)
    assert code == 2 and message in err, err
    assert nothing_written(save)


def test_broken_sources(capsys, src, tmp_path):
    save = tmp_path / "out"
    iteration = src / "iter_0000002"

    def expect(message):
        code, _, err = run(capsys, "--load-dir", src, "--save-dir", save, "--target-tensor-parallel-size", "1")
        assert code == 2 and message in err, err
        assert nothing_written(save)

    (src / "latest_checkpointed_iteration.txt").write_text("7")                    # tracker -> missing folder
    expect("names iter_0000007, but there is no such folder")
    (src / "latest_checkpointed_iteration.txt").write_text("2")
    os.replace(iteration / "mp_rank_01_001" / "model_optim_rng.pt", tmp_path / "moved.pt")  # half-written
    expect("is incomplete (half-written or mixed layouts)")
    os.replace(tmp_path / "moved.pt", iteration / "mp_rank_01_001" / "model_optim_rng.pt")
    (iteration / "mp_rank_00").mkdir()                                               # mixed layouts
    expect("mixes layouts")
    (iteration / "mp_rank_00").rmdir()
    state = mf.safe_load(iteration / "mp_rank_00_000" / "model_optim_rng.pt")        # args that do not fit
    state["args"].hidden_size, state["args"].ffn_hidden_size = 64, 256
    torch.save(state, iteration / "mp_rank_00_000" / "model_optim_rng.pt")
    expect("'embedding.word_embeddings.weight' has shape (256, 32), the saved args (hidden 64, heads 4, TP 2) imply (256, 64)")
    (src / "latest_checkpointed_iteration.txt").unlink()                            # not a checkpoint at all
    expect("is not a Megatron checkpoint folder: no latest_checkpointed_iteration.txt")
    code, _, err = run(capsys, "--load-dir", tmp_path / "nowhere", "--save-dir", save)
    assert code == 2 and "no such checkpoint folder" in err


def test_output_is_never_overwritten_unless_asked(capsys, tp2pp2, tmp_path):
    save = tmp_path / "out"
    save.mkdir()
    (save / "precious.txt").write_text("keep me")
    code, _, err = run(capsys, "--load-dir", tp2pp2, "--save-dir", save, "--target-tensor-parallel-size", "1")
    assert code == 2 and "exists and is not empty" in err and "--overwrite" in err
    assert (save / "precious.txt").read_text() == "keep me"
    inside, parent = os.path.join(tp2pp2, "iter_0000002", "new"), os.path.dirname(tp2pp2)
    for save_dir, how in ((tp2pp2, "is"), (inside, "is inside"), (parent, "holds")):
        for overwrite in ((), ("--overwrite",)):  # replacing --save-dir would delete the source: never
            code, _, err = run(capsys, "--load-dir", tp2pp2, "--save-dir", save_dir, *overwrite)
            assert code == 2 and err == f"error: --save-dir {save_dir} {how} --load-dir {tp2pp2}: write the " \
                                       "conversion to a folder outside the source\n", err
    assert read_tracker(tp2pp2) == 2 and not os.path.exists(inside)
    code, _, _ = run(capsys, "--load-dir", tp2pp2, "--save-dir", save, "--target-tensor-parallel-size", "1",
                     "--target-pipeline-parallel-size", "1", "--overwrite")
    assert code == 0 and not (save / "precious.txt").exists() and (save / "iter_0000002" / "mp_rank_00").is_dir()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


def test_a_failing_conversion_leaves_nothing(capsys, src, tmp_path, monkeypatch):
    from lessons_pkg.checkpoint import reshard

    calls = {"n": 0}
    real = reshard.build_rank_state

    def fail_on_third(*args, **kwargs):  # dies midway, after two of four shards were written
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real(*args, **kwargs)

    from lessons_pkg.checkpoint import convert

    monkeypatch.setattr(convert, "build_rank_state", fail_on_third)
    save = tmp_path / "out"
    code, _, err = run(capsys, "--load-dir", src, "--save-dir", save, "--target-tensor-parallel-size", "4")
    assert code == 2 and err == (f"error: could not write the conversion to --save-dir {save}: No space left on "
                                 "device (simulated); nothing was written\n"), err
    assert nothing_written(save)
