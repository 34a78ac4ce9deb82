import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # ckpt_testing

from ckpt_testing import write_trained_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tp2pp2(tmp_path_factory):
    """A TP=2 x PP=2 checkpoint written by the trainer's save_checkpoint after two AdamW steps (iteration 2)."""
    return write_trained_checkpoint(tmp_path_factory.mktemp("tp2pp2"), tp=2, pp=2)
