"""Unit tests of the training pieces that need no processes: arguments, LR schedule, weight decay, layout."""
from __future__ import annotations

import math

import pytest
import torch

from lessons_pkg.training.arguments import format_args, parse_args, validate_args
from lessons_pkg.training.checkpointing import get_rng_state, mp_rank_dirname, set_rng_state
from lessons_pkg.training.grads import clip_coefficient, counts_in_norm
from lessons_pkg.training.loss_scaler import DynamicLossScaler
from lessons_pkg.training.lr_scheduler import OptimizerParamScheduler, learning_rate
from lessons_pkg.training.optimizer import split_by_weight_decay
from lessons_pkg.training.train import chunk_layout, microbatch_sample_ids

BASE = ("--num-layers 4 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --micro-batch-size 2 "
        "--global-batch-size 8 --train-iters 10 --lr 1e-3 --mock-data --vocab-size 100").split()


def args_with(*extra: str):
    return parse_args(BASE + list(extra))


def test_valid_arguments_derive_megatron_sizes():
    args = validate_args(args_with("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"), 8)
    assert (args.data_parallel_size, args.num_micro_batches) == (2, 2)  # 8 = 2 (micro) x 2 (DP) x 2
    table = format_args(args)
    assert "  tensor_model_parallel_size ...................... 2" in table


@pytest.mark.parametrize("extra, world, message", [
    (("--num-attention-heads", "6", "--hidden-size", "36", "--tensor-model-parallel-size", "4"), 4,
     "num-attention-heads (6) is not divisible by tensor-model-parallel-size (4)"),
    (("--pipeline-model-parallel-size", "3"), 3, "num-layers (4) is not divisible by pipeline-model-parallel-size (3)"),
    (("--global-batch-size", "6",), 2, "global-batch-size (6) is not divisible by micro-batch-size (2) x "
                                       "data-parallel size (2) = 4"),
    (("--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"), 6,
     "world size (6) is not divisible by tensor-model-parallel-size (2) x pipeline-model-parallel-size (2) = 4"),
    (("--hidden-size", "30",), 1, "hidden-size (30) is not divisible by num-attention-heads (4)"),
    (("--seq-length", "64", "--max-position-embeddings", "32"), 1,
     "seq-length (64) is larger than max-position-embeddings (32)"),
    (("--bf16",), 1, "--bf16 needs CUDA GPUs"),
    (("--save-interval", "5"), 1, "save-interval (5) is set but --save"),
    (("--exit-interval", "0"), 1, "--exit-interval must be >= 1, got 0"),
    (("--lr-warmup-iters", "20"), 1, "lr-warmup-iters (20) must be between 0 and lr-decay-iters (10"),
    (("--vocab-size", "0"), 1, "--vocab-size must be a positive integer, got 0"),
    (("--ffn-hidden-size", "64"), 1, "ffn-hidden-size (64) must be 4 x hidden-size (128)"),
    (("--profile", "--profile-step-start", "5", "--profile-step-end", "5"), 1,
     "--profile needs 1 <= --profile-step-start (5) < --profile-step-end (5) <= --train-iters + 1 (11)"),
    (("--profile", "--profile-step-start", "0"), 1, "--profile-step-start (0)"),
    (("--profile", "--profile-step-start", "9", "--profile-step-end", "13"), 1, "--profile-step-end (13)"),
    (("--profile-trace", "t.json"), 1, "--profile-trace (t.json) is set but --profile is not"),
    (("--profile", "--profile-trace", "/no/such/folder/t.json"), 1,
     "--profile-trace (/no/such/folder/t.json): its folder does not exist"),
    (("--sequence-parallel",), 1, "--sequence-parallel splits the sequence over the tensor-parallel ranks and needs "
                                  "--tensor-model-parallel-size > 1, got 1"),
    (("--sequence-parallel", "--tensor-model-parallel-size", "4", "--seq-length", "18", "--max-position-embeddings",
      "18"), 4, "with --sequence-parallel, seq-length (18) must be divisible by tensor-model-parallel-size (4)"),
    (("--ckpt-format", "torch_dist"), 1, "--ckpt-format torch_dist: this trainer writes and reads Megatron-LM's "
                                         "legacy 'torch' format only"),
    (("--attention-backend", "flash"), 1, "--attention-backend flash: this course has auto"),
    (("--rampup-batch-size", "2", "4", "100"), 1, "global-batch-size (8) minus the start (2) is not a multiple of "
                                                  "the increment (4)"),
    (("--rampup-batch-size", "3", "5", "100"), 1, "--rampup-batch-size start (3) is not divisible by "
                                                  "micro-batch-size (2) x data-parallel size (1) = 2"),
    (("--rampup-batch-size", "16", "2", "100"), 1, "--rampup-batch-size starts at 16, above --global-batch-size (8)"),
    (("--rampup-batch-size", "0", "2", "100"), 1, "must be positive"),
    (("--clip-grad", "-1"), 1, "--clip-grad must be >= 0 (0: no clipping), got -1.0"),
    (("--clip-grad", "nan"), 1, "--clip-grad must be >= 0 (0: no clipping), got nan"),
    (("--weight-decay", "-0.1"), 1, "--weight-decay must be >= 0, got -0.1"),
    (("--adam-beta1", "1.0"), 1, "--adam-beta1 must be in [0, 1), got 1.0"),
    (("--adam-beta2", "nan"), 1, "--adam-beta2 must be in [0, 1), got nan"),
    (("--adam-eps", "0"), 1, "--adam-eps must be > 0, got 0.0"),
    (("--adam-eps", "nan"), 1, "--adam-eps must be > 0, got nan"),
    (("--init-method-std", "0"), 1, "--init-method-std must be > 0, got 0.0"),
    (("--init-method-std", "nan"), 1, "--init-method-std must be > 0, got nan"),
    (("--lr", "nan"), 1, "--lr must be >= 0, got nan"),
])
def test_inconsistent_arguments_are_named(extra, world, message):
    with pytest.raises(ValueError) as err:
        validate_args(args_with(*extra), world, "cpu")
    assert message in str(err.value)


def test_missing_data_files_and_a_bad_split_are_named(tmp_path):
    args = parse_args(BASE[:-3] + ["--data-path", str(tmp_path / "nothing"), "--vocab-file", str(tmp_path / "v.json"),
                                   "--merge-file", str(tmp_path / "m.txt"), "--split", ""])
    with pytest.raises(ValueError) as err:
        validate_args(args, 1, "cpu")
    text = str(err.value)
    with pytest.raises(ValueError, match=r"--data-path is required \(or --mock-data --vocab-size N\)"):
        validate_args(parse_args(BASE[:-3]), 1, "cpu")
    for message in (f"no {tmp_path / 'nothing'}.bin", f"no {tmp_path / 'nothing'}.idx",
                    f"--vocab-file {tmp_path / 'v.json'}: no such file", f"--merge-file {tmp_path / 'm.txt'}: no such file",
                    "--split '' must be numbers"):
        assert message in text, text


def test_all_problems_reported_at_once():
    with pytest.raises(ValueError) as err:
        validate_args(args_with("--tensor-model-parallel-size", "3", "--pipeline-model-parallel-size", "3"), 9)
    text = str(err.value)
    assert "num-attention-heads (4) is not divisible by tensor-model-parallel-size (3)" in text
    assert "num-layers (4) is not divisible by pipeline-model-parallel-size (3)" in text


def test_rampup_batch_size_follows_megatron_s_calculator():
    """Megatron's RampupBatchsizeNumMicroBatchesCalculator: 16 -> 48 by 16 over 64 samples is 2 increments,
    one per 32 samples; the size of an iteration depends only on the samples consumed before it."""
    from lessons_pkg.training.batch_size import global_batch_size_at

    args = validate_args(args_with("--global-batch-size", "48", "--rampup-batch-size", "16", "16", "64"), 1)
    consumed, sizes = 0, []
    for _ in range(7):
        sizes.append(global_batch_size_at(consumed, args))
        consumed += sizes[-1]
    # consumed before each: 0, 16, 32 (-> 32), 64 (-> 48: 64 / 32 = 2 increments), 112 (> 64: the full size) ...
    assert sizes == [16, 16, 32, 48, 48, 48, 48]
    assert global_batch_size_at(10**9, args) == 48
    constant = validate_args(args_with(), 1)
    assert global_batch_size_at(0, constant) == global_batch_size_at(10**6, constant) == 8


def test_cosine_schedule_matches_formula():
    # warm-up 10 of 100 steps, then cosine from lr to min_lr; evaluated against the closed form
    lr, min_lr = 1.0e-3, 1.0e-5
    assert learning_rate(0, lr, min_lr, 10, 100, "cosine") == 0.0
    assert learning_rate(5, lr, min_lr, 10, 100, "cosine") == pytest.approx(lr / 2)
    assert learning_rate(10, lr, min_lr, 10, 100, "cosine") == pytest.approx(lr)
    ratio = (55 - 10) / 90
    assert learning_rate(55, lr, min_lr, 10, 100, "cosine") == pytest.approx(
        min_lr + 0.5 * (1 + math.cos(math.pi * ratio)) * (lr - min_lr))
    assert learning_rate(100, lr, min_lr, 10, 100, "cosine") == pytest.approx(min_lr)
    assert learning_rate(150, lr, min_lr, 10, 100, "cosine") == min_lr


def test_scheduler_sets_lr_and_resumes():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    args = args_with("--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.2", "--min-lr", "1e-4")
    sched = OptimizerParamScheduler.from_args(opt, args)
    for _ in range(5):
        sched.step()
    resumed = OptimizerParamScheduler.from_args(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), args)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.optimizer.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == sched.get_lr()
    assert sched.warmup_steps == 2  # 0.2 x lr-decay-iters (= train-iters, 10)


def test_weight_decay_rules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = split_by_weight_decay(model.named_parameters())
    assert decay == [model[0].weight]
    assert no_decay == [model[0].bias, model[1].weight, model[1].bias]


def test_norm_counts_each_element_once():
    shard = torch.nn.Parameter(torch.zeros(2))
    shard.tensor_model_parallel = True
    replicated, copy = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    copy.tensor_model_parallel, copy.shared = True, True
    assert counts_in_norm(shard, 1) and counts_in_norm(replicated, 0)
    assert not counts_in_norm(replicated, 1) and not counts_in_norm(copy, 0)
    assert clip_coefficient(4.0, 1.0) == pytest.approx(1.0 / (4.0 + 1e-6)) and clip_coefficient(0.5, 1.0) == 1.0


def test_layouts_and_data_order():
    assert mp_rank_dirname(1, 0, 1) == "mp_rank_01" and mp_rank_dirname(1, 3, 4) == "mp_rank_01_003"
    # 8 layers, 2 stages, 2 chunks: rank 0 holds virtual stages 0 and 2
    assert [(c["layer_offset"], c["pre_process"], c["post_process"]) for c in chunk_layout(8, 2, 0, 2)] == \
        [(0, True, False), (4, False, False)]
    assert chunk_layout(8, 2, 1, 2)[1] == dict(layer_offset=6, num_layers=2, pre_process=False, post_process=True)
    # whatever the data-parallel size, one iteration reads the same global batch of samples
    for dp in (1, 2, 4):
        ids = sorted(i for d in range(dp) for mb in microbatch_sample_ids(16, 2, dp, d, 4 // dp) for i in mb)
        assert ids == list(range(16, 24))


def test_rng_state_roundtrip_is_weights_only_loadable(tmp_path):
    import random

    import numpy as np

    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_dynamic_loss_scaler_unscales_skips_and_grows():
    scaler = DynamicLossScaler(initial_scale=1024.0, growth_interval=2)
    grads = [torch.full((3,), 512.0)]
    assert not scaler.unscale_and_check(grads)                 # finite: divided by the scale
    assert torch.equal(grads[0], torch.full((3,), 0.5))
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 2048.0                             # 2 clean steps in a row: doubled
    assert scaler.unscale_and_check([torch.tensor([1.0, float("inf")])])
    scaler.update(True)
    assert scaler.scale == 1024.0 and scaler.clean_steps == 0  # overflow: halved, step to be skipped


def test_pretrain_gpt_reports_a_broken_vocab_file_before_any_process_group(tmp_path, capsys, monkeypatch, repo_root):
    import importlib.util

    import torch.distributed as dist

    spec = importlib.util.spec_from_file_location("pretrain_gpt", repo_root / "src/ch6/pretrain_gpt.py")
    pretrain_gpt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain_gpt)
    for name in ("d.bin", "d.idx", "merges.txt"):
        (tmp_path / name).write_text("")
    (tmp_path / "vocab.json").write_text('{"a": 0,')  # cut short
    monkeypatch.delenv("RANK", raising=False)
    from lessons_pkg.errors import run_cli

    status = run_cli(pretrain_gpt.main, BASE[:-3] + ["--data-path", str(tmp_path / "d"), "--vocab-file", str(tmp_path / "vocab.json"),
                                                     "--merge-file", str(tmp_path / "merges.txt")])
    assert status == 2 and not dist.is_initialized()
    assert f"error: {tmp_path / 'vocab.json'}: not GPT-2's vocab.json" in capsys.readouterr().err


def _interleaved_forward_on_the_nccl_branch():
    """train.forward_only with the interleaved schedule (p=2, v=2) as on NCCL: without a shape header.
    The executor takes its non-gloo branch when the backend is not gloo; named so here, it runs on gloo."""
    import torch.distributed as dist

    from lessons_pkg import parallel_state
    from lessons_pkg.pipeline import forward_backward
    from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict, vocab_parallel_cross_entropy
    from lessons_pkg.training import train

    parallel_state.initialize_model_parallel(1, 2)
    rt = train.Runtime()
    args = validate_args(args_with("--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage",
                                   "1", "--global-batch-size", "4"), 2)
    config = GPTConfig(vocab_size=100, hidden_size=32, num_layers=4, num_attention_heads=4, max_position_embeddings=16,
                       hidden_dropout=0.0, attention_dropout=0.0)
    master = master_state_dict(config, seed=3)
    chunks = []
    for layout in train.chunk_layout(4, 2, rt.pp_rank, 2):
        chunks.append(ParallelGPT(config, **layout))
        chunks[-1].load_master_state_dict(master)
    g = torch.Generator().manual_seed(0)
    batches = [train.get_batch([{"text": torch.randint(0, 100, (17,), generator=g)} for _ in range(2)], [0, 1], "cpu")
               for _ in range(args.num_micro_batches)]

    def loss_fn(logits, labels):
        return vocab_parallel_cross_entropy(logits, labels).mean()

    with_headers = train.forward_only(chunks, batches, rt, args, loss_fn)  # gloo: shapes announced by headers
    real = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"
    try:
        with pytest.raises(ValueError, match="pass tensor_shape="):  # what train.py used to do on NCCL
            forward_backward(chunks, "interleaved", None, None, loss_fn, group=rt.pp_group, forward_only=True,
                             num_microbatches=len(batches))
        without_headers = train.forward_only(chunks, batches, rt, args, loss_fn)
    finally:
        dist.get_backend = real
    return with_headers, without_headers


def test_interleaved_schedule_runs_on_the_nccl_branch_with_the_shape_train_passes():
    from lessons_pkg.testing import run_on_ranks

    for with_headers, without_headers in run_on_ranks(_interleaved_forward_on_the_nccl_branch, 2, timeout=90):
        assert math.isfinite(with_headers) and with_headers == without_headers  # same messages, same sums


def test_adam_is_fused_on_a_gpu_and_foreach_on_the_cpu():
    from lessons_pkg.training.param_groups import adam_kwargs

    args = args_with()
    cpu, cuda = adam_kwargs(args, "cpu"), adam_kwargs(args, torch.device("cuda", 0))
    assert (cpu["foreach"], cpu["fused"]) == (True, None) and (cuda["fused"], cuda["foreach"]) == (True, None)
    # the CPU optimizer the trainer builds takes it as it is
    w = torch.nn.Parameter(torch.ones(3))
    torch.optim.AdamW([w], **adam_kwargs(args, w.device))


def test_a_loaded_adam_state_keeps_this_machine_s_implementation():
    """torch's load_state_dict copies fused/foreach from the checkpoint; the trainer's optimizer keeps its own."""
    from lessons_pkg.training.optimizer import Groups, Optimizer

    args = args_with()
    model = torch.nn.Linear(3, 2)
    opt = Optimizer(list(model.named_parameters()), args, Groups(None, None, None, 0))
    model(torch.randn(4, 3)).sum().backward()
    opt.adam.step()
    saved = opt.state_dict()
    for group in saved["adam"]["param_groups"]:      # as a GPU run would have saved it
        group.update(fused=True, foreach=None)
    opt.load_state_dict(saved)
    assert all(g["foreach"] is True and g["fused"] is None for g in opt.adam.param_groups)
    opt.adam.step()                                  # and it still steps on this CPU


def test_iteration_profiler_records_only_its_iterations(capsys):
    from lessons_pkg.training.profiling import IterationProfiler

    with pytest.raises(ValueError, match="start=3, end=3"):
        IterationProfiler(3, 3, torch.device("cpu"), 0)
    prof = IterationProfiler(2, 3, torch.device("cpu"), rank=0, rows=5)
    a = torch.randn(64, 64)
    for it in range(1, 5):
        prof.before(it)
        a @ a if it == 2 else torch.cumsum(a, 0)     # only iteration 2 multiplies
        prof.after(it)
    out = capsys.readouterr().out
    assert out.count("profile of iteration(s) 2-2 (1 iteration(s))") == 1
    assert "aten::mm" in out and "aten::cumsum" not in out, out
    quiet = IterationProfiler(1, 2, torch.device("cpu"), rank=1)   # only rank 0 prints
    quiet.before(1), quiet.after(1)
    assert capsys.readouterr().out == "" and "profile of iteration(s) 1-1" in quiet.report
    early = IterationProfiler(2, 9, torch.device("cpu"), rank=0)   # the run stops after iteration 3
    for it in (1, 2, 3):
        early.before(it), a @ a, early.after(it)
    assert early.prof is not None and capsys.readouterr().out == ""
    early.close(3)
    assert early.prof is None
    assert "profile of iteration(s) 2-3 (2 iteration(s)) (the run ended inside the window, which was 2-8)" in \
        capsys.readouterr().out
    early.close(3)                                                  # a second close: nothing left to do
    assert capsys.readouterr().out == ""
