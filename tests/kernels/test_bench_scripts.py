"""What the CPU can test of the benchmark scripts: scripts/gpu_check.sh's skips and its
results parser (scripts/gpu_check_summary.py), fed with text made by the real producers
(the kernel benchmark's report functions, the trainer's progress logger); and the
statistics of scripts/bench_trainer.py."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import bench_trainer  # noqa: E402
import gpu_check_summary as summary  # noqa: E402

from lessons_pkg.kernels import bench  # noqa: E402
from lessons_pkg.training.logging import TrainingLogger  # noqa: E402

GPU_STEPS = ("kernel_build", "kernel_tests", "kernel_bench", "training", "generation")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the script would run the GPU steps")
def test_gpu_check_without_cuda_skips_every_gpu_step(tmp_path):
    results = tmp_path / "results.md"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(results)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, PYTHON=sys.executable))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = results.read_text()
    assert "| environment | ok |" in text
    for step in GPU_STEPS:
        assert f"| {step} | skipped | 0 | no CUDA device" in text, text


def _write_step(log_dir: Path, name: str, status: str, log: str = "", seconds: int = 3) -> None:
    (log_dir / f"{name}.status").write_text(f"{name} {status} {seconds}\n")
    (log_dir / f"{name}.log").write_text(log)


def test_summary_reads_what_the_producers_print(tmp_path):
    # kernel benchmark: rows with known times -> the report text bench.py prints on a GPU
    rows = [bench.Row("bias_gelu", "4096x3072", "forward", {"fused": 0.05, "eager": 0.1}, min_bytes=100_663_296),
            bench.Row("layer_norm", "8192x1024", "forward", {"fused": 0.06, "eager": 0.05}, min_bytes=67_108_864)]
    copy_gbps = 2000.0
    bench_log = "\n".join([bench.format_table(rows, copy_gbps), "GPU forward bandwidth:",
                           *[f"  {line}" for line in bench.forward_bandwidth_share(rows, copy_gbps)]])
    # training: the trainer's own progress line, for known times
    args = SimpleNamespace(global_batch_size=8, seq_length=1024, num_layers=12, hidden_size=768, ffn_hidden_size=3072,
                           log_interval=2, train_iters=4, world_size=1, peak_tflops=989.0, tensorboard_dir=None,
                           log_json=None)
    logger = TrainingLogger(args, 50304, enabled=True)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for it, seconds in enumerate([0.5, 0.5, 0.02, 0.03], start=1):
            logger.iteration(it, it * 8, seconds, 1e-4, 5.0, 1.0)
    for d in ("environment", "kernel_build", "kernel_tests"):
        _write_step(tmp_path, d, "ok", "gpu NVIDIA H200 | 139.8 GiB | 132 SMs\n" if d == "environment" else
                    "..........\n========= 30 passed, 2 skipped in 4.51s =========\n")
    _write_step(tmp_path, "kernel_bench", "ok", bench_log)
    _write_step(tmp_path, "training", "ok", out.getvalue())
    (tmp_path / "generation.status").write_text("generation skipped 0 no generation benchmark here\n")

    text, ok = summary.summarize(str(tmp_path), seconds=42)
    assert ok
    assert "GPU: NVIDIA H200" in text and "total time: 42 s" in text
    assert "pytest: 30 passed, 2 skipped in 4.51s" in text
    copy, parsed = summary.parse_bandwidth(bench_log)
    assert copy == pytest.approx(copy_gbps, abs=0.05)
    assert [r["kernel"] for r in parsed] == ["bias_gelu 4096x3072", "layer_norm 8192x1024"]
    # bytes / time by hand: 100,663,296 B in 0.05 ms = 2013.3 GB/s (met: >= 1500), 67,108,864 B in 0.06 ms = 1118.5
    assert [r["gbps"] for r in parsed] == [pytest.approx(2013.3, abs=0.05), pytest.approx(1118.5, abs=0.05)]
    assert "forward kernels at >= 75% of copy: 1 of 2" in text
    progress = summary.parse_training(out.getvalue())
    assert [p["iteration"] for p in progress] == [2, 4]
    expected_tps = 8 * 1024 / 0.025  # the second interval's mean iteration time
    assert progress[-1]["tokens_per_s"] == pytest.approx(expected_tps, rel=1e-3)
    # MFU from Narayanan et al.'s count, independent of the logger's code: 72 B s L h^2 (1 + s/(6h) + V/(12 L h))
    B, s, L, h, V = 8, 1024, 12, 768, 50304
    flops = 72 * B * s * L * h**2 * (1 + s / (6 * h) + V / (12 * L * h))
    expected_mfu = 100 * flops / 0.025 / 1e12 / 989.0
    assert progress[-1]["mfu"] == pytest.approx(expected_mfu, abs=0.05)
    assert f"MFU {expected_mfu:.1f}% (NOT met)" in text and expected_mfu < 40  # 28.3% against the 40% goal
    assert "| generation | skipped | 0 | no generation benchmark here |" in text


def test_summary_reports_a_failed_step_and_fails(tmp_path):
    _write_step(tmp_path, "environment", "ok", "python 3.11\n")
    _write_step(tmp_path, "kernel_tests", "failed(exit=1)", "E   AssertionError: kernel error 0.5 > 2 x PyTorch's\n")
    text, ok = summary.summarize(str(tmp_path))
    assert not ok
    assert "| kernel_tests | failed(exit=1) |" in text and "kernel error 0.5" in text
    assert "| training | missing |" in text  # no status file: the step never ran
    assert summary.main([str(tmp_path), str(tmp_path / "r.md")]) == 1


def test_bench_trainer_summary_drops_warmup_and_takes_the_median():
    steps = [(9.0, 0.0), (8.0, 0.0), (1.0, 0.25), (3.0, 0.5), (2.0, 0.5)]
    s = bench_trainer.summarize(steps, warmup=2, tokens_per_step=100)
    assert s["step_s"] == 2.0 and s["tokens_per_s"] == 50.0 and s["comm_share"] == 0.25
    with pytest.raises(ValueError, match="no timed iterations: 2 run, 2 dropped"):
        bench_trainer.summarize(steps[:2], warmup=2, tokens_per_step=100)


def test_kernel_bench_rotates_the_order_and_times_steady_states(monkeypatch):
    """interleaved_best_ms: each round starts with the next implementation; a sample is untimed calls
    (half as many as timed, at least one) then at least two timed ones (their mean); with a flush, one
    timed call right after the flush."""
    ticks = iter(range(10**6))
    monkeypatch.setattr(bench, "_clock", lambda: next(ticks) * 1e-3)  # every clock read: +1 ms
    log = []
    fns = {name: (lambda n=name: log.append(n)) for name in "abc"}
    ms = bench.interleaved_best_ms(fns, torch.device("cpu"), rounds=3, warmup=0, sample_ms=0.0)
    # one call each to size the samples, then per round 3 calls each, starting a, b, c in turn
    rounds = [log[3 + 9 * k:3 + 9 * (k + 1)] for k in range(3)]
    assert log[:3] == list("abc")
    assert rounds == [list("aaabbbccc"), list("bbbcccaaa"), list("cccaaabbb")]
    assert ms == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.5})  # 2 calls between 2 clock reads: 1 ms / 2

    # longer samples: untimed calls for half as long as the timed ones (the first calls after another
    # implementation are slower than its steady state)
    log.clear()
    monkeypatch.setattr(bench, "_clock", lambda: log.append("|") or next(ticks) * 1e-3)  # "|": a clock read
    bench.interleaved_best_ms(fns, torch.device("cpu"), rounds=1, warmup=0, sample_ms=7.5)
    sizing = "|a||b||c|"  # one timed call each: 1 ms, so 8 timed calls (and 4 untimed) per sample
    assert "".join(log) == sizing + "aaaa|aaaaaaaa|" + "bbbb|bbbbbbbb|" + "cccc|cccccccc|"
    monkeypatch.setattr(bench, "_clock", lambda: next(ticks) * 1e-3)

    log.clear()
    flushes = []
    bench.interleaved_best_ms(fns, torch.device("cpu"), rounds=2, warmup=0, flush=lambda: flushes.append(len(log)))
    assert log[3:] == list("abcbca")          # one timed call per sample, no untimed call
    assert flushes == [3, 4, 5, 6, 7, 8]      # a flush right before each of them


def test_kernel_bench_target_lines_never_round_up_to_the_target():
    """1.4996x the native op misses the 1.5x target, and its line must not print it as 1.50x or 1.500x."""
    rows = [bench.Row("layer_norm", "2048x256", "forward+backward", {"fused": 1.0, "eager": 1.4996, "compile": 1.6}),
            bench.Row("layer_norm", "2048x256", "forward", {"fused": 1.0, "eager": 9.0}),
            bench.Row("bias_gelu", "2048x1024", "forward+backward", {"fused": 2.0, "eager": 3.0})]
    assert bench.targets(rows) == [
        "layer_norm 2048x256: 1.499x eager (NOT met: target 1.5x), 1.600x torch.compile (met: target 1.0x)",
        "bias_gelu 2048x1024: 1.500x eager (met: target 1.5x)",
    ]
    broken = [bench.Row("causal_softmax", "64x256x256", "forward+backward", {"fused": 1.0, "eager": float("nan")})]
    assert bench.targets(broken) == ["causal_softmax 64x256x256: nanx eager (NOT met: target 1.5x)"]


def test_kernel_bench_stream_moves_the_kernels_bytes_and_is_reported(monkeypatch):
    """The "stream" stand-ins compute y = 2x (forward) and gx = gy + x (backward) into reused buffers, every
    row gets a stream time from the same rounds (kept out of the implementations), and the table shows it
    with fused / stream."""
    x = torch.randn(6, 5)
    forward, forward_backward = bench._stream(x)
    seen, outs = [], {}
    real_mul, real_add = torch.mul, torch.add

    def record(kind, real):
        def op(a, b, out):
            seen.append((kind, out.data_ptr()))
            outs[kind] = out
            return real(a, b, out=out)
        return op

    with monkeypatch.context() as m:
        m.setattr(torch, "mul", record("mul", real_mul))
        m.setattr(torch, "add", record("add", real_add))
        forward()
        forward_backward()
        forward_backward()
    assert torch.equal(outs["mul"], 2 * x) and torch.equal(outs["add"], 1 + x)  # gy is ones
    assert [kind for kind, _ in seen] == ["mul", "mul", "add", "mul", "add"]
    assert len({ptr for kind, ptr in seen if kind == "mul"}) == 1  # one output buffer, reused
    assert len({ptr for kind, ptr in seen if kind == "add"}) == 1
    assert all(ptr != x.data_ptr() for _, ptr in seen)            # never written over the input

    tiny = {"bias_gelu": (8, 16), "softmax": (1, 2, 8, 8), "layer_norm": (8, 16)}
    rows = bench.run(tiny, rounds=1, compile=False, unfused=False, log=lambda m: None)
    assert len(rows) == 8
    for r in rows:
        assert set(r.ms) == {"fused", "eager"}
        assert r.stream_ms is not None and 0 < r.stream_ms < float("inf")
        assert r.vs_stream == pytest.approx(r.ms["fused"] / r.stream_ms)
    table = bench.format_table(rows, ceiling_gbps=10.0)
    header, rule, first = table.splitlines()[:3]
    assert header.split(" | ")[5] == "stream ms" and header.endswith("fused / stream |")
    assert rule.count("|") == header.count("|")
    assert first.split(" | ")[5] == f"{rows[0].stream_ms:.3f}"
    assert first.endswith(f"| {rows[0].vs_stream:.2f}x |")
    # a row from before the stream column existed (or built by hand) still prints
    assert "| - | 10.0 |" in bench.format_table([bench.Row("op", "1x1", "forward", {"fused": 1.0}, min_bytes=10**7)], 1.0)


def test_summary_gives_no_verdict_for_unfinished_or_nan_runs_and_counts_missing_steps(tmp_path, capsys):
    bench_log = ("measured copy bandwidth (y.copy_(x), read + write): 100.0 GB/s\nGPU forward bandwidth:\n"
                 "  bias_gelu 4096x3072 forward: 74.6 GB/s = 75% of copy (NOT met: goal 75%)\n")
    _write_step(tmp_path, "environment", "ok", "gpu NVIDIA H200 | 139.8 GiB | 132 SMs\n")
    _write_step(tmp_path, "kernel_bench", "ok", bench_log)
    nan_line = (" iteration       10/      30 | elapsed time per iteration (ms): 100.0 | lm loss: nan | "
                "number of nan iterations:   3 | tokens per second: 81920.0 | TFLOP/s per device: 500.0 | MFU: 50.6% |\n")
    _write_step(tmp_path, "training", "ok", nan_line)
    text, ok = summary.summarize(str(tmp_path))
    assert "74.6 GB/s, 75% (NOT met)" in text  # 74.6% is below the goal although it prints as 75%
    assert "no verdict: the run's status is ok, 3 NaN iteration(s)" in text and "(met)" not in text
    assert not ok and "| kernel_build | missing |" in text  # steps that never ran are not passed

    _write_step(tmp_path, "kernel_bench", "timeout(180s)", bench_log)
    text, _ = summary.summarize(str(tmp_path))
    assert "the benchmark did not finish: timeout(180s); no verdicts" in text and "(NOT met)" not in text
    with pytest.raises(SystemExit) as stop:
        summary.main([str(tmp_path / "nowhere"), str(tmp_path / "r.md")])
    assert stop.value.code == 2 and "log folder" in capsys.readouterr().err and not (tmp_path / "r.md").exists()


@pytest.mark.skipif(sys.platform != "linux" or os.uname().machine != "x86_64", reason="measures x86-64 Linux cores")
def test_cpu_clock_measures_a_plausible_frequency():
    """scripts/cpu_clock.py (the clock that turns cycle counts into times in docs/benchmarks.md) runs and
    prints a frequency no x86-64 core could be outside of (0.5 to 7 GHz)."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "cpu_clock.py"), "--runs", "1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("measured core clock: ") and " GHz (best of 1 runs" in line, line
    ghz = float(line.split(": ", 1)[1].split()[0])
    assert 0.5 < ghz < 7.0, line
