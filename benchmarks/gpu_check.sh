#!/usr/bin/env bash
# GPU verification of ccluster's CUDA code in one command, from a bare copy of the tree on a machine with
# one GPU (H100/H200), a CUDA build of torch, nvcc, ninja, pytest and compute-sanitizer. Finishes within
# 8 minutes: every step has a time budget (the budgets add up to 7 min 25 s), and a step never runs past
# the overall limit either.
#
#   benchmarks/gpu_check.sh [OUT_DIR]       # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# Steps (budget):
#   env        (20 s)  GPU, driver, torch, nvcc; stops AT ONCE (exit 2) when torch.cuda.is_available() is false
#   build      (180 s) the extension in place with its CUDA kernels (FORCE_CUDA=1, setup.py build_ext --inplace);
#                      stops at once when it fails (nothing else could run). Should it run out of time, run
#                      the script again on the same tree: ninja keeps the objects it finished in build/
#   loads      (15 s)  every op has a CUDA kernel, and the library path's CUDA epilogues are registered
#   memcheck   (40 s)  compute-sanitizer --tool memcheck on benchmarks/sanitize_kernels.py (every kernel, small shapes)
#   racecheck  (35 s)  compute-sanitizer --tool racecheck on the same script (--quick), ccluster's kernels only
#   tests      (85 s)  tests/test_cuda.py (CUBLAS_WORKSPACE_CONFIG=:4096:8 for the deterministic-mode test);
#                      fails when every test was skipped
#   bench      (70 s)  the three benchmarks with --device cuda (library path, fused kernels, best pure PyTorch,
#                      cuBLAS GEMM floor, peak memory), each stopping new cases at its deadline and rewriting its
#                      JSON after every case: N = 16384, C = 20, n = 512/2048, m = 1024/2048, 1-2 labels per video
# A step that fails is recorded and the next one still runs (but for env and build). Everything goes to
# OUT_DIR: gpu_check.log (all output), summary.json (per step: exit status, seconds, budget; rewritten after
# every step), test_cuda.xml, bench_*.json. Exit status 0 only when env, build, loads, both sanitizers and
# the tests passed.
#
# Environment: PYTHON (default python3), CUDA_HOME (default: found from nvcc), TORCH_CUDA_ARCH_LIST
# (default 9.0), MAX_JOBS (default: number of CPUs), GPU_CHECK_SECONDS (overall limit, default 470),
# BENCH_SECONDS (benchmark budget, default 70), BENCH_ARGS (extra benchmark options).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
LOG="$OUT_DIR/gpu_check.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

T0=$SECONDS
TOTAL=${GPU_CHECK_SECONDS:-470}
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || PY=python
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export FORCE_CUDA=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ -z "${CUDA_HOME:-}" ]] && command -v nvcc >/dev/null; then
  CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")
  # a wrapper script in /usr/local/bin (exec /usr/local/cuda-X/bin/nvcc) resolves to /usr/local: look inside
  if [[ ! -f "$CUDA_HOME/include/cuda_runtime.h" ]]; then
    real=$(grep -o '/[^ ]*/bin/nvcc' "$(command -v nvcc)" 2>/dev/null | head -1)
    [[ -n "$real" ]] && CUDA_HOME=$(dirname "$(dirname "$real")")
  fi
  export CUDA_HOME
fi

declare -A RESULT DURATION BUDGET
ORDER=()
write_summary() {
  {
    echo "{"
    echo "  \"elapsed_seconds\": $((SECONDS - T0)),"
    echo "  \"limit_seconds\": $TOTAL,"
    echo "  \"steps\": {"
    local first=1 k
    for k in "${ORDER[@]}"; do
      (( first )) || echo ","
      first=0
      printf '    "%s": {"exit": %s, "seconds": %s, "budget": %s}' "$k" "${RESULT[$k]}" "${DURATION[$k]}" "${BUDGET[$k]}"
    done
    echo
    echo "  }"
    echo "}"
  } >"$OUT_DIR/summary.json"
}

# run_step NAME BUDGET CMD...: runs CMD under min(BUDGET, time left); exit 124 = over its time.
run_step() {
  local name=$1 budget=$2
  shift 2
  local left=$((TOTAL - (SECONDS - T0)))
  local limit=$(( budget < left ? budget : left ))
  ORDER+=("$name")
  BUDGET[$name]=$budget
  echo
  if (( limit < 5 )); then
    echo "=== [$name] skipped: ${left}s left of ${TOTAL}s"
    RESULT[$name]='"skipped"'
    DURATION[$name]=0
    write_summary
    return 1
  fi
  echo "=== [$name] $* (limit ${limit}s, $(date +%T))"
  local t=$SECONDS
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  DURATION[$name]=$((SECONDS - t))
  RESULT[$name]=$rc
  echo "=== [$name] exit $rc after ${DURATION[$name]}s"
  write_summary
  return $rc
}

finish() {
  write_summary
  echo
  echo "=== summary"
  cat "$OUT_DIR/summary.json"
  local ok=0 k
  for k in env build loads memcheck racecheck tests; do [[ ${RESULT[$k]:-1} == 0 ]] || ok=1; done
  echo "gpu_check: $([[ $ok == 0 ]] && echo PASSED || echo FAILED) after $((SECONDS - T0))s (log: $LOG)"
  exit $ok
}

# 1. environment: no GPU, no point going on
run_step env 20 "$PY" -c "
import shutil, subprocess, sys, torch
for cmd in (['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv'], ['nvcc', '--version']):
    if shutil.which(cmd[0]):
        subprocess.run(cmd, check=False)
    else:
        print(cmd[0], 'not found')
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit('gpu_check: torch.cuda.is_available() is False: no GPU to check')
print('device', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))
"
if [[ ${RESULT[env]} != 0 ]]; then echo "gpu_check: stopping: no usable CUDA device"; write_summary; exit 2; fi
echo "CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS"

# 2. build, in place (a bare copy of the tree: nothing is installed)
run_step build 180 "$PY" setup.py build_ext --inplace
if [[ ${RESULT[build]} != 0 ]]; then echo "gpu_check: stopping: the build failed"; finish; fi

# 3. the compiled ops load, with CUDA kernels and the library path's CUDA epilogues
run_step loads 15 "$PY" -c "
import torch, ccluster, ccluster.ops as ops
assert ops.has_compiled_ops(), 'ccluster._C did not load: %r' % (ops._LOAD_ERROR,)
for name in ('exemplar_logsumexp', 'exemplar_logsumexp_backward', 'cc_loss', 'fit_step'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('ccluster::' + name, 'CUDA'), name + ': no CUDA kernel'
x = torch.randn(5, 3, device='cuda'); db = torch.randn(2, 4, 3, device='cuda'); lq = torch.zeros(2, 4, device='cuda')
with ccluster.kernel_settings(backend='library'):
    print('library path:', ccluster.exemplar_logsumexp(x, db, lq, 1.0).shape)
print('compiled ops with CUDA kernels: ok;', ccluster.get_kernel_settings())"

# 4-5. compute-sanitizer on every kernel at small shapes (one cudaMalloc per tensor, so that an access past
# a tensor's end is caught)
SAN="compute-sanitizer"
command -v "$SAN" >/dev/null || SAN="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
run_step memcheck 40 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 3 \
  --print-limit 20 "$PY" benchmarks/sanitize_kernels.py
# racecheck only our kernels (names in namespace ccluster), where the sanitizer can filter by kernel name:
# cuBLAS's Hopper GEMMs synchronise shared memory through asynchronous copies and barriers not ours to check
RACE_FILTER=()
"$SAN" --help 2>/dev/null | grep -q -- "--kernel-name" && RACE_FILTER=(--kernel-name kns=ccluster)
run_step racecheck 35 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool racecheck --error-exitcode 3 \
  ${RACE_FILTER[@]+"${RACE_FILTER[@]}"} --print-limit 20 "$PY" benchmarks/sanitize_kernels.py --quick

# 6. the CUDA tests; every test skipped counts as a failure
run_step tests 85 env CUBLAS_WORKSPACE_CONFIG=:4096:8 "$PY" -m pytest tests/test_cuda.py -q -rfEsx \
  -p no:cacheprovider --junitxml="$OUT_DIR/test_cuda.xml"
if [[ -f "$OUT_DIR/test_cuda.xml" ]] && [[ ${RESULT[tests]} == 0 ]]; then
  "$PY" - "$OUT_DIR/test_cuda.xml" <<'PY' || RESULT[tests]=6
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
print(f"tests/test_cuda.py: {tests} collected, {skipped} skipped")
sys.exit(1 if tests == 0 or skipped == tests else 0)
PY
fi

# 7. benchmarks: each one rewrites its JSON after every case and starts no case after its deadline
BENCH=${BENCH_SECONDS:-70}
bench() {  # bench NAME SHARE_PERCENT SCRIPT ARGS...
  local name=$1 share=$2 script=$3
  shift 3
  local budget=$(( BENCH * share / 100 ))
  # shellcheck disable=SC2086  # BENCH_ARGS: extra options, e.g. "--rounds 2"
  run_step "$name" "$budget" "$PY" "benchmarks/$script" --device cuda --json "$OUT_DIR/$name.json" \
    --deadline $(( budget * 2 / 3 )) "$@" ${BENCH_ARGS:-}
}
bench bench_lse 45 bench_exemplar_logsumexp.py --dtype bfloat16,float32,tf32 --rounds 3 \
  --sizes "16384,20,512,1024;16384,20,2048,2048;16384,20,512,2048;16384,20,2048,1024"
bench bench_cc_loss 40 bench_cc_loss.py --dtype bfloat16,float32,tf32 --rounds 3 \
  --sizes "16,1024,20,512,1024;16,1024,20,2048,2048;16,1024,20,512,2048;16,1024,20,2048,1024"
bench bench_fit 15 bench_fit.py --dtype float32 --rounds 3 --no-tol --sizes "16,1024,20,512,1024"

finish
