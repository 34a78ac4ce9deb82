"""Checkpoints in Megatron-LM's layout, written so that a crash never leaves a broken ``latest``.

::

    <save>/latest_checkpointed_iteration.txt         "200": the newest COMPLETE checkpoint
    <save>/iter_0000200/mp_rank_00/model_optim_rng.pt           PP = 1: one folder per tensor rank
    <save>/iter_0000200/mp_rank_01_003/model_optim_rng.pt       PP > 1: mp_rank_{tp:02d}_{pp:03d}
    <save>/iter_0000200/mp_rank_01_003/distrib_optim_dp_rank_002.pt   with --use-distributed-optimizer

``model_optim_rng.pt`` (written by data-parallel rank 0 of each (tensor,
pipeline) position) holds the model shard (``model``, or ``model0``,
``model1``... for interleaved chunks), the optimizer state (plain optimizer),
the scheduler position, the iteration, consumed samples, the arguments (a plain
dict) and the RNG states of every data-parallel rank (``rng_state[d]``: python,
numpy, torch, cuda). With the distributed optimizer, every data-parallel rank
writes its own slice of the Adam state to ``distrib_optim_dp_rank_XXX.pt``
(not gathered: resuming needs the same data-parallel size).

Atomicity: every file is written to ``<name>.tmp`` and renamed (a rename is
atomic); ``latest_checkpointed_iteration.txt`` is rewritten (also tmp + rename)
by global rank 0 only after a barrier, i.e. after EVERY rank has renamed its
files. A crash mid-save leaves a partial ``iter_XXXXXXX`` folder that nothing
points to; ``--load`` resumes from the previous complete one.

Everything is saved as tensors, numbers, strings, lists and dicts, so it loads
with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist

TRACKER = "latest_checkpointed_iteration.txt"
CHECKPOINT_VERSION = 3.0
# Fault injection for the tests (see tests/training): the save at this iteration raises on
# the upper half of the ranks before they write, after the lower half have written theirs.
CRASH_ENV = "LESSONS_CRASH_DURING_SAVE_AT_ITER"


def mp_rank_dirname(tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return f"mp_rank_{tp_rank:02d}" if pp_size == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def checkpoint_dir(root: str, iteration: int, tp_rank: int, pp_rank: int, pp_size: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}", mp_rank_dirname(tp_rank, pp_rank, pp_size))


def read_tracker(root: str) -> int | None:
    """The iteration in ``latest_checkpointed_iteration.txt``, or None when there is no checkpoint."""
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise ValueError(f"{path} should hold an iteration number, found {text!r}")
    return int(text)


def saved_layout(root: str, iteration: int) -> tuple[int, int]:
    """``(tp, pp)`` of a saved checkpoint, read from its ``mp_rank_*`` folder names."""
    folder = os.path.join(root, f"iter_{iteration:07d}")
    names = [n for n in os.listdir(folder) if n.startswith("mp_rank_")]
    matches = [re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", n) for n in names]
    if not names or not all(matches):
        raise ValueError(f"{folder} holds no mp_rank_XX[_YYY] folders: {sorted(names)}")
    tps = {int(m.group(1)) for m in matches}
    pps = {int(m.group(2)) if m.group(2) else 0 for m in matches}
    return max(tps) + 1, max(pps) + 1


# --- random-number generators ------------------------------------------------------------------
def get_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "random": random.getstate(),
        "np_random": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["random"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["np_random"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _plain(value):
    """Arguments as plain Python values (so the checkpoint loads with weights_only=True)."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _save_atomic(obj, path: str) -> None:
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def _write_text_atomic(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


# --- save --------------------------------------------------------------------------------------
def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler, args, consumed_samples: int,
                    ranks: dict, dp_group) -> str:
    """Every rank calls this. ``ranks``: ``tp``, ``pp``, ``pp_size``, ``dp`` of this rank. Returns the folder."""
    folder = checkpoint_dir(root, iteration, ranks["tp"], ranks["pp"], ranks["pp_size"])
    distributed_optim = bool(args.use_distributed_optimizer)
    # RNG states of every data-parallel rank, so each resumes its own dropout stream
    rng_states = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(rng_states, get_rng_state(), group=dp_group)

    crash_at = os.environ.get(CRASH_ENV)
    if crash_at is not None and int(crash_at) == iteration and dist.get_rank() >= dist.get_world_size() // 2:
        raise RuntimeError(f"{CRASH_ENV}={crash_at}: simulated crash of rank {dist.get_rank()} "
                           f"in the middle of saving iteration {iteration}")

    if ranks["dp"] == 0:
        os.makedirs(folder, exist_ok=True)
        state = {
            "checkpoint_version": CHECKPOINT_VERSION,
            "iteration": iteration,
            "args": {k: _plain(v) for k, v in vars(args).items()},
            "consumed_train_samples": consumed_samples,
            "opt_param_scheduler": scheduler.state_dict(),
            "rng_state": rng_states,
        }
        if len(model_chunks) == 1:
            state["model"] = model_chunks[0].state_dict()
        else:
            for i, chunk in enumerate(model_chunks):
                state[f"model{i}"] = chunk.state_dict()
        if not distributed_optim:
            state["optimizer"] = optimizer.state_dict()
        _save_atomic(state, os.path.join(folder, "model_optim_rng.pt"))
    if distributed_optim:
        os.makedirs(folder, exist_ok=True)
        _save_atomic(optimizer.state_dict(), os.path.join(folder, f"distrib_optim_dp_rank_{ranks['dp']:03d}.pt"))

    dist.barrier()  # every rank's files are in place ...
    if dist.get_rank() == 0:  # ... only now does `latest` move
        _write_text_atomic(os.path.join(root, TRACKER), str(iteration))
    dist.barrier()
    return folder


# --- load --------------------------------------------------------------------------------------
def load_checkpoint(root: str, model_chunks, optimizer, scheduler, args, ranks: dict) -> tuple[int, int]:
    """Restore from the newest complete checkpoint under ``root``; return ``(iteration, consumed_samples)``.

    ``(0, 0)`` when ``root`` holds no checkpoint yet (a fresh start with ``--load``).
    """
    iteration = read_tracker(root)
    if iteration is None:
        return 0, 0
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    saved_tp, saved_pp = saved_layout(root, iteration)
    if (saved_tp, saved_pp) != (tp, pp):
        raise ValueError(
            f"checkpoint {root} (iteration {iteration}) was saved with tensor-model-parallel-size {saved_tp} and "
            f"pipeline-model-parallel-size {saved_pp}, but this run uses tensor-model-parallel-size {tp} and "
            f"pipeline-model-parallel-size {pp}: resume with the same layout (or convert the checkpoint first)")
    folder = checkpoint_dir(root, iteration, ranks["tp"], ranks["pp"], ranks["pp_size"])
    state = torch.load(os.path.join(folder, "model_optim_rng.pt"), map_location="cpu", weights_only=True)
    saved_dp = state["args"].get("data_parallel_size")
    if args.use_distributed_optimizer and saved_dp != args.data_parallel_size and not args.no_load_optim:
        raise ValueError(f"checkpoint {folder} holds distributed-optimizer shards of data-parallel size {saved_dp}, "
                         f"this run has data-parallel size {args.data_parallel_size} (use --no-load-optim)")

    for i, chunk in enumerate(model_chunks):
        chunk.load_state_dict(state["model"] if len(model_chunks) == 1 else state[f"model{i}"])
    if not args.no_load_optim:
        if args.use_distributed_optimizer:
            path = os.path.join(folder, f"distrib_optim_dp_rank_{ranks['dp']:03d}.pt")
            optimizer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        elif "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        else:
            raise ValueError(f"{folder} holds no optimizer state (saved with --use-distributed-optimizer?); "
                             "pass the same flag or --no-load-optim")
        scheduler.load_state_dict(state["opt_param_scheduler"])
    if hasattr(optimizer, "reload_model_params"):  # ZeRO-1's master slice must follow the loaded weights
        optimizer.reload_model_params()
    if not args.no_load_rng:
        set_rng_state(state["rng_state"][ranks["dp"]])
    return state["iteration"], state["consumed_train_samples"]
