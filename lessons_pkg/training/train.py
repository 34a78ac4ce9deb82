"""Megatron's ``pretrain()``: initialise, build the model chunks, train, evaluate, checkpoint.

``pretrain(args, model_provider, datasets_provider, loss_fn)`` is the generic
loop; ``src/ch6/pretrain_gpt.py`` supplies the GPT pieces, as Megatron-LM's
``pretrain_gpt.py`` does. One iteration (``train_step``)::

    zero grads
    forward_backward(chunks, schedule, micro-batches)   # pipeline executor: .grad = d mean(loss) / d param
    all-reduce sequence-parallel grads (LayerNorms, biases) over the tensor group   (--sequence-parallel)
    all-reduce tied-embedding grads (first + last stage)
    optimizer.step(): DP x CP average (all-reduce, or ZeRO-1 reduce-scatter), global norm, clip, AdamW
    scheduler.step()

Each data-parallel rank reads ``num_micro_batches`` micro-batches of
``micro_batch_size`` samples per iteration, so one iteration consumes
``global_batch_size = micro x DP x num_micro_batches`` samples in the same
order whatever the layout (Megatron's ``MegatronPretrainingSampler``): a
TP x PP x DP run sees the same data as a single process. With context
parallelism the CP ranks of a data-parallel rank read the same samples and
each keeps its two chunks of every sequence (``Runtime.local_tokens``); its
loss is the mean over its tokens, and the average over data x context ranks
is the mean over all.
"""
from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from lessons_pkg import parallel_state as ps
from lessons_pkg.context_parallel.split import split_sequence
from lessons_pkg.pipeline import forward_backward
from lessons_pkg.tensor_parallel.random import model_parallel_manual_seed
from lessons_pkg.tensor_parallel.sequence_parallel import allreduce_sequence_parallel_grads
from lessons_pkg.training.batch_size import global_batch_size_at
from lessons_pkg.training.checkpointing import load_checkpoint, save_checkpoint
from lessons_pkg.training.grads import allreduce_embedding_grads
from lessons_pkg.training.logging import TrainingLogger
from lessons_pkg.training.lr_scheduler import OptimizerParamScheduler
from lessons_pkg.training.optimizer import Groups, get_optimizer
from lessons_pkg.training.profiling import IterationProfiler
from lessons_pkg.utils import print_rank_0, set_seed


# --- which layers live where -------------------------------------------------------------------
def chunk_layout(num_layers: int, pp_size: int, pp_rank: int, num_chunks: int) -> list[dict]:
    """The layers of each model chunk of pipeline rank ``pp_rank``.

    Chunk ``c`` is virtual stage ``c * pp_size + pp_rank`` (Megatron's round-robin);
    each of the ``pp_size * num_chunks`` virtual stages holds consecutive layers.
    """
    stages = pp_size * num_chunks
    per_stage = num_layers // stages
    out = []
    for c in range(num_chunks):
        stage = c * pp_size + pp_rank
        out.append(dict(layer_offset=stage * per_stage, num_layers=per_stage,
                        pre_process=stage == 0, post_process=stage == stages - 1))
    return out


# --- data order --------------------------------------------------------------------------------
def microbatch_sample_ids(consumed: int, micro_batch_size: int, dp_size: int, dp_rank: int,
                          num_micro_batches: int) -> list[list[int]]:
    """Sample indices of this data-parallel rank's micro-batches for one iteration.

    Micro-step ``j`` takes samples ``[consumed + j*mb*dp, consumed + (j+1)*mb*dp)`` and
    data-parallel rank ``d`` the ``d``-th slice of ``mb`` of them (Megatron's sampler).
    """
    out = []
    for j in range(num_micro_batches):
        start = consumed + (j * dp_size + dp_rank) * micro_batch_size
        out.append(list(range(start, start + micro_batch_size)))
    return out


def get_batch(dataset, ids: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``tokens, labels`` ``[mb, s]`` from samples of ``s + 1`` ids (labels = tokens shifted by one)."""
    text = torch.stack([torch.as_tensor(dataset[i % len(dataset)]["text"]) for i in ids]).to(device)  # [mb, s+1]
    return text[:, :-1].contiguous(), text[:, 1:].contiguous()


# --- process groups, model, optimizer ------------------------------------------------------------
class Runtime:
    """This rank's place in the grid and its groups, read once from ``parallel_state``."""

    def __init__(self):
        self.tp_rank, self.pp_rank, self.dp_rank = (ps.get_tensor_model_parallel_rank(),
                                                    ps.get_pipeline_model_parallel_rank(),
                                                    ps.get_data_parallel_rank())
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.tp_group, self.pp_group = ps.get_tensor_model_parallel_group(), ps.get_pipeline_model_parallel_group()
        self.dp_group, self.embedding_group = ps.get_data_parallel_group(), ps.get_embedding_group()
        # context parallelism: the ranks of the other tokens; gradients, losses and the optimizer's shards
        # go over data x context (= the data-parallel group when CP=1)
        self.cp_size, self.cp_rank = ps.get_context_parallel_world_size(), ps.get_context_parallel_rank()
        self.cp_group = ps.get_context_parallel_group()
        self.grad_group = ps.get_data_parallel_group(with_context_parallel=True)
        self.grad_rank = ps.get_data_parallel_rank(with_context_parallel=True)
        self.pipeline_ranks = ps.get_pipeline_model_parallel_ranks()
        self.first_stage, self.last_stage = self.pp_rank == 0, self.pp_rank == self.pp_size - 1
        self.device = ps.get_device()

    @property
    def ranks(self) -> dict:
        """This rank's place for checkpoints: "dp" is its rank over data x context (rank 0 writes the model)."""
        return {"tp": self.tp_rank, "pp": self.pp_rank, "pp_size": self.pp_size, "dp": self.grad_rank}

    def local_tokens(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens, labels [mb, s] -> [mb, s/cp]``: this context-parallel rank's two chunks of each."""
        if self.cp_size == 1:
            return batch
        return tuple(split_sequence(t, self.cp_size, self.cp_rank) for t in batch)


def initialize(args) -> Runtime:
    ps.initialize_model_parallel(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                 backend=args.distributed_backend,
                                 context_parallel_size=getattr(args, "context_parallel_size", 1))
    rt = Runtime()
    # Megatron's seeding: pipeline stages differ (their dropout masks are independent), while
    # tensor-parallel peers share the stream so replicated activations see the same dropout mask.
    set_seed(args.seed + 100 * rt.pp_rank)
    # and a second stream that differs between tensor ranks, for dropout on sequence-parallel activations
    model_parallel_manual_seed(args.seed + 100 * rt.pp_rank, rt.tp_rank)
    return rt


class _Autocast(torch.nn.Module):
    """Runs a chunk's forward under ``torch.autocast`` (bf16/fp16 on GPU); weights stay float32."""

    def __init__(self, module: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module, self.dtype = module, dtype

    def forward(self, x):
        device = next(self.module.parameters()).device.type  # cuda in training; cpu in the tests
        with torch.autocast(device_type=device, dtype=self.dtype):
            return self.module(x)


def pipeline_tensor_shape(args) -> dict:
    """What every stage sends the next one: ``[micro-batch, seq, hidden]`` float32 (the residual stream;
    the executor casts an autocast bf16 activation to it), ``seq / cp`` of it with context parallelism and
    ``/ tp`` again with sequence parallelism.
    Given to the executor, as Megatron does, so no shape header has to travel: which the interleaved
    schedule needs on NCCL (see rounds.check_rounds)."""
    sp = getattr(args, "sequence_parallel", False)
    seq = args.seq_length // getattr(args, "context_parallel_size", 1)       # this rank's tokens (CP)
    seq = seq // args.tensor_model_parallel_size if sp else seq
    return dict(tensor_shape=(args.micro_batch_size, seq, args.hidden_size), tensor_dtype=torch.float32)


# --- one iteration -------------------------------------------------------------------------------
def _reduce_loss(losses: list[torch.Tensor] | None, rt: Runtime) -> float:
    """Mean micro-batch loss of the iteration, averaged over data-parallel ranks, known on every rank."""
    value = torch.zeros((), device=rt.device)
    if rt.last_stage:
        value = torch.stack(losses).float().mean()
        dist.all_reduce(value, group=rt.grad_group)      # data x context: each CP rank's mean over its tokens
        value /= dist.get_world_size(rt.grad_group)
    dist.broadcast(value, src=rt.pipeline_ranks[-1], group=rt.pp_group)  # last stage -> the whole pipeline
    return value.item()


def train_step(chunks, run_chunks, optimizer, scheduler, batches, rt: Runtime, args, loss_fn) -> tuple[float, float | None]:
    optimizer.zero_grad()
    tokens = [t for t, _ in batches] if rt.first_stage else None
    labels = [lab for _, lab in batches] if rt.last_stage else None
    scale = optimizer.loss_scaler.scale if optimizer.loss_scaler is not None else 1.0
    losses = forward_backward(run_chunks, args.pipeline_schedule, tokens, labels,
                              lambda out, lab: loss_fn(out, lab) * scale, group=rt.pp_group,
                              num_microbatches=len(batches), **pipeline_tensor_shape(args))
    if losses is not None and scale != 1.0:
        losses = [loss / scale for loss in losses]
    if getattr(args, "sequence_parallel", False):  # LayerNorms, biases saw only this rank's tokens
        allreduce_sequence_parallel_grads(chunks, rt.tp_group)
    if rt.pp_size > 1:
        shared = [c.shared_embedding_weight() for c in chunks if c.pre_process or c.post_process]
        allreduce_embedding_grads(shared, rt.embedding_group)
    grad_norm = optimizer.step()
    if grad_norm is not None:  # a skipped (fp16 overflow) step does not advance the schedule
        scheduler.step()
    return _reduce_loss(losses, rt), grad_norm


def forward_only(run_chunks, batches, rt: Runtime, args, loss_fn) -> float:
    """Loss of ``batches`` through the pipeline, forwards only, no autograd (evaluation)."""
    tokens = [t for t, _ in batches] if rt.first_stage else None
    labels = [lab for _, lab in batches] if rt.last_stage else None
    losses = forward_backward(run_chunks, args.pipeline_schedule, tokens, labels, loss_fn, group=rt.pp_group,
                              num_microbatches=len(batches), forward_only=True, **pipeline_tensor_shape(args))
    return _reduce_loss(losses, rt)


def evaluate(run_chunks, dataset, consumed: int, rt: Runtime, args, loss_fn) -> float:
    for chunk in run_chunks:
        chunk.eval()
    total = 0.0
    for k in range(args.eval_iters):
        start = consumed + k * args.global_batch_size
        ids = microbatch_sample_ids(start, args.micro_batch_size, args.data_parallel_size, rt.dp_rank,
                                    args.num_micro_batches)
        total += forward_only(run_chunks, [rt.local_tokens(get_batch(dataset, i, rt.device)) for i in ids], rt, args,
                              loss_fn)
    for chunk in run_chunks:
        chunk.train()
    return total / args.eval_iters


# --- the whole run -------------------------------------------------------------------------------
def num_samples(args) -> list[int]:
    """Samples each split must provide (Megatron's formula: evaluations continue through the valid set)."""
    evals = (args.train_iters // args.eval_interval + 1) * args.eval_iters
    return [args.train_iters * args.global_batch_size, evals * args.global_batch_size,
            args.eval_iters * args.global_batch_size]


def pretrain(args, rt: Runtime, model_provider, datasets_provider, loss_fn, padded_vocab_size: int) -> dict:
    """Train ``args.train_iters`` iterations; return the final numbers (on every rank)."""
    v = args.virtual_pipeline_model_parallel_size
    chunks = [model_provider(**layout) for layout in chunk_layout(args.num_layers, rt.pp_size, rt.pp_rank, v)]
    n_params = sum(p.numel() for c in chunks for p in c.parameters())
    if rt.grad_rank == 0:
        print(f" > number of parameters on (tensor, pipeline) model parallel rank ({rt.tp_rank}, {rt.pp_rank}): "
              f"{n_params}", flush=True)
    run_chunks = chunks
    if args.fp16 or args.bf16:
        run_chunks = [_Autocast(c, torch.float16 if args.fp16 else torch.bfloat16) for c in chunks]

    named = [(f"chunk{i}.{n}", p) for i, c in enumerate(chunks) for n, p in c.named_parameters()]
    optimizer = get_optimizer(named, args, Groups(rt.tp_group, rt.pp_group, rt.grad_group, rt.tp_rank))
    scheduler = OptimizerParamScheduler.from_args(optimizer, args)

    iteration, consumed = 0, 0
    if args.load:
        iteration, consumed = load_checkpoint(args.load, chunks, optimizer, scheduler, args, rt.ranks)
        if iteration:
            print_rank_0(f" > loaded checkpoint from {args.load} at iteration {iteration} "
                         f"(consumed samples: {consumed})")
        else:
            print_rank_0(f" > no checkpoint in {args.load}: training from scratch")

    train_ds, valid_ds, test_ds = datasets_provider(num_samples(args))
    logger = TrainingLogger(args, padded_vocab_size, enabled=dist.get_rank() == 0)
    consumed_valid = (iteration // args.eval_interval) * args.eval_iters * args.global_batch_size
    do_eval = args.eval_iters > 0
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    print_rank_0(f"training ... (iterations {iteration + 1} to {args.train_iters})")
    last_saved = iteration if args.load else None
    result = {"iteration": iteration}
    profiler = (IterationProfiler(args.profile_step_start, args.profile_step_end, rt.device, dist.get_rank(),
                                  args.profile_trace) if args.profile else None)
    if profiler and iteration >= args.profile_step_start:
        print_rank_0(f"WARNING: --profile-step-start {args.profile_step_start} is not after the loaded iteration "
                     f"{iteration}: nothing will be profiled")

    try:
        while iteration < args.train_iters:
            if profiler:
                profiler.before(iteration + 1)
            sync()
            start = time.perf_counter()
            batch_size = global_batch_size_at(consumed, args)      # --rampup-batch-size, or the constant one
            ids = microbatch_sample_ids(consumed, args.micro_batch_size, args.data_parallel_size, rt.dp_rank,
                                        batch_size // (args.micro_batch_size * args.data_parallel_size))
            batches = [rt.local_tokens(get_batch(train_ds, i, rt.device)) for i in ids]
            lr = optimizer.param_groups[0]["lr"]
            loss, grad_norm = train_step(chunks, run_chunks, optimizer, scheduler, batches, rt, args, loss_fn)
            sync()
            iteration += 1
            consumed += batch_size
            scale = optimizer.loss_scaler.scale if optimizer.loss_scaler is not None else None
            logger.iteration(iteration, consumed, time.perf_counter() - start, lr, loss, grad_norm, scale,
                             global_batch_size=batch_size)
            if profiler:
                profiler.after(iteration)

            if do_eval and valid_ds is not None and iteration % args.eval_interval == 0:
                valid_loss = evaluate(run_chunks, valid_ds, consumed_valid, rt, args, loss_fn)
                consumed_valid += args.eval_iters * args.global_batch_size
                logger.evaluation(f"iteration {iteration}", iteration, valid_loss)
            exiting = args.exit_interval is not None and iteration % args.exit_interval == 0
            if args.save and (iteration % (args.save_interval or args.train_iters) == 0 or exiting
                              or iteration == args.train_iters):
                _save(args, iteration, chunks, optimizer, scheduler, consumed, rt)
                last_saved = iteration
            if exiting:
                print_rank_0(f"exiting program at iteration {iteration} (--exit-interval {args.exit_interval})")
                logger.close()
                return {"iteration": iteration}
    finally:
        if profiler:  # a run that ended inside the profiling window (--exit-interval, an error) still reports
            profiler.close(iteration)

    result["iteration"] = iteration
    if do_eval and valid_ds is not None:
        result["valid_loss"] = evaluate(run_chunks, valid_ds, consumed_valid, rt, args, loss_fn)
        logger.evaluation("the end of training for val data", iteration, result["valid_loss"])
    if do_eval and test_ds is not None:
        result["test_loss"] = evaluate(run_chunks, test_ds, 0, rt, args, loss_fn)
        logger.evaluation("the end of training for test data", iteration, result["test_loss"], split="test")
    if args.save and last_saved != iteration:
        _save(args, iteration, chunks, optimizer, scheduler, consumed, rt)
    logger.close()
    return result


def _save(args, iteration, chunks, optimizer, scheduler, consumed, rt: Runtime) -> None:
    print_rank_0(f"saving checkpoint at iteration {iteration:7d} to {args.save}")
    save_checkpoint(args.save, iteration, chunks, optimizer, scheduler, args, consumed, rt.ranks, rt.grad_group)
    print_rank_0(f"  successfully saved checkpoint at iteration {iteration:7d} to {args.save}")
