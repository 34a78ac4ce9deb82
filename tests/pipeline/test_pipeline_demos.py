"""The chapter 5 schedule demos run under torchrun, print their verification and write their plots."""
from lessons_pkg.launch import torchrun


def test_schedules_verify_demo(repo_root):
    result = torchrun(str(repo_root / "src/ch5/schedules_verify.py"), "--train-iters", "2", "--num-microbatches", "4",
                      nproc_per_node=2, timeout=180, echo=False, cwd=str(repo_root))
    for name in ("gpipe", "1f1b", "interleaved"):
        assert f"{name}: losses and every gradient match the single-process model over 2 SGD steps (max error < 1e-05): True" in result.output


def test_memory_demo(repo_root, tmp_path):
    out = tmp_path / "memory.png"
    result = torchrun(str(repo_root / "src/ch5/pipeline_memory.py"), "--hidden-size", "32", "--seq-length", "8",
                      "--microbatches", "2", "4", "--out", str(out), nproc_per_node=2, timeout=180, echo=False, cwd=str(repo_root))
    assert "GPipe's peak is m x A_r and 1F1B's min(m, p - r) x A_r on every stage, as measured: True" in result.output
    assert out.stat().st_size > 10_000
