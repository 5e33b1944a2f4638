"""Atomic checkpoints: written to a temporary file in the same folder, flushed, then renamed over the
old one. A reader (or a resumed run) sees either the previous complete file or the new complete file,
whatever moment the writer is killed at (``os.replace`` is atomic on POSIX and Windows).

A checkpoint is a plain dict saved with ``torch.save``; see :meth:`train.procedure.Trainer.state_dict`
for its keys (model, optimizer, database, Q, stage, step, RNG states, config).
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

LATEST = "latest.pt"


def save_atomic(obj, path: str | os.PathLike, fsync: bool = False) -> None:
    """``torch.save(obj, path)`` so that ``path`` is never partially written. ``fsync`` also forces the
    bytes to disk (protects against power loss, not needed against a killed process)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    # Our own files: they hold numpy RNG state and a config dict, so weights_only=False.
    return torch.load(path, map_location=map_location, weights_only=False)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
