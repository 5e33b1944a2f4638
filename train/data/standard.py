"""The standard W-TALC release layout of pre-extracted I3D features (THUMOS14, ActivityNet1.2).

Files, for a dataset ``<Name>`` under ``<root>``::

    <root>/<Name>-I3D-JOINTFeatures.npy   object array, per video a float array [T_i, D] (RGB then flow)
    <root>/<Name>-Annotations/
        videoname.npy    per video its name                      (bytes or str)
        subset.npy       per video its subset, e.g. b'validation' / b'test'
        classlist.npy    class names
        duration.npy     per video its duration in seconds
        segments.npy     per video a list of [start_s, end_s]
        labels.npy       per video the class name of each segment
        labels_all.npy   per video its video-level labels
        Ambiguous_test.txt   optional, lines "name  start end" (THUMOS14)
        ccluster_meta.json   optional, written by us: feature_rate, rgb_dim

These are pickled numpy object arrays. They are read with :func:`train.data.npy.read_npy`, whose
unpickler builds numpy arrays, dtypes and plain containers only: a file whose pickle names anything else
(a crafted file that would run code) is refused with :class:`DatasetError` naming it, and nothing in it
is called. The native layout (:mod:`train.data.native`) holds no pickle at all.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .dataset import (DEFAULT_FEATURE_RATE, DatasetError, FeatureDataset, VideoRecord, check_features, check_segment,
                      checked_duration, checked_feature_rate, checked_rgb_dim)
from .npy import RefusedPickle, read_npy

__all__ = ["read_standard", "write_standard", "standard_paths"]

_REQUIRED = ("videoname", "subset", "classlist", "duration", "segments", "labels", "labels_all")
META_FILE = "ccluster_meta.json"
AMBIGUOUS_FILE = "Ambiguous_test.txt"


def standard_paths(root: str, name: str) -> tuple[str, str]:
    """(features file, annotation folder) of dataset ``name`` under ``root``."""
    return (os.path.join(root, f"{name}-I3D-JOINTFeatures.npy"), os.path.join(root, f"{name}-Annotations"))


def _text(x, path: str) -> str:
    """A name stored as bytes, numpy bytes or str, as str."""
    if isinstance(x, (bytes, np.bytes_)):
        return bytes(x).decode("utf-8")
    if isinstance(x, (str, np.str_)):
        return str(x)
    if isinstance(x, np.ndarray) and x.shape == ():
        return _text(x.item(), path)
    raise DatasetError(f"{path}: expected a name (bytes or str), got {type(x).__name__} {x!r}")


def _load_pickled(path: str, what: str = "array") -> np.ndarray:
    """The array in ``path``, read without running code (:func:`train.data.npy.read_npy`): a 1-d array
    (one entry per video or class) unless ``what`` says otherwise."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"standard layout: missing file {path}")
    try:
        array = read_npy(path)
    except RefusedPickle as e:
        raise DatasetError(f"file {path} refused: its pickle calls {e.qualname}, which could run code (a W-TALC "
                           f"file holds numpy arrays and lists only); nothing in it was run, replace it with "
                           f"the file of the release") from None
    except Exception as e:  # numpy and pickle raise many types for a corrupt file
        reason = str(e).split("\n")[0] or type(e).__name__
        raise DatasetError(f"file {path} is damaged (cannot read it: {reason}), restore it from the "
                           f"release you downloaded") from None
    if isinstance(array, np.ndarray) and array.ndim == 2 and array.shape[1] == 1 and what == "video":
        array = array[:, 0]  # W-TALC's release stores duration.npy as [V, 1] (its code reads duration[i, 0])
    if not isinstance(array, np.ndarray) or array.ndim != 1:
        shape = array.shape if isinstance(array, np.ndarray) else type(array).__name__
        raise DatasetError(f"{path}: expected a 1-d array with one entry per {what}, got {shape}")
    return array


def _read_ambiguous(path: str) -> dict[str, list]:
    out: dict[str, list] = {}
    with open(path, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            tok = line.split()
            if not tok:
                continue
            if len(tok) == 4:  # "name Ambiguous start end" variant
                tok = [tok[0], tok[2], tok[3]]
            try:
                name, s, e = tok[0], float(tok[1]), float(tok[2])
            except (ValueError, IndexError):
                raise DatasetError(f"{path} line {n}: expected 'name start end', got {line.strip()!r}") from None
            out.setdefault(name, []).append((s, e))
    return out


def _list_entry(value, path: str, video: str) -> list:
    """A per-video list entry (segments, labels): a list or 1-d array; None is an empty list."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim == 1):
        return list(value)
    raise DatasetError(f"{path}: video {video!r} has {value!r}; expected a list (one entry per instance)")


def read_standard(root: str, name: str, *, feature_rate: float | None = None,
                  rgb_dim: int | None = None) -> FeatureDataset:
    """Read the W-TALC layout (module docstring) into a :class:`FeatureDataset`.

    ``feature_rate`` / ``rgb_dim`` default to the values in ``ccluster_meta.json`` when the folder has one,
    else to 25/16 segments per second and 1024. The pickles are read without running code (a file that
    names anything but numpy arrays and plain containers is refused). Errors name the offending file (and
    video): missing file, lengths that disagree, unknown class, malformed segments or features, a duration
    that is not a number > 0, an instance outside its video, NaN or infinite features.
    """
    feat_path, ann = standard_paths(root, name)
    if not os.path.isdir(ann):
        raise FileNotFoundError(f"standard layout: missing annotation folder {ann}")
    meta_path = os.path.join(ann, META_FILE)
    meta = {}
    if os.path.isfile(meta_path):
        with open(meta_path, "r", encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{meta_path} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    feature_rate = (checked_feature_rate(feature_rate, meta_path, argument=True) if feature_rate is not None else
                    checked_feature_rate(meta.get("feature_rate", DEFAULT_FEATURE_RATE), meta_path))

    paths = {k: os.path.join(ann, f"{k}.npy") for k in _REQUIRED}
    for k in _REQUIRED:  # report a missing file before spending time on the (large) features
        if not os.path.isfile(paths[k]):
            raise FileNotFoundError(f"standard layout: missing annotation file {paths[k]}")
    arr = {k: _load_pickled(paths[k], "class" if k == "classlist" else "video") for k in _REQUIRED}
    names = [_text(x, paths["videoname"]) for x in arr["videoname"]]
    classes = [_text(x, paths["classlist"]) for x in arr["classlist"]]
    n = len(names)
    for k in ("subset", "duration", "segments", "labels", "labels_all"):
        if len(arr[k]) != n:
            raise DatasetError(f"{paths[k]} has {len(arr[k])} entries but {paths['videoname']} has {n} videos")
    if n == 0:
        raise DatasetError(f"{paths['videoname']} lists no video; expected one entry per video")
    features = _load_pickled(feat_path)
    if len(features) != n:
        raise DatasetError(f"{feat_path} has {len(features)} videos but {paths['videoname']} has {n}")
    cindex = {c: i for i, c in enumerate(classes)}
    ambiguous = {}
    amb_path = os.path.join(ann, AMBIGUOUS_FILE)
    if os.path.isfile(amb_path):
        ambiguous = _read_ambiguous(amb_path)

    videos = []
    dim = None
    for i, vname in enumerate(names):
        feats = np.asarray(features[i])
        check_features(feats, feat_path, vname, dim)
        dim = feats.shape[1]
        duration = checked_duration(arr["duration"][i], paths["duration"], vname)
        segs = _list_entry(arr["segments"][i], paths["segments"], vname)
        labs = _list_entry(arr["labels"][i], paths["labels"], vname)
        if len(segs) != len(labs):
            raise DatasetError(f"{paths['labels']}: video {vname!r} has {len(labs)} segment labels but "
                             f"{paths['segments']} has {len(segs)} segments")
        labels = np.zeros(len(classes), dtype=np.float32)
        segments = []
        for seg, lab in zip(segs, labs):
            lab = _text(lab, paths["labels"])
            try:
                s, e = float(seg[0]), float(seg[1])
            except (TypeError, ValueError, IndexError):
                raise DatasetError(f"{paths['segments']}: video {vname!r} has segment {seg!r}; expected "
                                 f"[start_s, end_s]") from None
            check_segment(s, e, duration, feature_rate, paths["segments"], vname, "segment")
            if lab not in cindex:
                if lab == "Ambiguous":
                    ambiguous.setdefault(vname, []).append((s, e))
                    continue
                raise DatasetError(f"{paths['labels']}: video {vname!r} has unknown class {lab!r} "
                                 f"(not in {paths['classlist']})")
            segments.append((s, e, cindex[lab]))
            labels[cindex[lab]] = 1.0
        for lab in _list_entry(arr["labels_all"][i], paths["labels_all"], vname):
            lab = _text(lab, paths["labels_all"])
            if lab not in cindex:
                raise DatasetError(f"{paths['labels_all']}: video {vname!r} has unknown class {lab!r} "
                                 f"(not in {paths['classlist']})")
            labels[cindex[lab]] = 1.0
        subset = _text(arr["subset"][i], paths["subset"])
        if not subset:
            raise DatasetError(f"{paths['subset']}: video {vname!r} has an empty subset name")
        videos.append(VideoRecord(name=vname, subset=subset, duration=duration,
                                  labels=labels, segments=segments,
                                  features=np.ascontiguousarray(feats, dtype=np.float32)))
    rgb_dim = (checked_rgb_dim(rgb_dim, dim, meta_path, argument=True) if rgb_dim is not None else
               checked_rgb_dim(meta.get("rgb_dim"), dim, meta_path))
    return FeatureDataset(classes, videos, feature_rate=feature_rate, rgb_dim=rgb_dim, ambiguous=ambiguous,
                          name=name, source=feat_path, subset_source=paths["subset"])


def _objects(items) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def write_standard(dataset: FeatureDataset, root: str, name: str) -> tuple[str, str]:
    """Write ``dataset`` in the W-TALC layout (names as bytes, segment labels as str, like the real files),
    plus ``ccluster_meta.json``; returns (features file, annotation folder)."""
    feat_path, ann = standard_paths(root, name)
    os.makedirs(ann, exist_ok=True)
    vids = dataset.videos
    enc = lambda s: s.encode("utf-8")  # noqa: E731
    np.save(os.path.join(ann, "videoname.npy"), np.array([enc(v.name) for v in vids]))
    np.save(os.path.join(ann, "subset.npy"), np.array([enc(v.subset) for v in vids]))
    np.save(os.path.join(ann, "classlist.npy"), np.array([enc(c) for c in dataset.classes]))
    np.save(os.path.join(ann, "duration.npy"), np.array([v.duration for v in vids], dtype=np.float64))
    np.save(os.path.join(ann, "segments.npy"), _objects([[[s, e] for s, e, _ in v.segments] for v in vids]),
            allow_pickle=True)
    np.save(os.path.join(ann, "labels.npy"),
            _objects([[dataset.classes[c] for _, _, c in v.segments] for v in vids]), allow_pickle=True)
    np.save(os.path.join(ann, "labels_all.npy"),
            _objects([[dataset.classes[c] for c in np.flatnonzero(v.labels > 0.5)] for v in vids]),
            allow_pickle=True)
    with open(os.path.join(ann, AMBIGUOUS_FILE), "w", encoding="utf-8") as f:
        for v, segs in dataset.ambiguous.items():
            for s, e in segs:
                f.write(f"{v}  {float(s)!r} {float(e)!r}\n")
    with open(os.path.join(ann, META_FILE), "w", encoding="utf-8") as f:
        json.dump({"feature_rate": dataset.feature_rate, "rgb_dim": dataset.rgb_dim, "written_by": "ccluster"}, f)
    np.save(feat_path, _objects([v.features for v in vids]), allow_pickle=True)
    return feat_path, ann
