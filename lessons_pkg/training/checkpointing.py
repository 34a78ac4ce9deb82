"""Checkpoints in Megatron-LM's layout and format, written so that a crash never leaves a broken ``latest``.

::

    <save>/latest_checkpointed_iteration.txt         "200": the newest COMPLETE checkpoint
    <save>/vocab.json, merges.txt                     the tokenizer (copied once), so the folder is self-contained
    <save>/iter_0000200/mp_rank_00/model_optim_rng.pt           PP = 1: one folder per tensor rank
    <save>/iter_0000200/mp_rank_01_003/model_optim_rng.pt       PP > 1: mp_rank_{tp:02d}_{pp:03d}
    <save>/iter_0000200/mp_rank_01_003/distrib_optim_dp_rank_002.pt   with --use-distributed-optimizer

``model_optim_rng.pt`` (written by data-parallel rank 0 of each (tensor,
pipeline) position) is Megatron-LM's legacy GPT file, so Megatron's tools read
it (see :mod:`lessons_pkg.checkpoint.megatron_format` for the tree):
``model`` (``model0``, ``model1``... for interleaved chunks) -> ``language_model``
-> ``embedding`` / ``encoder``, ``word_embeddings_for_head`` on a last stage,
``checkpoint_version`` 3.0, ``iteration``, ``args`` (an ``argparse.Namespace``
of Megatron's argument names, with ``padded_vocab_size`` and our
``true_vocab_size``), ``optimizer`` (plain optimizer; ``--no-save-optim``
leaves it out), ``opt_param_scheduler``, ``consumed_train_samples`` and
``rng_state`` (one entry per data-parallel rank; ``--no-save-rng`` leaves it
out). With the distributed optimizer, every data-parallel rank writes its own
slice of the Adam state to ``distrib_optim_dp_rank_XXX.pt``.

Atomicity, power loss included: every file is written to ``<name>.tmp``,
flushed to disk (``fsync``), renamed (atomic), and its folder is fsynced so the
rename itself is durable; ``latest_checkpointed_iteration.txt`` is rewritten
the same way by global rank 0 only after a barrier, i.e. after EVERY rank's
files are durable. A crash mid-save leaves a partial ``iter_XXXXXXX`` folder
that nothing points to; ``--load`` resumes from the previous complete one.
A write that fails (a full disk, a read-only folder) is not a crash: every rank
learns of it (the barrier before the tracker moves is an all-gather of each
rank's outcome), rank 0 removes this save's ``iter_XXXXXXX`` folder, the
tracker keeps naming the last complete iteration, and the ranks raise
:class:`~lessons_pkg.errors.OutputError` naming the folder and the reason
(printed once). Any other failure while saving takes the same path, except
that the rank that met it raises it as it is (a bug shows its traceback).

Loading (:func:`load_checkpoint`) accepts a checkpoint of ANY layout: the same
layout loads its own files; any other tensor/pipeline/virtual/data-parallel
layout is resharded on the fly by :mod:`lessons_pkg.checkpoint.reshard`
(weights and Adam state), exactly as ``src/ch6/checkpoint_util.py`` would
convert it first. Files load with ``torch.load(weights_only=True)`` and an
explicit allowlist (:data:`lessons_pkg.checkpoint.megatron_format.SAFE_GLOBALS`).
"""
from __future__ import annotations

import os
import random
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist

from lessons_pkg.checkpoint import megatron_format as mf
from lessons_pkg.checkpoint.layout import (TRACKER, checkpoint_dir, find_checkpoint, iteration_dirname, mp_rank_dirname,
                                          read_tracker)
from lessons_pkg.errors import CheckpointError, OutputError, UserError, describe, output_error
from lessons_pkg.tensor_parallel.random import get_model_parallel_rng_state, set_model_parallel_rng_state
from lessons_pkg.utils import print_rank_0

__all__ = ["KILL_DURING_SAVE_ENV", "TRACKER", "checkpoint_dir", "get_rng_state", "load_checkpoint",
           "mp_rank_dirname", "read_tracker", "save_checkpoint", "set_rng_state", "save_atomic", "write_text_atomic"]

# Fault injection for the tests (see tests/training): at the save of this iteration the last rank
# SIGKILLs itself once its own files are written, before any rank may move the tracker.
KILL_DURING_SAVE_ENV = "LESSONS_KILL_DURING_SAVE_AT_ITER"


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
    model_parallel = get_model_parallel_rng_state()   # the per-tensor-rank stream (sequence-parallel dropout)
    if model_parallel is not None:
        state["model_parallel"] = model_parallel
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["random"]
    random.setstate((version, tuple(keys), gauss))
    name, keys, pos, has_gauss, cached = state["np_random"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "model_parallel" in state:
        set_model_parallel_rng_state(state["model_parallel"])


# --- durable, atomic writes ---------------------------------------------------------------------
def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RecordingWriter:
    """The file ``torch.save`` writes through, keeping the ``OSError`` of a failed write.

    ``torch.save`` turns a failed write (``ENOSPC``, ``EFBIG``) into ``RuntimeError: ... unexpected
    pos``; this keeps the real reason so it can be reported.
    """

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _write_atomic(path: str, write, mode: str) -> None:
    """``write(f)`` into ``path.tmp``, fsync it, rename it to ``path``, fsync the folder (the rename is durable).

    A failed write leaves no ``path.tmp`` and raises :class:`OutputError` naming ``path`` and the reason.
    """
    try:
        with open(path + ".tmp", mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        _fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        _remove(path + ".tmp")
        raise output_error(path, e) from None
    except BaseException:  # anything else (a pickling error, Ctrl-C): no half-written file either
        _remove(path + ".tmp")
        raise


def save_atomic(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path``, atomically and durably (see :func:`_write_atomic`)."""
    def write(f):
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is None:
                raise
            raise writer.error from None

    _write_atomic(path, write, "wb")


def write_text_atomic(path: str, text: str) -> None:
    _write_atomic(path, lambda f: f.write(text), "w")


def copy_tokenizer_files(args, root: str) -> None:
    """Copy ``--vocab-file``/``--merge-file`` into the checkpoint folder once (atomically), if they exist."""
    for src, name in ((getattr(args, "vocab_file", None), "vocab.json"), (getattr(args, "merge_file", None),
                                                                            "merges.txt")):
        dst = os.path.join(root, name)
        if src and os.path.isfile(src) and not os.path.exists(dst):
            try:
                shutil.copyfile(src, dst + ".tmp")
                os.replace(dst + ".tmp", dst)
            except OSError as e:
                _remove(dst + ".tmp")
                raise output_error(dst, e) from None


# --- save --------------------------------------------------------------------------------------
def checkpoint_args(args, model_chunks, consumed_samples: int, iteration: int):
    """The ``args`` Namespace a checkpoint stores: Megatron's names, the padded and the true vocabulary."""
    first = model_chunks[0]
    return mf.megatron_args(args, padded_vocab_size=first.padded_vocab_size, true_vocab_size=first.config.vocab_size,
                            consumed_train_samples=consumed_samples, iteration=iteration,
                            virtual_pipeline_model_parallel_size=len(model_chunks) if len(model_chunks) > 1 else None)


def save_checkpoint(root: str, iteration: int, model_chunks, optimizer, scheduler, args, consumed_samples: int,
                    ranks: dict, dp_group) -> str:
    """Every rank calls this. ``ranks``: ``tp``, ``pp``, ``pp_size``, ``dp`` of this rank; ``dp_group``: the
    ranks that hold the same model shard (data x context parallel), ``dp`` this rank's place among them
    (the one at 0 writes the model file). Returns the folder."""
    folder = checkpoint_dir(root, iteration, ranks["tp"], ranks["pp"], ranks["pp_size"])
    distributed_optim = bool(args.use_distributed_optimizer)
    save_optim, save_rng = not getattr(args, "no_save_optim", False), not getattr(args, "no_save_rng", False)
    # RNG states of every data-parallel rank, so each resumes its own dropout stream
    rng_states = [None] * dist.get_world_size(dp_group)
    if save_rng:
        dist.all_gather_object(rng_states, get_rng_state(), group=dp_group)

    error, failure = None, None  # this rank's failed write, if any, and its exception
    try:
        if ranks["dp"] == 0:
            os.makedirs(folder, exist_ok=True)
            state = {
                "checkpoint_version": mf.CHECKPOINT_VERSION,
                "iteration": iteration,
                "args": checkpoint_args(args, model_chunks, consumed_samples, iteration),
                "consumed_train_samples": consumed_samples,
            }
            for i, chunk in enumerate(model_chunks):
                state["model" if len(model_chunks) == 1 else f"model{i}"] = mf.to_megatron(chunk.state_dict())
            if save_optim:
                state["opt_param_scheduler"] = scheduler.state_dict()
                if not distributed_optim:
                    state["optimizer"] = optimizer.state_dict()
            if save_rng:
                state["rng_state"] = rng_states
            save_atomic(state, os.path.join(folder, "model_optim_rng.pt"))
        if distributed_optim and save_optim:
            os.makedirs(folder, exist_ok=True)
            save_atomic(optimizer.state_dict(), os.path.join(folder, f"distrib_optim_dp_rank_{ranks['dp']:03d}.pt"))
    except Exception as e:  # every rank must hear of it, or the others wait in the all-gather below
        failure = e
        if isinstance(e, OSError):  # a full disk, a read-only folder, a file where a folder goes
            error = describe(e)
        else:
            error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
    if os.environ.get(KILL_DURING_SAVE_ENV) == str(iteration) and dist.get_rank() == dist.get_world_size() - 1:
        os.kill(os.getpid(), signal.SIGKILL)  # the tests' kill -9 between the shard writes and the tracker move

    # every rank's files are in place and on disk (or some rank's write failed: all ranks learn which)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    error = next((e for e in errors if e is not None), None)
    if error is None and dist.get_rank() == 0:  # ... only now does `latest` move
        try:
            _fsync_dir(os.path.dirname(folder))
            copy_tokenizer_files(args, root)
            write_text_atomic(os.path.join(root, TRACKER), str(iteration))
        except (OSError, UserError) as e:
            error = describe(e)
    outcome = [error]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        _fail_save(root, iteration, outcome[0], failure if failure is not None and describe(failure) is None else None)
    return folder


def _fail_save(root: str, iteration: int, error: str, bug: Exception | None) -> None:
    """Remove the iteration's folder (rank 0, once every rank has stopped writing) unless the tracker names it,
    then raise on every rank: the bug itself on the rank that met one, a UserError naming the folder elsewhere."""
    last = read_tracker(root)
    folder = os.path.join(root, iteration_dirname(iteration))
    if dist.get_rank() == 0 and last != iteration:
        shutil.rmtree(folder, ignore_errors=True)
    dist.barrier()
    if bug is not None:
        raise bug
    if last == iteration:  # an earlier complete save of the same iteration, named by the tracker: kept
        left = f"{folder}, which {TRACKER} names, is kept (some of its files may be this save's)"
    else:
        gone = "is gone" if not os.path.exists(folder) else "could not be removed"
        kept = f"{TRACKER} still names iteration {last}" if last is not None else f"there is no {TRACKER} yet"
        left = f"this save's {folder} {gone} and {kept}"
    raise OutputError(f"could not save iteration {iteration} to {root}: {error}; {left}")


# --- load --------------------------------------------------------------------------------------
def _can_read_own_files(files, state: dict, args, model_chunks, ranks: dict, no_optim: bool) -> bool:
    """True when this rank can load its own files as they are (no resharding needed)."""
    if (files.tp, files.pp) != (args.tensor_model_parallel_size, args.pipeline_model_parallel_size):
        return False
    if len(mf.model_keys(state)) != len(model_chunks):
        return False
    if no_optim:
        return True
    plain = isinstance(state.get("optimizer"), dict)
    zero = bool(files.zero_files(ranks["tp"], ranks["pp"]))
    saved = state["args"]
    if getattr(saved, "padded_vocab_size", None) not in (None, model_chunks[0].padded_vocab_size):
        return False  # another padding (e.g. another make_vocab_size_divisible_by): fit the embedding rows
    same_dp = _replicas(saved) == _replicas(args)
    if args.use_distributed_optimizer:  # ZeRO-1 reads its own slice (same DP) or cuts it from the plain form
        return (zero and same_dp) or plain
    return plain or not zero


def _replicas(args) -> int | None:
    """Ranks holding one copy of each model shard: data x context parallel (ZeRO-1 shards and RNG states
    are kept per such rank)."""
    dp = getattr(args, "data_parallel_size", None)
    return None if dp is None else dp * (getattr(args, "context_parallel_size", None) or 1)


def _check_model_args(saved, config, where: str) -> None:
    """The checkpoint's model must be this run's model: name every size that differs."""
    if saved is None:
        return
    mine = dict(num_layers=config.num_layers, hidden_size=config.hidden_size,
                num_attention_heads=config.num_attention_heads, max_position_embeddings=config.max_position_embeddings,
                true_vocab_size=config.vocab_size, orig_vocab_size=config.vocab_size)
    diffs = [f"{k} {getattr(saved, k)} (this run: {v})" for k, v in mine.items()
             if getattr(saved, k, None) is not None and getattr(saved, k) != v]
    gelu = mf.gelu_approximate(saved)
    if gelu != config.gelu_approximate:
        flag = "without --no-bias-gelu-fusion" if gelu == "tanh" else "with --no-bias-gelu-fusion"
        diffs.append(f"GeLU approximate={gelu!r} (this run: {config.gelu_approximate!r}; run {flag})")
    if diffs:
        raise CheckpointError(f"{where} holds another model than this run builds: " + ", ".join(diffs))


def load_checkpoint(root: str, model_chunks, optimizer, scheduler, args, ranks: dict) -> tuple[int, int]:
    """Restore from the newest complete checkpoint under ``root``; return ``(iteration, consumed_samples)``.

    ``(0, 0)`` when ``root`` holds no checkpoint yet (a fresh start with ``--load``).
    A checkpoint of another layout is resharded for this rank on the fly.
    ``--finetune`` (and a ``release`` checkpoint) loads the weights only and starts at iteration 0.
    """
    if read_tracker(root) is None:
        return 0, 0
    files = find_checkpoint(root)
    finetune = getattr(args, "finetune", False) or files.iteration is None
    no_optim = args.no_load_optim or finetune
    where = files.model_file(ranks["tp"] % files.tp, ranks["pp"] % files.pp)
    state = mf.safe_load(where)
    state["args"] = mf.read_args(state.get("args", {}), where)
    if _can_read_own_files(files, state, args, model_chunks, ranks, no_optim):
        zero_file = os.path.join(files.rank_dir(ranks["tp"], ranks["pp"]), f"distrib_optim_dp_rank_{ranks['dp']:03d}.pt")
        optim_state = state.get("optimizer")
        if args.use_distributed_optimizer and optim_state is None and os.path.exists(zero_file):
            optim_state = mf.safe_load(zero_file)
    else:
        from lessons_pkg.checkpoint.reshard import Layout, SourceCheckpoint, build_rank_state

        from lessons_pkg.checkpoint.reshard import VocabHints

        config = model_chunks[0].config
        src = SourceCheckpoint.open(root, VocabHints(tokenizer_size=config.vocab_size,
                                                     tokenizer_source="this run's vocabulary"))
        target = Layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, len(model_chunks))
        print_rank_0(f" > resharding checkpoint {root} (TP={files.tp} x PP={files.pp} x {src.layout.vp} chunks) "
                     f"to TP={target.tp} x PP={target.pp} x {target.vp} chunks while loading")
        state = build_rank_state(src, target, ranks["tp"], ranks["pp"], with_optim=not no_optim,
                                 padded_vocab_size=model_chunks[0].padded_vocab_size)
        optim_state = state.get("optimizer")

    _check_model_args(state.get("args"), model_chunks[0].config, files.model_file(0, 0))
    version = float(state.get("checkpoint_version", 0.0))
    heads = model_chunks[0].config.num_attention_heads // model_chunks[0].tp_size
    for chunk, key in zip(model_chunks, mf.model_keys(state)):
        stage = mf.from_megatron(state[key], version, heads)
        if mf.HEAD in stage and chunk.post_process and chunk.pre_process:
            # transformers' converter writes the head's copy of the tied embedding even at PP=1, where the
            # model uses the embedding itself: the copy must be that embedding
            if mf.WORD in stage and not torch.equal(stage.pop(mf.HEAD), stage[mf.WORD]):
                raise CheckpointError(f"{where}: word_embeddings_for_head differs from the word embedding: the output "
                                 "layer is not tied to the input embedding, which ParallelGPT requires")
        chunk.load_state_dict(stage)
    if hasattr(optimizer, "reload_model_params"):  # ZeRO-1's master slice must follow the loaded weights
        optimizer.reload_model_params()
    if finetune:
        print_rank_0(" > --finetune (or a release checkpoint): weights only, starting at iteration 0")
        return 0, 0
    if not no_optim:
        if optim_state is None:
            raise CheckpointError(f"{files.folder} holds no optimizer state (saved with --no-save-optim?): "
                             "pass --no-load-optim (or --finetune) to load the weights only")
        optimizer.load_state_dict(optim_state)
        if "opt_param_scheduler" in state:
            scheduler.load_state_dict(state["opt_param_scheduler"])
    if not args.no_load_rng:
        rng = state.get("rng_state")
        if rng and len(rng) == _replicas(args) and isinstance(rng[ranks["dp"]], dict) and "torch" in rng[ranks["dp"]]:
            set_rng_state(rng[ranks["dp"]])
        else:
            saved = "none saved" if not rng else (f"{len(rng)} saved, this run has {_replicas(args)} data x "
                                                  "context-parallel ranks")
            print_rank_0(f" > random-number generators not restored ({saved}): they continue from --seed")
    consumed = state.get("consumed_train_samples", getattr(state.get("args"), "consumed_train_samples", 0) or 0)
    return int(state["iteration"]), int(consumed)
