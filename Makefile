# The course's two commands: `make course` and `make test`. Both set up .venv first.
#   TORCH_SPEC   the torch to install first (default torch==2.13.0; e.g. TORCH_SPEC="torch==2.13.0 --index-url ...")
#   PYTHON       the interpreter that creates .venv (default python3)
PYTHON     ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV       := .venv
PY         := $(VENV)/bin/python
LAUNCH     := $(PY) -m lessons_pkg.launch
export OMP_NUM_THREADS ?= 1
export PYTHONUNBUFFERED := 1

.PHONY: setup course test lab clean course-ch6-warmup course-ch6-tensor-parallel course-ch6-kernels \
        course-ch6-data course-ch6-pretrain course-ch5 course-ch5-schedules course-ch6-after course-ch6-long

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m lessons_pkg.kernels build
	bash scripts/install_chromium.sh || echo "note: chromium not installed (needs root); the web page's browser test installs it or skips"
	touch $@

# ---- make course: every chapter's demos, real multi-process runs -------------
course: setup course-ch5 course-ch5-schedules course-ch6-warmup course-ch6-tensor-parallel course-ch6-kernels \
        course-ch6-data course-ch6-pretrain course-ch6-after course-ch6-long
	@echo "course finished: every demo above printed its verification"

course-ch6-warmup: setup
	@echo "== Chapter 6 warm-up: splitting one matrix product =="
	$(PY) src/ch6/non_parallelism.py
	$(PY) src/ch6/column_parallelism.py
	$(PY) src/ch6/row_parallelism.py
	$(PY) src/ch6/megatron_mlp_gelu.py
	$(PY) src/ch6/column_parallelism_dist.py --nproc 2
	$(PY) src/ch6/column_parallelism_dist.py --nproc 4
	$(PY) src/ch6/row_parallelism_dist.py --nproc 2
	$(PY) src/ch6/row_parallelism_dist.py --nproc 4

course-ch6-tensor-parallel: setup
	@echo "== Chapter 6: Megatron tensor parallelism (every demo checks itself against one process) =="
	$(PY) src/ch6/parallel_mlp.py --nproc 2
	$(PY) src/ch6/parallel_mlp.py --nproc 4
	$(PY) src/ch6/mlp_orderings.py --nproc 2
	$(PY) src/ch6/mlp_orderings.py --nproc 4
	$(PY) src/ch6/parallel_attention.py --nproc 2
	$(PY) src/ch6/parallel_attention.py --nproc 4
	$(PY) src/ch6/vocab_parallel_embedding.py --nproc 2
	$(PY) src/ch6/vocab_parallel_embedding.py --nproc 4
	$(PY) src/ch6/vocab_parallel_cross_entropy.py --nproc 2
	$(PY) src/ch6/vocab_parallel_cross_entropy.py --nproc 4
	$(PY) src/ch6/parallel_gpt.py --nproc 2
	$(PY) src/ch6/parallel_gpt.py --nproc 4
	$(PY) src/ch6/parallelformers_inference.py --nproc 2
	$(PY) src/ch6/parallelformers_inference.py --nproc 4

course-ch6-kernels: setup
	@echo "== Chapter 6, part 2: fused kernels (build, correctness, quick benchmark) =="
	$(PY) -m lessons_pkg.kernels build
	$(PY) -m lessons_pkg.kernels.check
	$(LAUNCH) --nproc 2 src/ch6/parallel_gpt_fused.py
	$(PY) -m lessons_pkg.kernels.bench --quick --no-compile

course-ch6-data: setup
	@echo "== Chapter 6, part 3: corpus -> tokenizer -> data/my-gpt2_text_document.bin/.idx =="
	$(PY) src/ch6/megatron_datasets.py --output data/megatron_datasets.jsonl --show 3 --show-chars 300
	$(PY) src/ch6/train_tokenizer.py --input data/megatron_datasets.jsonl --output-dir data \
		--tokenizer train --vocab-size 2048
	$(PY) src/ch6/preprocess_data.py --input data/megatron_datasets.jsonl --output-prefix data/my-gpt2 \
		--vocab-file data/vocab.json --merge-file data/merges.txt --tokenizer-type GPT2BPETokenizer \
		--json-keys text --append-eod --workers 2 --log-interval 250

course-ch6-pretrain: setup
	@echo "== Chapter 6, part 4: pretrain a GPT with TP=2 x PP=2 on 4 CPU processes, checkpoint, plot =="
	test -f data/my-gpt2_text_document.idx || $(MAKE) course-ch6-data
	rm -rf outputs/ch6/pretrain && mkdir -p outputs/ch6/pretrain
	$(LAUNCH) --nproc 4 --timeout 900 src/ch6/pretrain_gpt.py \
		--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
		--num-layers 4 --hidden-size 64 --num-attention-heads 4 --seq-length 64 \
		--micro-batch-size 2 --global-batch-size 8 --train-iters 50 \
		--lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-fraction 0.1 --weight-decay 0.01 --clip-grad 1.0 \
		--data-path data/my-gpt2_text_document --vocab-file data/vocab.json --merge-file data/merges.txt \
		--split 949,50,1 --log-interval 10 --eval-interval 25 --eval-iters 2 --save-interval 25 \
		--save outputs/ch6/pretrain/checkpoints --log-json outputs/ch6/pretrain/log.jsonl \
		--tensorboard-dir outputs/ch6/pretrain/tensorboard
	$(PY) -m lessons_pkg.training.plot outputs/ch6/pretrain/log.jsonl outputs/ch6/pretrain_loss.png

course-ch6-long: setup
	@echo "== Chapter 6f: sequence parallelism at TP=2 and TP=4, checked against one process; memory per layer =="
	$(PY) src/ch6/sequence_parallel.py --nproc 2
	$(PY) src/ch6/sequence_parallel.py --nproc 4
	$(PY) scripts/bench_sequence_parallel.py --plot outputs/ch6/sequence_parallel_memory.png
	@echo "== Chapter 6f: context parallelism (ring attention) at CP=2 and CP=4, checked against one process =="
	$(PY) src/ch6/context_parallel.py --nproc 2
	$(PY) src/ch6/context_parallel.py --nproc 4
	$(PY) scripts/bench_context_parallel.py --seq 2048 --plot outputs/ch6

course-ch6-after: setup
	@echo "== Chapter 6e: convert the trained checkpoint (TP=1, PP=4, transformers), generate at TP=1 and TP=2 x PP=2 =="
	test -f outputs/ch6/pretrain/checkpoints/latest_checkpointed_iteration.txt || $(MAKE) course-ch6-pretrain
	rm -rf outputs/ch6/ckpt-tp1 outputs/ch6/ckpt-pp4 outputs/ch6/gpt2-hf
	$(PY) src/ch6/checkpoint_util.py --model-type GPT --load-dir outputs/ch6/pretrain/checkpoints \
		--save-dir outputs/ch6/ckpt-tp1 --target-tensor-parallel-size 1 --target-pipeline-parallel-size 1 --verify
	$(PY) src/ch6/checkpoint_util.py --model-type GPT --load-dir outputs/ch6/pretrain/checkpoints \
		--save-dir outputs/ch6/ckpt-pp4 --target-tensor-parallel-size 1 --target-pipeline-parallel-size 4 --verify
	$(PY) src/ch6/checkpoint_util.py --loader megatron --saver hf --load-dir outputs/ch6/pretrain/checkpoints \
		--save-dir outputs/ch6/gpt2-hf --verify
	$(PY) src/ch6/generate.py --load outputs/ch6/pretrain/checkpoints --prompt "The history of" \
		--prompt "In 1990, the city" --tokens-to-generate 32 --greedy --compare-hf
	$(PY) src/ch6/generate.py --load outputs/ch6/pretrain/checkpoints --prompt "The history of" \
		--prompt "In 1990, the city" --tokens-to-generate 32 --greedy --compare-hf \
		--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
	@echo "== Chapter 6e: zero-shot LAMBADA and WikiText-103 (offline: stand-ins from held-out documents) at TP=1 and TP=2 x PP=2 =="
	rm -rf outputs/ch6/eval
	for layout in "1 1" "2 2"; do set -- $$layout; \
		$(PY) src/ch6/evaluate_gpt.py --task LAMBADA --strict-lambada --valid-data auto --no-progress \
			--load outputs/ch6/pretrain/checkpoints --tensor-model-parallel-size $$1 --pipeline-model-parallel-size $$2 \
			--results-json outputs/ch6/eval/lambada_tp$$1_pp$$2.json || exit 1; \
		$(PY) src/ch6/evaluate_gpt.py --task WIKITEXT103 --overlapping-eval 32 --valid-data auto --no-progress \
			--load outputs/ch6/pretrain/checkpoints --tensor-model-parallel-size $$1 --pipeline-model-parallel-size $$2 \
			--results-json outputs/ch6/eval/wikitext_tp$$1_pp$$2.json || exit 1; \
	done
	$(PY) -m lessons_pkg.evaluation.metrics --compare outputs/ch6/eval/lambada_tp1_pp1.json outputs/ch6/eval/lambada_tp2_pp2.json
	$(PY) -m lessons_pkg.evaluation.metrics --compare outputs/ch6/eval/wikitext_tp1_pp1.json outputs/ch6/eval/wikitext_tp2_pp2.json

course-ch5: setup
	@echo "== Chapter 5: GPipe (torchgpipe) and PipeDream-Flush (DeepSpeed) on a tiny GPT-2 =="
	$(PY) src/ch5/gpipe.py --steps 300
	$(PY) src/ch5/gpipe_memory.py
	$(PY) src/ch5/deepspeed_launch.py --num_gpus 4 --timeout 900 src/ch5/pipe_dream.py --steps 200

course-ch5-schedules: setup
	@echo "== Chapter 5: our own pipeline schedules (writes outputs/ch5/*.png) =="
	$(PY) src/ch5/schedules_verify.py --nproc 2
	$(PY) src/ch5/schedules_verify.py --nproc 4
	$(PY) src/ch5/pipeline_timeline.py --nproc 4
	$(PY) src/ch5/pipeline_memory.py --nproc 4

# ---- make test: unit and multi-rank tests and every notebook under nbval, in one session ---
# Two workers (pytest-xdist), one per core: most tests wait on process start-up and collectives, and
# --dist loadfile keeps each module (and each notebook's cells, in order) on one worker. One session for
# tests/ and chapters/ lets a worker that finishes its share of one take work from the other (two sessions
# left a core idle at the end of each); the longest units go first (the notebooks, then the test files
# that take 25 s or more, named in HEAVY_TESTS; pytest collects each file once) so that the many short test
# files fill the end: in the order of the directories, test_training_pretrain_gpt.py (150 s) came last and
# one worker waited ~100 s for it. --nbval applies to the notebooks only.
# --durations=15 prints the slowest tests of every run: the ones to make cheaper before CI nears 15 minutes.
TEST_WORKERS ?= 2
# (not tests/serving: its modules import helpers `from conftest`, which only resolves when that folder is
# collected before tests/evaluation, whose conftest would otherwise take the name)
HEAVY_TESTS := tests/training/test_training_pretrain_gpt.py tests/course/test_src_plain_python.py \
	tests/checkpoint/test_other_tools.py tests/foundation/test_bad_inputs.py tests/ch5_libs/test_ch5_libs_pipe_dream.py \
	tests/foundation/test_launch.py
test: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=15 --nbval --nbval-current-env \
		--nbval-sanitize-with chapters/nbval_sanitize.cfg --nbval-cell-timeout 900 -p no:cacheprovider \
		chapters $(HEAVY_TESTS) tests

# JupyterLab on chapters/, as a user or as root (adds --allow-root); LAB_IP, LAB_PORT, LAB_OPEN: see scripts/lab.sh
lab: setup
	JUPYTER=$(VENV)/bin/jupyter scripts/lab.sh

clean:
	rm -rf $(VENV) build *.egg-info outputs
