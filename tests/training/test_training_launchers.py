"""pretrain_gpt.py launched like on a cluster: two torchrun "nodes" on this machine, and a Slurm batch job."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from lessons_pkg.launch import free_port

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
SCRIPT = os.path.join(ROOT, "src", "ch6", "pretrain_gpt.py")
# a tiny TP=2 run on random tokens (the data pipeline is tested elsewhere): 2 iterations
TINY = ["--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2",
        "--lr", "1e-3", "--mock-data", "--vocab-size", "128", "--make-vocab-size-divisible-by", "32",
        "--log-interval", "1", "--eval-iters", "0"]


def test_two_torchrun_nodes_with_c10d_rendezvous(tmp_path):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in range(2):  # what each of 2 nodes runs: torchrun --nnodes 2 --node_rank i --tee 3 ...
        cmd = [sys.executable, "-m", "torch.distributed.run", "--tee", "3", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--rdzv_id", "lessons-test", "--rdzv_backend", "c10d",
               "--rdzv_endpoint", f"127.0.0.1:{port}", SCRIPT, *TINY]
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True), log))
    try:
        for proc, _ in procs:
            proc.wait(timeout=120)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            log.close()
    outputs = [(tmp_path / f"node{n}.log").read_text() for n in range(2)]
    assert [p.returncode for p, _ in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    text = "".join(outputs)
    assert "using world size: 2, data-parallel size: 1, context-parallel size: 1, tensor-model-parallel size: 2" in text
    assert " iteration        2/       2 |" in text and "| lm loss: " in text
    # --tee 3: each line of a rank, whole, after its local rank's label (the rank prints in one write per line)
    printed = [line for line in outputs[0].splitlines() if " iteration " in line or "> building" in line]
    assert printed and all(line.startswith("[default0]:") and line.count("[default") == 1 for line in printed)


def test_torch_distributed_launch_as_the_lesson_runs_it(tmp_path):
    """The lesson's train.sh (seed 001): ``python -m torch.distributed.launch --nproc_per_node N pretrain_gpt.py ...``.
    That launcher (deprecated, still in torch) appends ``--local-rank=I`` to every rank's arguments."""
    cmd = [sys.executable, "-m", "torch.distributed.launch", "--nproc_per_node", "2", "--master_port",
           str(free_port()), SCRIPT, *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert f"local_rank {'.' * 38} 0" in out   # the flag the launcher passed, accepted (rank 0's table)
    assert " iteration        2/       2 |" in out and "| lm loss: " in out


@pytest.fixture
def slurm_cluster(tmp_path):
    """A one-node cluster of our own (scripts/start_slurm.sh: private config, state, ports), stopped after the test.

    Skipped only where Slurm is absent and cannot be installed (not root, no apt-get, no network);
    any other failure of the script fails the test."""
    installed = shutil.which("slurmctld") is not None
    if os.geteuid() != 0:
        pytest.skip("scripts/start_slurm.sh needs root to start Slurm's daemons")
    if not installed and shutil.which("apt-get") is None:
        pytest.skip("Slurm is not installed and apt-get is missing: cannot install it here")
    env = dict(os.environ, LESSONS_SLURM_DIR=str(tmp_path / "slurm"), LESSONS_SLURM_PORT=str(free_port()))
    script = os.path.join(ROOT, "scripts", "start_slurm.sh")
    started = time.monotonic()
    result = subprocess.run(["bash", script], capture_output=True, text=True, timeout=600, env=env)
    try:
        if result.returncode == 2 and not installed:
            pytest.skip(f"Slurm cannot be installed here: {result.stderr.strip()}")
        assert result.returncode == 0, result.stdout + result.stderr
        print(f"start_slurm.sh took {time.monotonic() - started:.1f} s")
        yield dict(SLURM_CONF=str(tmp_path / "slurm" / "slurm.conf"))
    finally:
        subprocess.run(["bash", script, "stop"], capture_output=True, timeout=60, env=env)


def _stop_stops_only_its_own_daemons(tmp_path):
    """`start_slurm.sh stop` ends the three daemons it started (their pid files say which) and nothing else."""
    pids = {}
    for name in ("munged", "slurmctld", "slurmd"):
        pids[name] = int((tmp_path / "slurm" / "run" / f"{name}.pid").read_text())
        assert open(f"/proc/{pids[name]}/comm").read().strip() == name
    import psutil

    others = [p.pid for p in psutil.process_iter(["name", "status"])  # e.g. the machine's own Slurm, if any
              if p.info["name"] in pids and p.info["status"] != psutil.STATUS_ZOMBIE and p.pid not in pids.values()]
    env = dict(os.environ, LESSONS_SLURM_DIR=str(tmp_path / "slurm"))
    subprocess.run(["bash", os.path.join(ROOT, "scripts", "start_slurm.sh"), "stop"], check=True, timeout=60, env=env)
    assert [n for n, p in pids.items() if os.path.exists(f"/proc/{p}")] == []
    assert all(os.path.exists(f"/proc/{p}") for p in others)  # daemons it did not start are left running


def test_sbatch_job_trains(slurm_cluster, tmp_path):
    out = tmp_path / "job.out"
    env = dict(os.environ, NPROC_PER_NODE="2", MASTER_PORT=str(free_port()), PYTHON=sys.executable,
               OMP_NUM_THREADS="1", **slurm_cluster)
    result = subprocess.run(["sbatch", "--parsable", "--output", str(out), "--time", "00:05:00",
                             os.path.join(ROOT, "src", "ch6", "slurm", "pretrain_gpt.sbatch"), *TINY],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    job_id = result.stdout.strip().split(";")[0]
    state, deadline = "", time.monotonic() + 240
    while time.monotonic() < deadline:  # poll twice a second (sbatch --wait sleeps up to 10 s between looks)
        state = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
        if any(f"JobState={s}" in state for s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL")):
            break
        time.sleep(0.5)
    else:
        subprocess.run(["scancel", job_id], env=env)
        pytest.fail(f"Slurm job {job_id} did not finish within 240 s:\n{state}")
    log = out.read_text() if out.exists() else ""
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, f"{state}\n{log[-3000:]}"
    assert f"job {job_id}: 1 node(s) x 2 ranks" in log
    assert " iteration        2/       2 |" in log and "| lm loss: " in log
    # every line a rank printed is whole and says where it came from: "<node>: [default<local rank>]:"
    rank_lines = [line for line in log.splitlines() if "iteration " in line or "using world size" in line]
    assert rank_lines and all(line.startswith("0: [default0]:") for line in rank_lines), rank_lines
    _stop_stops_only_its_own_daemons(tmp_path)
