"""Zero-shot evaluation of a GPT on LAMBADA or WikiText-103, Megatron-LM's ``tasks/main.py`` way, on any TP x PP.

    python src/ch6/evaluate_gpt.py --task LAMBADA --strict-lambada --valid-data lambada_test.jsonl \\
        --load outputs/ch6/pretrain/checkpoints --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    python src/ch6/evaluate_gpt.py --task WIKITEXT103 --valid-data wiki.test.tokens --overlapping-eval 32 \\
        --load gpt2-folder --micro-batch-size 8 --results-json outputs/ch6/eval/wikitext.json

Plain ``python`` starts its own ranks (``--nproc``, default TP x PP); under
``torchrun`` the job's ranks are used. Data parallelism takes the rest:
DP = world / (TP x PP) replicas each evaluate every DP-th example, and the sums
are all-reduced. ``--load`` is a Megatron checkpoint root of any layout or a
``transformers`` GPT-2 folder; sizes come from it, the tokenizer from it or
from ``--vocab-file``/``--merge-file``.

``--valid-data`` is a file, or one of

    download   the official test set through ``datasets`` (OpenAI's 5153 LAMBADA passages,
               WikiText-103's test split): an error without network
    standin    the offline stand-in built from the training run's held-out documents
               (:mod:`lessons_pkg.evaluation.standin`; --data-path/--split default to the checkpoint's)
    auto       download when the Hugging Face hub answers, else standin, saying which

A file that is missing, empty or malformed is an error naming it (and the line).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from lessons_pkg.evaluation.tasks import TASKS  # noqa: E402  (light: no torch.distributed work at import)

_SPECIAL = ("auto", "download", "standin")


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--valid-data", required=True, help="a file, or auto | download | standin")
    p.add_argument("--strict-lambada", action="store_true", help="the whole last word is the target")
    p.add_argument("--overlapping-eval", type=int, default=None,
                   help="WikiText: windows start every N tokens, only their last N tokens scored (default seq-length)")
    p.add_argument("--load", required=True, help="Megatron checkpoint root or transformers GPT-2 folder")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--seq-length", type=int, default=None, help="default: the model's max_position_embeddings")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="the real vocabulary size of a checkpoint that records only its padded one (Megatron's flag)")
    p.add_argument("--results-json", default=None, help="write the metrics here (rank 0)")
    p.add_argument("--eval-data-dir", default="data/eval", help="where download/standin write their files")
    p.add_argument("--data-path", default=None, help="standin: the training .bin/.idx prefix (default: checkpoint's)")
    p.add_argument("--split", default=None, help="standin: the training --split (default: checkpoint's)")
    p.add_argument("--nproc", type=int, default=None, help="ranks to start under plain python (default TP x PP)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds before a self-started job is killed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log-interval", type=int, default=None, metavar="N",
                   help="a progress line every N micro-batches (Megatron's flag; default: a bar, or a line every 10 s)")
    p.add_argument("--no-load-optim", action="store_true", help="(Megatron's flag) evaluation never loads the optimizer")
    p.add_argument("--no-load-rng", action="store_true", help="(Megatron's flag) evaluation never loads the RNG states")
    from lessons_pkg.checkpoint.model_flags import add_model_arguments
    from lessons_pkg.launch import accept_local_rank

    add_model_arguments(p, seq_length=False, micro_batch_size=False)  # --num-layers ... --fp16, as Megatron's script

    accept_local_rank(p)  # python -m torch.distributed.launch passes --local-rank
    args = p.parse_args(argv)
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "micro_batch_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.true_vocab_size is not None and args.true_vocab_size < 1:
        p.error(f"--true-vocab-size must be >= 1, got {args.true_vocab_size}")
    if args.log_interval is not None and args.log_interval < 1:
        p.error(f"--log-interval must be >= 1, got {args.log_interval}")
    if args.overlapping_eval is not None and args.task != "WIKITEXT103":
        p.error("--overlapping-eval applies to --task WIKITEXT103 only")
    if args.strict_lambada and args.task != "LAMBADA":
        p.error("--strict-lambada applies to --task LAMBADA only")
    if args.results_json:  # refused before the model is loaded, not after the work is done
        from lessons_pkg.errors import output_folder_problems

        for problem in output_folder_problems("--results-json", os.path.dirname(os.path.abspath(args.results_json)),
                                              what="its folder"):
            p.error(f"{problem} (the file {args.results_json})")
    return args


def resolve_valid_data(args, pre) -> str:
    """The file to evaluate on (rank 0 only: it may download or build it)."""
    from lessons_pkg.evaluation import datasets, standin

    choice = args.valid_data
    if choice not in _SPECIAL:
        datasets.check_file(choice)
        return choice
    if choice == "auto":
        from lessons_pkg.hub import hub_reachable

        reachable, reason = hub_reachable()
        choice = "download" if reachable else "standin"
        print(f" --valid-data auto: {'the Hugging Face hub answers, downloading' if reachable else reason}"
              f"{'' if reachable else '; building the offline stand-in'}", flush=True)
    if choice == "download":
        fetch = datasets.download_lambada if args.task == "LAMBADA" else datasets.download_wikitext103
        try:
            return fetch(args.eval_data_dir)
        except Exception as e:  # no network, no such dataset: say so, never substitute
            raise RuntimeError(f"--valid-data download: fetching the {args.task} test set failed "
                               f"({type(e).__name__}: {e}); use --valid-data standin or a file") from None
    saved = pre.args
    data_path = args.data_path or getattr(saved, "data_path", None)
    split = args.split or getattr(saved, "split", None)
    if not data_path or not split:
        raise RuntimeError("--valid-data standin needs the training data and split: pass --data-path and --split "
                           f"(the checkpoint {args.load!r} does not name them)")
    report = standin.build_standin(data_path, split, pre.tokenizer, args.eval_data_dir)
    print(standin.describe(report), flush=True)
    return report.cloze_path if args.task == "LAMBADA" else report.text_path


def _share(value, error):
    """Rank 0's ``(value, error)`` on every rank."""
    import torch.distributed as dist

    box = [(value, error)]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def _without_nproc(argv: list[str]) -> list[str]:
    """``argv`` minus ``--nproc N``: the ranks do not need it, and torchrun would take it for its own option."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def main(argv=None) -> None:
    args = get_args(argv)
    from lessons_pkg.launch import launch_self

    sys.argv[1:] = _without_nproc(sys.argv[1:])
    launch_self(args.nproc or args.tensor_model_parallel_size * args.pipeline_model_parallel_size, args.timeout)

    import torch.distributed as dist

    from lessons_pkg import parallel_state as ps
    from lessons_pkg.checkpoint.model_flags import check_model_arguments, params_dtype
    from lessons_pkg.checkpoint.pretrained import load_pretrained
    from lessons_pkg.evaluation import metrics as M
    from lessons_pkg.evaluation.loop import progress_bar
    from lessons_pkg.evaluation.standin import STANDIN_NOTICE
    from lessons_pkg.evaluation.tasks import prepare_task, run_task
    from lessons_pkg.utils import print_rank_0

    ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    rank = dist.get_rank()
    # a bad folder or file: a UserError, the same on every rank before any collective (run_cli)
    pre = load_pretrained(args.load, args.vocab_file, args.merge_file, args.tokenizer_type, args.true_vocab_size)
    if pre.tokenizer is None:
        raise SystemExit(f"error: {args.load!r} ships no tokenizer: pass --vocab-file and --merge-file")
    if pre.tokenizer.vocab_size != pre.config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {pre.tokenizer.vocab_size} tokens but the model's vocabulary has "
                         f"{pre.config.vocab_size}: not the tokenizer this model was trained with")
    check_model_arguments(args, pre.config, args.load, seq_length=False, micro_batch_size=False)  # its own flags
    seq_length = args.seq_length or pre.config.max_position_embeddings
    if not 1 <= seq_length <= pre.config.max_position_embeddings:
        raise SystemExit(f"error: --seq-length ({seq_length}) must be between 1 and the model's "
                         f"max_position_embeddings ({pre.config.max_position_embeddings})")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    print_rank_0(f"> evaluating {pre.source} model {args.load} (iteration {pre.iteration}) on {args.task}: "
                 f"TP={tp} x PP={pp} x DP={ps.get_data_parallel_world_size()}, seq-length {seq_length}, "
                 f"micro-batch-size {args.micro_batch_size}, parameters in {params_dtype(args) or 'float32'}")

    path, error = None, None
    if rank == 0:
        try:
            path = resolve_valid_data(args, pre)
        except Exception as e:  # every rank must hear of it, or the others wait forever
            error = str(e)
    path, error = _share(path, error)
    if error:
        raise SystemExit(f"error: {error}")
    standin = os.path.basename(path).startswith("standin_")
    try:
        prepared = prepare_task(args.task, path, pre.tokenizer, seq_length, args.strict_lambada, args.overlapping_eval)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    what = "passages" if args.task == "LAMBADA" else "windows"
    print_rank_0(f"> {path}: {len(prepared.samples)} {what}" +
                 (f", {prepared.info['truncated']} truncated to the last {seq_length + 1} tokens"
                  if args.task == "LAMBADA" else
                  f", detokenizer: {prepared.info['detokenizer']}, number of original tokens: "
                  f"{prepared.info['num_original_tokens']}, number of detokenized tokens: "
                  f"{prepared.info['num_tokenized_tokens']}"))

    every = None if args.log_interval is None else args.log_interval * args.micro_batch_size
    bar = progress_bar(len(prepared.samples), what, enabled=rank == 0 and not args.no_progress, every=every)
    result, _ = run_task(pre, prepared, args.micro_batch_size, bar, dtype=params_dtype(args))
    if bar is not None:
        bar.close()
    result.update(load=args.load, tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  data_parallel_size=ps.get_data_parallel_world_size(), seq_length=seq_length, standin=standin)
    if rank == 0:
        if standin:
            print(STANDIN_NOTICE)
        print("\n".join(M.megatron_lines(result) + M.extra_lines(result)), flush=True)
        if args.results_json:
            M.write_json(args.results_json, result)
            print(f"> results written to {args.results_json}")
    print_rank_0("done :-)")
    dist.barrier()  # every rank past its last send before any rank closes its connections
    ps.destroy_model_parallel()
    dist.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
