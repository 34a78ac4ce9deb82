"""Run a script under torchrun with a timeout, and print every rank's output in rank order.

The notebooks, ``make course`` and the tests all start multi-process jobs
through :func:`torchrun`. Each rank's stdout and stderr go to their own file
(torchrun's ``--redirects 3``); rank 0's lines are shown while the job runs, the
other ranks' after it ends, so the output of a job is the same every time it
runs. If a rank fails, its stderr is shown and :class:`LaunchError` is raised;
if the job outlives ``timeout``, the whole process group is killed and
:class:`LaunchTimeout` is raised.

Command line (what ``make course`` uses)::

    python -m lessons_pkg.launch --nproc 2 [--timeout 300] src/ch6/column_parallelism_dist.py [args...]
"""
from __future__ import annotations

import argparse
import glob
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field


class LaunchError(RuntimeError):
    """A rank exited with an error; the message holds its stderr."""


class LaunchTimeout(LaunchError):
    """The job ran past its timeout and was killed."""


@dataclass
class LaunchResult:
    nproc: int
    returncode: int
    stdout: list[str] = field(repr=False)  # one string per rank
    stderr: list[str] = field(repr=False)

    @property
    def output(self) -> str:
        """All ranks' stdout, rank 0 first."""
        return "".join(self.stdout)


def _rank_logs(log_dir: str, nproc: int, stream: str) -> list[str]:
    texts = []
    for rank in range(nproc):
        paths = glob.glob(os.path.join(log_dir, "*", "attempt_*", str(rank), f"{stream}.log"))
        text = ""
        if paths:
            with open(sorted(paths)[-1], errors="replace") as f:
                text = f.read()
        texts.append(text)
    return texts


def _prefixed(rank: int, text: str, nproc: int) -> str:
    if nproc == 1:
        return text
    return "".join(f"[rank {rank}] {line}\n" for line in text.splitlines())


def torchrun(
    script: str,
    *args: str,
    nproc_per_node: int = 2,
    timeout: float = 300,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
    echo: bool = True,
    check: bool = True,
) -> LaunchResult:
    """Run ``torchrun --standalone --nproc_per_node N script args`` and wait for it.

    ``echo`` prints the ranks' stdout (rank 0 live, then the others, each line
    prefixed with its rank when N > 1). ``check`` raises :class:`LaunchError`
    when the job fails. Each rank gets ``OMP_NUM_THREADS=1`` unless ``env``
    says otherwise.
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if not os.path.exists(script):
        raise FileNotFoundError(f"no such script: {script}")
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="torchrun-") as log_dir:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}", "--log-dir", log_dir, "--redirects", "3",
            script, *map(str, args),
        ]
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, text=True,
        )
        deadline = time.monotonic() + timeout
        shown = 0  # characters of rank 0's stdout already printed
        timed_out = False
        while proc.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                kill_process_group(proc)
                break
            if echo:
                shown = _echo_new(log_dir, shown, nproc_per_node)
            time.sleep(0.1)
        launcher_output = proc.stdout.read() if proc.stdout else ""
        proc.wait()
        stdout = _rank_logs(log_dir, nproc_per_node, "stdout")
        stderr = _rank_logs(log_dir, nproc_per_node, "stderr")
    if echo:
        _echo_new_text(stdout[0], shown, nproc_per_node)
        for rank in range(1, nproc_per_node):
            print(_prefixed(rank, stdout[rank], nproc_per_node), end="", flush=True)
    result = LaunchResult(nproc_per_node, proc.returncode, stdout, stderr)
    if timed_out:
        raise LaunchTimeout(f"{script} ran past its timeout of {timeout:.0f} s and was killed\n" + _failure_report(result, launcher_output))
    if check and proc.returncode != 0:
        raise LaunchError(f"{script} failed with exit code {proc.returncode}\n" + _failure_report(result, launcher_output))
    return result


def _echo_new(log_dir: str, shown: int, nproc: int) -> int:
    text = _rank_logs(log_dir, 1, "stdout")[0]
    return _echo_new_text(text, shown, nproc)


def _echo_new_text(text: str, shown: int, nproc: int) -> int:
    # print only whole new lines, so a line is never split between two prints
    end = text.rfind("\n") + 1
    if end > shown:
        print(_prefixed(0, text[shown:end], nproc), end="", flush=True)
        return end
    return shown


def kill_process_group(proc: subprocess.Popen) -> None:
    """End ``proc`` and every process it started (it must run in its own session): SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=5)
            return
        except subprocess.TimeoutExpired:
            continue


def _failure_report(result: LaunchResult, launcher_output: str) -> str:
    parts = []
    for rank, err in enumerate(result.stderr):
        if err.strip():
            tail = "\n".join(err.strip().splitlines()[-40:])
            parts.append(f"--- rank {rank} stderr (last lines) ---\n{tail}")
    if not parts:
        parts.append(f"--- torchrun output ---\n{launcher_output.strip()[-4000:]}")
    return "\n".join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; bind to it soon after)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_self(nproc: int, timeout: float = 600) -> None:
    """Make a plain ``python FILE [args]`` a job of ``nproc`` ranks; do nothing under torchrun/srun.

    Called at the top of a demo's ``main()``: when this process is not already
    a rank (no ``RANK`` in its environment), ``nproc == 1`` turns it into rank 0
    of a one-process job and returns; ``nproc > 1`` runs ``FILE args`` under
    :func:`torchrun` (rank-ordered output, timeout, clean-up) and exits with
    the job's status, so the code after the call only ever runs inside a rank.
    """
    if "RANK" in os.environ:
        return
    if nproc < 1:
        raise SystemExit(f"error: --nproc must be >= 1, got {nproc}")
    if nproc == 1:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        return
    script = os.path.abspath(sys.argv[0])
    try:
        torchrun(script, *sys.argv[1:], nproc_per_node=nproc, timeout=timeout)
    except LaunchError as e:
        print(e, file=sys.stderr, flush=True)
        raise SystemExit(124 if isinstance(e, LaunchTimeout) else 1) from None
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) to start")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the job is killed")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    try:
        torchrun(ns.script, *ns.args, nproc_per_node=ns.nproc, timeout=ns.timeout)
    except LaunchError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
