#!/usr/bin/env bash
# Compile-only check of the CUDA kernels (csrc/cuda/*.cu): no GPU needed, only nvcc and a CUDA build of
# torch for the headers. Runs nvcc on every .cu file with the flags setup.py / torch's BuildExtension use,
# in parallel, and fails on any error (warnings are printed).
#
#   .ci/compile_cuda.sh [python]       # python: an interpreter with torch installed (only its headers are used)
#
# Environment: PYTHON (default: the argument, else python3), NVCC (default: nvcc on PATH), CUDA_SOURCES
# (default csrc/cuda/*.cu), CUDA_STD (default: what torch's headers require),
# CUDA_ARCH (default 90 -> sm_90), JOBS (default: number of CPUs), OBJ_DIR (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-${PYTHON:-python3}}
NVCC=${NVCC:-nvcc}
ARCH=${CUDA_ARCH:-90}
JOBS=${JOBS:-$(nproc)}
OBJ_DIR=${OBJ_DIR:-$(mktemp -d /tmp/ccluster-cuda-obj.XXXXXX)}

if ! command -v "$NVCC" >/dev/null; then echo "compile_cuda: nvcc not found" >&2; exit 2; fi
# torch's include dirs and the flags its BuildExtension passes to nvcc (COMMON_NVCC_FLAGS: the
# half-operator macros, --expt-relaxed-constexpr), found WITHOUT importing torch: only torch/include is
# read, so the torch install may lack its CUDA runtime libraries (pip install --no-deps) or be a CPU build
# whose wheel ships the c10/cuda and ATen/cuda headers (torch 2.13 CPU does). CUDA's own headers come from
# the toolkit next to nvcc.
mapfile -t INFO < <("$PYTHON" - <<'PY'
import importlib.util, os, re
spec = importlib.util.find_spec("torch")
assert spec is not None, "compile_cuda: torch is not installed for this interpreter"
root = os.path.dirname(spec.origin)
inc = os.path.join(root, "include")
assert os.path.isfile(os.path.join(inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")), \
    f"compile_cuda: {inc} lacks c10/cuda/impl/cuda_cmake_macros.h (a CPU build of torch); use a CUDA build (pip install --no-deps is enough)"
print(f"-I{inc} -I{os.path.join(inc, 'torch', 'csrc', 'api', 'include')}")
flags = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
         "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
try:  # the installed torch's own list, when its source says so
    src = open(os.path.join(root, "utils", "cpp_extension.py")).read()
    m = re.search(r"COMMON_NVCC_FLAGS = \[(.*?)\]", src, re.S)
    if m:
        flags = re.findall(r"'([^']+)'|\"([^\"]+)\"", m.group(1))
        flags = [a or b for a, b in flags]
except OSError:
    pass
print(" ".join(flags))
version = open(os.path.join(root, "version.py")).read()
print(re.search(r"__version__ = '([^']+)'", version).group(1) if "__version__" in version else "?")
# the C++ standard this torch's headers require (torch >= 2.14 requires C++20, earlier ones C++17)
aten = open(os.path.join(inc, "ATen", "ATen.h")).read()
print("c++20" if "C++20 or later" in aten else "c++17")
PY
)
(( ${#INFO[@]} == 4 )) || { echo "compile_cuda: could not locate torch's headers with $PYTHON" >&2; exit 2; }
TORCH_INC=${INFO[0]}
TORCH_NVCC_FLAGS=${INFO[1]}
TORCH_VERSION=${INFO[2]}
CXX_STD=${CUDA_STD:-${INFO[3]}}

# the limited-API level setup.py defines (the .cu files do not include Python.h, but keep the macros equal)
LIMITED_API=$(grep -oE '"Py_LIMITED_API", *"0x[0-9A-Fa-f]+"' setup.py | grep -oE '0x[0-9A-Fa-f]+' || echo 0x030A0000)
FLAGS=(-c -std=${CXX_STD} -O3 -lineinfo -Xcompiler -fPIC
       "-gencode=arch=compute_${ARCH},code=sm_${ARCH}"
       -DPy_LIMITED_API=${LIMITED_API} -DTORCH_EXTENSION_NAME=_C -DTORCH_API_INCLUDE_EXTENSION_H
       -Icsrc $TORCH_INC $TORCH_NVCC_FLAGS -Xptxas -warn-spills)
# CUDA_WERROR=1: warnings (register spills included) fail the check too. CUDA_VERBOSE=1: ptxas register /
# shared-memory / spill report per kernel.
if [[ "${CUDA_WERROR:-0}" == 1 ]]; then FLAGS+=(-Werror all-warnings); fi
if [[ "${CUDA_VERBOSE:-0}" == 1 ]]; then FLAGS+=(-Xptxas -v); fi

shopt -s nullglob
if [[ -n "${CUDA_SOURCES:-}" ]]; then read -ra SOURCES <<<"$CUDA_SOURCES"; else SOURCES=(csrc/cuda/*.cu); fi
if (( ${#SOURCES[@]} == 0 )); then echo "compile_cuda: no csrc/cuda/*.cu files"; exit 0; fi
echo "compile_cuda: $(${NVCC} --version | tail -1); torch ${TORCH_VERSION} headers; sm_${ARCH}; -std=${CXX_STD}; ${#SOURCES[@]} files, ${JOBS} jobs"
start=$(date +%s)
fail=0
pids=()
for src in "${SOURCES[@]}"; do
  obj="$OBJ_DIR/$(basename "${src%.cu}").o"
  ( t0=$(date +%s)
    if "$NVCC" "${FLAGS[@]}" "$src" -o "$obj" >"$obj.log" 2>&1; then
      echo "  ok   $src ($(( $(date +%s) - t0 )) s)"; cat "$obj.log"
    else
      echo "  FAIL $src"; cat "$obj.log"; exit 1
    fi ) &
  pids+=($!)
  while (( $(jobs -rp | wc -l) >= JOBS )); do sleep 0.2; done
done
for p in "${pids[@]}"; do wait "$p" || fail=1; done
echo "compile_cuda: $(( $(date +%s) - start )) s total; objects in $OBJ_DIR"
exit $fail
