"""The torchrun launcher used by notebooks, `make course` and tests: ordered output, errors, timeouts."""
import time

import pytest

from lessons_pkg.launch import LaunchError, LaunchTimeout, torchrun

SCRIPT = """
import os, sys, time
rank = int(os.environ["RANK"])
print(f"hello from rank {rank} of {os.environ['WORLD_SIZE']}")
mode = sys.argv[1]
if mode == "fail" and rank == 1:
    raise ValueError("deliberate failure on rank 1")
if mode == "hang":
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


def test_hung_job_is_killed_at_its_timeout(script):
    start = time.monotonic()
    with pytest.raises(LaunchTimeout, match="ran past its timeout of 5 s"):
        torchrun(script, "hang", nproc_per_node=2, timeout=5, echo=False)
    assert time.monotonic() - start < 20
