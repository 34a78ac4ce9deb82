"""Command-line arguments of ``pretrain_gpt.py``, with Megatron-LM's names and meanings.

``parse_args(argv)`` reads them; ``validate_args(args, world_size, device)``
checks that they fit together and derives the sizes Megatron derives::

    data_parallel_size  = world_size / (tensor_model_parallel_size * pipeline_model_parallel_size)
    num_micro_batches   = global_batch_size / (micro_batch_size * data_parallel_size)

Every inconsistency is reported at once, each naming its values, before a
single process group or weight exists. ``format_args(args)`` prints the
argument table Megatron prints at start-up.
"""
from __future__ import annotations

import argparse
import math
import os

import torch

from lessons_pkg.errors import UserError, output_folder_problems
from lessons_pkg.launch import accept_local_rank
from lessons_pkg.training.batch_size import rampup_problems

# a few options are ours (not Megatron-LM's); they are marked "(course)" in --help
_SCHEDULES = ("1f1b", "gpipe", "interleaved")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Pretrain a GPT with tensor, pipeline and data parallelism (Megatron-LM style).",
        allow_abbrev=False,
    )
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="4 x hidden-size, the only size ParallelGPT's MLP (and its checkpoints) support")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: seq-length")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x tensor-model-parallel-size")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--recompute-activations", action="store_true",
                   help="recompute each transformer layer's activations in the backward pass")
    g.add_argument("--attention-backend", default="auto",
                   help="auto (F.scaled_dot_product_attention: flash attention where the device has it) or "
                        "unfused (scores, softmax and weighted sum step by step); also Megatron's local")
    g.add_argument("--use-fused-kernels", action="store_true",
                   help="use the compiled fused kernels (bias+GeLU, scaled masked softmax, LayerNorm)")
    g.add_argument("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false",
                   help="the exact erf GeLU, as Megatron-LM computes it without its fused (tanh) bias-GeLU; "
                        "default: the tanh GeLU of GPT-2")
    g.add_argument("--attention-softmax-in-fp32", action="store_true",
                   help="attention's softmax in float32 in 16-bit runs (SDPA's kernels always do; the "
                        "step-by-step paths cast)")

    g = p.add_argument_group("parallelism")
    accept_local_rank(g)  # python -m torch.distributed.launch passes --local-rank; LOCAL_RANK says the same
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per model chunk for the interleaved schedule")
    g.add_argument("--pipeline-schedule", choices=_SCHEDULES, default=None,
                   help="(course) pipeline schedule; default 1f1b, or interleaved when "
                        "--num-layers-per-virtual-pipeline-stage is given")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="split every sequence over this many ranks; attention as a ring (needs --attention-dropout 0)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split LayerNorms, dropouts and residuals along the sequence over the tensor-parallel "
                        "ranks (Korthikanti et al. 2022); needs --tensor-model-parallel-size > 1")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state over data-parallel ranks (ZeRO-1)")
    g.add_argument("--distributed-backend", choices=("gloo", "nccl"), default=None,
                   help="default: nccl with one GPU per rank, else gloo")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="default: micro-batch-size x data-parallel size (no gradient accumulation)")
    g.add_argument("--rampup-batch-size", type=int, nargs=3, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="ramp the global batch size from START by INCREMENT over SAMPLES consumed samples")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--fp16", action="store_true", help="float16 mixed precision with dynamic loss scaling (GPU)")
    g.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (GPU)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 32)
    g.add_argument("--loss-scale-window", type=int, default=1000)
    g.add_argument("--exit-interval", type=int, default=None,
                   help="stop (after saving, if --save) when the iteration is a multiple of this")

    g = p.add_argument_group("optimizer and learning rate")
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: train-iters")
    g.add_argument("--lr-warmup-fraction", type=float, default=None,
                   help="warm-up length as a fraction of lr-decay-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)

    g = p.add_argument_group("data")
    g.add_argument("--data-path", type=str, default=None, help="prefix of the .bin/.idx files")
    g.add_argument("--split", type=str, default="969, 30, 1", help="train, valid, test proportions")
    g.add_argument("--vocab-file", type=str, default=None)
    g.add_argument("--merge-file", type=str, default=None)
    g.add_argument("--tokenizer-type", choices=("GPT2BPETokenizer", "NullTokenizer"), default="GPT2BPETokenizer")
    g.add_argument("--vocab-size", type=int, default=None, help="vocabulary size of NullTokenizer / --mock-data")
    g.add_argument("--mock-data", action="store_true", help="random token ids instead of --data-path")

    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", type=str, default=None, help="folder to save checkpoints to")
    g.add_argument("--load", type=str, default=None, help="folder to resume from (if it holds a checkpoint)")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-load-optim", action="store_true", help="do not load the optimizer state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load the random-number-generator states")
    g.add_argument("--no-save-optim", action="store_true", help="do not save the optimizer and scheduler state")
    g.add_argument("--no-save-rng", action="store_true", help="do not save the random-number-generator states")
    g.add_argument("--ckpt-format", default="torch",
                   help="torch: Megatron-LM's legacy format, the one this trainer writes and reads (Megatron-LM's "
                        "own default is torch_dist)")
    g.add_argument("--finetune", action="store_true",
                   help="load the weights of --load only (any layout, e.g. imported GPT-2) and start at iteration 0")

    g = p.add_argument_group("logging and evaluation")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", type=str, default=None)
    g.add_argument("--log-json", type=str, default=None,
                   help="(course) also write every iteration's numbers, one JSON object a line")
    g.add_argument("--peak-tflops", type=float, default=None,
                   help="(course) peak dense TFLOP/s of one device, to report model FLOPs utilisation")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start to --profile-step-end - 1 with torch.profiler; "
                        "rank 0 prints the ops that took the most time")
    g.add_argument("--profile-step-start", type=int, default=10, help="first iteration profiled (1-based)")
    g.add_argument("--profile-step-end", type=int, default=12, help="iteration after the last one profiled")
    g.add_argument("--profile-trace", type=str, default=None,
                   help="(course) with --profile, also write rank 0's trace (Chrome trace format) to this file")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.ffn_hidden_size is None and args.hidden_size is not None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.pipeline_schedule is None:
        args.pipeline_schedule = "interleaved" if args.num_layers_per_virtual_pipeline_stage else "1f1b"
    return args


def validate_args(args: argparse.Namespace, world_size: int, device: torch.device | str = "cpu") -> argparse.Namespace:
    """Check every constraint, derive the parallel sizes, or raise one ``ValueError`` listing all problems."""
    errors: list[str] = []
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size

    def positive(name: str) -> bool:
        value = getattr(args, name)
        if value is None or value < 1:
            errors.append(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
            return False
        return True

    sizes_ok = all([positive(n) for n in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                          "context_parallel_size",
                                          "num_layers", "hidden_size", "num_attention_heads", "seq_length",
                                          "micro_batch_size", "train_iters", "ffn_hidden_size",
                                          "max_position_embeddings", "make_vocab_size_divisible_by")])
    if not sizes_ok:
        raise UserError(errors[0] if len(errors) == 1 else "inconsistent arguments:\n  " + "\n  ".join(errors))

    dp, cp = None, args.context_parallel_size
    if world_size % (tp * pp * cp):
        sizes = f"tensor-model-parallel-size ({tp}) x pipeline-model-parallel-size ({pp})"
        if cp > 1:
            sizes += f" x context-parallel-size ({cp})"
        errors.append(f"world size ({world_size}) is not divisible by {sizes} = {tp * pp * cp}")
    else:
        dp = world_size // (tp * pp * cp)
    if cp > 1:
        if args.seq_length % (2 * cp):
            errors.append(f"with --context-parallel-size {cp}, seq-length ({args.seq_length}) must be divisible by "
                          f"2 x context-parallel-size ({2 * cp}): each rank holds two equal chunks of a sequence")
        elif args.sequence_parallel and (args.seq_length // cp) % tp:
            errors.append(f"with --context-parallel-size {cp} and --sequence-parallel, each rank's "
                          f"{args.seq_length // cp} tokens must divide by tensor-model-parallel-size ({tp})")
        if args.attention_dropout:
            errors.append(f"--context-parallel-size {cp} computes attention as a ring, without dropout: "
                          f"--attention-dropout must be 0, got {args.attention_dropout}")
    if args.num_attention_heads % tp:
        errors.append(f"num-attention-heads ({args.num_attention_heads}) is not divisible by "
                      f"tensor-model-parallel-size ({tp})")
    if args.hidden_size % args.num_attention_heads:
        errors.append(f"hidden-size ({args.hidden_size}) is not divisible by "
                      f"num-attention-heads ({args.num_attention_heads})")
    if args.ffn_hidden_size != 4 * args.hidden_size:
        errors.append(f"ffn-hidden-size ({args.ffn_hidden_size}) must be 4 x hidden-size "
                      f"({4 * args.hidden_size}): ParallelGPT's MLP supports no other size")
    elif args.ffn_hidden_size % tp:
        errors.append(f"ffn-hidden-size ({args.ffn_hidden_size}) is not divisible by tensor-model-parallel-size ({tp})")
    if args.num_layers % pp:
        errors.append(f"num-layers ({args.num_layers}) is not divisible by pipeline-model-parallel-size ({pp})")
    if args.sequence_parallel and tp == 1:
        errors.append("--sequence-parallel splits the sequence over the tensor-parallel ranks and needs "
                      "--tensor-model-parallel-size > 1, got 1 (Megatron-LM turns it off at TP=1: drop the flag)")
    elif args.sequence_parallel and cp == 1 and args.seq_length % tp:
        errors.append(f"with --sequence-parallel, seq-length ({args.seq_length}) must be divisible by "
                      f"tensor-model-parallel-size ({tp})")
    args.virtual_pipeline_model_parallel_size = 1
    if args.pipeline_schedule == "interleaved":
        per_chunk = args.num_layers_per_virtual_pipeline_stage
        if per_chunk is None or per_chunk < 1:
            errors.append("--pipeline-schedule interleaved needs --num-layers-per-virtual-pipeline-stage")
        elif pp < 2:
            errors.append(f"the interleaved schedule needs pipeline-model-parallel-size > 1, got {pp}")
        elif args.num_layers % pp == 0 and (args.num_layers // pp) % per_chunk:
            errors.append(f"layers per pipeline stage ({args.num_layers // pp}) is not divisible by "
                          f"num-layers-per-virtual-pipeline-stage ({per_chunk})")
        else:
            args.virtual_pipeline_model_parallel_size = args.num_layers // pp // per_chunk
    elif args.num_layers_per_virtual_pipeline_stage is not None:
        errors.append(f"--num-layers-per-virtual-pipeline-stage needs --pipeline-schedule interleaved, "
                      f"got {args.pipeline_schedule}")
    if args.seq_length > args.max_position_embeddings:
        errors.append(f"seq-length ({args.seq_length}) is larger than "
                      f"max-position-embeddings ({args.max_position_embeddings})")

    if dp is not None:
        if args.global_batch_size is None:
            args.global_batch_size = args.micro_batch_size * dp
        if args.global_batch_size < 1 or args.global_batch_size % (args.micro_batch_size * dp):
            errors.append(f"global-batch-size ({args.global_batch_size}) is not divisible by micro-batch-size "
                          f"({args.micro_batch_size}) x data-parallel size ({dp}) = {args.micro_batch_size * dp}")
        else:
            args.num_micro_batches = args.global_batch_size // (args.micro_batch_size * dp)
            if args.pipeline_schedule == "interleaved" and args.num_micro_batches % pp:
                errors.append(f"the interleaved schedule needs the number of micro-batches "
                              f"({args.num_micro_batches}) to be a multiple of pipeline-model-parallel-size ({pp})")
            ramp_errors = rampup_problems(args, dp)
            errors += ramp_errors
            if args.rampup_batch_size and not ramp_errors and args.pipeline_schedule == "interleaved" \
                    and any((v // (args.micro_batch_size * dp)) % pp for v in args.rampup_batch_size[:2]):
                errors.append(f"the interleaved schedule needs every ramped batch size to hold a multiple of "
                              f"pipeline-model-parallel-size ({pp}) micro-batches: --rampup-batch-size "
                              f"{args.rampup_batch_size[0]} {args.rampup_batch_size[1]} does not")
    args.data_parallel_size = dp

    if args.ckpt_format != "torch":
        errors.append(f"--ckpt-format {args.ckpt_format}: this trainer writes and reads Megatron-LM's legacy "
                      "'torch' format only (the lesson's --ckpt-format torch); Megatron-LM's torch_dist "
                      "(*.distcp files) is not supported")
    if args.attention_backend not in ("auto", "unfused", "local"):
        errors.append(f"--attention-backend {args.attention_backend}: this course has auto "
                      "(F.scaled_dot_product_attention, which picks flash attention on GPUs that have it) and "
                      "unfused (step by step; 'local' means the same); Transformer Engine's flash and fused "
                      "backends are not part of it")
    if args.use_fused_kernels and not args.bias_gelu_fusion:
        errors.append("--use-fused-kernels with --no-bias-gelu-fusion: the fused bias-GeLU kernel computes the "
                      "tanh GeLU, --no-bias-gelu-fusion asks for the exact one")
    if args.distributed_backend == "nccl":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if gpus < local_world:
            errors.append(f"--distributed-backend nccl needs one CUDA GPU per rank: this node runs {local_world} "
                          f"rank(s) and has {gpus} GPU(s); drop the flag (gloo is the default without GPUs)")
            device = "cpu"
    if args.fp16 and args.bf16:
        errors.append("--fp16 and --bf16 cannot both be set")
    if (args.fp16 or args.bf16) and torch.device(device).type != "cuda":
        errors.append(f"--{'fp16' if args.fp16 else 'bf16'} needs CUDA GPUs (mixed precision runs on tensor "
                      f"cores); this job computes on {torch.device(device).type}: drop the flag to train in float32")
    for name in ("attention_dropout", "hidden_dropout"):
        if not 0.0 <= getattr(args, name) < 1.0:
            errors.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    finite = math.isfinite
    if not (finite(args.clip_grad) and args.clip_grad >= 0):
        errors.append(f"--clip-grad must be >= 0 (0: no clipping), got {args.clip_grad}")
    if not (finite(args.weight_decay) and args.weight_decay >= 0):
        errors.append(f"--weight-decay must be >= 0, got {args.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:   # also False for NaN
            errors.append(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if not (finite(args.adam_eps) and args.adam_eps > 0):
        errors.append(f"--adam-eps must be > 0, got {args.adam_eps}")
    if not (finite(args.init_method_std) and args.init_method_std > 0):
        errors.append(f"--init-method-std must be > 0, got {args.init_method_std}")
    if not (finite(args.lr) and args.lr >= 0):
        errors.append(f"--lr must be >= 0, got {args.lr}")
    if not 0.0 <= args.min_lr <= args.lr:
        errors.append(f"min-lr ({args.min_lr}) must be between 0 and lr ({args.lr})")
    if args.lr_warmup_fraction is not None:
        if args.lr_warmup_iters:
            errors.append(f"use either lr-warmup-fraction ({args.lr_warmup_fraction}) or "
                          f"lr-warmup-iters ({args.lr_warmup_iters}), not both")
        if not 0.0 <= args.lr_warmup_fraction <= 1.0:
            errors.append(f"lr-warmup-fraction ({args.lr_warmup_fraction}) must be in [0, 1]")
    if args.lr_decay_iters < 1:
        errors.append(f"lr-decay-iters ({args.lr_decay_iters}) must be >= 1")
    elif args.lr_warmup_fraction is None and not 0 <= args.lr_warmup_iters <= args.lr_decay_iters:
        errors.append(f"lr-warmup-iters ({args.lr_warmup_iters}) must be between 0 and lr-decay-iters "
                      f"({args.lr_decay_iters}, default train-iters): the warm-up must end before the decay does")
    if args.exit_interval is not None and args.exit_interval < 1:
        errors.append(f"--exit-interval must be >= 1, got {args.exit_interval}")
    if args.save_interval is not None and args.save_interval < 1:
        errors.append(f"save-interval ({args.save_interval}) must be >= 1")
    if args.save_interval is not None and args.save is None:
        errors.append(f"save-interval ({args.save_interval}) is set but --save (the folder) is not")
    if args.finetune and not args.load:
        errors.append("--finetune loads weights from --load, but --load is not set")
    for flag, folder in (("--save", args.save), ("--tensorboard-dir", args.tensorboard_dir)):
        if folder is not None:
            errors += output_folder_problems(flag, folder)
    if args.log_json is not None:
        if os.path.isdir(args.log_json):
            errors.append(f"--log-json {args.log_json} is a folder; it names the file the log lines go to")
        else:
            errors += output_folder_problems("--log-json", os.path.dirname(os.path.abspath(args.log_json)),
                                             what="its folder")
    for name in ("log_interval", "eval_interval"):
        if getattr(args, name) < 1:
            errors.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.eval_iters < 0:
        errors.append(f"--eval-iters must be >= 0, got {args.eval_iters}")
    if args.profile and not 1 <= args.profile_step_start < args.profile_step_end <= args.train_iters + 1:
        errors.append(f"--profile needs 1 <= --profile-step-start ({args.profile_step_start}) < --profile-step-end "
                      f"({args.profile_step_end}) <= --train-iters + 1 ({args.train_iters + 1})")
    if args.profile_trace and not args.profile:
        errors.append(f"--profile-trace ({args.profile_trace}) is set but --profile is not")
    elif args.profile_trace and not os.path.isdir(os.path.dirname(os.path.abspath(args.profile_trace))):
        errors.append(f"--profile-trace ({args.profile_trace}): its folder does not exist")

    if args.vocab_size is not None and args.vocab_size < 1:
        errors.append(f"--vocab-size must be a positive integer, got {args.vocab_size}")
    if args.mock_data:
        if args.vocab_size is None:
            errors.append("--mock-data needs --vocab-size")
    elif args.data_path is None:
        errors.append("--data-path is required (or --mock-data --vocab-size N)")
    else:
        errors += _data_problems(args)

    if errors:
        raise UserError(errors[0] if len(errors) == 1 else "inconsistent arguments:\n  " + "\n  ".join(errors))
    args.world_size = world_size
    return args


def _data_problems(args: argparse.Namespace) -> list[str]:
    """Missing data or tokenizer files and an unreadable --split, found before any process starts work."""
    from lessons_pkg.data.gpt_dataset import get_train_valid_test_split

    problems = [f"--data-path {args.data_path}: no {args.data_path}{ext}"
                for ext in (".bin", ".idx") if not os.path.isfile(args.data_path + ext)]
    if args.tokenizer_type == "GPT2BPETokenizer":
        if args.vocab_file is None or args.merge_file is None:
            problems.append(f"GPT2BPETokenizer needs --vocab-file ({args.vocab_file}) and "
                            f"--merge-file ({args.merge_file})")
        else:
            problems += [f"--{flag} {path}: no such file" for flag, path in
                         (("vocab-file", args.vocab_file), ("merge-file", args.merge_file)) if not os.path.isfile(path)]
    elif args.vocab_size is None:
        problems.append("NullTokenizer needs --vocab-size")
    try:
        get_train_valid_test_split(args.split, 1)
    except ValueError as e:
        problems.append(str(e))
    return problems


def format_args(args: argparse.Namespace) -> str:
    """Megatron's start-up table: one ``name ..... value`` line per argument, sorted."""
    lines = ["------------------------ arguments ------------------------"]
    for name in sorted(vars(args)):
        dots = "." * (48 - len(name))
        lines.append(f"  {name} {dots} {getattr(args, name)}")
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)
