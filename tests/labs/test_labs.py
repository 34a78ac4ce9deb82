"""Every lab checker passes on its reference solution and fails, saying why, on the unmodified starting point.

The solutions are handed to the checkers explicitly (``run_check(exercise, path)``): the
checkers themselves only ever read labs/<chapter>/<file>. A few typical wrong answers
are checked too, so that a checker cannot pass merely because something was written.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lessons_pkg.labs import exercises, find, run_check

ROOT = Path(__file__).resolve().parents[2]
EXERCISES = {e.id: e for e in exercises()}


def test_every_chapter_has_three_to_five_exercises_and_every_file_exists():
    chapters = {}
    for e in EXERCISES.values():
        chapters.setdefault(e.id.split(".")[0], []).append(e)
        assert (ROOT / "labs" / e.file).is_file(), e.file
        assert (ROOT / "labs" / "solutions" / e.file).is_file(), e.file
    assert sorted(chapters) == ["ch5", "ch6", "ch6b", "ch6c", "ch6d", "ch6e", "ch6f"]
    assert all(3 <= len(v) <= 5 for v in chapters.values()), {k: len(v) for k, v in chapters.items()}


def test_checkers_read_the_learners_file_only(tmp_path, monkeypatch):
    # a labs folder without solutions/, where the learner's files hold the solutions' code: every
    # (cheap) checker passes from its default path; so it never needed labs/solutions/
    monkeypatch.setenv("LESSONS_LABS_DIR", str(tmp_path))
    for e in (EXERCISES[i] for i in ("ch5.1", "ch6c.1", "ch6e.3")):  # one per kind of checker input; cheap
        (tmp_path / e.file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / e.file).write_text((ROOT / "labs" / "solutions" / e.file).read_text())
        result = run_check(e)
        assert result.passed and str(tmp_path) in result.lines[0], result.report()


@pytest.mark.parametrize("exercise_id", sorted(EXERCISES))
def test_solution_passes_and_starting_point_fails(exercise_id):
    e = EXERCISES[exercise_id]
    solved = run_check(e, ROOT / "labs" / "solutions" / e.file)
    assert solved.passed, solved.report()
    start = run_check(e, ROOT / "labs" / e.file)
    assert not start.passed, start.report()
    assert len(start.lines) >= 2 and start.lines[-1].strip(), start.report()  # a reason, not just FAIL


WRONG = {
    # g's backward all-reduces too: every gradient comes out tp times too large
    "ch6.1": "import torch, torch.distributed as dist\n"
             "class G(torch.autograd.Function):\n"
             "    @staticmethod\n    def forward(ctx, x, group):\n"
             "        out = x.clone(); dist.all_reduce(out, group=group); ctx.group = group; return out\n"
             "    @staticmethod\n    def backward(ctx, grad):\n"
             "        grad = grad.clone(); dist.all_reduce(grad, group=ctx.group); return grad, None\n",
    # f's backward forgets the all-reduce: the input gradient is one rank's part
    "ch6.2": "import torch\n"
             "class F(torch.autograd.Function):\n"
             "    @staticmethod\n    def forward(ctx, x, group): return x.view_as(x)\n"
             "    @staticmethod\n    def backward(ctx, grad): return grad, None\n",
    # the naive bubble bound: (p-1)/(m+p-1) <= 10% counted as "under"
    "ch5.1": "FEWEST_MICROBATCHES_1F1B = 27\nFEWEST_MICROBATCHES_INTERLEAVED = 16\n",
    # a warm-up of p - r forwards, one too many: trains like one process, but holds one micro-batch too many
    "ch5.2": "def one_f_one_b_order(p, m, rank):\n    w = min(p - rank, m)\n"
             "    return [f'F{i}' for i in range(w)] + [a for i in range(m - w) for a in (f'F{w + i}', f'B{i}')]"
             " + [f'B{i}' for i in range(m - w, m)]\n",
    # 1F1B's count in chunks: forgets that interleaving's warm-up runs through v - 1 extra chunks
    "ch5.3": "def peak_in_flight(p, m, v, rank):\n    return min(m, p - rank) * v\n",
    # one-pass variance
    "ch6b.3": "import torch\n"
              "def layer_norm(x, w, b, eps=1e-5):\n"
              "    m = x.mean(-1, keepdim=True); v = (x * x).mean(-1, keepdim=True) - m * m\n"
              "    return (x - m) / torch.sqrt(v + eps) * w + b\n",
    # the document index has D + 1 entries, not D
    "ch6c.1": "def idx_size(s, d):\n    return 34 + 12 * s + 8 * d\n",
    # padding to a multiple of 128 only (ignores TP)
    "ch6.4": "def padded_vocab_size(v, tp, by=128):\n    return -(-v // by) * by\n"
             "ERROR_WITHOUT_PADDING = 'is not divisible by tensor_model_parallel_size (2)'\nWHY = 'B'\n",
    # the lesson's "TP2 x PP3 with the distributed optimizer": thinking ZeRO-1 shards the fp16 weights too
    "ch6d.2": "BYTES = {'fp16 weight': 2, 'fp32 gradient': 4, 'fp32 master weight': 4, 'adam m': 4, 'adam v': 4}\n"
              "def weight_and_optimizer_bytes(n, dp, zero1):\n    return n * 18 / dp if zero1 else n * 18\n",
    # forgets the replicated position embedding and biases
    "ch6d.1": "def params_per_rank(L, h, V, s, tp):\n    m = 128 * tp; Vp = -(-V // m) * m\n"
              "    return Vp // tp * h + L * 12 * h * h // tp\n",
    # tensor parallelism splits everything: the 10 s b h it leaves whole forgotten
    "ch6f.1": "def activation_bytes(s, b, h, a, t=1, sequence_parallel=False, activation_bytes=2, mask_bytes=1):\n"
              "    return s * b * h * (34 + 5 * a * s / h) / t\n",
    # the blocks' outputs averaged instead of weighted by their share of the softmax
    "ch6f.2": "import torch\n"
              "def merge(out_a, lse_a, out_b, lse_b):\n    return (out_a + out_b) / 2, torch.logaddexp(lse_a, lse_b)\n",
    # ch6.3: looks every id up in this rank's rows (another rank's ids index out of range): a one-line FAIL
    "ch6.3": "import torch.nn.functional as F\n"
             "def partial_embedding(ids, shard, vocab_start, vocab_end):\n    return F.embedding(ids - vocab_start, shard)\n",
    # the plain contiguous split
    "ch6f.3": "def rank_tokens(r, cp, s):\n    n = s // cp\n    return list(range(r * n, (r + 1) * n))\n"
              "def causal_chunk_pairs(r, cp):\n    return 4 * r + 3\n",
}


@pytest.mark.parametrize("exercise_id", sorted(WRONG))
def test_a_typical_wrong_answer_fails(exercise_id, tmp_path):
    path = tmp_path / "answer.py"
    path.write_text(WRONG[exercise_id])
    result = run_check(EXERCISES[exercise_id], path)
    assert not result.passed and "not written yet" not in result.report(), result.report()


def test_ch5_2_runs_the_orders_on_two_ranks_and_says_in_one_line_why_one_fails(tmp_path):
    solved = run_check(EXERCISES["ch5.2"], ROOT / "labs" / "solutions" / "ch5" / "one_f_one_b.py")
    assert "on 2 processes the course's executor ran your orders" in solved.report(), solved.report()
    deadlock = ("def one_f_one_b_order(p, m, rank):\n"  # rank 0 waits for B0 while rank 1 waits for F1
                "    if rank == 0:\n        return [a for i in range(m) for a in (f'F{i}', f'B{i}')]\n"
                "    return [f'F{i}' for i in range(m)] + [f'B{i}' for i in range(m)]\n")
    for source, reason in ((WRONG["ch5.2"], "p=2, m=3: rank 0 held 3.0 micro-batches' activations at its peak"),
                           (deadlock, "p=2, m=2: the ranks' orders cannot run together")):
        path = tmp_path / "answer.py"
        path.write_text(source)
        result = run_check(EXERCISES["ch5.2"], path)
        assert not result.passed and len(result.lines) == 2 and result.lines[1].startswith(reason), result.report()


def test_ch6_4_accepts_the_error_as_python_prints_it(tmp_path):
    """The last line of the traceback (with ``ValueError:``) or the bare message: both pass; the traceback's
    first line fails, saying so."""
    solution = (ROOT / "labs" / "solutions" / "ch6" / "vocab_padding.py").read_text()
    from lessons_pkg.tensor_parallel import VocabParallelEmbedding
    from lessons_pkg.tensor_parallel.layers import TPShape

    with pytest.raises(ValueError) as e:
        VocabParallelEmbedding(50257, 8, tp_group=TPShape(2))
    for pasted, passes in ((f"ValueError: {e.value}", True), (str(e.value), True),
                           ("Traceback (most recent call last):", False)):
        path = tmp_path / "answer.py"
        path.write_text(solution + f"\nERROR_WITHOUT_PADDING = {pasted!r}\n")
        result = run_check(EXERCISES["ch6.4"], path)
        assert result.passed == passes, result.report()
        if not passes:
            assert "last line" in result.report()


def test_command_line_check_and_list(capsys):
    from lessons_pkg.labs.__main__ import main

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert all(i in listed for i in EXERCISES), listed
    assert main(["check", "ch6c.1", "--file", str(ROOT / "labs/solutions/ch6c/idx_size.py")]) == 0
    assert "PASS" in (out := capsys.readouterr().out) and "1,580,042 bytes" in out, out
    assert main(["check", "ch6c.1"]) == 1 and "FAIL" in capsys.readouterr().out
    assert main(["check", "ch9.9"]) == 2 and "no exercise 'ch9.9'" in capsys.readouterr().err
    assert main(["check", "ch6c", "--file", "x.py"]) == 2  # one file cannot answer three exercises
    # and as a learner types it (one subprocess: the module entry point)
    run = subprocess.run([sys.executable, "-m", "lessons_pkg.labs", "check", "ch5.1"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "FAIL" in run.stdout, run.stdout + run.stderr
    with pytest.raises(ValueError, match="known: ch5.1"):
        find("nope")
