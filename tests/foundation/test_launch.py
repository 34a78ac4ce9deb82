"""The torchrun launcher used by notebooks, `make course` and tests: ordered output, errors, timeouts, clean-up."""
import os
import signal
import time

import psutil
import pytest

from lessons_pkg.launch import LaunchError, LaunchTimeout, torchrun

SCRIPT = """
import os, signal, sys, time
rank = int(os.environ["RANK"])
print(f"hello from rank {rank} of {os.environ['WORLD_SIZE']}")
mode = sys.argv[1]
if mode == "fail" and rank == 1:
    raise ValueError("deliberate failure on rank 1")
if mode == "killed":
    said = os.path.join(sys.argv[2], "rank0-said")
    if rank == 1:
        while not os.path.exists(said):        # rank 0's stderr line first, so the report has one
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)   # then die silently, as under the OOM killer
    print("rank 0 waits", file=sys.stderr, flush=True)
    open(said, "w").close()
    time.sleep(300)                            # ended by torchrun once rank 1 is gone
if mode == "hang":
    # a rank that ignores SIGTERM, so only SIGKILL ends it; it says who it is first
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(os.path.join(sys.argv[2], f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "job.py"
    path.write_text(SCRIPT)
    return str(path)


def test_output_is_in_rank_order(script, capsys):
    result = torchrun(script, "ok", nproc_per_node=3, timeout=120)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"[rank {r}] hello from rank {r} of 3" for r in range(3)]
    assert result.returncode == 0 and result.stdout[2] == "hello from rank 2 of 3\n"


def test_failing_rank_error_is_shown(script):
    with pytest.raises(LaunchError) as info:
        torchrun(script, "fail", nproc_per_node=2, timeout=120, echo=False)
    assert "rank 1 stderr" in str(info.value)
    assert "deliberate failure on rank 1" in str(info.value)


def test_a_rank_killed_by_a_signal_is_named_even_when_others_wrote_stderr(script, tmp_path):
    """Rank 1 leaves no stderr (SIGKILL); rank 0 wrote some: the report still says rank 1 failed first, and how."""
    start = time.monotonic()
    with pytest.raises(LaunchError) as info:
        torchrun(script, "killed", str(tmp_path), nproc_per_node=2, timeout=120, echo=False)
    message = str(info.value)
    assert "rank 0 stderr" in message and "rank 0 waits" in message
    assert "the first rank to fail" in message, message
    first = message.split("the first rank to fail")[1]
    assert "rank      : 1" in first and ("SIGKILL" in first or "-9" in first), first
    assert time.monotonic() - start < 100    # torchrun ended rank 0 (else its 300 s sleep, past the 120 s timeout)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _rank_pids(folder, nproc):
    return [int((folder / f"pid{r}").read_text()) for r in range(nproc) if (folder / f"pid{r}").exists()]


@pytest.fixture
def known_launch_id(monkeypatch):
    """The launch's marker, known in advance: every process of the job carries it in its environment."""
    import uuid

    from lessons_pkg import launch

    marker = uuid.uuid4()
    monkeypatch.setattr(launch.uuid, "uuid4", lambda: marker)
    return marker.hex


def test_hung_job_is_killed_at_its_timeout_and_leaves_no_process(script, tmp_path, known_launch_id):
    # torchrun starts each rank in a session of its own and these ranks ignore
    # SIGTERM: the call must still return with every process of the job gone
    from lessons_pkg.launch import processes_of_launch

    seen = []  # processes_of_launch while the job runs: the finder must see it (else "none left" proves nothing)

    def look(signum, frame):
        seen.append(len(processes_of_launch(known_launch_id)))
        signal.setitimer(signal.ITIMER_REAL, 0.5)

    previous = signal.signal(signal.SIGALRM, look)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    start = time.monotonic()
    try:
        with pytest.raises(LaunchTimeout, match="ran past its timeout of 10 s"):
            torchrun(script, "hang", str(tmp_path), nproc_per_node=2, timeout=10, echo=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - start < 40
    assert max(seen, default=0) >= 1, f"the launch's processes were never found while it ran: {seen}"
    assert processes_of_launch(known_launch_id) == []
    pids = _rank_pids(tmp_path, 2)  # the ranks that had started (on a loaded machine torchrun may be slow)
    assert [p for p in pids if _alive(p)] == []


def test_interrupted_launch_leaves_no_process(script, tmp_path, known_launch_id):
    """Ctrl-C (KeyboardInterrupt) while the ranks run: the call re-raises it and no rank survives."""
    from lessons_pkg.launch import processes_of_launch

    seen = []

    def interrupt_once_ranks_run(signum, frame):
        if all((tmp_path / f"pid{r}").exists() for r in range(2)):
            seen.append(len(processes_of_launch(known_launch_id)))  # torchrun and both ranks, at least
            raise KeyboardInterrupt
        signal.setitimer(signal.ITIMER_REAL, 0.2)

    previous = signal.signal(signal.SIGALRM, interrupt_once_ranks_run)
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt):
            torchrun(script, "hang", str(tmp_path), nproc_per_node=2, timeout=120, echo=False)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert len(_rank_pids(tmp_path, 2)) == 2  # both ranks were running when Ctrl-C came
    assert seen and seen[0] >= 3, f"the finder saw {seen} processes of the running launch (torchrun + 2 ranks)"
    assert [p for p in _rank_pids(tmp_path, 2) if _alive(p)] == []
    assert processes_of_launch(known_launch_id) == []


@pytest.mark.parametrize("argv, message", [
    (["--nproc", "0", "job.py"], "error: nproc_per_node must be >= 1, got 0"),
    (["--nproc", "2", "no_such_script.py"], "error: no such script: no_such_script.py"),
])
def test_command_line_names_a_bad_request(argv, message, capsys):
    from lessons_pkg.launch import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err



ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_RANK_SPELLINGS = ["--local-rank=1", "--local_rank=1", "--local-rank 1"]


def _parse(script: str, function: str, argv: list[str]):
    import importlib.util

    spec = importlib.util.spec_from_file_location(os.path.basename(script)[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, function)(argv)


@pytest.mark.parametrize("spelling", LOCAL_RANK_SPELLINGS)
@pytest.mark.parametrize("script, function, argv", [
    ("src/ch6/evaluate_gpt.py", "get_args", ["--task", "LAMBADA", "--valid-data", "x.jsonl", "--load", "ckpt"]),
    ("src/ch6/generate.py", "get_args", ["--load", "ckpt", "--prompt", "Hi"]),
    ("src/ch6/text_generation_server.py", "parse_args", ["--load", "ckpt"]),
    ("src/ch5/pipe_dream.py", "parse_args", []),
])
def test_rank_programs_accept_the_local_rank_of_torch_distributed_launch(script, function, argv, spelling):
    """``python -m torch.distributed.launch`` appends ``--local-rank=I`` (older torch: ``--local_rank``) to each
    rank's arguments, as the lesson's scripts launch them; every rank program takes it (LOCAL_RANK says the same).
    pretrain_gpt.py under that launcher: tests/training/test_training_launchers.py."""
    if script.endswith("pipe_dream.py"):
        pytest.importorskip("deepspeed")
    assert _parse(script, function, argv + spelling.split()).local_rank == 1


@pytest.mark.parametrize("spelling", LOCAL_RANK_SPELLINGS)
def test_demo_and_trainer_parsers_accept_the_local_rank(spelling):
    """Every demo's parser gets ``--local-rank`` from ``add_nproc_argument``; the trainer's has it too."""
    import argparse

    from lessons_pkg.launch import add_nproc_argument
    from lessons_pkg.training.arguments import build_parser

    p = argparse.ArgumentParser()
    add_nproc_argument(p, default=2)
    assert p.parse_args(spelling.split()).local_rank == 1
    assert p.parse_args([]).local_rank is None
    pretrain = build_parser().parse_args(["--num-layers", "1", "--hidden-size", "8", "--num-attention-heads", "2",
                                          "--seq-length", "8", "--micro-batch-size", "1", "--train-iters", "1",
                                          "--lr", "1e-3", *spelling.split()])
    assert pretrain.local_rank == 1
