"""Reading ``.npy`` files that hold object arrays without running code from them.

The W-TALC release stores its features and annotations as numpy *object* arrays (per video an array or
a list), which ``np.save`` writes as a pickle. ``np.load(allow_pickle=True)`` unpickles with Python's
full unpickler, which calls whatever the file names: a crafted file runs code when read.
:func:`read_npy` reads them with an unpickler that can build only what such a file legitimately holds:

* numpy arrays and numpy scalars (numpy's ``_reconstruct``, ``_frombuffer`` and ``scalar``, ``ndarray``,
  ``dtype``);
* plain values and containers (numbers, strings, bytes, lists, tuples, dicts, sets);
* ``_codecs.encode``, with which Python 3 writes ``bytes`` at pickle protocol 2.

Any other name in the pickle (``os.system``, ``builtins.eval``, a class of some module, ...) stops the
read with :class:`RefusedPickle` before anything is called. Arrays without objects are read with
``allow_pickle=False``, as numpy reads them anyway.
"""
from __future__ import annotations

import builtins
import codecs
import os
import pickle

import numpy as np
from numpy.lib import format as npy_format

__all__ = ["read_npy", "RefusedPickle", "NUMPY_GLOBALS"]


class RefusedPickle(pickle.UnpicklingError):
    """A pickle names something other than numpy arrays, dtypes and plain containers."""

    def __init__(self, module: str, name: str):
        super().__init__(f"{module}.{name}")
        self.qualname = f"{module}.{name}"


_RECONSTRUCT = np.empty(0).__reduce__()[0]   # numpy's array reconstructor, wherever numpy keeps it
_SCALAR = np.float64(0).__reduce__()[0]       # numpy's scalar reconstructor
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]  # numpy's array reconstructor at pickle protocol 5

# What a numpy object array's pickle may name: numpy's own names across versions (numpy.core in 1.x,
# numpy._core in 2.x) and the plain containers under their Python 3 and Python 2 module names.
_ALLOWED = {
    **{(module, "_reconstruct"): _RECONSTRUCT for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "scalar"): _SCALAR for module in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(module, "_frombuffer"): _FROMBUFFER for module in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(module, name): getattr(builtins, name) for module in ("builtins", "__builtin__")
       for name in ("list", "tuple", "dict", "set", "frozenset", "bytearray", "complex")},
}

# The same, as objects: what torch.load(weights_only=True) must additionally allow for numpy arrays of
# numbers, bytes and strings (see train.run.checkpoint.upgrade); it also checks the dtype's class.
NUMPY_GLOBALS = [_RECONSTRUCT, _SCALAR, _FROMBUFFER, np.ndarray, np.dtype] + sorted(
    {type(np.dtype(code)) for code in np.typecodes["All"] if code != "O"}, key=lambda t: t.__name__)


class _NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes and plain containers only."""

    def find_class(self, module, name):
        found = _ALLOWED.get((module, name))
        if found is None:
            raise RefusedPickle(module, name)
        return found


def _header(f, version):
    if version == (1, 0):
        return npy_format.read_array_header_1_0(f)
    if version == (2, 0):
        return npy_format.read_array_header_2_0(f)
    return npy_format._read_array_header(f, version)  # 3.0: numpy offers no public reader


def read_npy(path: str | os.PathLike):
    """The array stored in the ``.npy`` file at ``path`` (or the object a bare pickle file holds),
    read without running code: object arrays through the restricted unpickler (module docstring).

    Raises:
        RefusedPickle: the file's pickle names something other than numpy arrays, dtypes or plain
            containers (its ``qualname`` says what); nothing in the file was called.
        ValueError, EOFError, pickle.UnpicklingError: a damaged file.
    """
    with open(path, "rb") as f:
        magic = f.read(len(npy_format.MAGIC_PREFIX))
        f.seek(0)
        if magic != npy_format.MAGIC_PREFIX:  # np.load also reads a bare pickle
            return _NumpyUnpickler(f, encoding="latin1").load()
        version = npy_format.read_magic(f)
        _, _, dtype = _header(f, version)
        if not dtype.hasobject:
            f.seek(0)
            return np.load(f, allow_pickle=False)
        array = _NumpyUnpickler(f, encoding="latin1").load()
    if not isinstance(array, np.ndarray):
        raise ValueError(f"the header announces an object array, the pickle holds a {type(array).__name__}")
    return array
