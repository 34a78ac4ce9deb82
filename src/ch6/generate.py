"""Generate text from a trained GPT on any TP x PP layout: Megatron-LM's text generation, one shot.

    python src/ch6/generate.py --load outputs/ch6/pretrain/checkpoints --prompt "Once upon a time" \\
        --tokens-to-generate 32 --greedy --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    python src/ch6/generate.py --load gpt2-folder --prompt "Hello" --prompt "The" --top_p 0.9 --random-seed 1
    python src/ch6/generate.py --load CKPT --prompt "Hello" --beam-width 4 --tokens-to-generate 16

Plain ``python`` starts its own ranks (``--nproc``, default TP x PP); under
``torchrun`` the job's ranks are used (several replicas if the world is larger).
``--load`` is a Megatron checkpoint root of any layout (resharded on load) or a
``transformers`` GPT-2 folder; the model's sizes come from it, the tokenizer
from it or from ``--vocab-file``/``--merge-file``. Sampling flags are
Megatron's: ``--greedy`` (= ``--top_k 1``), ``--temperature``, ``--top_k``,
``--top_p`` with ``--top-p-decay``/``--top-p-bound``, ``--random-seed``; the
default (no top-k, no top-p) samples from the whole distribution. Rank 0
prints each prompt and its continuation.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def get_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint root or transformers GPT-2 folder")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch)")
    p.add_argument("--tokens-to-generate", type=int, default=32)
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--greedy", action="store_true", help="the most likely token each step (top_k = 1)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0)
    p.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=0.0)
    p.add_argument("--top-p-decay", type=float, default=0.0)
    p.add_argument("--top-p-bound", type=float, default=0.0)
    p.add_argument("--random-seed", type=int, default=-1, help="-1: a fresh seed each run")
    p.add_argument("--logprobs", action="store_true", help="print each token with its log-probability")
    p.add_argument("--add-BOS", action="store_true", help="prepend the end-of-document token to each prompt")
    p.add_argument("--stop-on-eol", action="store_true")
    p.add_argument("--stop-on-double-eol", action="store_true")
    p.add_argument("--prevent-newline-after-colon", action="store_true")
    p.add_argument("--beam-width", type=int, default=None, help="beam search with this many beams (one prompt)")
    p.add_argument("--length-penalty", type=float, default=1.0)
    p.add_argument("--stop-token", type=int, default=None, help="beam search: default the end-of-document id")
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--tokenizer-type", default="GPT2BPETokenizer")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="the real vocabulary size of a checkpoint that records only its padded one (Megatron's flag)")
    p.add_argument("--output-json", default=None, help="also write the result as JSON here (rank 0)")
    p.add_argument("--compare-hf", action="store_true",
                   help="greedy only: rank 0 also runs transformers' generate on the same weights; exit 1 if they differ")
    p.add_argument("--nproc", type=int, default=None, help="ranks to start under plain python (default TP x PP)")
    p.add_argument("--timeout", type=float, default=600, help="seconds before a self-started job is killed")
    from lessons_pkg.checkpoint.model_flags import add_model_arguments
    from lessons_pkg.launch import accept_local_rank

    add_model_arguments(p)  # --num-layers ... --fp16, as Megatron's scripts pass them
    accept_local_rank(p)  # python -m torch.distributed.launch passes --local-rank
    args = p.parse_args(argv)
    for flag in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.true_vocab_size is not None and args.true_vocab_size < 1:
        p.error(f"--true-vocab-size must be >= 1, got {args.true_vocab_size}")
    if args.greedy and (args.top_k not in (0, 1) or args.top_p > 0):
        p.error(f"--greedy cannot be combined with --top_k {args.top_k} / --top_p {args.top_p}")
    if args.compare_hf and (not args.greedy or args.beam_width is not None):
        p.error("--compare-hf checks greedy decoding: add --greedy (and no --beam-width)")
    if args.compare_hf and (args.fp16 or args.bf16):
        p.error(f"--compare-hf expects the same tokens as transformers' float32 model: drop "
                f"--{'fp16' if args.fp16 else 'bf16'} (16-bit logits may break near-ties the other way)")
    if args.beam_width is not None:
        if len(args.prompt) != 1:
            p.error(f"beam search takes one prompt, got {len(args.prompt)}")
        sampling = [f for f in ("greedy", "top_k", "top_p", "top_p_decay", "top_p_bound", "logprobs",
                                "stop_on_eol", "stop_on_double_eol") if getattr(args, f)]
        if sampling or args.random_seed != -1 or args.temperature != 1.0:
            p.error(f"--beam-width is deterministic: it takes no sampling flags (got "
                    f"{sampling + (['random_seed'] if args.random_seed != -1 else []) + (['temperature'] if args.temperature != 1.0 else [])})")
    if args.output_json:  # refused before the model is loaded, not after the work is done
        from lessons_pkg.errors import output_folder_problems

        for problem in output_folder_problems("--output-json", os.path.dirname(os.path.abspath(args.output_json)),
                                              what="its folder"):
            p.error(f"{problem} (the file {args.output_json})")
    return args


def sampling_params(args):
    from lessons_pkg.inference import SamplingParams

    return SamplingParams(
        tokens_to_generate=args.tokens_to_generate, logprobs=args.logprobs, temperature=args.temperature,
        top_k=1 if args.greedy else args.top_k, top_p=args.top_p, top_p_decay=args.top_p_decay,
        top_p_bound=args.top_p_bound, add_BOS=args.add_BOS, stop_on_eol=args.stop_on_eol,
        stop_on_double_eol=args.stop_on_double_eol, prevent_newline_after_colon=args.prevent_newline_after_colon,
        random_seed=args.random_seed)


def main(argv=None) -> None:
    args = get_args(argv)
    from lessons_pkg.launch import launch_self

    launch_self(args.nproc or args.tensor_model_parallel_size * args.pipeline_model_parallel_size, args.timeout)

    import torch.distributed as dist

    from lessons_pkg import parallel_state as ps
    from lessons_pkg.checkpoint.model_flags import check_model_arguments, params_dtype
    from lessons_pkg.checkpoint.pretrained import build_stage, load_pretrained
    from lessons_pkg.inference import InferenceEngine
    from lessons_pkg.utils import print_rank_0

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ps.initialize_model_parallel(tp, pp)
    # a bad folder or file: a UserError, the same on every rank before any collective (run_cli)
    pre = load_pretrained(args.load, args.vocab_file, args.merge_file, args.tokenizer_type, args.true_vocab_size)
    if pre.tokenizer is None:
        raise SystemExit(f"error: {args.load!r} ships no tokenizer: pass --vocab-file and --merge-file")
    if pre.tokenizer.vocab_size != pre.config.vocab_size:
        raise SystemExit(f"error: the tokenizer has {pre.tokenizer.vocab_size} tokens but the model's vocabulary has "
                         f"{pre.config.vocab_size}: not the tokenizer this model was trained with")
    check_model_arguments(args, pre.config, args.load)
    c = pre.config
    print_rank_0(f"> {pre.source} model {args.load} (iteration {pre.iteration}): {c.num_layers} layers, hidden "
                 f"{c.hidden_size}, {c.num_attention_heads} heads, vocabulary {c.vocab_size}, "
                 f"{c.max_position_embeddings} positions; TP={tp} x PP={pp} x DP={ps.get_data_parallel_world_size()}")
    model = build_stage(pre, ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_rank(), pp,
                        dtype=params_dtype(args))
    engine = InferenceEngine(model, pre.tokenizer, ps.get_tensor_model_parallel_group(),
                             ps.get_pipeline_model_parallel_group())
    try:
        if args.beam_width is not None:
            out = engine.beam_search(args.prompt, args.tokens_to_generate, args.beam_width, args.length_penalty,
                                     args.stop_token, args.add_BOS, args.prevent_newline_after_colon)
        else:
            out = engine.generate(args.prompt, sampling_params(args))
    except ValueError as e:  # refused identically on every rank before any collective
        raise SystemExit(f"error: {e}") from None

    same = True
    if dist.get_rank() == 0:
        out["params_dtype"] = str(next(model.parameters()).dtype)
        report(args, out)
        if args.compare_hf:
            same = compare_with_transformers(pre, args.prompt, out["tokens"], args)
    print_rank_0("done :-)")
    dist.barrier()  # every rank past its last send before any rank closes its connections
    ps.destroy_model_parallel()
    dist.destroy_process_group()  # a clean exit: no gloo threads left running at shutdown
    if not same:
        raise SystemExit(1)


def compare_with_transformers(pre, prompts: list[str], tokens: list[list[int]], args) -> bool:
    """transformers' greedy ``generate`` on the same weights must choose the same tokens (cut after eod)."""
    import torch

    from lessons_pkg.tensor_parallel.hf import to_hf_model

    hf, tok = to_hf_model(pre.state_dict, pre.config), pre.tokenizer
    same = True
    for prompt, ours in zip(prompts, tokens):
        ids = ([tok.eod] if args.add_BOS else []) + tok.tokenize(prompt)
        with torch.inference_mode():
            ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              do_sample=False, max_new_tokens=args.tokens_to_generate, eos_token_id=tok.eod,
                              pad_token_id=tok.eod)[0].tolist()[len(ids):]
        if tok.eod in ref:
            ref = ref[: ref.index(tok.eod) + 1]
        same &= ours == ids + ref
    print(f"> the same tokens as transformers' GPT2LMHeadModel.generate(do_sample=False) on these weights: {same}")
    return same


def report(args, out: dict) -> None:
    if args.beam_width is not None:
        for i, (text, score) in enumerate(zip(out["text"], out["scores"])):
            print(f"--- beam {i} (score {score:.4f}) ---\n{text}")
    else:
        for i, text in enumerate(out["text"]):
            print(f"--- prompt {i} ---\n{text}")
            if args.logprobs:
                pairs = zip(out["segments"][i][1:], out["logprobs"][i])
                print("    " + " ".join(f"{seg!r}:{lp:.3f}" for seg, lp in pairs))
    if args.output_json:
        from lessons_pkg.evaluation.metrics import write_json

        write_json(args.output_json, out)  # atomic; a failed write names the file
        print(f"> written to {args.output_json}")
    sys.stdout.flush()


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
