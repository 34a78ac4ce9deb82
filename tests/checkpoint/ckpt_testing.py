"""Real checkpoints for the checkpoint tests, written by the trainer's own save_checkpoint on real ranks.

``write_trained_checkpoint(root, tp, pp, vp, dp, zero)`` builds the ParallelGPT
chunks of every rank from one master state dict, takes two AdamW steps with
gradients cut from one full-size random gradient per parameter (so replicated
tensors and the tied embedding's two copies get equal gradients, as in
training) and saves iteration 2 with ``save_checkpoint``. Same seeds, same
numbers, whatever the layout.
"""
from __future__ import annotations

import argparse
import zlib

import torch

from lessons_pkg import parallel_state as ps
from lessons_pkg.tensor_parallel import GPTConfig, ParallelGPT, master_state_dict, shard_of
from lessons_pkg.testing import run_on_ranks

# 500 tokens pad to 512 at TP 1, 2 and 4 (make_vocab_size_divisible_by 128): round trips keep every row
CONFIG = dict(vocab_size=500, hidden_size=32, num_layers=4, num_attention_heads=4, max_position_embeddings=16,
              hidden_dropout=0.0, attention_dropout=0.0)


def train_args(tp, pp, dp, vp, zero) -> argparse.Namespace:
    c = GPTConfig(**CONFIG)
    return argparse.Namespace(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, data_parallel_size=dp,
        num_layers_per_virtual_pipeline_stage=c.num_layers // (pp * vp) if vp > 1 else None,
        num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        max_position_embeddings=c.max_position_embeddings, seq_length=c.max_position_embeddings,
        make_vocab_size_divisible_by=128, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
        use_distributed_optimizer=zero, lr=1e-2, min_lr=1e-3, lr_decay_style="cosine", lr_decay_iters=10,
        lr_warmup_fraction=None, lr_warmup_iters=1, weight_decay=0.1, clip_grad=0.0, adam_beta1=0.9,
        adam_beta2=0.95, adam_eps=1e-8, fp16=False, bf16=False, initial_loss_scale=2.0 ** 32, loss_scale_window=1000,
        tokenizer_type="NullTokenizer", vocab_size=c.vocab_size, vocab_file=None, merge_file=None, seed=1234,
        no_save_optim=False, no_save_rng=False, no_load_optim=False, no_load_rng=False, finetune=False)


def _rank(root: str, tp: int, pp: int, vp: int, zero: bool, steps: int) -> None:
    from lessons_pkg.checkpoint.reshard import Layout
    from lessons_pkg.training.checkpointing import save_checkpoint
    from lessons_pkg.training.lr_scheduler import OptimizerParamScheduler
    from lessons_pkg.training.optimizer import Groups, get_optimizer
    from lessons_pkg.training.train import Runtime

    ps.initialize_model_parallel(tp, pp)
    rt = Runtime()
    dp = ps.get_data_parallel_world_size()
    args = train_args(tp, pp, dp, vp, zero)
    config = GPTConfig(**CONFIG)
    master = master_state_dict(config, seed=7)
    chunks = []
    for kw in Layout(tp, pp, vp).chunks(config, rt.pp_rank):
        model = ParallelGPT(config, rt.tp_group, **kw)
        model.load_master_state_dict(master)
        chunks.append(model)
    named = [(f"chunk{i}.{n}", p) for i, c in enumerate(chunks) for n, p in c.named_parameters()]
    optimizer = get_optimizer(named, args, Groups(rt.tp_group, rt.pp_group, rt.dp_group, rt.tp_rank))
    scheduler = OptimizerParamScheduler.from_args(optimizer, args)
    for step in range(steps):
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                key = chunk.global_layer_name(name)
                gen = torch.Generator().manual_seed(zlib.crc32(f"{key}/{step}".encode()))
                full = torch.randn(master[key].shape, generator=gen)
                p.grad = shard_of(p, full, rt.tp_rank, tp).clone()
        optimizer.step()
        scheduler.step()
    save_checkpoint(root, steps, chunks, optimizer, scheduler, args, consumed_samples=8 * steps, ranks=rt.ranks,
                    dp_group=rt.dp_group)


def write_trained_checkpoint(root: str, tp: int = 2, pp: int = 2, vp: int = 1, dp: int = 1, zero: bool = False,
                             steps: int = 2) -> str:
    run_on_ranks(_rank, world_size=tp * pp * dp, args=(str(root), tp, pp, vp, zero, steps), timeout=120)
    return str(root)


def flatten(obj, prefix: str = "") -> dict:
    """Every tensor and number of a (nested) checkpoint dict, keyed by its path."""
    out = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}/"))
    elif isinstance(obj, argparse.Namespace):
        pass
    else:
        out[prefix.rstrip("/")] = obj
    return out


def assert_identical(a: dict, b: dict, what: str) -> None:
    fa, fb = flatten(a), flatten(b)
    assert sorted(fa) == sorted(fb), f"{what}: keys differ: {sorted(set(fa) ^ set(fb))[:5]}"
    for k in fa:
        if isinstance(fa[k], torch.Tensor):
            assert fa[k].dtype == fb[k].dtype and torch.equal(fa[k], fb[k]), f"{what}: {k} differs"
        else:
            assert fa[k] == fb[k], f"{what}: {k}: {fa[k]!r} != {fb[k]!r}"
