"""ActivityNet-format JSON: ground truth (``database``) and detection results (``results``).

Ground truth::

    {"version": "...", "taxonomy": [...], "classes": ["A", "B", ...],        # "classes" is our addition
     "database": {"<video>": {"subset": "test", "duration": 180.2,
                              "annotations": [{"segment": [12.3, 15.0], "label": "A"}, ...],
                              "ambiguous": [[30.1, 31.0], ...]}}}          # optional, our addition

Annotations labelled ``"Ambiguous"`` (some THUMOS14 conversions do this) are read as ambiguous segments.

Results::

    {"version": "...", "results": {"<video>": [{"label": "A", "score": 0.9, "segment": [12.0, 15.5]}, ...]},
     "external_data": {}}
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

__all__ = ["GroundTruthFile", "read_ground_truth_json", "write_ground_truth_json",
           "read_predictions_json", "read_predictions_file", "write_predictions_json"]


@dataclass
class GroundTruthFile:
    """Content of an ActivityNet ground-truth JSON (restricted to one subset when asked).

    entries: list of dict(video, label (class name), start, end) in seconds;
    classes: class names (the file's ``classes`` list, else its taxonomy leaves, else the sorted labels);
    videos: video -> dict(subset, duration, plus any other stored fields);
    ambiguous: video -> list of (start, end); meta: the other top-level fields (e.g. feature_rate).
    """
    entries: list = field(default_factory=list)
    classes: list = field(default_factory=list)
    videos: dict = field(default_factory=dict)
    ambiguous: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


def _load_json(path: str, what: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {path}: expected a JSON object at the top level, got {type(data).__name__}")
    return data


def _segment(value, path: str, video: str) -> tuple[float, float]:
    try:
        s, e = float(value[0]), float(value[1])
    except (TypeError, ValueError, IndexError, KeyError):
        raise ValueError(f"{path}: video {video!r} has a segment {value!r}; expected [start, end] in seconds") from None
    if not (math.isfinite(s) and math.isfinite(e)) or e < s:
        raise ValueError(f"{path}: video {video!r} has an invalid segment [{s}, {e}]; expected finite start <= end")
    return s, e


def _kind(value) -> str:
    """A short description of a JSON value for an error message."""
    if value is None:
        return "null"
    text = json.dumps(value)
    return f"{type(value).__name__} {text[:40] + '...' if len(text) > 43 else text}"


def _list_field(info: dict, key: str, path: str, video: str) -> list:
    """``info[key]`` (a list; absent: empty), or a ValueError naming the file, the video and the field."""
    value = info.get(key, [])
    if not isinstance(value, list):
        raise ValueError(f"{path}: video {video!r} field '{key}' must be a list, got {_kind(value)}")
    return value


def read_ground_truth_json(path: str, subset: str | None = None) -> GroundTruthFile:
    """Read an ActivityNet ground-truth JSON, keeping only videos of ``subset`` (all videos if None)."""
    data = _load_json(path, "ground-truth")
    db = data.get("database")
    if not isinstance(db, dict):
        raise ValueError(f"ground-truth file {path} has no 'database' object (is it a results file?)")
    out = GroundTruthFile()
    seen_subsets = set()
    for video, info in db.items():
        if not isinstance(info, dict):
            raise ValueError(f"{path}: database entry {video!r} is not an object")
        vsub = info.get("subset")
        seen_subsets.add(vsub)
        if subset is not None and vsub != subset:
            continue
        out.videos[video] = {k: v for k, v in info.items() if k not in ("annotations", "ambiguous")}
        amb = [_segment(s, path, video) for s in _list_field(info, "ambiguous", path, video)]
        for a in _list_field(info, "annotations", path, video):
            if not isinstance(a, dict) or "segment" not in a or "label" not in a:
                raise ValueError(f"{path}: video {video!r} has an annotation {a!r}; expected "
                                 f"{{'segment': [start, end], 'label': name}}")
            s, e = _segment(a["segment"], path, video)
            if a["label"] == "Ambiguous":
                amb.append((s, e))
            else:
                out.entries.append({"video": video, "label": str(a["label"]), "start": s, "end": e})
        if amb:
            out.ambiguous[video] = amb
    if subset is not None and not out.videos:
        raise ValueError(f"ground-truth file {path} has no video in subset {subset!r}; "
                         f"subsets present: {sorted(map(str, seen_subsets))}")
    out.meta = {k: v for k, v in data.items() if k not in ("database", "taxonomy", "classes")}
    if "classes" in data:
        classes = data["classes"]
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{path}: field 'classes' must be a list of class names, got {_kind(classes)}")
        out.classes = list(classes)
    elif isinstance(data.get("taxonomy"), list) and data["taxonomy"]:
        parents = {t.get("parentName") for t in data["taxonomy"]}
        out.classes = sorted({t["nodeName"] for t in data["taxonomy"] if t.get("nodeName") not in parents})
    else:
        out.classes = sorted({e["label"] for e in out.entries})
    return out


def write_ground_truth_json(path: str, database: Mapping[str, Mapping], classes: Sequence[str] | None = None,
                            version: str = "ccluster", meta: Mapping | None = None) -> None:
    """Write ground truth as ActivityNet JSON.

    database: video -> dict(subset, duration, annotations=[{"segment": [s, e], "label": name}], ...);
    extra keys (e.g. ``ambiguous``, ``labels``) are written as they are. ``classes`` fixes the class order;
    ``meta`` adds top-level fields.
    """
    data = {"version": version, "taxonomy": [{"nodeName": c, "parentName": "Root"} for c in (classes or [])],
            "database": {v: dict(info) for v, info in database.items()}}
    if classes is not None:
        data["classes"] = list(classes)
    data.update(meta or {})
    _dump(path, data)


def read_predictions_json(path: str) -> list[dict]:
    """Read ActivityNet detection results: list of dict(video, label (name), start, end, score)."""
    return read_predictions_file(path)[0]


def read_predictions_file(path: str) -> tuple[list[dict], list[str]]:
    """As :func:`read_predictions_json`, and the videos the file lists (with or without detections).
    A score must be a finite number; errors name the file and the video."""
    data = _load_json(path, "predictions")
    res = data.get("results")
    if not isinstance(res, dict):
        raise ValueError(f"predictions file {path} has no 'results' object (is it a ground-truth file?)")
    out = []
    for video, items in res.items():
        if not isinstance(items, list):
            raise ValueError(f"{path}: results for video {video!r} should be a list, got {type(items).__name__}")
        for it in items:
            if not isinstance(it, dict) or not {"segment", "label", "score"} <= it.keys():
                raise ValueError(f"{path}: video {video!r} has a result {it!r}; expected "
                                 f"{{'label': name, 'score': x, 'segment': [start, end]}}")
            s, e = _segment(it["segment"], path, video)
            try:
                score = float(it["score"]) if not isinstance(it["score"], bool) else math.nan
            except (TypeError, ValueError):
                score = math.nan
            if not math.isfinite(score):
                raise ValueError(f"{path}: video {video!r} has a result with score {it['score']!r}; expected a "
                                 f"finite number")
            out.append({"video": video, "label": str(it["label"]), "start": s, "end": e, "score": score})
    return out, list(res)


def write_predictions_json(path: str, predictions: Iterable[Mapping], class_names: Sequence[str] | None = None,
                           videos: Iterable[str] = (), version: str = "ccluster") -> None:
    """Write predictions (dicts video, label, start, end, score) as ActivityNet results JSON.

    Integer labels are mapped to names through ``class_names`` when given. Videos listed in ``videos`` appear
    with an empty list even if they have no prediction.
    """
    res: dict[str, list] = {v: [] for v in videos}
    for p in predictions:
        label = p["label"]
        if class_names is not None and not isinstance(label, str):
            label = class_names[int(label)]
        res.setdefault(p["video"], []).append(
            {"label": str(label), "score": float(p["score"]), "segment": [float(p["start"]), float(p["end"])]})
    _dump(path, {"version": version, "results": res, "external_data": {}})


def _dump(path: str, data: dict) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
    os.replace(tmp, path)
