"""Input normalisation for the two I3D streams, and TV-L1 optical flow (OpenCV contrib).

RGB: uint8 pixels scaled linearly to [-1, 1] (``x / 127.5 - 1``).
Flow: TV-L1 (Zach, Pock & Bischof 2007; OpenCV's ``DualTVL1OpticalFlow`` with its default parameters) on
grey-scale frames, displacements in pixels clipped to [-20, 20] and divided by 20, so they lie in
[-1, 1]; channel 0 is horizontal (x, positive to the right), channel 1 vertical (y, positive down).
This is the recipe of the published Kinetics I3D two-stream features.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import List, Sequence

import numpy as np

__all__ = ["require_cv2", "rgb_to_unit", "normalize_flow", "to_gray", "TVL1", "FLOW_BOUND"]

FLOW_BOUND = 20.0
INSTALL_HINT = "pip install 'ccluster[features]'  (or: pip install av opencv-contrib-python-headless)"


def require_cv2():
    """Import and return OpenCV with the contrib ``optflow`` module, or raise ImportError saying what to do."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(f"TV-L1 optical flow needs OpenCV with the contrib modules, which is not installed: "
                          f"{e}. Install it with: {INSTALL_HINT}") from None
    if not hasattr(cv2, "optflow") or not hasattr(cv2.optflow, "DualTVL1OpticalFlow_create"):
        raise ImportError("TV-L1 optical flow needs OpenCV's contrib 'optflow' module, but the installed "
                          f"cv2 ({getattr(cv2, '__version__', '?')}) lacks it: it is the plain opencv build. "
                          "Uninstall opencv-python / opencv-python-headless and install "
                          "opencv-contrib-python-headless (one OpenCV wheel at a time).")
    return cv2


def rgb_to_unit(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (any shape) -> float32 in [-1, 1]: ``x / 127.5 - 1``."""
    if frames.dtype != np.uint8:
        raise TypeError(f"rgb_to_unit: expected uint8 pixels, got {frames.dtype}")
    return frames.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def normalize_flow(flow: np.ndarray, bound: float = FLOW_BOUND) -> np.ndarray:
    """Flow in pixels -> float32 in [-1, 1]: clip to [-bound, bound], divide by bound."""
    if bound <= 0:
        raise ValueError(f"normalize_flow: bound must be positive, got {bound}")
    return (np.clip(flow, -bound, bound) / np.float32(bound)).astype(np.float32, copy=False)


def to_gray(frame: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] -> uint8 grey [H, W] (ITU-R BT.601 weights, as OpenCV)."""
    cv2 = require_cv2()
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"to_gray: expected an RGB frame [H, W, 3], got shape {frame.shape}")
    return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


class TVL1:
    """TV-L1 optical flow between grey frames, optionally over several threads (OpenCV releases the GIL).

    Args:
        threads: frame pairs computed in parallel by :meth:`many` (each thread has its own solver).
        bound: clip bound in pixels used by :meth:`many` when ``normalize`` is true.
    """

    def __init__(self, threads: int = 1, bound: float = FLOW_BOUND):
        self.cv2 = require_cv2()
        self.bound = bound
        self.threads = max(1, int(threads))
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def _solver(self):
        solver = getattr(self._local, "solver", None)
        if solver is None:
            solver = self.cv2.optflow.DualTVL1OpticalFlow_create()
            self._local.solver = solver
        return solver

    def __call__(self, prev_gray: np.ndarray, next_gray: np.ndarray) -> np.ndarray:
        """Flow from ``prev_gray`` to ``next_gray`` (uint8 [H, W]) in pixels, float32 [H, W, 2] (x, y)."""
        if prev_gray.shape != next_gray.shape or prev_gray.ndim != 2:
            raise ValueError(f"TVL1: expected two grey frames of one shape [H, W], got {prev_gray.shape} "
                             f"and {next_gray.shape}")
        return self._solver().calc(prev_gray, next_gray, None)

    def many(self, grays: Sequence[np.ndarray], normalize: bool = True) -> List[np.ndarray]:
        """Flows between consecutive frames: ``len(grays) - 1`` arrays [H, W, 2] (normalised by default)."""
        pairs = list(zip(grays[:-1], grays[1:]))
        work = (lambda p: self(*p)) if not normalize else (lambda p: normalize_flow(self(*p), self.bound))
        if self._pool is None or len(pairs) < 2:
            return [work(p) for p in pairs]
        return list(self._pool.map(work, pairs))

    def close(self) -> None:
        """Stop the worker threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
