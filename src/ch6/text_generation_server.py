"""Megatron-LM's text-generation server on TP x PP ranks: ``PUT /api``, OpenAI completions, a web page.

    python src/ch6/text_generation_server.py --load CKPT --port 5000                        # one rank
    torchrun --nproc_per_node 4 src/ch6/text_generation_server.py --load CKPT \\
        --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 --port 5000
    curl 'http://localhost:5000/api' -X PUT -H 'Content-Type: application/json' \\
        -d '{"prompts":["Hello world"], "tokens_to_generate":1}'

Plain ``python`` with TP x PP > 1 starts its own ranks. Model sizes and the
tokenizer come from the checkpoint (a Megatron checkpoint of any layout, or a
``transformers`` GPT-2 folder); Megatron's ``--tokenizer-type``/``--vocab-file``/
``--merge-file`` override the tokenizer. Global rank 0 (TP rank 0 of the first
pipeline stage) serves HTTP; every other rank follows (lessons_pkg/serving/).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load", required=True, help="Megatron checkpoint root or transformers GPT-2 folder")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    p.add_argument("--tokenizer-type", default=None)
    p.add_argument("--vocab-file", default=None)
    p.add_argument("--merge-file", default=None)
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="the real vocabulary size of a checkpoint that records only its padded one (Megatron's flag)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--max-batch-size", type=int, default=32, help="most prompts generated together")
    p.add_argument("--distributed-timeout-minutes", type=float, default=5.0,
                   help="timeout of every model collective (Megatron's flag)")
    p.add_argument("--control-timeout", type=float, default=60.0,
                   help="seconds a rank waits for rank 0's next work item (heartbeats come every --heartbeat s)")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between idle pings from rank 0")
    p.add_argument("--model-name", default=None, help="name in /v1/models (default: the --load folder's name)")
    p.add_argument("--inject-fault-prompt", default=None, help=argparse.SUPPRESS)   # tests: fail on this prompt
    g = p.add_argument_group("defaults of PUT /api requests (Megatron's flags; a request's own fields win)")
    g.add_argument("--temperature", type=float, default=None, help="default 1.0")
    g.add_argument("--top_k", type=int, default=None, help="default 0 (no top-k); used when a request sets "
                   "neither top_k nor top_p, like --top_p")
    g.add_argument("--top_p", type=float, default=None, help="default 0.0 (no nucleus sampling)")
    g.add_argument("--out-seq-length", type=int, default=None, metavar="N",
                   help="the most tokens a request may generate (more: 400); below 64 also the default "
                        "tokens_to_generate (Megatron's 64 otherwise)")
    g.add_argument("--seed", type=int, default=None,
                   help="requests without random_seed take seeds drawn from this one, so a restarted server given "
                        "the same requests in the same order and batches answers the same (default: fresh seeds)")
    from lessons_pkg.checkpoint.model_flags import add_model_arguments
    from lessons_pkg.launch import accept_local_rank

    add_model_arguments(p)  # --num-layers ... --fp16, as Megatron's server scripts pass them
    accept_local_rank(p)  # python -m torch.distributed.launch passes --local-rank
    args = p.parse_args(argv)
    from lessons_pkg.serving.schema import SAMPLING_DEFAULTS, BadRequest, check_sampling

    try:
        check_sampling(dict(SAMPLING_DEFAULTS, **api_defaults(args)))
    except BadRequest as e:
        p.error(f"the /api defaults: {e}")
    if args.heartbeat >= args.control_timeout:
        p.error(f"--heartbeat ({args.heartbeat}) must be shorter than --control-timeout ({args.control_timeout})")
    if args.true_vocab_size is not None and args.true_vocab_size < 1:
        p.error(f"--true-vocab-size must be >= 1, got {args.true_vocab_size}")
    if args.max_batch_size < 1:
        p.error(f"--max-batch-size must be >= 1, got {args.max_batch_size}")
    if not 1 <= args.port <= 65535:
        p.error(f"--port must be between 1 and 65535, got {args.port}")
    return args


def api_defaults(args) -> dict:
    """The PUT /api fields the command line sets (Megatron's names)."""
    given = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if args.out_seq_length is not None and args.out_seq_length < 64:   # Megatron's default would be refused
        given["tokens_to_generate"] = args.out_seq_length
    return {k: v for k, v in given.items() if v is not None}


class FaultInjectingEngine:
    """Test double around the real engine: a prompt equal to ``fault_prompt`` makes the last stage's forward fail.

    Only the ranks of the last pipeline stage arm a forward hook on their
    model stage, so with PP > 1 the error happens inside generation on some
    ranks only; the engine shares it at its next per-step exchange, every rank
    raises ``GenerationError``, the server answers 500, and the next request
    must be answered correctly. (All TP ranks of the stage fail together: a
    failure on one TP rank alone, in the middle of a forward, leaves its peers
    in an all-reduce that only the collective timeout ends.)
    """

    def __init__(self, engine, fault_prompt: str, failing: bool):
        self.engine, self.fault_prompt, self.armed = engine, fault_prompt, False
        self.max_positions = engine.max_positions
        if failing:
            engine.model.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs):
        if self.armed:
            raise RuntimeError(f"injected fault in the forward pass (prompt {self.fault_prompt!r})")

    def generate(self, prompts, params, callback=None):
        self.armed = self.fault_prompt in prompts
        try:
            return self.engine.generate(prompts, params, callback=callback)
        finally:
            self.armed = False

    def beam_search(self, prompts, **kwargs):
        return self.engine.beam_search(prompts, **kwargs)


def main(argv=None) -> int:
    args = parse_args(argv)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    from lessons_pkg.launch import launch_self

    if "RANK" not in os.environ and tp * pp > 1:
        # plain python starts its own ranks: SIGTERM here must stop them too (launch's clean-up runs on
        # KeyboardInterrupt), and a server has no run-time limit
        def interrupt(signum, frame):
            raise KeyboardInterrupt

        signal.signal(signal.SIGTERM, interrupt)
    try:
        launch_self(tp * pp, timeout=10 * 365 * 24 * 3600)
    except KeyboardInterrupt:
        print("server stopped (every rank ended)", flush=True)
        return 0

    import torch
    import torch.distributed as dist

    from lessons_pkg import parallel_state as ps
    from lessons_pkg.checkpoint.model_flags import check_model_arguments, params_dtype
    from lessons_pkg.checkpoint.pretrained import build_stage, load_pretrained
    from lessons_pkg.inference import InferenceEngine, SamplingParams
    from lessons_pkg.serving import ControlChannel, ServingLoop, follow

    world = int(os.environ["WORLD_SIZE"])
    if world != tp * pp:
        raise SystemExit(f"error: the server runs one model replica: world size ({world}) must equal "
                         f"tensor-model-parallel-size ({tp}) x pipeline-model-parallel-size ({pp})")
    ps.init_distributed(timeout_s=args.distributed_timeout_minutes * 60)
    ps.initialize_model_parallel(tp, pp)
    rank = dist.get_rank()
    t_rank, p_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    if rank == 0:
        print(f"using world size: {world}, data-parallel size: 1, tensor-model-parallel size: {tp}, "
              f"pipeline-model-parallel size: {pp}", flush=True)
        print(f"> initialized tensor model parallel with size {tp}\n"
              f"> initialized pipeline model parallel with size {pp}", flush=True)
    # a bad folder or file: a UserError, the same on every rank before any collective (run_cli)
    pre = load_pretrained(args.load, args.vocab_file, args.merge_file, args.tokenizer_type, args.true_vocab_size)
    if pre.tokenizer is None:
        raise SystemExit(f"error: {args.load} names no tokenizer; pass --vocab-file and --merge-file")
    check_model_arguments(args, pre.config, args.load)
    if args.top_k is not None and args.top_k >= pre.config.vocab_size:
        raise SystemExit(f"error: --top_k ({args.top_k}) must be below the vocabulary size ({pre.config.vocab_size})")
    if rank == 0:
        padded = pre.config.padded_vocab_size(tp)
        print(f"> building {args.tokenizer_type or 'GPT2BPETokenizer'} tokenizer ...\n"
              f" > padded vocab (size: {pre.config.vocab_size}) with {padded - pre.config.vocab_size} dummy tokens "
              f"(new size: {padded})\nbuilding GPT model ...", flush=True)
    model = build_stage(pre, ps.get_tensor_model_parallel_group(), p_rank, pp, dtype=params_dtype(args))
    model.to(ps.get_device())
    n_params = sum(p.nelement() for p in model.parameters())
    print(f" > number of parameters on (tensor, pipeline) model parallel rank ({t_rank}, {p_rank}): {n_params}",
          flush=True)
    if rank == 0:
        where = f"at iteration {pre.iteration}" if pre.iteration is not None else f"({pre.source} folder)"
        print(f" loading checkpoint from {args.load} {where}\n"
              f"  successfully loaded checkpoint from {args.load} {where}", flush=True)

    engine = InferenceEngine(model, pre.tokenizer, ps.get_tensor_model_parallel_group(),
                             ps.get_pipeline_model_parallel_group(), seed=args.seed)
    if args.inject_fault_prompt is not None:
        engine = FaultInjectingEngine(engine, args.inject_fault_prompt, failing=p_rank == pp - 1)
    channel = ControlChannel(timeout_s=args.control_timeout)
    pids = channel.all_gather(os.getpid())
    status = 0
    with torch.inference_mode():
        if rank == 0:
            name = args.model_name or os.path.basename(os.path.normpath(args.load))
            loop = ServingLoop(engine, pre.tokenizer, channel, SamplingParams, engine.max_positions, name,
                               args.host, args.port, args.max_batch_size, args.heartbeat,
                               info={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                                     "rank_pids": pids, "params_dtype": str(next(model.parameters()).dtype)},
                               api_defaults=api_defaults(args), max_new_tokens=args.out_seq_length)
            loop.install_signal_handlers()
            status = loop.run()
        else:
            try:
                done = follow(engine, channel)
                print(f"rank {rank}: stop received after {done} work items", flush=True)
            except Exception as e:
                print(f"error: rank {rank} lost rank 0 ({type(e).__name__}: {e}); exiting", file=sys.stderr, flush=True)
                status = 1
    if status == 0:
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    from lessons_pkg.errors import run_cli

    sys.exit(run_cli(main))
