"""Run the course's command-line tools many times, cheaply: ``python FILE args`` in a forked child.

Started once by tests/foundation/test_bad_inputs.py. It imports what the tools
import (torch, transformers, lessons_pkg) once, then for each request read
from stdin (one JSON object per line: ``tool``, ``argv``, ``env``, ``cwd``,
``fsize``, ``timeout``) forks a child that runs the tool as ``python FILE
args`` would (``runpy.run_path(FILE, run_name="__main__")``; the differences:
the modules below are imported already, so an ``env`` value read at import
time is not seen, and the child ends with ``os._exit``, skipping atexit handlers;
its stdout and stderr in files, a fresh session, ``RLIMIT_FSIZE`` lowered to
``fsize`` bytes when given: writes past it fail with ``EFBIG``, as on a full
disk). It answers one JSON line: ``status`` (the exit status Python would
give), ``stdout``, ``stderr``, ``seconds``, ``timed_out``. Tools that start
ranks start them for real (torchrun), from the child; every process a case
started carries ``LESSONS_BAD_INPUT_CASE`` in its environment and is killed
when the case ends.
"""
from __future__ import annotations

import faulthandler
import json
import os
import resource
import signal
import sys
import tempfile
import time
import traceback
import uuid

CASE_VAR = "LESSONS_BAD_INPUT_CASE"


def preload() -> None:
    import numpy  # noqa: F401
    import torch  # noqa: F401
    import torch.distributed  # noqa: F401
    import transformers  # noqa: F401
    from transformers import GPT2LMHeadModel, GPT2TokenizerFast  # noqa: F401

    import lessons_pkg.checkpoint.convert  # noqa: F401
    import lessons_pkg.data  # noqa: F401
    import lessons_pkg.inference  # noqa: F401
    import lessons_pkg.launch  # noqa: F401
    import lessons_pkg.training.train  # noqa: F401


def run_child(request: dict, out_path: str, err_path: str) -> None:
    """In the forked child: become ``python FILE args`` and exit as it would."""
    os.setsid()
    for fd, path in ((1, out_path), (2, err_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    os.environ.update(request.get("env") or {})
    os.chdir(request.get("cwd") or os.getcwd())
    if request.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (request["fsize"], request["fsize"]))
    # a case that hangs shows where: every thread's stack on its stderr shortly before it is killed
    faulthandler.dump_traceback_later(max(request.get("timeout", 120) - 5, 1), exit=False)
    sys.argv = [request["tool"], *request["argv"]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(request["tool"])))
    status = 0
    try:
        import runpy

        runpy.run_path(request["tool"], run_name="__main__")
    except SystemExit as e:  # what the interpreter does with it
        if e.code is None:
            status = 0
        elif isinstance(e.code, int):
            status = e.code
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(status)


def end_case(case_id: str, pid: int | None) -> None:
    """Kill the case's child (``pid``: its session) and every process that carries the case's marker."""
    import psutil

    if pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    left = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(CASE_VAR) == case_id:
                p.kill()
                left.append(p)
        except (psutil.Error, OSError):
            continue
    psutil.wait_procs(left, timeout=10)


def serve() -> None:
    preload()
    with tempfile.TemporaryDirectory(prefix="tool-runner-") as out_dir:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            answer(json.loads(line), out_dir)


def answer(request: dict, out_dir: str) -> None:
    """Run one request in a forked child and print its outcome as one JSON line."""
    case_id = uuid.uuid4().hex
    request.setdefault("env", {})[CASE_VAR] = case_id
    out_path, err_path = os.path.join(out_dir, "stdout"), os.path.join(out_dir, "stderr")
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        run_child(request, out_path, err_path)
    deadline = start + request.get("timeout", 120)
    timed_out, status = False, None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
        elif time.monotonic() > deadline:
            timed_out = True
            end_case(case_id, pid)
            status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        else:
            time.sleep(0.02)
    if not timed_out:
        end_case(case_id, None)  # nothing a case started outlives it
    with open(out_path, errors="replace") as f:
        stdout = f.read()
    with open(err_path, errors="replace") as f:
        stderr = f.read()
    print(json.dumps({"status": status, "stdout": stdout, "stderr": stderr, "timed_out": timed_out,
                      "seconds": round(time.monotonic() - start, 2)}), flush=True)


if __name__ == "__main__":
    serve()
