#!/usr/bin/env bash
# The course's checks that need a GPU, as one command (about 5 minutes on one H100/H200):
#
#     scripts/gpu_check.sh [RESULTS_FILE]        # default: outputs/gpu_check/results.md
#
# Steps (each with its own time limit; a failed step does not stop the others):
#   1. environment     GPU name, driver, torch and CUDA versions
#   2. kernel build    the CPU and CUDA kernels (nvcc, cached in build/kernels)
#      kernel tests    pytest tests/kernels/test_kernels_cuda.py (CUDA kernels vs float64 references)
#   3. kernel bench    python -m lessons_pkg.kernels.bench on the GPU; goal: every forward >= 75% of the
#                      measured copy bandwidth
#   4. training        GPT-2 124M (12 layers, hidden 768, 12 heads, sequence 1024, vocabulary 50257), bf16,
#                      TP=1, 30 iterations of 8 x 1024 tokens: tokens/s and MFU; goal MFU >= 40% on H100/H200
#   5. generation      scripts/bench_generation.py --device cuda --quick (our KV-cache engine against transformers'
#                      generate, float32, same tokens required); its JSON and plot go to the logs folder
# Without a CUDA device every GPU step is SKIPPED (with the reason) and the script exits 0: that is
# what the CPU test (tests/kernels/test_bench_scripts.py) checks. Logs: <results dir>/logs/<step>.log;
# the results file is written by scripts/gpu_check_summary.py from those logs.
#
# Environment: GPU_CHECK_BUDGET_S (460: a step that would start after it is skipped), PYTHON (default .venv/bin/python if present, else python3), GPU_CHECK_TRAIN_ITERS (30),
# GPU_CHECK_PEAK_TFLOPS (dense bf16 peak for the MFU; default from the GPU's name: H100/H200 989, A100 312).
set -u
cd "$(dirname "$0")/.."
RESULTS=${1:-outputs/gpu_check/results.md}
DIR=$(dirname "$RESULTS")
LOGS="$DIR/logs"
mkdir -p "$LOGS"
rm -f "$LOGS"/*.log "$LOGS"/*.status "$LOGS"/kernel_bench.md "$LOGS"/generation.json "$LOGS"/generation_cache.png  # nothing of an earlier run
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
ITERS=${GPU_CHECK_TRAIN_ITERS:-30}
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET_S:-460}  # every step ends by then (8 minutes with the summary and some slack)

# run_step NAME TIMEOUT_S COMMAND...: log to $LOGS/NAME.log, status line "NAME STATUS SECONDS" to NAME.status
run_step() {
  local name=$1 limit=$2
  shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if [ "$left" -lt 15 ]; then skip_step "$name" "out of the ${BUDGET}-second budget"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s) rc
  echo "== $name: $*" | tee "$LOGS/$name.log"
  timeout --kill-after=10 "$limit" "$@" >>"$LOGS/$name.log" 2>&1
  rc=$?
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="timeout(${limit}s)"; elif [ $rc -ne 0 ]; then status="failed(exit=$rc)"; fi
  echo "$name $status $(( $(date +%s) - t0 ))" > "$LOGS/$name.status"
  echo "   -> $status"
}

skip_step() {  # skip_step NAME REASON
  echo "$1 skipped 0 $2" > "$LOGS/$1.status"
  echo "== $1: skipped ($2)"
}

run_step environment 60 "$PYTHON" -c "
import os, platform, torch
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('cuda_available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('gpu', torch.cuda.get_device_name(0), '|', round(p.total_memory / 2**30, 1), 'GiB |', p.multi_processor_count, 'SMs')
print('load_average', os.getloadavg())
"
if grep -q "^cuda_available True" "$LOGS/environment.log"; then
  GPU_NAME=$(sed -n 's/^gpu \(.*\) | .* GiB .*/\1/p' "$LOGS/environment.log")
  command -v nvidia-smi >/dev/null && nvidia-smi >>"$LOGS/environment.log" 2>&1
  run_step kernel_build 300 "$PYTHON" -m lessons_pkg.kernels build
  run_step kernel_tests 180 "$PYTHON" -m pytest tests/kernels/test_kernels_cuda.py -q -p no:cacheprovider
  run_step kernel_bench 180 "$PYTHON" -m lessons_pkg.kernels.bench --device cuda --shapes issue course \
    --no-compile --no-unfused --rounds 20 --output "$LOGS/kernel_bench.md"
  PEAK=${GPU_CHECK_PEAK_TFLOPS:-}
  if [ -z "$PEAK" ]; then
    case "$GPU_NAME" in
      *H100*|*H200*|*GH200*) PEAK=989 ;;
      *A100*) PEAK=312 ;;
      *L40S*) PEAK=362 ;;
      *) PEAK= ;;
    esac
  fi
  run_step training 240 "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node 1 src/ch6/pretrain_gpt.py \
    --num-layers 12 --hidden-size 768 --num-attention-heads 12 --seq-length 1024 --max-position-embeddings 1024 \
    --micro-batch-size 8 --global-batch-size 8 --train-iters "$ITERS" --lr 6e-4 --bf16 \
    --hidden-dropout 0 --attention-dropout 0 --mock-data --vocab-size 50257 --log-interval 10 --eval-iters 0 \
    ${PEAK:+--peak-tflops "$PEAK"}
  GEN=""
  for f in scripts/bench_generation.py src/ch6/bench_generation.py; do [ -f "$f" ] && GEN=$f && break; done
  if [ -n "$GEN" ]; then
    GEN_ARGS=()
    grep -q -- '"--device"' "$GEN" && GEN_ARGS+=(--device cuda)
    grep -q -- '"--quick"' "$GEN" && GEN_ARGS+=(--quick)
    grep -q -- '"--json"' "$GEN" && GEN_ARGS+=(--json "$LOGS/generation.json")
    grep -q -- '"--plot"' "$GEN" && GEN_ARGS+=(--plot "$LOGS/generation_cache.png")
    run_step generation 120 "$PYTHON" "$GEN" "${GEN_ARGS[@]}"
  else
    skip_step generation "no scripts/bench_generation.py or src/ch6/bench_generation.py in this checkout"
  fi
elif grep -q "^cuda_available False" "$LOGS/environment.log"; then
  for step in kernel_build kernel_tests kernel_bench training generation; do skip_step $step "no CUDA device (torch.cuda.is_available() is False)"; done
else
  for step in kernel_build kernel_tests kernel_bench training generation; do skip_step $step "the environment step did not finish (see its log)"; done
fi

"$PYTHON" scripts/gpu_check_summary.py "$LOGS" "$RESULTS" --seconds $(( $(date +%s) - START ))
