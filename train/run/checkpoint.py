"""Checkpoints: safe to open, written atomically.

**Safe to open.** A checkpoint holds only tensors and plain values (dicts, lists, numbers, strings):
the config is stored as YAML text and the RNG states as tensors and lists, so :func:`load` reads it
with ``torch.load(weights_only=True)``, which cannot run code. A file that carries a pickled Python
object (a checkpoint from elsewhere, or from an older ccluster) is refused with :class:`CheckpointError`;
``python -m train.run.checkpoint upgrade FILE`` converts an older ccluster checkpoint (reading only numpy
arrays besides, so that cannot run code either).

**Atomic.** A checkpoint is written to a temporary file in the same folder, flushed, then renamed over
the old one. A reader (or a resumed run) sees either the previous complete file or the new complete
file, whatever moment the writer is killed at (``os.replace`` is atomic on POSIX and Windows).

See :meth:`train.run.Run.state_dict` for the keys (model, optimizer, database, Q, stage,
step, RNG states, config).
"""
from __future__ import annotations

import os
import pickle
import random
import re
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

from ..common import names

LATEST = "latest.pt"
# How a torch.save file begins: a zip archive (the default format) or a pickle (the legacy format).
_TORCH_SAVE_STARTS = (b"PK\x03\x04", b"\x80")
FORMAT = "ccluster-checkpoint-2"  # tensors and plain values only; config as YAML text


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and what to do."""


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
    except OSError as exc:  # a full disk, a folder without permission: the previous file is untouched
        before = (f"{path.name} still holds the previous checkpoint" if path.exists() else
                  f"no earlier {path.name} was there")
        raise CheckpointError(f"could not write checkpoint {path} ({exc.strerror or exc}): {before}; free disk "
                              f"space (or fix the folder's permissions), then continue the run with fit --resume "
                              f"(run.dir {path.parent})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def encode(state: dict) -> dict:
    """The state as it is stored: the config dict becomes YAML text, a format tag is added."""
    out = dict(state)
    out["config"] = yaml.safe_dump(state["config"], sort_keys=False)
    out["format"] = FORMAT
    return out


def save(state: dict, path: str | os.PathLike) -> None:
    """Write a training state (:meth:`train.run.Run.state_dict`) atomically."""
    save_atomic(encode(state), path)


def _copies(path: Path) -> str:
    """Advice naming the complete per-stage copies beside a damaged checkpoint."""
    stages = sorted(p for p in path.parent.glob("stage-*.pt") if p != path)
    if not stages:
        return "no stage-*.pt copy is beside it: start the run again (or restore the file from a backup)"
    newest = max(stages, key=lambda p: p.stat().st_mtime)
    return (f"the stage copies beside it are complete ({', '.join(p.name for p in stages)}): to resume "
            f"from the end of a stage, copy one over {LATEST} (e.g. cp {newest} {path.parent / LATEST}) "
            f"and run fit --resume again")


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save` (a file, or a run folder holding ``latest.pt``).

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: the file is damaged (e.g. truncated), carries a pickled Python object, or is
            not a ccluster checkpoint. The message names the file and what to do.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LATEST
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}, pass a checkpoint file ({LATEST} or "
                                f"stage-<name>.pt) or a run folder that holds {LATEST}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head and not head.startswith(_TORCH_SAVE_STARTS):  # another kind of file, not a damaged checkpoint
        raise CheckpointError(f"{path} is not a checkpoint (not a file written by torch.save: it starts with "
                              f"{head!r}), pass a checkpoint file ({LATEST} or stage-<name>.pt written by "
                              f"{names.TRAIN} fit) or a run folder that holds {LATEST}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:  # not a pickled object: bytes that are not a checkpoint at all
            raise CheckpointError(f"checkpoint {path} is damaged (truncated or overwritten: not a torch.save "
                                  f"file), {_copies(path)}") from None
        what = found.group(1)
        raise CheckpointError(
            f"checkpoint {path} carries a pickled Python object ({what}), which could run code when "
            f"loaded: refused (ccluster checkpoints hold tensors and plain values only), if it is an older "
            f"ccluster checkpoint, convert it with: {names.module('run.checkpoint')} upgrade {path}") from None
    except Exception as exc:  # a truncated or overwritten file: zip, pickle or I/O errors of any kind
        raise CheckpointError(f"checkpoint {path} is damaged (truncated or overwritten: {_reason(exc)}), "
                              f"{_copies(path)}") from None
    return decode(state, path)


def _reason(exc: Exception) -> str:
    text = str(exc).split("\n")[0].split(". ")[0].strip() or type(exc).__name__
    return text if len(text) < 120 else text[:117] + "..."


def decode(state, path: str | os.PathLike = "checkpoint") -> dict:
    """The stored form back in memory (config as a dict); checks that it is one of ours."""
    if not isinstance(state, dict) or state.get("format") != FORMAT or not isinstance(state.get("config"), str):
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a ccluster training checkpoint (format {found!r}, expected "
                              f"{FORMAT!r}); pass a latest.pt or stage-<name>.pt written by {names.TRAIN} fit")
    state = dict(state)
    try:
        state["config"] = yaml.safe_load(state["config"])
    except yaml.YAMLError as exc:
        raise CheckpointError(f"checkpoint {path} is damaged (its config is not valid YAML: {exc}), "
                              f"{_copies(Path(path))}") from None
    return state


def rng_state() -> dict:
    """torch, numpy and Python RNG states as tensors and plain values (loadable with weights_only)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                       "gauss_next": gauss_next}}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned, exactly."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))


def upgrade(path: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Convert a checkpoint written by an older ccluster (numpy arrays and tuples in its RNG states) to
    the current format. It is read with ``weights_only=True`` allowing numpy's array reconstruction as
    well, so it cannot run code either: a file that names anything else is refused."""
    from ..data.npy import NUMPY_GLOBALS
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(NUMPY_GLOBALS):
            old = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        raise CheckpointError(f"{path} carries a pickled Python object ({found.group(1) if found else 'unknown'}) "
                              f"that an older ccluster checkpoint does not hold, which could run code when loaded: "
                              f"refused") from None
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is damaged (truncated or overwritten: {_reason(exc)})") from None
    if not isinstance(old, dict) or not {"model", "config", "rng"} <= set(old):
        raise CheckpointError(f"{path} is not a ccluster training checkpoint (no model, config and rng)")
    rng = old["rng"]
    if isinstance(rng.get("numpy"), tuple):
        name, keys, pos, has_gauss, cached = rng["numpy"]
        version, internal, gauss_next = rng["python"]
        rng = {"torch": rng["torch"],
               "numpy": {"name": name, "keys": torch.from_numpy(np.asarray(keys).astype(np.int64)),
                         "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
               "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                          "gauss_next": gauss_next}}
    state = {**old, "rng": rng}
    state.pop("format", None)
    out = Path(out) if out else path
    save(state, out)
    load(out)  # the result must open with weights_only=True
    return out


def main(argv=None) -> int:
    """``python -m train.run.checkpoint upgrade FILE [--out NEW]``: convert an older ccluster checkpoint."""
    from ..common.parsing import OneLineParser
    p = OneLineParser(prog=names.module("run.checkpoint"), description=main.__doc__)
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    u = sub.add_parser("upgrade", help="convert an older ccluster checkpoint")
    u.add_argument("file")
    u.add_argument("--out", help="write here instead of replacing FILE")
    args = p.parse_args(argv)
    try:
        print(f"wrote {upgrade(args.file, args.out)}")
    except (OSError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
