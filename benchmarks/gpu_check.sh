#!/usr/bin/env bash
# GPU verification of the CUDA kernels, from a fresh copy of the tree on a machine with a GPU, a CUDA
# build of torch and nvcc. About 8 minutes on one H100 (16 CPU cores): build ~2-4 min, tests ~2 min,
# benchmarks the rest.
#
#   benchmarks/gpu_check.sh [OUT_DIR]       # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# Steps, each with its own time limit; a failing step is recorded and the next one still runs:
#   1. environment (GPU, torch, nvcc)
#   2. build the extension in place with the CUDA kernels (FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=9.0)
#   3. pytest tests/test_cuda.py, then the CUDA-parametrised cases of the other test files (-k cuda)
#   4. the benchmarks with --device cuda (float32 and bfloat16), each writing OUT_DIR/<name>.json
# Writes at most 8 files, all directly in OUT_DIR: gpu_check.log (everything), summary.json (step
# results), and one JSON per benchmark (5). Exit status: 0 when the build and the tests passed.
#
# Environment: PYTHON (default python), CUDA_HOME (default: found from nvcc), TORCH_CUDA_ARCH_LIST
# (default 9.0), MAX_JOBS (default: number of CPUs), BENCH_TIMEOUT (seconds per benchmark, default 90),
# BENCH_ARGS (extra benchmark options, e.g. --no-memory to skip the peak-memory subprocesses).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

PY=${PYTHON:-python}
command -v "$PY" >/dev/null || PY=python3
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FORCE_CUDA=1
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  # a wrapper script in /usr/local/bin (exec /usr/local/cuda-X/bin/nvcc) resolves to /usr/local: look inside
  if [[ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
    real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1)
    [[ -n "$real" ]] && CUDA_HOME=$(dirname "$(dirname "$real")")
  fi
  export CUDA_HOME
fi

declare -A RESULT DURATION
run_step() {  # run_step NAME TIMEOUT_S CMD...
  local name=$1 limit=$2
  shift 2
  echo
  echo "=== [$name] $* (limit ${limit}s, $(date +%T))"
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  DURATION[$name]=$((SECONDS - t0))
  RESULT[$name]=$rc
  echo "=== [$name] exit $rc after ${DURATION[$name]}s"
  return $rc
}

run_step env 60 bash -c "nvidia-smi || true; nvcc --version | tail -2; echo CUDA_HOME=\$CUDA_HOME; \
  $PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", \
  torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")'"

run_step build 420 "$PY" setup.py build_ext --inplace
run_step loads 60 "$PY" -c "
import torch, ccluster.ops as ops
assert ops.has_compiled_ops(), 'ccluster._C did not load'
for name in ('exemplar_logsumexp', 'exemplar_logsumexp_backward', 'cc_loss', 'fit_step'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('ccluster::' + name, 'CUDA'), name + ': no CUDA kernel'
print('compiled ops with CUDA kernels: ok')"

run_step test_cuda 300 "$PY" -m pytest tests/test_cuda.py -q -rfEsx -p no:cacheprovider
# the CUDA cases of the other test files (exit 5 = none collected: fine)
run_step test_other_cuda 180 "$PY" -m pytest tests -q -rfEx -p no:cacheprovider --ignore=tests/test_cuda.py -k cuda
[[ ${RESULT[test_other_cuda]} == 5 ]] && RESULT[test_other_cuda]=0

# The benchmarks, at the sizes of the CUDA targets: float32 and bfloat16 log-sum-exp (bf16 against the
# cuBLAS bf16 GEMM), the loss at N = 16384 (16 videos x 1024), C = 20, n = 512, m = 2048 and at the
# THUMOS-like batch, one fit iteration.
# shellcheck disable=SC2086  # BENCH_ARGS: extra options, e.g. "--no-memory --rounds 2"
bench() {  # bench NAME SCRIPT ARGS...
  local name=$1 script=$2
  shift 2
  run_step "$name" "${BENCH_TIMEOUT:-90}" "$PY" "benchmarks/$script" --device cuda --json "$OUT_DIR/$name.json" \
    "$@" ${BENCH_ARGS:-}
}
bench lse_float32 bench_exemplar_logsumexp.py
bench lse_bfloat16 bench_exemplar_logsumexp.py --dtype bfloat16
bench cc_loss_float32 bench_cc_loss.py --sizes "16,1024,20,512,2048;10,750,20,256,1024"
bench cc_loss_bfloat16 bench_cc_loss.py --dtype bfloat16 --sizes "16,1024,20,512,2048"
bench fit_float32 bench_fit.py

# summary.json: every step's exit status and duration
{
  echo "{"
  first=1
  for k in "${!RESULT[@]}"; do
    (( first )) || echo ","
    first=0
    printf '  "%s": {"exit": %s, "seconds": %s}' "$k" "${RESULT[$k]}" "${DURATION[$k]}"
  done
  echo
  echo "}"
} >"$OUT_DIR/summary.json"
echo
echo "=== summary"; cat "$OUT_DIR/summary.json"
ok=0
for k in build loads test_cuda test_other_cuda; do [[ ${RESULT[$k]:-1} == 0 ]] || ok=1; done
echo "gpu_check: $([[ $ok == 0 ]] && echo PASSED || echo FAILED) (log: $LOG)"
exit $ok
