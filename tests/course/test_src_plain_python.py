"""Every script in src/ runs the way a learner first tries it: ``python FILE`` (no torchrun, no launcher).

Multi-process demos start their own ranks (``lessons_pkg.launch.start_ranks``). Each run must
exit 0 and print its verification; the arguments only shrink the work (fewer steps, smaller
tensors; pipeline_timeline on 2 ranks instead of 4).

One-process scripts that another test already runs as ``python FILE`` are listed in
PLAIN_ELSEWHERE with that test (not run twice); multi-process demos that a chapter runs and
checks under nbval, through the launcher ``python FILE`` uses, in RUN_BY_A_CHAPTER; scripts
that cannot run without arguments naming inputs (launchers, servers, command-line clients,
conversion tools) in NEEDS_ARGUMENTS with the test that runs them. A file in src/ that is in
none of the lists fails ``test_every_src_script_is_covered``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# script -> (arguments that only make the run small, text its verification prints). column_parallelism_dist
# runs here on its default 2 ranks (tests/warmup: 1 rank; chapter 06: 2 and 4).
PLAIN = {
    "src/ch6/column_parallelism_dist.py": ([], "equals single-process X @ A: True"),
    "src/ch6/parallel_gpt_fused.py": (["--nproc", "1"], "matches the plain model (atol = rtol = 1e-05): True"),
    "src/ch5/pipeline_timeline.py": (["--nproc", "2", "--num-microbatches", "4", "--cost-ms", "1", "--repeats", "1",
                                      "--out", "{tmp}/timeline.png"], "every schedule's gradients match"),
    "src/ch5/gpipe_memory.py": (["--n-embd", "32", "--n-layer", "2", "--vocab-size", "101", "--seq-len", "16",
                                 "--batch-size", "4", "--chunks", "2", "--balance", "2", "1", "1"], "to the byte: True"),
}

# multi-process demos that a chapter runs under nbval through lessons_pkg.launch.torchrun, the launcher a plain
# `python FILE` hands itself to (launch_self), and whose printed verifications nbval compares: not run twice.
# The plain-python path itself (start_ranks, --nproc) is checked on the scripts above and by the --nproc test.
RUN_BY_A_CHAPTER = {
    "src/ch6/row_parallelism_dist.py": "chapters/06_tensor_parallelism.ipynb (2 and 4 ranks)",
    "src/ch6/parallel_mlp.py": "chapters/06_tensor_parallelism.ipynb",
    "src/ch6/mlp_orderings.py": "chapters/06_tensor_parallelism.ipynb; tests/tensor_parallel/test_mlp_orderings.py",
    "src/ch6/parallel_attention.py": "chapters/06_tensor_parallelism.ipynb",
    "src/ch6/vocab_parallel_embedding.py": "chapters/06_tensor_parallelism.ipynb",
    "src/ch6/vocab_parallel_cross_entropy.py": "chapters/06_tensor_parallelism.ipynb",
    "src/ch6/parallel_gpt.py": "chapters/06_tensor_parallelism.ipynb",
    "src/ch6/parallelformers_inference.py": "chapters/06_tensor_parallelism.ipynb (--model local)",
    "src/ch6/sequence_parallel.py": "chapters/06f_sequence_and_context_parallelism.ipynb",
    "src/ch6/context_parallel.py": "chapters/06f_sequence_and_context_parallelism.ipynb",
    "src/ch5/schedules_verify.py": "chapters/05_pipeline_parallelism.ipynb",
    "src/ch5/pipeline_memory.py": "chapters/05_pipeline_parallelism.ipynb",
}

# already run the plain way (python FILE) by another test: not run twice
PLAIN_ELSEWHERE = {
    "src/ch6/non_parallelism.py": "tests/warmup/test_warmup_demos.py::test_single_process_demos_print_the_same_product",
    "src/ch6/column_parallelism.py": "tests/warmup/test_warmup_demos.py::test_single_process_demos_print_the_same_product",
    "src/ch6/row_parallelism.py": "tests/warmup/test_warmup_demos.py::test_single_process_demos_print_the_same_product",
    "src/ch6/megatron_mlp_gelu.py": "tests/warmup/test_warmup_demos.py::test_gelu_commutes_with_column_split_only",
    "src/ch6/megatron_datasets.py": "tests/data/test_data_preprocess.py (the corpus -> tokenizer -> .bin/.idx chain)",
    "src/ch6/train_tokenizer.py": "tests/data/test_data_preprocess.py",
    "src/ch6/preprocess_data.py": "tests/data/test_data_preprocess.py",
    "src/ch6/pretrain_gpt.py": "tests/training/test_training_pretrain_gpt.py (one process, plain python; "
                               "multi-process layouts under torchrun)",
    "src/ch5/gpipe.py": "tests/ch5_libs/test_ch5_libs_gpipe.py::test_gpipe_script_trains_and_verifies",
    "src/ch5/pipe_dream.py": "tests/ch5_libs/test_ch5_libs_pipe_dream.py::test_pipe_dream_on_2_ranks_matches_single_"
                             "process_and_learns (python FILE --nproc 2)",
    "src/ch5/gpt2_sequential.py": "a library module of gpipe.py and pipe_dream.py (nothing to run): "
                                  "tests/ch5_libs/test_ch5_libs_gpt2_sequential.py",
    "src/ch5/text_data.py": "a library module of gpipe.py and pipe_dream.py (nothing to run): "
                            "tests/ch5_libs/test_ch5_libs_text_data.py",
}

# scripts whose command line must name their inputs; the test that runs each is named
NEEDS_ARGUMENTS = {
    "src/ch5/deepspeed_launch.py": "a launcher (SCRIPT argument): tests/ch5_libs/test_ch5_libs_pipe_dream.py",
    "src/ch6/generate.py": "needs a checkpoint (--load): tested by its owner's tests",
    "src/ch6/text_generation_server.py": "a server (--load, --port): tested by its owner's tests",
    "src/ch6/text_generation_cli.py": "a client of a running server (URL): tested by its owner's tests",
    "src/ch6/evaluate_gpt.py": "needs a checkpoint and a task file: tested by its owner's tests",
    "src/ch6/checkpoint_util.py": "a conversion tool (--load-dir, --save-dir): tested by its owner's tests",
}

TIMEOUT = 300  # seconds per script; a rank that hangs is killed by the script's own launcher first


def run_plain(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # as a fresh shell has it
        env.pop(name, None)
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)


def test_every_src_script_is_covered():
    scripts = {str(p.relative_to(ROOT)) for p in ROOT.glob("src/**/*.py")}
    uncovered = scripts - set(PLAIN) - set(PLAIN_ELSEWHERE) - set(NEEDS_ARGUMENTS) - set(RUN_BY_A_CHAPTER)
    assert not uncovered, f"scripts in src/ that no test runs the plain way: {sorted(uncovered)}"
    missing = set(PLAIN) - scripts
    assert not missing, f"listed but not in src/: {sorted(missing)}"
    for script, where in RUN_BY_A_CHAPTER.items():  # the chapter named really runs it, and checks what it prints
        chapter = ROOT / where.split(" ")[0].rstrip(";")
        assert f'torchrun(\\"{script}' in chapter.read_text(), f"{chapter.name} does not run {script}"


@pytest.mark.parametrize("script", sorted(PLAIN))
def test_script_runs_with_plain_python(script, tmp_path):
    args, verification = PLAIN[script]
    proc = run_plain(script, [a.replace("{tmp}", str(tmp_path)) for a in args], cwd=ROOT)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{output[-3000:]}"
    assert verification in proc.stdout, f"{script} did not print {verification!r}\n{output[-3000:]}"
    assert ": False" not in proc.stdout, f"{script} printed a failed check\n{proc.stdout[-3000:]}"


def test_nproc_one_runs_one_rank_and_a_contradicting_nproc_is_refused(tmp_path):
    proc = run_plain("src/ch6/parallel_mlp.py", ["--nproc", "1"], cwd=ROOT)
    assert proc.returncode == 0 and "[rank" not in proc.stdout and "MLP" in proc.stdout, proc.stdout + proc.stderr
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    bad = subprocess.run([sys.executable, str(ROOT / "src/ch6/parallel_mlp.py"), "--nproc", "2"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert bad.returncode != 0 and "--nproc 2" in bad.stderr and "WORLD_SIZE 1" in bad.stderr, bad.stderr
