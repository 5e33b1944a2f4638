"""Shared fixtures, tolerances and input builders for the tests of the compiled ops.

Nothing here is autouse: other test modules in this folder are unaffected unless they ask for a fixture.

Tolerances
----------
* float64 against the float64 oracle (:mod:`ccluster.reference`): ``RTOL64 = 1e-10`` *relative to the
  largest magnitude of the expected tensor*. Per-element relative error is not meaningful for gradients,
  which are differences of sums (``W @ Y - rowsum(W) * x``) and can be exactly 0 or tiny where the
  terms are of order one; their absolute error is then a few ulps of the terms, not of the result.
* lower precision (float32, and float16/bfloat16 which are computed in float32): FlashAttention's rule.
  The fused op's error against the float64 oracle must be at most ``2 x`` the error of plain PyTorch
  (the reference) run in the same dtype, plus a floor of ``8 ulps`` of the result's magnitude. The floor
  is needed because the two implementations add the same terms in a different order (tiles of
  kColBlock columns, per-worker buffers), which alone can cost a few ulps of the largest term even
  when both are equally accurate; without it the rule would fail on lucky reference roundings.
"""
from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch

import ccluster
from ccluster import reference

RTOL64 = 1e-10
LOW_PRECISION_FACTOR = 2.0
LOW_PRECISION_FLOOR_ULPS = 8.0

METRICS = reference.METRICS
ROW_BLOCK = 256   # csrc/cpu/tile.h kRowBlock
COL_BLOCK = 512   # csrc/cpu/tile.h kColBlock

def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "CUDA is not available (torch.cuda.is_available() is False)"
    if ccluster.has_compiled_ops() and not ccluster.settings.kernel_statistics()["cuda_kernels"]:
        return ("ccluster was built without its CUDA kernels (csrc/cuda); rebuild with a CUDA toolkit, e.g. "
                "FORCE_CUDA=1 pip install --no-build-isolation -e .")
    return None


# The one CUDA switch of the suite: op tests take the `device` fixture and run on CUDA wherever a GPU and
# the compiled CUDA kernels are there (tests/test_cuda.py keeps what only a GPU has: streams, graphs,
# TF32, tensor cores, the fused CUDA kernels against the library path, synchronisation counts).
CUDA_SKIP_REASON = _cuda_skip_reason()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda,
                                              pytest.mark.skipif(CUDA_SKIP_REASON is not None,
                                                                 reason=CUDA_SKIP_REASON or "")])]


@pytest.fixture(params=DEVICES)
def device(request):
    """Every device the ops run on; CUDA is skipped (with its reason) where absent. On CUDA the ops run
    their default implementation, the library path."""
    return torch.device(request.param)


@pytest.fixture(params=METRICS)
def metric(request):
    return request.param


def pytest_configure(config):
    config.addinivalue_line("markers", "parallel: run with torch's default intra-op thread count (the "
                                       "other tests of the compiled ops run single-threaded)")


@pytest.fixture
def thread_policy(request):
    """Single-threaded unless the test is marked ``parallel``.

    The CPU kernels parallelise with at::parallel_for (OpenMP). On a shared, oversubscribed machine an
    OpenMP team of 2 spends most of its time waiting at barriers (a 129 x 1026 forward: ~100 ms with 2
    threads, ~1 ms with 1), so the many small-shape tests run on one thread, and the tests marked
    ``parallel`` (one medium shape per property, plus the cross-thread-count determinism test) keep the
    default count and exercise the per-worker buffers and merges.
    """
    threads = torch.get_num_threads()
    if request.node.get_closest_marker("parallel") is None:
        torch.set_num_threads(1)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def compiled_ops():
    """Fail (not skip) when ccluster._C is not loaded: the ops would silently fall back to the
    reference and every comparison below would compare the oracle with itself."""
    if not ccluster.has_compiled_ops():
        from ccluster import ops
        pytest.fail(f"ccluster compiled ops are not loaded ({ops._LOAD_ERROR!r}); if someone is rebuilding "
                    "the extension, wait a minute and rerun")


# ---------------------------------------------------------------------------------------------------
# Input builders


def make_inputs(N, C, n, m, *, dtype=torch.float64, device="cpu", seed=0, requires_grad=False,
                spread=1.0):
    """(x [N, m], db [C, n, m], log_q [C, n]) with log_q normalised per class.

    Features are N(0, spread^2); with alpha ~ 1/m the scores alpha*d are O(1), so all slots matter.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, m, generator=g, dtype=torch.float64) * spread
    db = torch.randn(C, n, m, generator=g, dtype=torch.float64) * spread
    log_q = torch.randn(C, n, generator=g, dtype=torch.float64).log_softmax(-1) if n else \
        torch.zeros(C, 0, dtype=torch.float64)
    out = [t.to(device=device, dtype=dtype) for t in (x, db, log_q)]
    if requires_grad:
        out = [t.requires_grad_() for t in out]
    return tuple(out)


def random_mask(N, C, p=0.5, *, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(N, C, generator=g) < p).to(device)


def random_like(t, *, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(t.shape, generator=g, dtype=torch.float64).to(device=t.device, dtype=t.dtype)


# ---------------------------------------------------------------------------------------------------
# Comparisons


def _scale(expected: torch.Tensor) -> float:
    expected = expected.detach()
    finite = expected[torch.isfinite(expected)]
    return max(1e-300, float(finite.abs().max())) if finite.numel() else 1.0


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, rtol: float = RTOL64, msg: str = ""):
    """float64 comparison relative to the largest |expected| (see module docstring); -inf/NaN must sit
    in the same places."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual.double(), expected.double(), rtol=rtol, atol=rtol * _scale(expected),
                               equal_nan=True, msg=lambda m: f"{msg}: {m}")


def max_err(a: torch.Tensor, oracle: torch.Tensor) -> float:
    """Largest absolute difference on the entries where the oracle is finite (must agree elsewhere)."""
    oracle = oracle.detach()
    fin = torch.isfinite(oracle)
    a = a.detach().double()
    assert torch.equal(torch.isfinite(a), fin), "non-finite entries differ from the oracle's"
    return float((a[fin] - oracle[fin]).abs().max()) if fin.any() else 0.0


def assert_low_precision(fused: torch.Tensor, plain: torch.Tensor, oracle: torch.Tensor, dtype, msg=""):
    """FlashAttention's rule: err(fused) <= 2 err(plain PyTorch in dtype) + 8 ulps(dtype) of the scale."""
    e_fused, e_plain = max_err(fused, oracle), max_err(plain, oracle)
    floor = LOW_PRECISION_FLOOR_ULPS * torch.finfo(dtype).eps * _scale(oracle)
    bound = LOW_PRECISION_FACTOR * e_plain + floor
    assert e_fused <= bound, (f"{msg}: fused error {e_fused:.3g} > {LOW_PRECISION_FACTOR} x plain error "
                              f"{e_plain:.3g} + floor {floor:.3g}")


NEG_INF = -math.inf


@contextlib.contextmanager
def private_cache(path):
    """``CCLUSTER_CACHE`` pointed at ``path`` (where synthetic sets are generated) for the duration."""
    old = os.environ.get("CCLUSTER_CACHE")
    os.environ["CCLUSTER_CACHE"] = str(path)
    try:
        yield path
    finally:
        if old is None:
            del os.environ["CCLUSTER_CACHE"]
        else:
            os.environ["CCLUSTER_CACHE"] = old


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private synthetic-data cache for one test module (the tiny preset is generated into it once)."""
    with private_cache(tmp_path_factory.mktemp("cache")) as path:
        yield path
