import os
from pathlib import Path

# One thread per rank: the machines have 2 cores and tests start up to 8 ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return ROOT



@pytest.fixture(scope="session")
def transformers_converter():
    """transformers' own Megatron GPT-2 converter (4.46.3, in a side folder), installed once per machine.

    Skipped only when no package registry answers; any other failure of the install is an error.
    """
    from lessons_pkg.checkpoint import transformers_converter as tc

    try:
        tc.install(log=lambda *a: None)
    except tc.ConverterUnavailable as e:
        if e.unreachable:
            pytest.skip(f"transformers' Megatron converter cannot be installed: no package registry answered ({e})")
        raise
    return tc
