#!/usr/bin/env bash
# GPU verification of ccluster in one command, from a bare copy of the tree on a machine with one GPU
# (H100/H200), 16 CPU cores, a CUDA build of torch, nvcc, ninja and pytest (compute-sanitizer optional).
# Decides within 8 minutes, build included: every step has a time budget (they add up to 465 s) and no
# step runs past the overall limit (GPU_CHECK_SECONDS, 470 s). Its exit status is the verdict.
#
#   benchmarks/gpu_check.sh [OUT_DIR]       # OUT_DIR defaults to $OUT, else ./gpu_check_out
#
# Steps (budget), the decisive ones first:
#   env         (15)  GPU, driver, torch, nvcc; stops AT ONCE (exit 2) without a usable CUDA device
#   build      (150)  the extension in place with its CUDA kernels (FORCE_CUDA=1, setup.py build_ext --inplace,
#                     MAX_JOBS = CPUs); stops at once when it fails. Out of time: run the script again on the
#                     same tree, ninja keeps the objects it finished in build/
#   loads       (10)  every op has a CUDA kernel and the library path's CUDA epilogues are registered
#   tests_cuda  (40)  tests/test_cuda.py: fused kernels vs the library path, tensor cores, TF32 and centring,
#                     host pairs, no host synchronisation on the hot path (torch.cuda.set_sync_debug_mode
#                     "error"), CUDA graphs of the ops and of a training step replayed against eager, streams,
#                     deterministic mode (CUBLAS_WORKSPACE_CONFIG=:4096:8), the workspace bound
#   bench_lse   (40)  exemplar_logsumexp at N = 7500, C = 20, n = 256, m = 1024 / 2048 and a large case,
#                     float32 (TF32 off), TF32, bfloat16: ours, the best pure PyTorch, one cuBLAS GEMM;
#                     CUDA-event timing, median of >= 20 calls after a warm-up; peak memory; error vs float64
#   bench_cc    (55)  the convex clustering loss fwd+bwd at 10 videos x 750 segments (1.1 labels per video),
#                     C = 20, n = 256, m = 1024 / 2048, and a large case; same precisions and timing; pairs on
#                     the GPU and on the CPU; both plans; errors of the loss, dL/dx, dL/ddb, dL/dlog_q; the
#                     cost model's plan and estimates
#   targets      (5)  benchmarks/gpu_targets.py: asserts the targets on the two JSONs, names every miss
#   train       (25)  python -m train fit --config configs/tiny.yaml device=cuda, to the end
#   steptime    (45)  python -m train steptime at THUMOS14 model sizes (embed 1024, C x n = 20 x 256 on the
#                     synthetic "calibrated" preset, batch 10 x up to 750 segments) on cuda; includes writing
#                     the preset (~380 MB, ~25 s of disk here)
#   tests_ops   (35)  the device-parametrised op tests (-m cuda): oracle, gradcheck, opcheck, odd / empty /
#                     non-contiguous shapes, extreme alpha d, NaN, bad input, the library path's plans
#   memcheck    (25)  compute-sanitizer memcheck on benchmarks/sanitize_kernels.py (every kernel, small shapes)
#   racecheck   (20)  compute-sanitizer racecheck on the same (--quick), ccluster's kernels only
# A step that fails is recorded and the next one still runs (but for env and build). summary.json is
# rewritten after every step (exit status, seconds, budget, and for the sanitizers "unavailable" when the
# device or its driver refuses them), so a timeout still leaves every finished figure; each step's output is
# in OUT_DIR/<step>.log, everything in gpu_check.log.
#
# Exit status: 0 only when every step passed, the targets included, and each sanitizer passed or was
# "unavailable" (refused by the device: not a failure, recorded as such). A step skipped for lack of time
# is a failure: nothing was decided. The closing lines name every failed step and every missed target.
#
# Environment: PYTHON (default python3), CUDA_HOME (default: found from nvcc), TORCH_CUDA_ARCH_LIST
# (default 9.0), MAX_JOBS (default: number of CPUs), GPU_CHECK_SECONDS (overall limit, default 470),
# BENCH_ARGS (extra benchmark options).
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
export CUBLAS_WORKSPACE_CONFIG=${CUBLAS_WORKSPACE_CONFIG:-:4096:8}
export CCLUSTER_CACHE=${CCLUSTER_CACHE:-${TMPDIR:-/tmp}/ccluster_gpu_check_cache}  # synthetic sets: not in OUT_DIR
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
    echo "  },"
    if [[ -f "$OUT_DIR/targets.json" ]]; then
      echo "  \"targets\": $(cat "$OUT_DIR/targets.json")"
    else
      echo "  \"targets\": null"
    fi
    echo "}"
  } >"$OUT_DIR/summary.json.tmp" && mv "$OUT_DIR/summary.json.tmp" "$OUT_DIR/summary.json"
}

# run_step NAME BUDGET CMD...: runs CMD under min(BUDGET, time left); exit 124 = over its time. Output also
# goes to OUT_DIR/NAME.log.
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
  timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
  local rc=${PIPESTATUS[0]}
  DURATION[$name]=$((SECONDS - t))
  RESULT[$name]=$rc
  echo "=== [$name] exit $rc after ${DURATION[$name]}s"
  write_summary
  return $rc
}

# a sanitizer step that never reached our script (no "sanitize_kernels:" line) and reported no error of
# ours was refused by the device or driver: "unavailable", not a failure
sanitizer_verdict() {
  local name=$1
  [[ ${RESULT[$name]} == 0 ]] && return
  if ! grep -q "sanitize_kernels: backend=" "$OUT_DIR/$name.log" && \
     ! grep -qE "=========  *(Invalid|Race|Error: [0-9]+ (error|hazard))" "$OUT_DIR/$name.log"; then
    RESULT[$name]='"unavailable"'
    echo "=== [$name] unavailable: the sanitizer did not start the program (refused by the device or driver)"
    write_summary
  fi
}

finish() {
  write_summary
  echo
  echo "=== summary"
  cat "$OUT_DIR/summary.json"
  local failed=() k
  for k in "${ORDER[@]}"; do
    case "${RESULT[$k]}" in
      0|'"unavailable"') ;;
      *) failed+=("$k (${RESULT[$k]})") ;;
    esac
  done
  if [[ -f "$OUT_DIR/targets.log" ]]; then grep -E "^  - " "$OUT_DIR/targets.log" | sed 's/^  - /target missed: /'; fi
  if (( ${#failed[@]} == 0 )); then
    echo "gpu_check: PASSED after $((SECONDS - T0))s (log: $LOG)"
    exit 0
  fi
  echo "gpu_check: FAILED after $((SECONDS - T0))s: ${failed[*]} (log: $LOG)"
  exit 1
}

# 1. environment: no GPU, no point going on
run_step env 15 "$PY" -c "
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
run_step build 150 "$PY" setup.py build_ext --inplace
if [[ ${RESULT[build]} != 0 ]]; then echo "gpu_check: stopping: the build failed"; finish; fi

# 3. the compiled ops load, with CUDA kernels and the library path's CUDA epilogues
run_step loads 10 "$PY" -c "
import torch, ccluster, ccluster.ops as ops
assert ops.has_compiled_ops(), 'ccluster._C did not load: %r' % (ops._LOAD_ERROR,)
for name in ('exemplar_logsumexp', 'exemplar_logsumexp_backward', 'cc_loss', 'fit_step'):
    assert torch._C._dispatch_has_kernel_for_dispatch_key('ccluster::' + name, 'CUDA'), name + ': no CUDA kernel'
assert ccluster.settings.kernel_statistics()['cuda_kernels'], 'no CUDA epilogues registered'
x = torch.randn(5, 3, device='cuda'); db = torch.randn(2, 4, 3, device='cuda'); lq = torch.zeros(2, 4, device='cuda')
print('library path:', ccluster.exemplar_logsumexp(x, db, lq, 1.0).shape, ccluster.get_kernel_settings())"

# 4. the CUDA-only tests
run_step tests_cuda 40 "$PY" -m pytest tests/test_cuda.py -q -rfEsx -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests_cuda.xml"
all_skipped() {  # a test step whose tests were all skipped decided nothing
  "$PY" - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
tests, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
print(f"{sys.argv[1]}: {tests} collected, {skipped} skipped")
sys.exit(1 if tests == 0 or skipped == tests else 0)
PY
}
if [[ ${RESULT[tests_cuda]} == 0 ]]; then all_skipped "$OUT_DIR/tests_cuda.xml" || { RESULT[tests_cuda]=6; write_summary; }; fi

# 5-7. benchmarks at training sizes, then the targets
# shellcheck disable=SC2086  # BENCH_ARGS: extra options, e.g. "--rounds 2"
run_step bench_lse 40 "$PY" benchmarks/bench_exemplar_logsumexp.py --device cuda --json "$OUT_DIR/bench_lse.json" \
  --deadline 28 --dtype bfloat16,tf32,float32 --rounds 4 --reps 5 --cases library_fwd,library_fwd_bwd,ref_fwd,ref_fwd_bwd \
  --sizes "7500,20,256,1024;7500,20,256,2048;16384,20,1024,2048" ${BENCH_ARGS:-}
# shellcheck disable=SC2086
run_step bench_cc 55 "$PY" benchmarks/bench_cc_loss.py --device cuda --json "$OUT_DIR/bench_cc_loss.json" \
  --deadline 38 --dtype bfloat16,tf32,float32 --rounds 4 --reps 5 \
  --cases library,library_host,library_dense,library_packed,label_aware,dense \
  --sizes "10,750,20,256,1024;10,750,20,256,2048;16,1024,20,1024,2048" ${BENCH_ARGS:-}
run_step targets 5 "$PY" benchmarks/gpu_targets.py --cc "$OUT_DIR/bench_cc_loss.json" --lse "$OUT_DIR/bench_lse.json" \
  --json "$OUT_DIR/targets.json"

# 8-9. the training code on the GPU
run_step train 25 "$PY" -m train fit --config configs/tiny.yaml device=cuda --run-dir "$OUT_DIR/tiny_run"
run_step steptime 45 "$PY" -m train steptime --config configs/synthetic.yaml data.synthetic=calibrated \
  data.batch_size=10 data.max_seqlen=750 model.embed_dim=1024 cc.size=256 device=cuda --steps 6

# 10. the op tests on the GPU
run_step tests_ops 35 "$PY" -m pytest tests/test_exemplar_logsumexp.py tests/test_cc_loss.py tests/test_fit.py \
  tests/test_library_path.py tests/test_exemplar_losses.py -m cuda -q -rfEx -p no:cacheprovider \
  --junitxml="$OUT_DIR/tests_ops.xml"
if [[ ${RESULT[tests_ops]} == 0 ]]; then all_skipped "$OUT_DIR/tests_ops.xml" || { RESULT[tests_ops]=6; write_summary; }; fi

# 11-12. compute-sanitizer on every kernel at small shapes (one cudaMalloc per tensor, so that an access past
# a tensor's end is caught)
SAN="compute-sanitizer"
command -v "$SAN" >/dev/null || SAN="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
if [[ -x "$(command -v "$SAN" || echo "$SAN")" ]]; then
  run_step memcheck 25 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool memcheck --error-exitcode 3 \
    --print-limit 20 "$PY" benchmarks/sanitize_kernels.py
  sanitizer_verdict memcheck
  # racecheck only our kernels (names in namespace ccluster): cuBLAS's Hopper GEMMs synchronise shared memory
  # through asynchronous copies and barriers not ours to check
  RACE_FILTER=()
  "$SAN" --help 2>/dev/null | grep -q -- "--kernel-name" && RACE_FILTER=(--kernel-name kns=ccluster)
  run_step racecheck 20 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SAN" --tool racecheck --error-exitcode 3 \
    ${RACE_FILTER[@]+"${RACE_FILTER[@]}"} --print-limit 20 "$PY" benchmarks/sanitize_kernels.py --quick
  sanitizer_verdict racecheck
else
  for k in memcheck racecheck; do ORDER+=("$k"); BUDGET[$k]=0; DURATION[$k]=0; RESULT[$k]='"unavailable"'; done
  echo "=== compute-sanitizer not found: memcheck and racecheck unavailable"
fi

finish
