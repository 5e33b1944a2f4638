"""The native layout: plain ``.npy`` features (no pickle) and ActivityNet-format JSON annotations.

Files, for a dataset ``<name>`` under ``<root>``::

    <root>/<name>/annotations.json        ActivityNet ground truth (usable by ``python -m train.eval``) with
                                          top-level "classes", "feature_rate", "rgb_dim", and per video
                                          "subset", "duration", "annotations", "labels" (video-level class
                                          names), "ambiguous" ([[start, end], ...]), "num_segments"
    <root>/<name>/features/<video>.npy    float32 [T, D] per video (RGB half first)

Everything is read with ``allow_pickle=False``: loading a native dataset cannot run code.
"""
from __future__ import annotations

import os

import numpy as np

from .activitynet import read_ground_truth_json, write_ground_truth_json
from .dataset import (DEFAULT_FEATURE_RATE, DatasetError, FeatureDataset, VideoRecord, check_features,
                      check_segment, checked_duration, checked_feature_rate, checked_rgb_dim)

__all__ = ["read_native", "write_native", "native_paths", "LAYOUT_VERSION"]

LAYOUT_VERSION = "ccluster-native-1"


def native_paths(root: str, name: str) -> tuple[str, str]:
    """(annotations.json, features folder) of dataset ``name`` under ``root``."""
    base = os.path.join(root, name)
    return os.path.join(base, "annotations.json"), os.path.join(base, "features")


def _restore_advice(root: str, name: str) -> str:
    """What to do about a damaged file of dataset ``name``: regenerate a synthetic set, else restore."""
    if os.path.isfile(os.path.join(root, name, "synthetic.json")):
        return (f"the synthetic generator wrote it: delete {os.path.join(root, name)} and the next run with "
                f"data.synthetic set generates it again")
    return "restore the file from its source, or write the dataset again (write_native)"


def _check_name(video: str, where: str) -> None:
    if not video or video.startswith(".") or "/" in video or "\\" in video or "\0" in video:
        raise DatasetError(f"{where}: video name {video!r} cannot be used as a file name in the native layout")


def _checked_count(value, where: str, video: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DatasetError(f"{where}: video {video!r} field 'num_segments': expected an integer >= 1, got {value!r}")
    return value


def read_native(root: str, name: str, *, feature_rate: float | None = None,
                rgb_dim: int | None = None) -> FeatureDataset:
    """Read the native layout (module docstring). ``feature_rate`` / ``rgb_dim`` override the stored values
    (default: those in annotations.json, else 25/16 and 1024). Errors name the offending file, and the
    video and field where there is one: a duration that is not a number > 0, an instance outside its
    video, labels that are not a list of the file's classes, NaN or infinite features, a feature width
    that differs between videos."""
    ann_path, feat_dir = native_paths(root, name)
    if not os.path.isfile(ann_path):
        raise FileNotFoundError(f"native layout: missing annotation file {ann_path}")
    try:
        gt = read_ground_truth_json(ann_path)
    except ValueError as e:
        raise DatasetError(f"{e}; {_restore_advice(root, name)}") from None
    if not gt.videos:
        raise DatasetError(f"{ann_path}: field 'database' holds no video; expected one entry per video")
    classes = gt.classes
    cindex = {c: i for i, c in enumerate(classes)}
    feature_rate = (checked_feature_rate(feature_rate, ann_path, argument=True) if feature_rate is not None else
                    checked_feature_rate(gt.meta.get("feature_rate", DEFAULT_FEATURE_RATE), ann_path))
    by_video: dict[str, list] = {}
    for e in gt.entries:
        if e["label"] not in cindex:
            raise DatasetError(f"{ann_path}: video {e['video']!r} has unknown class {e['label']!r} "
                             f"(not in the file's classes)")
        by_video.setdefault(e["video"], []).append((e["start"], e["end"], cindex[e["label"]]))
    videos = []
    dim = None
    for vname, info in gt.videos.items():
        _check_name(vname, ann_path)
        for key in ("subset", "duration"):
            if key not in info:
                raise DatasetError(f"{ann_path}: video {vname!r} has no field '{key}'; every video needs "
                                   f"'subset' and 'duration'")
        if not isinstance(info["subset"], str) or not info["subset"]:
            raise DatasetError(f"{ann_path}: video {vname!r} field 'subset': expected a subset name such as "
                               f"'validation' or 'test', got {info['subset']!r}")
        duration = checked_duration(info["duration"], ann_path, vname)
        video_labels = info.get("labels", [])
        if not isinstance(video_labels, list) or not all(isinstance(lab, str) for lab in video_labels):
            raise DatasetError(f"{ann_path}: video {vname!r} field 'labels': expected a list of class names, "
                               f"got {video_labels!r}")
        fpath = os.path.join(feat_dir, vname + ".npy")
        if not os.path.isfile(fpath):
            raise FileNotFoundError(f"native layout: missing feature file {fpath} (video listed in {ann_path})")
        try:
            feats = np.load(fpath, allow_pickle=False)
        except Exception as e:  # numpy raises many types for a truncated or overwritten file
            reason = str(e).split("\n")[0] or type(e).__name__
            raise DatasetError(f"feature file {fpath} is damaged (cannot read it: {reason}), "
                               f"{_restore_advice(root, name)}") from None
        check_features(feats, fpath, vname, dim)
        dim = feats.shape[1]
        if "num_segments" in info and _checked_count(info["num_segments"], ann_path, vname) != feats.shape[0]:
            raise DatasetError(f"{fpath} has {feats.shape[0]} segments but {ann_path} says num_segments="
                             f"{info['num_segments']} for video {vname!r}")
        labels = np.zeros(len(classes), dtype=np.float32)
        segs = by_video.get(vname, [])
        for s, e, c in segs:
            check_segment(s, e, duration, feature_rate, ann_path, vname, "annotations")
            labels[c] = 1.0
        for lab in video_labels:
            if lab not in cindex:
                raise DatasetError(f"{ann_path}: video {vname!r} field 'labels' has {lab!r}, which is not one of "
                                   f"the file's classes")
            labels[cindex[lab]] = 1.0
        videos.append(VideoRecord(name=vname, subset=info["subset"], duration=duration,
                                  labels=labels, segments=segs,
                                  features=np.ascontiguousarray(feats, dtype=np.float32)))
    rgb_dim = (checked_rgb_dim(rgb_dim, dim, ann_path, argument=True) if rgb_dim is not None else
               checked_rgb_dim(gt.meta.get("rgb_dim"), dim, ann_path))
    return FeatureDataset(classes, videos, feature_rate=feature_rate, rgb_dim=rgb_dim, ambiguous=gt.ambiguous,
                          name=name, source=ann_path)


def write_native(dataset: FeatureDataset, root: str, name: str) -> tuple[str, str]:
    """Write ``dataset`` in the native layout; returns (annotations.json, features folder)."""
    ann_path, feat_dir = native_paths(root, name)
    os.makedirs(feat_dir, exist_ok=True)
    database = {}
    for v in dataset.videos:
        _check_name(v.name, "write_native")
        np.save(os.path.join(feat_dir, v.name + ".npy"), np.ascontiguousarray(v.features, dtype=np.float32),
                allow_pickle=False)
        entry = {"subset": v.subset, "duration": float(v.duration), "url": "",
                 "annotations": [{"segment": [float(s), float(e)], "label": dataset.classes[c]}
                                 for s, e, c in v.segments],
                 "labels": [dataset.classes[c] for c in np.flatnonzero(v.labels > 0.5)],
                 "num_segments": v.num_segments}
        if dataset.ambiguous.get(v.name):
            entry["ambiguous"] = [[float(s), float(e)] for s, e in dataset.ambiguous[v.name]]
        database[v.name] = entry
    write_ground_truth_json(ann_path, database, classes=dataset.classes, version=LAYOUT_VERSION,
                            meta={"feature_rate": dataset.feature_rate, "rgb_dim": dataset.rgb_dim})
    return ann_path, feat_dir
