"""scripts/bench_generation.py end to end on the CPU (the course's model, a few tokens), and its refusals.

The GPU path (``--device cuda``) is what scripts/gpu_check.sh runs (recorded in docs/gpu/); here the
same code runs with ``--device cpu``: the models and prompts are moved to the named device and the run
must generate exactly the tokens transformers generates (else exit 1). The timer's synchronisation
with a GPU is a no-op on the CPU, so only the GPU run exercises it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench_generation.py"


def _run(args, tmp_path, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_course_model_on_cpu_matches_transformers(tmp_path):
    out_json, out_png = tmp_path / "gen.json", tmp_path / "gen.png"
    proc = _run(["--device", "cpu", "--threads", "1", "--models", "course", "--batches", "1", "2", "--quick",
                 "--json", str(out_json), "--plot", str(out_png)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every run generated the same tokens as transformers: True" in proc.stdout
    data = json.loads(out_json.read_text())
    assert [r["batch"] for r in data["generate"]] == [1, 2]
    for r in data["generate"]:
        assert r["same_tokens"] is True and r["new_tokens"] == 8
        assert 0 < r["ours_tok_s"] < float("inf") and 0 < r["hf_tok_s"] < float("inf")
    assert [r["context"] for r in data["context"]] == [8, 16, 32, 64]
    assert all(0 < r["cached_ms"] < float("inf") and 0 < r["recomputed_ms"] < float("inf") for r in data["context"])
    assert out_png.stat().st_size > 0


@pytest.mark.parametrize("device, message", [
    ("meta", "only cpu and cuda"),
    ("not-a-device", "not a device torch knows"),
] + ([] if torch.cuda.is_available() else [("cuda", "sees no CUDA device")]))
def test_bad_device_is_refused_naming_it(tmp_path, device, message):
    proc = _run(["--device", device, "--quick"], tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and repr(device) in proc.stderr, proc.stderr
    assert not (tmp_path / "outputs").exists()      # refused before any work or output
