"""Kernel settings: which implementation the ops run, how the library-GEMM path lays out its work and
uses memory, and when the checks of values read the data.

The ops have two implementations:

* ``"library"``: the library-GEMM path. Rows in chunks; per chunk ONE distance GEMM from the BLAS library
  through ATen (cuBLAS on CUDA, tensor cores for float16 / bfloat16 and for TF32 when torch allows it),
  into a bounded workspace, followed by small fused epilogue kernels (the online log-sum-exp merge, the
  responsibilities ``P = g exp(s - logz) kappa``, the eta reduction). Runs on CPU and CUDA.
* ``"fused"``: the hand-written fused kernels: the CPU kernels (at the GEMM floor on CPU) and the
  SIMT/WMMA CUDA kernels.

``"auto"`` (the default) picks ``"library"`` on CUDA and ``"fused"`` on CPU. The settings are process-wide
and read whenever an op runs, so they also apply to graphs compiled with ``torch.compile``.

Settings (all optional keywords of :func:`set_kernel_settings` and :func:`kernel_settings`):

* ``backend``: ``"auto"``, ``"library"`` or ``"fused"``. Environment: ``CCLUSTER_BACKEND``.
* ``plan``: the library path's work layout with pairs: ``"auto"`` (the cost model, see
  :func:`estimate_plans`), ``"dense"`` (every row against every class in one GEMM per row chunk, the pairs
  masking the epilogue: no host read, CUDA-graph safe) or ``"packed"`` (only the pairs, each class's rows
  in a block, one batched GEMM per chunk; laid out on the host, which costs a device synchronisation
  unless the pair mask is given on the CPU). ``"auto"`` never synchronises: with the mask on the GPU it
  takes the dense plan. Environment: ``CCLUSTER_PLAN``.
* ``workspace_bytes``: upper bound on the scratch memory of one library-path call (GEMM output chunks,
  gathered rows), 256 MiB by default. Smaller values mean more, smaller GEMMs; memory stays
  O(workspace + N*C) besides the inputs and outputs. Environment: ``CCLUSTER_WORKSPACE_BYTES``.
* ``centring``: ``"auto"``, ``"on"`` or ``"off"``. Centring subtracts one mean, of the database's filled
  exemplars, from x and from the exemplars before the distance GEMM (distances are unchanged) so that a
  GEMM that rounds its operands errs by ``alpha eps |x - mu| |y - mu|`` instead of ``alpha eps |x| |y|``.
  ``"auto"`` centres exactly when the GEMM rounds float32 operands to TF32 (CUDA, with
  ``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision("high")``).
  float16/bfloat16 inputs are not centred by ``"auto"``: the GEMM multiplies them exactly (float32
  accumulation and output), while centring would round ``x - mu`` back to 16 bits.
* ``check_values``: ``"auto"``, ``"eager"`` or ``"deferred"``. The checks of values (negative attention
  or ``log_q > 0`` in the loss, a negative or non-finite fit weight) read the data. ``"eager"`` reads and
  raises ValueError; ``"deferred"`` never reads on the host and turns the op's results (the loss and
  dL/dx, the fit's logz and log eta) into NaN instead; ``"auto"`` is eager on the CPU and deferred on a GPU,
  where a read would synchronise the device every call. Use ``"eager"`` on a GPU to find a bad input.
  Environment: ``CCLUSTER_CHECK_VALUES``.
* ``gather``: the earlier name of ``plan``: ``True`` is ``plan="auto"``, ``False`` is ``plan="dense"``.

Read-only statistics (:func:`kernel_statistics`): ``pieces`` (GEMM chunks of the library path),
``host_syncs`` (reads of device data the ops made: eager checks on a GPU, a packed plan forced without a
host mask), ``last_plan`` (``"dense"`` or ``"packed"``: the plan of the last library-path call).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

_BACKENDS = ("auto", "library", "fused")
_CENTRING = ("auto", "on", "off")
_PLANS = ("auto", "dense", "packed")
_CHECKS = ("auto", "eager", "deferred")
_NAMES = ("backend", "workspace_bytes", "centring", "plan", "check_values")

# Values kept here when the compiled library is absent (the settings then have no effect).
_fallback = {"backend": 0, "workspace_bytes": 256 << 20, "centring": 0, "plan": 0, "check_values": 0}


def _lib():
    from . import ops
    if not ops.has_compiled_ops():
        return None
    from . import _C
    return _C


def _get(name: str) -> int:
    lib = _lib()
    return lib._get_setting(name) if lib is not None else _fallback[name]


def _set(name: str, value: int) -> None:
    lib = _lib()
    if lib is not None:
        lib._set_setting(name, int(value))
    _fallback[name] = int(value)


def get_kernel_settings() -> dict:
    """The settings in force, as a dict with keys ``backend``, ``workspace_bytes``, ``centring``, ``plan``,
    ``check_values``."""
    return {"backend": _BACKENDS[_get("backend")], "workspace_bytes": _get("workspace_bytes"),
            "centring": _CENTRING[_get("centring")], "plan": _PLANS[_get("plan")],
            "check_values": _CHECKS[_get("check_values")]}


def _choice(fn, name, value, choices):
    if value is not None and (not isinstance(value, str) or value not in choices):
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {value!r}")


def set_kernel_settings(*, backend: str | None = None, workspace_bytes: int | None = None,
                        centring: str | None = None, plan: str | None = None, check_values: str | None = None,
                        gather: bool | None = None) -> dict:
    """Changes the given settings (see the module docstring) and returns the previous ones (all keys).

    Raises ``ValueError`` naming the setting, the accepted values and what arrived.
    """
    fn = "set_kernel_settings"
    _choice(fn, "backend", backend, _BACKENDS)
    _choice(fn, "centring", centring, _CENTRING)
    _choice(fn, "plan", plan, _PLANS)
    _choice(fn, "check_values", check_values, _CHECKS)
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes <= 0):
        raise ValueError(f"{fn}: workspace_bytes must be an int > 0, got {workspace_bytes!r}")
    if gather is not None:
        if not isinstance(gather, bool):
            raise ValueError(f"{fn}: gather must be a bool, got {gather!r}")
        if plan is not None:
            raise ValueError(f"{fn}: give plan or its earlier name gather, not both")
        plan = "auto" if gather else "dense"
    previous = get_kernel_settings()
    if backend is not None:
        _set("backend", _BACKENDS.index(backend))
    if workspace_bytes is not None:
        _set("workspace_bytes", workspace_bytes)
    if centring is not None:
        _set("centring", _CENTRING.index(centring))
    if plan is not None:
        _set("plan", _PLANS.index(plan))
    if check_values is not None:
        _set("check_values", _CHECKS.index(check_values))
    return previous


@contextlib.contextmanager
def kernel_settings(**settings) -> Iterator[dict]:
    """Context manager: ``with ccluster.kernel_settings(backend="library", workspace_bytes=1 << 20): ...``.

    Applies the given settings (keywords of :func:`set_kernel_settings`) and restores the previous ones
    on exit; yields the settings in force inside.
    """
    previous = set_kernel_settings(**settings)
    try:
        yield get_kernel_settings()
    finally:
        set_kernel_settings(**previous)


def kernel_statistics() -> dict:
    """Read-only counters of the compiled library (see the module docstring): ``pieces``, ``host_syncs``,
    ``last_plan``; and ``cuda_kernels``, whether this build has its CUDA kernels."""
    lib = _lib()
    if lib is None:
        return {"pieces": 0, "host_syncs": 0, "last_plan": None, "cuda_kernels": False}
    return {"pieces": lib._get_setting("pieces"), "host_syncs": lib._get_setting("host_syncs"),
            "last_plan": (None, "dense", "packed")[lib._get_setting("last_plan")],
            "cuda_kernels": bool(lib._get_setting("cuda_kernels"))}


def value_checks_eager(t) -> bool:
    """Whether checks of values on ``t``'s data read it now (the ops' rule, csrc/ops/dispatch.h): on the
    CPU, or with ``check_values="eager"``; never while torch.compile traces or a CUDA graph is captured.
    Without the compiled library, always (the reference fallback checks in Python)."""
    import torch
    if torch.compiler.is_compiling() or t.device.type == "meta" or type(t).__name__ == "FakeTensor":
        return False
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    if _lib() is None:
        return True
    mode = _CHECKS[_get("check_values")]
    return mode == "eager" or (mode == "auto" and t.device.type == "cpu")


def estimate_plans(N: int, C: int, n: int, m: int, *, device: str = "cuda", dtype: str = "float32",
                   tf32: bool = False, pairs=None, mask_on_device: bool = False, gemms: int = 2,
                   epilogues: int = 1, workspace_bytes: int | None = None, plan: str = "auto") -> dict:
    """The library path's cost model (csrc/library/plan.h) for one workload, as the ops apply it.

    ``pairs``: the ``[N, C]`` bool mask as the op would see it on the host (read here), or None: then
    ``mask_on_device=True`` is a mask the op cannot read without a synchronisation, False no mask. ``gemms``:
    GEMM passes (1 forward, 2 the loss with dL/dx). Returns ``{"plan", "reason", "dense", "packed"}``, each
    estimate a dict of ``gflop``, ``gbyte``, ``pieces``, ``launches``, ``syncs``, ``seconds``. The device
    rates are published figures (CUDA: an H100-class GPU) and measured single-core ones (CPU).
    """
    lib = _lib()
    if lib is None:
        raise RuntimeError("estimate_plans: the compiled library is not loaded")
    _choice("estimate_plans", "plan", plan, _PLANS)
    known, Ca, Rmax = False, 0, 0
    if pairs is not None:
        counts = pairs.detach().to("cpu").sum(0)
        known, Ca, Rmax = True, int((counts > 0).sum()), int(counts.max()) if counts.numel() else 0
    ws = _get("workspace_bytes") if workspace_bytes is None else int(workspace_bytes)
    code, reason, dense, packed = lib._estimate_plans(
        device, dtype, bool(tf32), int(N), int(C), int(n), int(m), int(gemms), int(epilogues), ws,
        pairs is not None or bool(mask_on_device), known, Ca, Rmax, _PLANS.index(plan))
    keys = ("gflop", "gbyte", "pieces", "launches", "syncs", "seconds")
    return {"plan": _PLANS[code], "reason": reason, "dense": dict(zip(keys, dense)),
            "packed": dict(zip(keys, packed))}


def _apply_environment() -> None:
    env = {}
    for key, name in (("backend", "CCLUSTER_BACKEND"), ("plan", "CCLUSTER_PLAN"),
                      ("check_values", "CCLUSTER_CHECK_VALUES")):
        if os.environ.get(name):
            env[key] = os.environ[name]
    if os.environ.get("CCLUSTER_WORKSPACE_BYTES"):
        try:
            env["workspace_bytes"] = int(os.environ["CCLUSTER_WORKSPACE_BYTES"])
        except ValueError:
            raise ValueError("CCLUSTER_WORKSPACE_BYTES must be an integer number of bytes, got "
                             f"{os.environ['CCLUSTER_WORKSPACE_BYTES']!r}") from None
    if env:
        set_kernel_settings(**env)


_apply_environment()
