"""Chapter 6 warm-up demos: each computes X @ A its own way and checks it against the whole product."""
import os
import subprocess
import sys

import pytest
import torch

from lessons_pkg.launch import torchrun

X = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
A = torch.tensor([[10, 14], [11, 15], [12, 16], [13, 17]])


def run_script(repo_root, name):
    proc = subprocess.run([sys.executable, str(repo_root / "src/ch6" / name)], capture_output=True, text=True,
                          timeout=120, cwd=repo_root)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("name", ["non_parallelism.py", "column_parallelism.py", "row_parallelism.py"])
def test_single_process_demos_print_the_same_product(repo_root, name):
    # the expected text is what torch prints for X @ A, computed here, not copied
    assert run_script(repo_root, name).strip() == str(X @ A)


def test_gelu_commutes_with_column_split_only(repo_root):
    # each split is compared with the unsplit GeLU(X @ W), and the row split is right once summed first
    lines = run_script(repo_root, "megatron_mlp_gelu.py").splitlines()
    assert lines == [
        "Is GeLU in RowParallelLinear same with non-parallel = False",
        "Is GeLU after the all-reduce of the row split same with non-parallel = True",
        "Is GeLU in ColumnParallelLinear same with non-parallel = True",
    ]


@pytest.mark.parametrize("script,check", [
    ("column_parallelism_dist.py", "column-parallel Y equals single-process X @ A: True"),
    ("row_parallelism_dist.py", "row-parallel Y equals single-process X @ A: True"),
])
@pytest.mark.parametrize("nproc", [1])  # 2 and 4 ranks: chapters/06 (nbval) and test_src_plain_python.py
def test_distributed_demos_match_single_process(repo_root, script, check, nproc):
    result = torchrun(str(repo_root / "src/ch6" / script), nproc_per_node=nproc, timeout=120, echo=False)
    for rank in range(nproc):
        assert check in result.stdout[rank], f"rank {rank}:\n{result.stdout[rank]}"


def test_distributed_demo_refuses_a_world_that_does_not_divide(repo_root):
    script = str(repo_root / "src/ch6/column_parallelism_dist.py")
    # (through lessons_pkg.launch the same line comes back alone: tests/foundation/test_bad_inputs.py)
    # plain torchrun, all ranks on one terminal: every rank meets it, the line is printed once, no rank shows a
    # traceback, and torchrun's failure summary names it as the root cause (not "To enable traceback see ...")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "3",
                           script], capture_output=True, text=True, timeout=120, env=env)
    lines = (done.stdout + done.stderr).splitlines()
    assert done.returncode != 0
    assert lines.count("error: A has 4 columns, which do not split over 3 ranks") == 1, lines
    assert not [line for line in lines if line.startswith("[rank")], lines
    root_cause = "\n".join(lines[next(i for i, line in enumerate(lines) if line.startswith("Root Cause")):])
    assert "traceback : error: A has 4 columns, which do not split over 3 ranks" in root_cause, root_cause
