"""pretrain_gpt.py launched for real: layouts agree with one process, checkpoints resume exactly.

Launches (shared through module fixtures, to keep the suite fast):
    serial   1 rank,  TP=PP=DP=1                          6 iterations
    tp2pp2   4 ranks, TP=2 x PP=2, saves at 3 and 6         (uninterrupted reference of the resume test)
    dp2      8 ranks, TP=2 x PP=2 x DP=2, --use-distributed-optimizer, interleaved schedule, recomputation,
             --sequence-parallel
    full     4 ranks, resumed from tp2pp2's iteration 3, the disk full (RLIMIT_FSIZE) when it saves at 6
    killed-in-save  4 ranks, resumed from 3, one rank SIGKILLed between the shard writes and the tracker move at 6
    resumed  4 ranks, resumed again (from 3: neither failed save became `latest`)
    zero1    2 ranks, DP=2 with the distributed optimizer, then resumed from its iteration-3 checkpoint
"""
from __future__ import annotations

import json
import os
import pydoc_data.topics
import resource
import shutil
import subprocess
import sys

import pytest

from lessons_pkg.data import IndexedDatasetBuilder
from lessons_pkg.data.tokenizer import build_tokenizer, train_byte_level_bpe
from lessons_pkg.launch import free_port, torchrun
from lessons_pkg.training.checkpointing import KILL_DURING_SAVE_ENV, read_tracker

SCRIPT = "src/ch6/pretrain_gpt.py"
ITERS = 6
# Float32 tolerance: the layouts compute the same sums in a different order (TP splits matmuls and
# the softmax denominator over ranks, DP averages across ranks), which moves losses of ~6 by a few
# ulps (1 ulp = 4.8e-7 at 6) per iteration; 2e-5 leaves room for that drift over 6 steps.
LOSS_TOL = 2e-5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A real (small) corpus: Python's reference-manual topics, a 300-token byte-level BPE, .bin/.idx."""
    root = tmp_path_factory.mktemp("pretrain-data")
    texts = [t for t in pydoc_data.topics.topics.values() if len(t) > 500][:120]
    vocab, merges = train_byte_level_bpe(texts, 300, str(root))
    tok = build_tokenizer(vocab, merges)
    assert tok.vocab_size == 300
    prefix = str(root / "topics_text_document")
    with IndexedDatasetBuilder(prefix) as builder:
        for text in texts:
            builder.add_document(tok.tokenize(text) + [tok.eod])
    return {"prefix": prefix, "vocab": vocab, "merges": merges, "root": root}


def common_args(data, log_json, *extra):
    return [
        "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
        "--lr", "5e-3", "--min-lr", "5e-4", "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.2",
        "--weight-decay", "0.1", "--clip-grad", "1.0", "--attention-dropout", "0", "--hidden-dropout", "0",
        "--data-path", data["prefix"], "--vocab-file", data["vocab"], "--merge-file", data["merges"],
        "--split", "90,8,2", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
        "--seed", "1234", "--log-json", str(log_json), *extra,
    ]


def launch(nproc, data, log_json, *extra, env=None, check=True, timeout=240, preexec_fn=None):
    # the same padded vocabulary in every layout: 300 -> 320 (64 x 5) at TP=1 and (32 x 2) x 5 at TP=2,
    # since the dummy tokens' logits enter the softmax (as in Megatron)
    tp = 2 if "--tensor-model-parallel-size" in extra else 1
    divisible = ["--make-vocab-size-divisible-by", str(64 // tp)]
    return torchrun(SCRIPT, *common_args(data, log_json, *divisible, *extra), nproc_per_node=nproc,
                    timeout=timeout, env=env, check=check, echo=False, preexec_fn=preexec_fn)


def records(path, kind="train"):
    return {r["iteration"]: r for r in map(json.loads, open(path)) if r["kind"] == kind}


def losses(path, kind="train"):
    return {i: r["lm_loss"] for i, r in records(path, kind).items()}


TP2PP2 = ("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2")


@pytest.fixture(scope="module")
def serial(data):
    log = data["root"] / "serial.jsonl"
    # --profile records iterations 2-3 (it changes no number: the other layouts are compared with this run)
    result = launch(1, data, log, "--tensorboard-dir", str(data["root"] / "tensorboard"), "--profile",
                    "--profile-step-start", "2", "--profile-step-end", "4",
                    "--profile-trace", str(data["root"] / "trace.json"))
    return log, result


@pytest.fixture(scope="module")
def tp2pp2(data):
    log, save = data["root"] / "tp2pp2.jsonl", data["root"] / "ckpt-tp2pp2"
    result = launch(4, data, log, *TP2PP2, "--save", str(save), "--save-interval", "3")
    return log, save, result


def assert_same_curve(log, reference):
    got, ref = losses(log), losses(reference)
    assert sorted(got) == list(range(1, ITERS + 1)) == sorted(ref)
    for i in ref:
        assert abs(got[i] - ref[i]) <= LOSS_TOL, f"iteration {i}: {got[i]} vs single process {ref[i]}"
    for i, r in records(reference).items():  # the global gradient norm too: each element counted once
        assert abs(records(log)[i]["grad_norm"] - r["grad_norm"]) <= 1e-5 * max(1.0, r["grad_norm"])
    for kind in ("valid", "test"):
        for i, value in losses(reference, kind).items():
            assert abs(losses(log, kind)[i] - value) <= LOSS_TOL


def test_serial_run_logs_like_megatron(serial):
    log, result = serial
    out = result.output
    assert " > padded vocab (size: 300) with 20 dummy tokens (new size: 320)" in out
    assert " > number of parameters on (tensor, pipeline) model parallel rank (0, 0): " in out
    assert "------------------------ arguments ------------------------" in out
    assert f" iteration        {ITERS}/       {ITERS} | consumed samples:           48 |" in out
    assert "| lm loss: " in out and "| grad norm: " in out and "| tokens per second: " in out
    assert " validation loss at iteration 3 | lm loss value: " in out
    assert " test loss at the end of training for test data | lm loss value: " in out
    train = losses(log)
    assert train[ITERS] < train[1], "the loss should go down in 6 iterations"
    assert list((log.parent / "tensorboard").glob("events.out.tfevents.*")), "--tensorboard-dir wrote no events"
    # --profile: one table of iterations 2-3, CPU time here (on a GPU: CUDA time), the matmuls in it
    assert out.count("profile of iteration(s) 2-3 (2 iteration(s)), sorted by self_cpu_time_total:") == 1
    table = out.split("profile of iteration(s) 2-3")[1]
    assert "Self CPU time total:" in table and ("aten::mm" in table or "aten::addmm" in table), table[:3000]
    trace = json.loads((log.parent / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert "Optimizer.step#AdamW.step" in names and "aten::mm" in names


def test_tp2_pp2_matches_single_process(serial, tp2pp2):
    assert_same_curve(tp2pp2[0], serial[0])
    out = tp2pp2[2].output
    for tp, pp in ((0, 0), (1, 0), (0, 1), (1, 1)):
        assert f"model parallel rank ({tp}, {pp}): " in out


def test_tp2_pp2_dp2_distributed_optimizer_matches_single_process(data, serial, tp2pp2):
    """Also the interleaved schedule (2 chunks of 1 layer per stage), activation recomputation and sequence
    parallelism: the same losses as one process (LOSS_TOL: sequence parallelism only moves the sums again,
    reduce-scatters and all-gathers where all-reduces were, the LayerNorm gradients summed over the tensor
    ranks), and the same weights in the same files as the run without it (TP=2 x PP=2 fixture)."""
    from lessons_pkg.checkpoint import megatron_format as mf
    from lessons_pkg.checkpoint.reshard import read_full_checkpoint

    log, save = data["root"] / "dp2.jsonl", data["root"] / "ckpt-dp2"
    result = launch(8, data, log, *TP2PP2, "--use-distributed-optimizer", "--num-layers-per-virtual-pipeline-stage",
                    "1", "--recompute-activations", "--sequence-parallel", "--attention-softmax-in-fp32",
                    "--save", str(save), "--save-interval", "3")
    assert ("data-parallel size: 2, context-parallel size: 1, tensor-model-parallel size: 2, "
            "pipeline-model-parallel size: 2, micro-batches per iteration: 2, schedule: interleaved") in result.output
    assert f"  sequence_parallel {'.' * 31} True" in result.output
    assert_same_curve(log, serial[0])
    # ZeRO-1 checkpoint: each data-parallel rank's slice of the Adam state in its own file
    folder = save / f"iter_{ITERS:07d}" / "mp_rank_01_001"
    assert sorted(p.name for p in folder.iterdir()) == [
        "distrib_optim_dp_rank_000.pt", "distrib_optim_dp_rank_001.pt", "model_optim_rng.pt"]
    # sequence parallelism changes no weight: the files hold the same tensors as without it (up to the
    # float32 rounding of the sums, moved through 6 AdamW steps)
    state = mf.safe_load(str(folder / "model_optim_rng.pt"))
    assert "model_parallel" in state["rng_state"][0]   # the per-tensor-rank dropout stream resumes too
    ours, theirs = read_full_checkpoint(str(save)).state_dict, read_full_checkpoint(str(tp2pp2[1])).state_dict
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        assert ours[k].shape == theirs[k].shape, k
        assert (ours[k] - theirs[k]).abs().max() <= 1e-5, k


def test_the_lesson_s_flags_run_as_written(data):
    """The flags the lesson's command lines end with (seed 000: --attention-softmax-in-fp32 --sequence-parallel
    --ckpt-format torch; seed 004: --attention-backend auto, --rampup-batch-size), at TP=2 on 2 processes."""
    from lessons_pkg.training.batch_size import global_batch_size_at
    from lessons_pkg.training.arguments import parse_args

    log = data["root"] / "lesson-flags.jsonl"
    flags = ("--tensor-model-parallel-size", "2", "--attention-softmax-in-fp32", "--sequence-parallel",
             "--ckpt-format", "torch", "--attention-backend", "auto", "--rampup-batch-size", "4", "4", "16")
    result = launch(2, data, log, *flags)
    assert f"  rampup_batch_size {'.' * 31} [4, 4, 16]" in result.output
    # the ramp: each iteration's batch from the samples consumed before it (4, 4, 4, 4, then 8)
    args = parse_args(common_args(data, log, *flags))
    consumed, expected = 0, []
    for _ in range(ITERS):
        expected.append(global_batch_size_at(consumed, args))
        consumed += expected[-1]
    got = records(log)
    assert [got[i]["global_batch_size"] for i in range(1, ITERS + 1)] == expected and min(expected) == 4
    assert got[ITERS]["consumed_samples"] == sum(expected)
    assert f"global batch size: {expected[-1]:5d} |" in result.output


def test_context_parallel_with_tp_sp_pp_and_zero1_matches_and_resumes_at_cp1(data, serial):
    """--context-parallel-size 2 with TP=2 (and sequence parallelism), PP=2 and the distributed optimizer
    (8 ranks; ZeRO-1 shards over data x context): one process's losses (LOSS_TOL: the softmax normalised
    block by block round the ring, sums in another order). Its iteration-3 checkpoint holds the same files
    as any other and resumes on one process (CP=1, TP=1, PP=1, plain Adam) onto the CP run's own curve."""
    log, save = data["root"] / "cp2tp2pp2.jsonl", data["root"] / "ckpt-cp2tp2pp2"
    result = launch(8, data, log, "--context-parallel-size", "2", *TP2PP2, "--sequence-parallel",
                    "--use-distributed-optimizer", "--save", str(save), "--save-interval", "3")
    assert "data-parallel size: 1, context-parallel size: 2, tensor-model-parallel size: 2" in result.output
    assert_same_curve(log, serial[0])
    folder = save / f"iter_{ITERS:07d}" / "mp_rank_01_001"
    assert sorted(p.name for p in folder.iterdir()) == [f"distrib_optim_dp_rank_{r:03d}.pt" for r in range(2)] + [
        "model_optim_rng.pt"]
    resume = _checkpoint_at(save, 3, data["root"] / "ckpt-cp2-from-3")
    log1 = data["root"] / "cp-resumed-at-cp1.jsonl"
    launch(1, data, log1, "--load", str(resume))
    got, reference = losses(log1), losses(log)
    assert sorted(got) == [4, 5, 6]
    for i in got:
        assert abs(got[i] - reference[i]) <= LOSS_TOL, f"iteration {i}: {got[i]} vs the CP run's {reference[i]}"


def test_checkpoint_layout(tp2pp2):
    _, save, _ = tp2pp2
    assert read_tracker(str(save)) == ITERS
    for it in (3, ITERS):
        for name in ("mp_rank_00_000", "mp_rank_01_000", "mp_rank_00_001", "mp_rank_01_001"):
            assert (save / f"iter_{it:07d}" / name / "model_optim_rng.pt").is_file()
    assert not list(save.rglob("*.tmp"))


def full_disk():
    """In torchrun's process before it starts (the ranks inherit it): files cannot grow past 64 KiB, as on a
    full disk. The logs stay below it; every checkpoint shard of this model is larger (~200 KiB)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_failed_saves_lose_nothing_and_the_run_resumes_exactly(data, tp2pp2):
    ref_log = tp2pp2[0]
    save = data["root"] / "ckpt-resume"
    args = (*TP2PP2, "--save", str(save), "--load", str(save), "--save-interval", "3")
    partial = save / f"iter_{ITERS:07d}"

    # 1. a job that stopped after its save at iteration 3: tp2pp2's checkpoint of 3, alone in the folder
    _checkpoint_at(tp2pp2[1], 3, save)

    # 2. resumed from 3; the disk is full when it saves at 6: one error line, the partial iteration removed
    full_log = data["root"] / "full-disk.jsonl"
    full = launch(4, data, full_log, *args, check=False, preexec_fn=full_disk)
    assert full.returncode != 0 and " > loaded checkpoint from" in full.output and "at iteration 3" in full.output
    reports = [line for err in full.stderr for line in err.splitlines() if line.startswith("error: ")]
    assert len(reports) == 1 and not any("Traceback" in err for err in full.stderr), full.stderr
    assert reports[0].startswith(f"error: could not save iteration {ITERS} to {save}: cannot write {partial}/"), reports
    assert reports[0].endswith(f"File too large; this save's {partial} is gone and "
                               "latest_checkpointed_iteration.txt still names iteration 3"), reports
    assert read_tracker(str(save)) == 3 and not partial.exists() and not list(save.rglob("*.tmp"))

    # 3. resumed from 3 again; one rank is killed (SIGKILL) after the shards of 6 are written, before the
    #    tracker moves: `latest` still names 3
    killed_in_save = launch(4, data, data["root"] / "killed-in-save.jsonl", *args, env={KILL_DURING_SAVE_ENV: str(ITERS)},
                            check=False)
    assert killed_in_save.returncode != 0
    assert read_tracker(str(save)) == 3, "`latest` must not point at the checkpoint whose save was cut short"

    # 4. resumed again: from the last complete checkpoint (3), finishes and saves 6
    resumed_log = data["root"] / "resumed.jsonl"
    resumed = launch(4, data, resumed_log, *args)
    assert "at iteration 3" in resumed.output and read_tracker(str(save)) == ITERS

    # same layout, same operations: the resumed losses equal the uninterrupted run's bit for bit
    reference = losses(ref_log)
    for log in (full_log, data["root"] / "killed-in-save.jsonl", resumed_log):
        assert losses(log) == {i: reference[i] for i in range(4, ITERS + 1)}


def test_distributed_optimizer_checkpoint_resumes_exactly(data):
    # DP=2 with ZeRO-1: each data-parallel rank saves and reloads only its slice of the Adam state
    save = data["root"] / "ckpt-zero1"
    full_log = data["root"] / "zero1.jsonl"
    launch(2, data, full_log, "--use-distributed-optimizer", "--save", str(save), "--save-interval", "3")
    assert sorted(p.name for p in (save / "iter_0000003" / "mp_rank_00").iterdir()) == [
        "distrib_optim_dp_rank_000.pt", "distrib_optim_dp_rank_001.pt", "model_optim_rng.pt"]
    # resume from iteration 3: a folder holding that checkpoint only, as a job stopped after it would leave
    resume = data["root"] / "ckpt-zero1-from-3"
    shutil.copytree(save / "iter_0000003", resume / "iter_0000003")
    (resume / "latest_checkpointed_iteration.txt").write_text("3")
    resumed_log = data["root"] / "zero1-resumed.jsonl"
    launch(2, data, resumed_log, "--use-distributed-optimizer", "--load", str(resume))
    reference = losses(full_log)
    assert losses(resumed_log) == {i: reference[i] for i in range(4, ITERS + 1)}  # bit for bit


def run_script(data, *extra, world_size=1, timeout=120):
    """``python pretrain_gpt.py`` as rank 0 of a job of ``world_size`` (for runs that stop before training)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE=str(world_size), RANK="0", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, SCRIPT, *common_args(data, data["root"] / "stopped.jsonl", *extra)],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _checkpoint_at(save, iteration, dest):
    """A folder holding only ``save``'s checkpoint of ``iteration``, as a job stopped after it would leave."""
    shutil.copytree(save / f"iter_{iteration:07d}", dest / f"iter_{iteration:07d}")
    (dest / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return dest


def test_resume_at_another_layout_follows_the_uninterrupted_run(data, tp2pp2):
    """TP2 x PP2's iteration-3 checkpoint continues at TP=1 x DP=2 with ZeRO-1: resharded on load, or converted first.

    Weights, Adam moments and step, scheduler and consumed samples all travel, so iterations 4-6 follow
    the uninterrupted TP2 x PP2 run within LOSS_TOL (the layouts sum in another order, see above), and
    loading the converted checkpoint gives bit for bit what resharding on load gives.
    """
    ref_log, save, _ = tp2pp2
    resume = _checkpoint_at(save, 3, data["root"] / "ckpt-relayout-from-3")
    log = data["root"] / "relayout.jsonl"
    result = launch(2, data, log, "--use-distributed-optimizer", "--load", str(resume))
    assert "resharding checkpoint" in result.output and "at iteration 3" in result.output
    reference, got = losses(ref_log), losses(log)
    assert sorted(got) == [4, 5, 6]
    for i in got:
        assert abs(got[i] - reference[i]) <= LOSS_TOL, f"iteration {i}: {got[i]} vs uninterrupted {reference[i]}"

    converted = data["root"] / "ckpt-relayout-tp1"
    tool = subprocess.run([sys.executable, "src/ch6/checkpoint_util.py", "--load-dir", str(resume), "--save-dir",
                           str(converted), "--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size",
                           "1", "--no-progress"], capture_output=True, text=True, timeout=120)
    assert tool.returncode == 0, tool.stderr
    log2 = data["root"] / "relayout-converted.jsonl"
    result2 = launch(2, data, log2, "--use-distributed-optimizer", "--load", str(converted))
    assert "resharding checkpoint" not in result2.output  # the same TP x PP: its own files
    assert losses(log2) == got


def test_inconsistent_arguments_stop_before_training(data):
    # validation reads WORLD_SIZE and runs before any process group exists, so rank 0 alone shows it
    result = run_script(data, "--tensor-model-parallel-size", "2", "--num-attention-heads", "3",
                        "--num-layers", "3", "--pipeline-model-parallel-size", "2", world_size=2)
    assert result.returncode == 2
    for message in ("num-attention-heads (3) is not divisible by tensor-model-parallel-size (2)",
                    "hidden-size (32) is not divisible by num-attention-heads (3)",
                    "num-layers (3) is not divisible by pipeline-model-parallel-size (2)",
                    "world size (2) is not divisible by tensor-model-parallel-size (2) x "
                    "pipeline-model-parallel-size (2) = 4"):
        assert message in result.stderr
    assert result.stdout == ""  # nothing started: no argument table, no model, no training
