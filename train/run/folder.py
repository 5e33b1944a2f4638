"""A run folder: every file one run writes, and one writer at a time.

    <folder>/.lock                      held while a command writes here (:mod:`train.run.lock`)
    <folder>/config.yaml                the run's config (:func:`train.config.save_config`)
    <folder>/metrics.jsonl              one JSON line per logged step, collection, evaluation, warning
    <folder>/latest.pt                  the latest checkpoint; stage-<name>.pt at the end of every stage
    <folder>/results.json               the evaluation of every training stage, written when the run ends
    <folder>/predictions[-<stage>].json the detections of an evaluation, an ActivityNet result file
    <folder>/cams[-<stage>].npz         per test video its T-CAM and attention
    <folder>/curves.png, figures/       loss curves and test mAP; T-CAM figures of test videos
    <folder>/tensorboard/               the same scalars for TensorBoard, when it is installed

:class:`RunFolder` owns these names. It writes only on rank 0 (``main``): on the other ranks of a
data-parallel run every write is skipped and the lock is not taken, so the nodes need not share a file
system for the folder. Every file appears whole (written to a temporary name, then renamed), except
``metrics.jsonl``, which is appended to and cut back on resume to what the checkpoint had seen.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from ..common import distributed
from ..config import save_config
from . import checkpoint as ckpt
from .lock import RunFolderLock

log = logging.getLogger("train")

RESULTS = "results.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


class RunFolder:
    """The files of one run folder (see the module docstring).

    Args:
        path: the folder (created when something is written).
        main: whether this process writes (rank 0 of a data-parallel run; the only process otherwise).
    """

    def __init__(self, path: str | os.PathLike, main: bool | None = None):
        self.path = Path(path)
        self.main = distributed.is_main() if main is None else main
        self._lock = RunFolderLock(self.path)
        self._depth = 0
        self._metrics_offset = 0
        self._writer = None  # TensorBoard

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------------
    # the lock

    def acquire(self) -> None:
        """Take the folder's lock (:class:`train.run.lock.RunFolderLock`; raises
        :class:`train.run.lock.RunFolderBusy` when another process holds it). Reentrant: every
        :meth:`acquire` needs its :meth:`release`; the lock is let go at the last one."""
        if self.main and self._depth == 0:
            self._lock.acquire()
        self._depth += 1

    def release(self) -> None:
        """Undo one :meth:`acquire`."""
        if self._depth == 0:
            return
        self._depth -= 1
        if self.main and self._depth == 0:
            self._lock.release()

    @contextlib.contextmanager
    def locked(self):
        """``with folder.locked():`` the lock, for the block."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    # ------------------------------------------------------------------------------------------------
    # config record and checkpoints

    @property
    def latest(self) -> Path:
        """The latest checkpoint's path (it may not exist)."""
        return self.path / ckpt.LATEST

    def has_checkpoint(self) -> bool:
        """Whether the folder holds a run (its ``latest.pt``)."""
        return self.latest.exists()

    def recorded_config(self) -> dict | None:
        """``config.yaml`` as written (not validated), or None when absent or unreadable: what a command
        needs before it can open the run (the device of its process group)."""
        import yaml
        try:
            return yaml.safe_load((self.path / CONFIG).read_text()) or None
        except (OSError, yaml.YAMLError):
            return None

    def write_config(self, cfg: dict) -> None:
        """Record the run's config in ``config.yaml`` (atomically)."""
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.path / CONFIG)

    def load_checkpoint(self) -> dict | None:
        """The latest checkpoint (None when there is none). With several processes rank 0 reads it and
        every rank receives it; in one process a damaged file raises
        :class:`train.run.checkpoint.CheckpointError`."""
        if distributed.world_size() == 1:
            return ckpt.load(self.latest) if self.latest.exists() else None
        state = None
        if distributed.is_main():
            try:
                state = ckpt.load(self.latest)
            except FileNotFoundError:
                state = None
        return distributed.broadcast_object(state)

    def save_checkpoint(self, state: dict, stage_copy: str | None = None) -> None:
        """Write ``latest.pt`` (and ``stage-<stage_copy>.pt``), loadable with ``weights_only=True``."""
        if not self.main:
            return
        stored = ckpt.encode(state)
        ckpt.save_atomic(stored, self.latest)
        if stage_copy:
            ckpt.save_atomic(stored, self.path / f"stage-{stage_copy}.pt")

    # ------------------------------------------------------------------------------------------------
    # metrics.jsonl and TensorBoard

    def open_log(self, offset: int, tensorboard: bool) -> None:
        """Start logging: ``metrics.jsonl`` is cut back to ``offset`` bytes (the lines written after the
        checkpoint a run resumes from are redone); TensorBoard too when ``tensorboard`` and installed."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics_offset = offset
        path = self.path / METRICS
        if path.exists():
            with open(path, "r+") as f:
                f.truncate(offset)
        if tensorboard and self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(self.path / "tensorboard"))
            except ImportError:
                self._writer = None

    def log(self, record: dict) -> int:
        """Append ``record`` (with the time) to ``metrics.jsonl``; returns the file's length after it, which
        a checkpoint records. Numbers of records with a ``step`` also go to TensorBoard."""
        if not self.main:
            return self._metrics_offset
        record = {"time": round(time.time(), 3), **record}
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            self._metrics_offset = f.tell()
        if self._writer is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])
        return self._metrics_offset

    def close_log(self) -> None:
        """Close TensorBoard's writer, if one is open."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    # ------------------------------------------------------------------------------------------------
    # results and outputs

    @property
    def finished(self) -> bool:
        """Whether the run ended: ``results.json`` is written last."""
        return (self.path / RESULTS).exists()

    def results(self) -> dict:
        """``results.json``: the evaluation of every training stage (and ``evaluated_from`` where the
        folder's run re-evaluated another run's training, see :meth:`train.run.Run.evaluate_results`)."""
        return json.loads((self.path / RESULTS).read_text())

    def write_results(self, results: dict) -> None:
        """Write ``results.json`` (whole: a run with it has ended)."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f"{RESULTS}.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        tmp.replace(self.path / RESULTS)

    def draw_curves(self) -> None:
        """``curves.png`` from ``metrics.jsonl`` (a figure is never a reason to fail a finished run)."""
        if not self.main:
            return
        from .curves import plot_curves
        try:
            plot_curves(self.path / METRICS, self.path / "curves.png")
        except Exception as exc:
            log.warning("could not draw the curves: %s", exc)

    def figure_path(self, tag: str, video: str) -> Path:
        """Where the T-CAM figure of ``video`` at stage ``tag`` goes (its folder created)."""
        folder = self.path / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        return folder / f"tcam-{tag}-{video}.png"

    def write_outputs(self, tag: str, dataset, videos: list, predictions: list, cams: list,
                      settings: dict | None = None) -> None:
        """Write ``predictions-<tag>.json`` (the detections, an ActivityNet result file for ``python -m
        train.eval --predictions`` or the official evaluation code) and ``cams-<tag>.npz`` (per test video
        its T-CAM ``tcam/<video>`` ``[T, C]`` and attention ``attention/<video>`` ``[T]``, with ``classes``,
        ``videos``, ``feature_rate`` and the evaluation's ``smooth`` and ``tiou``, for ``python -m
        train.eval.plot --cam``), then copy them to ``predictions.json`` and ``cams.npz``; every file appears
        whole. ``settings``: the config's ``eval`` section."""
        if not self.main:
            return
        from ..data.activitynet import write_predictions_json
        run_dir = self.path
        run_dir.mkdir(parents=True, exist_ok=True)
        pred = run_dir / f"predictions-{tag}.json"
        write_predictions_json(str(pred), predictions, class_names=list(dataset.classes), videos=videos)
        arrays = {"classes": np.array([str(c) for c in dataset.classes]), "videos": np.array(videos),
                  "feature_rate": np.array(float(dataset.feature_rate))}
        if settings is not None:
            arrays["smooth"] = np.array(int(settings["smooth"]))
            arrays["tiou"] = np.array([float(t) for t in settings["tiou"]])
        for name, (tcam, att) in zip(videos, cams):
            arrays[f"tcam/{name}"] = np.asarray(tcam, dtype=np.float32)
            arrays[f"attention/{name}"] = np.asarray(att, dtype=np.float32)
        cam = run_dir / f"cams-{tag}.npz"
        tmp = cam.with_name(f".{cam.name}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, cam)
        for src, dst in ((pred, run_dir / "predictions.json"), (cam, run_dir / "cams.npz")):
            tmp = dst.with_name(f".{dst.name}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
