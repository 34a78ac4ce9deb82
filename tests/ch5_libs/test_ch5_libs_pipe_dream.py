"""DeepSpeed PipelineModule demo (src/ch5/pipe_dream.py) on CPU ranks, and the `deepspeed` launcher's wrapper."""
import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from transformers import GPT2LMHeadModel

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src" / "ch5"))
from deepspeed_launch import DeepSpeedLaunchError, deepspeed_launch  # noqa: E402
from gpt2_sequential import tiny_config  # noqa: E402
from pipe_dream import hf_name, logged_param_counts, pipeline_layers, show_pipeline_log_only  # noqa: E402


def test_every_layer_parameter_maps_to_a_distinct_gpt2_parameter():
    config = tiny_config(101, n_positions=32, n_embd=32, n_layer=3, n_head=4)
    reference = dict(GPT2LMHeadModel(config).named_parameters())
    specs = pipeline_layers(config)
    names = []
    for index, spec in enumerate(specs):
        prefix = "tied_modules.wte." if hasattr(spec, "key") else f"{index}."
        for name, param in spec.build().named_parameters():
            hf = hf_name(prefix + name, config.n_layer)
            assert reference[hf].shape == param.shape, (prefix + name, hf)
            names.append(hf)
    # the tied matrix appears twice (embedding and LM head), everything else once, nothing is missing
    assert sorted(set(names)) == sorted(reference)
    assert len(names) == len(reference) + 1


def test_pipe_dream_on_2_ranks_matches_single_process_and_learns():
    # 2 CPU ranks = 2 pipeline stages, started the way a learner first tries it (python FILE --nproc 2: our
    # launcher); the `deepspeed` launcher runs it on 4 ranks in chapters/05 (nbval checks the same lines)
    done = subprocess.run([sys.executable, "src/ch5/pipe_dream.py", "--nproc", "2", "--steps", "12"], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = re.sub(r"(?m)^\[rank \d+\] ", "", done.stdout)  # the other ranks' lines, without their label
    checks = [line for line in out.splitlines() if line.startswith("check:")]
    assert len(checks) == 6 and all(line.endswith(": True") for line in checks), out
    assert "stage 0: gradients" in out and "stage 1: gradients" in out
    assert "stage=0 layers=4" in out and "stage=1 layers=4" in out  # DeepSpeed's partition: 2 blocks each
    # DeepSpeed's own pipeline lines come through: 4 micro-batches per step, each stage's parameters
    assert "CONFIG: micro_batches=4 micro_batch_size=2" in out, out
    assert "RANK=0 STAGE=0 LAYERS=4 [0, 4) STAGE_PARAMS=" in out and "RANK=1 STAGE=1 LAYERS=4 [4, 8) STAGE_PARAMS=" in out, out
    assert "DeepSpeed info: version" not in out and "DeepSpeedEngine configuration" not in out  # the rest stays out


def test_deepspeed_log_shows_its_pipeline_lines_and_warnings_only():
    logger = logging.getLogger("test-pipe-dream-log")
    logger.propagate = False
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setLevel(logging.WARNING)  # as DeepSpeed 0.19 sets its handler
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    log = show_pipeline_log_only(logger)
    logger.info("CONFIG: micro_batches=4 micro_batch_size=2")
    logger.info("RANK=1 STAGE=1 LAYERS=4 [4, 8) STAGE_PARAMS=132864 (0.133M) TOTAL_PARAMS=273792 (0.274M) "
                "UNIQUE_PARAMS=241024 (0.241M)")
    logger.info("DeepSpeed Final Optimizer = Adam")
    logger.warning("a warning")
    printed = stream.getvalue().splitlines()
    assert printed == ["CONFIG: micro_batches=4 micro_batch_size=2", log.lines[1], "a warning"], printed
    assert logged_param_counts(log.lines) == {"STAGE_PARAMS": 132864, "TOTAL_PARAMS": 273792, "UNIQUE_PARAMS": 241024}
    assert logged_param_counts(["CONFIG: micro_batches=4"]) == {}


def test_deepspeed_launch_reports_a_failing_script(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nprint('about to fail')\nsys.exit(3)\n")
    with pytest.raises(DeepSpeedLaunchError, match=r"failed with exit code") as info:
        deepspeed_launch(str(script), num_gpus=1, timeout=120, echo=False)
    assert "about to fail" in str(info.value)


def test_deepspeed_launch_kills_a_job_past_its_timeout_and_leaves_no_process(tmp_path):
    # the rank ignores SIGTERM: only the launcher's SIGKILL of every process of the job ends it
    script = tmp_path / "hangs.py"
    pid_file = tmp_path / "pid"
    script.write_text("import os, signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                      f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
                      "print('started', flush=True)\ntime.sleep(600)\n")
    with pytest.raises(DeepSpeedLaunchError, match=r"ran past its timeout of 20 s and was killed"):
        deepspeed_launch(str(script), num_gpus=1, timeout=20, echo=False)
    pid = int(pid_file.read_text())
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    assert not alive, f"rank {pid} outlived the launch"


def test_deepspeed_launch_command_line_names_a_bad_request(capsys):
    from deepspeed_launch import main

    assert main(["--num_gpus", "0", "src/ch5/pipe_dream.py"]) == 2
    assert "error: num_gpus must be >= 1, got 0" in capsys.readouterr().err
