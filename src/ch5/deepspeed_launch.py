"""Run a script under the ``deepspeed`` launcher with a timeout (what the notebook, tests and ``make course`` use).

    out = deepspeed_launch("src/ch5/pipe_dream.py", "--steps", "20", num_gpus=2, timeout=300)

runs ``deepspeed --num_gpus 2 --master_port <free port> src/ch5/pipe_dream.py --steps 20``
in its own process group and shows its output as it comes. Without CUDA it sets ``DS_ACCELERATOR=cpu``: the
launcher then starts ``num_gpus`` CPU processes and DeepSpeed talks gloo
between them. Every rank's stdout arrives on the launcher's stdout (in the
demos only rank 0 prints). If the job fails, :class:`DeepSpeedLaunchError`
carries the tail of its output; if it runs past ``timeout``, every process of
the job is killed first. However the call ends (Ctrl-C included), no process it
started is left running (the same clean-up as :func:`lessons_pkg.launch.torchrun`).

On a CPU machine DeepSpeed would compile a shared-memory all-reduce for inference
when it initialises (a minute or two per environment); ``pipe_dream.py`` skips that
build, which its training never needs.

Command line::

    python src/ch5/deepspeed_launch.py --num_gpus 2 --timeout 600 src/ch5/pipe_dream.py [args...]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import uuid

import torch

from lessons_pkg.launch import LAUNCH_ID_VAR, end_launch, free_port

# the launcher's own log lines: "[2026-01-01 12:00:00,000] [INFO] [launch.py:...] ..."
_LAUNCHER_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\] \[(INFO|WARNING)\] \[(runner|launch)\.py")


class DeepSpeedLaunchError(RuntimeError):
    """The job failed or timed out; the message holds the tail of its output."""


def _deepspeed_command() -> str:
    beside_python = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    found = beside_python if os.path.exists(beside_python) else shutil.which("deepspeed")
    if not found:
        raise FileNotFoundError("the `deepspeed` launcher is not installed (pip install deepspeed)")
    return found


def deepspeed_launch(script: str, *args: str, num_gpus: int = 2, timeout: float = 600,
                     echo: bool = True) -> str:
    """Run ``deepspeed --num_gpus num_gpus script args`` and return its stdout (launcher log lines removed)."""
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if not os.path.exists(script):
        raise FileNotFoundError(f"no such script: {script}")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    launch_id = env[LAUNCH_ID_VAR] = uuid.uuid4().hex  # every process of the job inherits it
    env.setdefault("OMP_NUM_THREADS", "1")
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    cmd = [_deepspeed_command(), "--num_gpus", str(num_gpus), "--master_port", str(free_port()), script, *map(str, args)]
    with tempfile.TemporaryFile("w+") as stderr_file:  # a file, so a chatty stderr cannot block the job
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=stderr_file, text=True,
                                start_new_session=True)
        killed = threading.Event()
        # a daemon timer: it never keeps Python alive after Ctrl-C
        timer = threading.Timer(timeout, lambda: (killed.set(), end_launch(proc, launch_id)))
        timer.daemon = True
        timer.start()
        kept = []
        try:
            for line in proc.stdout:  # every rank's stdout, shown as it comes
                if not _LAUNCHER_LOG.match(line):
                    kept.append(line)
                    if echo:
                        print(line, end="", flush=True)
            proc.wait()
        finally:  # also on Ctrl-C: nothing of the job outlives the call
            timer.cancel()
            end_launch(proc, launch_id)
        stderr_file.seek(0)
        stderr = stderr_file.read()
    output = "".join(kept)
    if killed.is_set():
        raise DeepSpeedLaunchError(f"{' '.join(cmd)} ran past its timeout of {timeout:g} s and was killed\n"
                                   + _tail(output, stderr))
    if proc.returncode != 0:
        raise DeepSpeedLaunchError(f"{' '.join(cmd)} failed with exit code {proc.returncode}\n" + _tail(output, stderr))
    return output


def _tail(stdout: str, stderr: str, lines: int = 40) -> str:
    return ("--- stdout (last lines) ---\n" + "\n".join(stdout.strip().splitlines()[-lines:])
            + "\n--- stderr (last lines) ---\n" + "\n".join(stderr.strip().splitlines()[-lines:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_gpus", type=int, default=2, help="processes (pipeline stages) to start")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    try:
        deepspeed_launch(ns.script, *ns.args, num_gpus=ns.num_gpus, timeout=ns.timeout)
    except (ValueError, FileNotFoundError) as e:  # a bad --num_gpus, script or installation: nothing started
        print(f"error: {e}", file=sys.stderr)
        return 2
    except DeepSpeedLaunchError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
