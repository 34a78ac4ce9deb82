"""Run a script under torchrun with a timeout, and print every rank's output in rank order.

The notebooks, ``make course`` and the tests all start multi-process jobs
through :func:`torchrun`. Each rank's stdout and stderr go to their own file
(torchrun's ``--redirects 3``); rank 0's lines are shown while the job runs, the
other ranks' after it ends, so the output of a job is the same every time it
runs. If a rank fails, its stderr is shown and :class:`LaunchError` is raised
(a user error, one ``error: ...`` report of :mod:`lessons_pkg.errors`, is shown alone);
if the job outlives ``timeout``, every process of the job is killed and
:class:`LaunchTimeout` is raised. However the call ends (success, failure,
timeout, Ctrl-C), no process it started is left running: torchrun starts each
rank in a session of its own, so killing torchrun's process group is not
enough; every process of a job carries the job's ``LESSONS_LAUNCH_ID`` in its
environment, and the clean-up ends every process that carries it.

Command line (what ``make course`` uses)::

    python -m lessons_pkg.launch --nproc 2 [--timeout 300] src/ch6/column_parallelism_dist.py [args...]
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

LAUNCH_ID_VAR = "LESSONS_LAUNCH_ID"  # set in the environment of every process of one job
USER_ERROR_LINE = re.compile(r"^(?:[\w.-]+: )?error: ")  # lessons_pkg.errors' report, or argparse's


class LaunchError(RuntimeError):
    """A rank exited with an error; the message holds its stderr.

    ``user_error``: the ``error: ...`` lines a rank printed for a user error (see
    :mod:`lessons_pkg.errors`), or None; the message is then those lines alone.
    """

    def __init__(self, message: str, user_error: str | None = None):
        super().__init__(message)
        self.user_error = user_error


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
    preexec_fn=None,
) -> LaunchResult:
    """Run ``torchrun --standalone --nproc_per_node N script args`` and wait for it.

    ``echo`` prints the ranks' stdout (rank 0 live, then the others, each line
    prefixed with its rank when N > 1). ``check`` raises :class:`LaunchError`
    when the job fails. Each rank gets ``OMP_NUM_THREADS=1`` unless ``env``
    says otherwise. ``preexec_fn`` runs in torchrun's process before it starts
    (the tests lower ``RLIMIT_FSIZE`` there: the ranks inherit it, a full disk).
    """
    if nproc_per_node < 1:
        raise ValueError(f"nproc_per_node must be >= 1, got {nproc_per_node}")
    if not os.path.exists(script):
        raise FileNotFoundError(f"no such script: {script}")
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env.update(env or {})
    launch_id = full_env[LAUNCH_ID_VAR] = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="torchrun-") as log_dir:
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc_per_node}", "--log-dir", log_dir, "--redirects", "3",
            script, *map(str, args),
        ]
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True, text=True, preexec_fn=preexec_fn,
        )
        deadline = time.monotonic() + timeout
        shown = 0  # characters of rank 0's stdout already printed
        timed_out = False
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                if echo:
                    shown = _echo_new(log_dir, shown, nproc_per_node)
                time.sleep(0.1)
        finally:  # also on Ctrl-C (KeyboardInterrupt) or any other exception
            end_launch(proc, launch_id)
        launcher_output = proc.stdout.read() if proc.stdout else ""
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
        user_error = user_error_of(result)
        if user_error is not None:  # one rank said what is wrong; the other ranks' logs add nothing
            raise LaunchError(user_error, user_error)
        raise LaunchError(f"{script} failed with exit code {proc.returncode}\n" + _failure_report(result, launcher_output))
    return result


def user_error_of(result: LaunchResult) -> str | None:
    """The report of a user error (:mod:`lessons_pkg.errors`) by the first rank that printed one, or None.

    The report is a line ``error: ...`` (or argparse's ``prog: error: ...``) with the indented lines that
    continue it; no traceback may follow it in that rank's stderr (a crash is not a user error).
    """
    for err in result.stderr:
        lines = err.rstrip("\n").splitlines()
        starts = [i for i, line in enumerate(lines) if USER_ERROR_LINE.match(line)]
        if starts and not any(line.startswith("Traceback") for line in lines[starts[-1]:]):
            end = starts[-1] + 1
            while end < len(lines) and lines[end].startswith("  "):
                end += 1
            return "\n".join(lines[starts[-1]:end])
    return None


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


def processes_of_launch(launch_id: str) -> list:
    """The running processes whose environment holds ``LESSONS_LAUNCH_ID=launch_id``."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(LAUNCH_ID_VAR) == launch_id:
                found.append(p)
        except (psutil.Error, OSError):  # gone, a zombie, or not ours to read
            continue
    return found


def end_launch(proc: subprocess.Popen, launch_id: str, grace: float = 3.0) -> None:
    """End ``proc`` (started in its own session) and every process of the launch ``launch_id``.

    SIGTERM first, so torchrun can stop its ranks; whatever is still alive
    ``grace`` seconds later (a rank that ignores SIGTERM, a rank torchrun
    started in a session of its own) gets SIGKILL. Returns when all are gone.
    """
    import psutil

    def signal_all(sig):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        procs = processes_of_launch(launch_id)
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        return procs

    if proc.poll() is None:
        signal_all(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    left = signal_all(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(left, timeout=10)


def kill_process_group(proc: subprocess.Popen) -> None:
    """End ``proc`` and every process in its process group (it must run in its own session): SIGTERM, then SIGKILL."""
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
    elif "Root Cause" in launcher_output:
        # which rank failed first, with its exit code or signal: a rank killed by a signal (the kernel's
        # OOM killer, a segfault) writes nothing to its stderr, and the others then die of torchrun's SIGTERM
        root = launcher_output[launcher_output.index("Root Cause"):].strip()
        parts.append(f"--- torchrun: the first rank to fail ---\n{root[:1500]}")
    return "\n".join(parts)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it; bind to it soon after)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch_self(nproc: int, timeout: float = 600, argv: list[str] | None = None) -> None:
    """Make a plain ``python FILE [args]`` a job of ``nproc`` ranks; do nothing under torchrun/srun.

    Called at the top of a demo's ``main()``: when this process is not already
    a rank (no ``RANK`` in its environment), ``nproc == 1`` turns it into rank 0
    of a one-process job and returns; ``nproc > 1`` runs ``FILE args`` under
    :func:`torchrun` (rank-ordered output, timeout, clean-up) and exits with
    the job's status, so the code after the call only ever runs inside a rank.
    ``argv`` (default ``sys.argv[1:]``) are the arguments each rank gets.
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
        torchrun(script, *(sys.argv[1:] if argv is None else argv), nproc_per_node=nproc, timeout=timeout)
    except LaunchError as e:
        print(e, file=sys.stderr, flush=True)
        raise SystemExit(124 if isinstance(e, LaunchTimeout) else 2 if e.user_error else 1) from None
    raise SystemExit(0)


def accept_local_rank(parser: argparse.ArgumentParser) -> None:
    """Accept ``--local-rank N`` (``--local_rank N``), which ``python -m torch.distributed.launch`` appends to each
    rank's command line unless given ``--use-env``; the rank reads ``LOCAL_RANK`` from its environment instead,
    as torchrun sets it (Megatron-LM accepts the flag the same way)."""
    if any("--local-rank" in action.option_strings for action in parser._actions):
        return
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def add_nproc_argument(parser: argparse.ArgumentParser, default: int) -> None:
    """Give a demo's parser ``--nproc N``: the ranks a plain ``python FILE`` starts (``default``: the lesson's),
    and accept the ``--local-rank`` that ``torch.distributed.launch`` passes (see :func:`accept_local_rank`)."""
    accept_local_rank(parser)
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help=f"ranks to start when run with plain python (default {default}); under "
                             "torchrun/srun the launcher decides, and --nproc, if given, must match it")
    parser.set_defaults(nproc_default=default)


def start_ranks(args: argparse.Namespace, timeout: float = 600) -> None:
    """:func:`launch_self` with ``args.nproc`` (or the parser's default); an ``--nproc`` that contradicts torchrun is an error."""
    if "RANK" in os.environ and args.nproc is not None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if args.nproc != world:
            raise SystemExit(f"error: --nproc {args.nproc} asked for, but this job was started with "
                             f"WORLD_SIZE {world} ranks by its launcher; drop --nproc or make them equal")
    # the ranks do not get --nproc: torchrun itself would reject it (ambiguous with its --nproc-per-node)
    argv, rest = [], iter(sys.argv[1:])
    for arg in rest:
        if arg == "--nproc":
            next(rest, None)
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    launch_self(args.nproc if args.nproc is not None else args.nproc_default, timeout, argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) to start")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before the job is killed")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    try:
        torchrun(ns.script, *ns.args, nproc_per_node=ns.nproc, timeout=ns.timeout)
    except (ValueError, FileNotFoundError) as e:  # a bad --nproc or script: nothing was started
        print(f"error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:
        print(e, file=sys.stderr)
        return 2 if e.user_error else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
