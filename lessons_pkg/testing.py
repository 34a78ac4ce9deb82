"""Run a function on N ranks inside one test, with a timeout.

    results = run_on_ranks(check_column_linear, world_size=4, args=(seed,), timeout=60)

starts ``world_size`` processes, initialises ``torch.distributed`` (gloo, a
file store, so parallel tests never fight over ports) in each, calls
``fn(*args)`` and returns the list of the ranks' return values, rank 0 first.

A rank that raises makes the call raise :class:`RankError` with that rank's
traceback; a rank that is still running after ``timeout`` seconds (a deadlock,
a missing collective on one rank) makes it raise :class:`RankTimeout`. Either
way every process is killed, so a broken test fails in seconds instead of
hanging CI.

One failure is retried, once: gloo's start-up, before ``fn`` runs, failing to
connect its mesh of TCP pairs ("Gloo connectFullMesh failed ... Connection closed
by peer"). It is a rare flake of gloo on a loaded machine, known from PyTorch's own
tests (pytorch/pytorch#53270). It hit one CI run of this project in a test that
passes every other time. The whole job then runs again from the start, with fresh
processes and a fresh store, and a warning names the failure. The results returned
are those of the second run, complete on every rank; nothing of the first is kept.
Any other failure, at start-up or later, is raised as it is.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


class RankError(RuntimeError):
    """A rank raised; the message holds its traceback."""


class RankTimeout(RankError):
    """Some rank did not finish within the timeout."""


class RankStartError(RankError):
    """A rank failed to start: ``init_process_group`` raised, before ``fn`` ran."""


# gloo's own words when its mesh of TCP pairs fails to connect at start-up (the one failure retried)
_GLOO_MESH_FLAKE = "Gloo connectFullMesh failed"


def _start_method() -> str:
    # fork starts a rank in milliseconds (torch is already imported);
    # LESSONS_MP_START=spawn is there for platforms without fork.
    return os.environ.get("LESSONS_MP_START", "fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _rank_main(fn, rank, world_size, store_path, timeout, backend, args, kwargs, results) -> None:
    try:
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1", MASTER_PORT="0", OMP_NUM_THREADS="1",
        )
        torch.set_num_threads(1)
        try:
            dist.init_process_group(
                backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                timeout=timedelta(seconds=timeout),
            )
        except BaseException:  # noqa: BLE001
            results.put((rank, "start-error", traceback.format_exc()))
            return
        value = fn(*args, **kwargs)
        # pickled here, by value: put on the queue as they are, tensors would travel as shared-memory
        # handles (torch registers that with multiprocessing), which the parent cannot open once this rank
        # has exited; and a value that cannot be pickled is reported as this rank's error
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        from lessons_pkg import parallel_state

        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    kwargs: dict | None = None,
    timeout: float = 60,
    backend: str = "gloo",
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results, rank 0 first."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    try:
        return _run_once(fn, world_size, args, kwargs, timeout, backend)
    except RankStartError as first:
        if _GLOO_MESH_FLAKE not in str(first):
            raise
        warnings.warn(f"run_on_ranks: starting again once, after gloo's start-up failed ({first})", stacklevel=2)
        return _run_once(fn, world_size, args, kwargs, timeout, backend)


def _run_once(fn, world_size, args, kwargs, timeout, backend) -> list[Any]:
    ctx = mp.get_context(_start_method())
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="ranks-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [
            ctx.Process(
                target=_rank_main,
                args=(fn, rank, world_size, store, timeout, backend, args, kwargs or {}, results),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=5)


def _collect(procs, results, world_size: int, timeout: float) -> list[Any]:
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    while len(values) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world_size)) - set(values))
            raise RankTimeout(
                f"ranks {missing} of {world_size} did not finish within {timeout:g} s "
                "(a deadlock or a collective that not every rank called?)"
            )
        try:
            rank, status, value = results.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if r not in values and not p.is_alive() and p.exitcode != 0]
            if dead:
                # give a rank that is just now reporting its error a moment to arrive
                try:
                    rank, status, value = results.get(timeout=1.0)
                except queue.Empty:
                    codes = {r: procs[r].exitcode for r in dead}
                    raise RankError(f"ranks {dead} died without reporting (exit codes {codes})") from None
            else:
                continue
        if status == "start-error":
            raise RankStartError(f"rank {rank} of {world_size} failed to start:\n{value}")
        if status == "error":
            raise RankError(f"rank {rank} of {world_size} failed:\n{value}")
        values[rank] = pickle.loads(value)
    return [values[r] for r in range(world_size)]
