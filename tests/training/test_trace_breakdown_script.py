"""scripts/trace_breakdown.py on a small hand-made trace whose answer is known, and its refusals.

The CPU records no GPU kernels, so the trace is built here in the format torch.profiler
writes (cpu_op events with an ``External id``; kernel events carrying the id of the op
that launched them). The GPU-side run it was written for is in docs/benchmarks.md.
"""
from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "trace_breakdown.py"
sys.path.insert(0, str(ROOT / "scripts"))

import trace_breakdown  # noqa: E402


def op(name, ts, dur, ext, tid=1):
    return {"ph": "X", "cat": "cpu_op", "name": name, "pid": 1, "tid": tid, "ts": ts, "dur": dur,
            "args": {"External id": ext}}


def kernel(ts, dur, ext, cat="kernel"):
    return {"ph": "X", "cat": cat, "name": "k", "pid": 0, "tid": 7, "ts": ts, "dur": dur, "args": {"External id": ext}}


EVENTS = [
    op("MmBackward0", 0, 100, 1), op("aten::mm", 10, 20, 2),                   # a matmul inside a backward node
    op("aten::to", 200, 50, 3), op("aten::_to_copy", 205, 40, 4), op("aten::copy_", 210, 30, 5),
    op("aten::_fused_adamw_", 300, 10, 6),
    kernel(1000, 400, 2), kernel(1400, 100, 5, cat="gpu_memcpy"), kernel(1450, 200, 5),  # overlaps: busy once
    kernel(3000, 300, 6), kernel(3300, 10, 99),                                  # 99: no op (kept, by its name)
]


def test_each_kernel_is_charged_to_its_launch_site_and_group():
    sites = dict()
    for site, d in trace_breakdown.launch_sites(EVENTS, depth=3):
        sites[site] = sites.get(site, 0) + d
    assert sites == {"MmBackward0 > aten::mm": 400, "aten::to > aten::_to_copy > aten::copy_": 300,
                     "aten::_fused_adamw_": 300, "k": 10}
    assert trace_breakdown.group_of("MmBackward0 > aten::mm") == "matmul"
    assert trace_breakdown.group_of("aten::_fused_adamw_") == "optimizer (AdamW)"
    assert trace_breakdown.group_of("k") == "other"
    # the attention's softmax (fused path, eager attention) is not the loss
    assert trace_breakdown.group_of("aten::_softmax").startswith("attention")
    assert trace_breakdown.group_of("LogSoftmaxBackward0 > aten::_log_softmax_backward_data").startswith("loss")
    busy, span = trace_breakdown.busy_and_span(EVENTS)
    assert (busy, span) == (650 + 310, 2310)     # [1000, 1650] and [3000, 3310]


def test_script_prints_per_iteration_times(tmp_path):
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": EVENTS}, f)
    proc = subprocess.run([sys.executable, str(SCRIPT), str(path), "--iterations", "2"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert ("GPU busy 0.48 ms per iteration over a span of 1.16 ms (42% busy); kernel time summed: 0.51 ms; "
            "2.5 kernels, copies and fills per iteration") in proc.stdout
    assert "| matmul | 0.20 | 39.6% |" in proc.stdout         # 400 of 1010 us
    assert "| 0.15 | 1 | 150.0 | aten::to > aten::_to_copy > aten::copy_ |" in proc.stdout  # 100 + 200 us


def test_a_trace_without_gpu_kernels_or_a_bad_argument_is_refused(tmp_path):
    cpu_only = tmp_path / "cpu.json"
    cpu_only.write_text(json.dumps({"traceEvents": EVENTS[:6]}))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(cpu_only), "--iterations", "1"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "no GPU kernels in this trace" in proc.stderr and str(cpu_only) in proc.stderr
    proc = subprocess.run([sys.executable, str(SCRIPT), str(cpu_only), "--iterations", "0"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--iterations must be >= 1, got 0" in proc.stderr
