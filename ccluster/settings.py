"""Kernel settings: which implementation the ops run, and how the library-GEMM path uses memory.

The ops have two implementations:

* ``"library"``: the library-GEMM path. Rows in chunks; per chunk and class (or group of classes) the
  distance GEMM comes from the BLAS library through ATen (cuBLAS on CUDA, tensor cores for float16 /
  bfloat16 and for TF32 when torch allows it), into a bounded workspace, followed by small fused
  epilogue kernels (the online log-sum-exp merge, the responsibilities ``P = g exp(s - logz) kappa``, the
  eta reduction). Runs on CPU and CUDA.
* ``"fused"``: the hand-written fused kernels: the CPU kernels (at the GEMM floor on CPU) and the
  SIMT/WMMA CUDA kernels.

``"auto"`` (the default) picks ``"library"`` on CUDA and ``"fused"`` on CPU. The settings are process-wide
and read whenever an op runs, so they also apply to graphs compiled with ``torch.compile``.

Settings (all optional keywords of :func:`set_kernel_settings` and :func:`kernel_settings`):

* ``backend``: ``"auto"``, ``"library"`` or ``"fused"``. Environment: ``CCLUSTER_BACKEND``.
* ``workspace_bytes``: upper bound on the scratch memory of one library-path call (GEMM output chunks,
  gathered rows), 256 MiB by default. Smaller values mean more, smaller GEMMs; memory stays
  O(workspace + N*C) besides the inputs and outputs. Environment: ``CCLUSTER_WORKSPACE_BYTES``.
* ``centring``: ``"auto"``, ``"on"`` or ``"off"``. Centring subtracts each class's exemplar mean from x
  and from the exemplars before the distance GEMM (distances are unchanged) so that a GEMM that rounds
  its operands errs by ``alpha eps |x - mu| |y - mu|`` instead of ``alpha eps |x| |y|``. ``"auto"`` centres
  exactly when the GEMM rounds float32 operands to TF32 (CUDA, with
  ``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision("high")``).
  float16/bfloat16 inputs are not centred by ``"auto"``: the GEMM multiplies them exactly (float32
  accumulation and output), while centring would round ``x - mu`` back to 16 bits.
* ``gather``: ``True`` (default) gathers the rows of each class's pairs (work proportional to the pairs;
  one copy of the per-class counts to the host per call). ``False`` computes every row for every class
  with the pairs as a mask; this is also what happens while a CUDA graph is being captured.
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

_BACKENDS = ("auto", "library", "fused")
_CENTRING = ("auto", "on", "off")
_NAMES = ("backend", "workspace_bytes", "centring", "gather")

# Values kept here when the compiled library is absent (the settings then have no effect).
_fallback = {"backend": 0, "workspace_bytes": 256 << 20, "centring": 0, "gather": 1}


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
    """The settings in force, as a dict with keys ``backend``, ``workspace_bytes``, ``centring``, ``gather``."""
    return {"backend": _BACKENDS[_get("backend")], "workspace_bytes": _get("workspace_bytes"),
            "centring": _CENTRING[_get("centring")], "gather": bool(_get("gather"))}


def set_kernel_settings(*, backend: str | None = None, workspace_bytes: int | None = None,
                        centring: str | None = None, gather: bool | None = None) -> dict:
    """Changes the given settings (see the module docstring) and returns the previous ones (all keys).

    Raises ``ValueError`` naming the setting, the accepted values and what arrived.
    """
    fn = "set_kernel_settings"
    if backend is not None and backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend must be one of {_BACKENDS}, got {backend!r}")
    if centring is not None and centring not in _CENTRING:
        raise ValueError(f"{fn}: centring must be one of {_CENTRING}, got {centring!r}")
    if workspace_bytes is not None and (isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int)
                                        or workspace_bytes <= 0):
        raise ValueError(f"{fn}: workspace_bytes must be an int > 0, got {workspace_bytes!r}")
    if gather is not None and not isinstance(gather, bool):
        raise ValueError(f"{fn}: gather must be a bool, got {gather!r}")
    previous = get_kernel_settings()
    if backend is not None:
        _set("backend", _BACKENDS.index(backend))
    if workspace_bytes is not None:
        _set("workspace_bytes", workspace_bytes)
    if centring is not None:
        _set("centring", _CENTRING.index(centring))
    if gather is not None:
        _set("gather", int(gather))
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


def _apply_environment() -> None:
    env = {}
    if os.environ.get("CCLUSTER_BACKEND"):
        env["backend"] = os.environ["CCLUSTER_BACKEND"]
    if os.environ.get("CCLUSTER_WORKSPACE_BYTES"):
        try:
            env["workspace_bytes"] = int(os.environ["CCLUSTER_WORKSPACE_BYTES"])
        except ValueError:
            raise ValueError("CCLUSTER_WORKSPACE_BYTES must be an integer number of bytes, got "
                             f"{os.environ['CCLUSTER_WORKSPACE_BYTES']!r}") from None
    if env:
        set_kernel_settings(**env)


_apply_environment()
