"""Average precision: video-level classification and temporal detection (localization).

Detection follows the official ActivityNet evaluation protocol (Heilbron et al., ``eval_detection.py``),
reimplemented here from its description:

1. for one class, all predictions (of every video) are sorted by decreasing score;
2. each prediction, in that order, visits the ground-truth instances of its video and class by decreasing
   temporal IoU with it; at each threshold, an IoU below the threshold ends the visit with a false positive,
   a ground truth already matched at that threshold is skipped, the first free one is matched (true
   positive); a prediction that matches nothing (no ground truth in its video, or all taken) is a false
   positive;
3. AP is the area under the precision/recall curve after replacing precision by its envelope (the maximum
   precision at any higher recall), with recall sentinels 0 and 1 (VOC 2010+ "all-point" interpolation);
4. mAP at a threshold is the mean AP over the classes that have ground truth; the reported "average" is the
   mean of mAP over the thresholds.

Ties in score are ranked as the official code ranks them whenever numpy's sort keeps equal keys in input
order (``argsort()[::-1]``): among equal scores the prediction listed *later* comes first. We use a stable
sort so this holds on every machine. Ground truths tied in IoU are visited in the same way.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

THUMOS14_TIOU = tuple(round(0.1 * i, 2) for i in range(1, 8))  # 0.1:0.1:0.7
ACTIVITYNET_TIOU = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))  # 0.5:0.05:0.95

__all__ = [
    "THUMOS14_TIOU", "ACTIVITYNET_TIOU", "average_precision", "classification_map", "segment_iou",
    "envelope_ap", "detection_ap_per_class", "detection_map", "drop_ambiguous",
]


# --------------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------------
def envelope_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """VOC-style interpolated AP: area under the precision envelope (max precision at >= recall).

    ``precision`` and ``recall`` are the values after each ranked prediction (recall non-decreasing).
    Sentinels (recall 0, precision 0) and (recall 1, precision 0) are added, as in the ActivityNet code.
    """
    prec = np.concatenate([[0.0], np.asarray(precision, dtype=np.float64), [0.0]])
    rec = np.concatenate([[0.0], np.asarray(recall, dtype=np.float64), [1.0]])
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    steps = np.nonzero(rec[1:] != rec[:-1])[0] + 1
    return float(np.sum((rec[steps] - rec[steps - 1]) * prec[steps]))


def average_precision(scores: np.ndarray, positives: np.ndarray, interpolation: str = "none") -> float:
    """AP of one class from per-item scores [N] and binary relevance [N].

    interpolation:
      - ``"none"``: non-interpolated AP, sum over ranks of precision x (recall increment); this is the
        THUMOS14 recognition metric (mean of the precision at each positive when there are no ties).
      - ``"11point"``: VOC2007 11-point AP, mean over r in {0, 0.1, ..., 1} of the best precision at recall >= r.
      - ``"envelope"``: VOC2010+/ActivityNet all-point interpolated AP (see :func:`envelope_ap`); the official
        ActivityNet classification evaluator uses this one.

    Items with equal scores form one rank (a single operating point), so the result does not depend on the
    order of tied items. Returns NaN when there is no positive item (AP undefined).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    pos = np.asarray(positives).ravel().astype(bool)
    if scores.shape != pos.shape:
        raise ValueError(f"average_precision: scores has {scores.size} items but positives has {pos.size}")
    if np.isnan(scores).any():
        raise ValueError("average_precision: scores contain NaN")
    npos = int(pos.sum())
    if npos == 0:
        return math.nan
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], pos[order]
    tp = np.cumsum(p)
    fp = np.cumsum(~p)
    last = np.concatenate([np.nonzero(s[1:] != s[:-1])[0], [len(s) - 1]])  # last item of each tie group
    tp, fp = tp[last].astype(np.float64), fp[last].astype(np.float64)
    precision = tp / (tp + fp)
    recall = tp / npos
    if interpolation == "none":
        return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))
    if interpolation == "11point":
        total = 0.0
        for r in np.linspace(0.0, 1.0, 11):
            ok = recall >= r - 1e-12
            total += precision[ok].max() if ok.any() else 0.0
        return float(total / 11.0)
    if interpolation == "envelope":
        return envelope_ap(precision, recall)
    raise ValueError(f"interpolation must be 'none', '11point' or 'envelope', got {interpolation!r}")


def classification_map(scores: np.ndarray, labels: np.ndarray, interpolation: str = "none"):
    """Video-level classification mAP.

    scores: [V, C] real scores (any monotone scale); labels: [V, C] multi-hot (> 0.5 means positive).
    Returns ``(mAP, ap)`` where ``ap`` is the per-class AP array [C]; classes without any positive video
    get NaN and are left out of the mean (mAP is NaN if no class has a positive).
    See :func:`average_precision` for ``interpolation``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 2 or scores.shape != labels.shape:
        raise ValueError(f"classification_map: expected scores and labels of the same shape [V, C], "
                         f"got scores {scores.shape} and labels {labels.shape}")
    if np.isnan(scores).any():
        bad = np.argwhere(np.isnan(scores))[0]
        raise ValueError(f"classification_map: scores contain NaN (first at video {bad[0]}, class {bad[1]})")
    ap = np.array([average_precision(scores[:, c], labels[:, c] > 0.5, interpolation)
                   for c in range(scores.shape[1])])
    valid = ~np.isnan(ap)
    return (float(ap[valid].mean()) if valid.any() else math.nan), ap


# --------------------------------------------------------------------------------------------------
# detection
# --------------------------------------------------------------------------------------------------
def segment_iou(segment: Sequence[float], candidates: np.ndarray) -> np.ndarray:
    """Temporal IoU of one [start, end] segment with each row of candidates [N, 2] (0 where the union is 0)."""
    cand = np.asarray(candidates, dtype=np.float64).reshape(-1, 2)
    inter = np.clip(np.minimum(segment[1], cand[:, 1]) - np.maximum(segment[0], cand[:, 0]), 0.0, None)
    union = (cand[:, 1] - cand[:, 0]) + (segment[1] - segment[0]) - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _check_predictions(predictions: Iterable[Mapping]) -> list[Mapping]:
    preds = list(predictions)
    for i, p in enumerate(preds):
        for key in ("video", "label", "start", "end", "score"):
            if key not in p:
                raise ValueError(f"prediction {i} has no {key!r} (expected keys video, label, start, end, score)")
        s, e, sc = float(p["start"]), float(p["end"]), float(p["score"])
        if math.isnan(sc):
            raise ValueError(f"prediction {i} (video {p['video']!r}, label {p['label']!r}) has a NaN score")
        if not (math.isfinite(s) and math.isfinite(e)) or e < s:
            raise ValueError(f"prediction {i} (video {p['video']!r}) has an invalid segment [{s}, {e}]: "
                             f"expected finite start <= end")
    return preds


def _check_ground_truth(ground_truth: Iterable[Mapping]) -> list[Mapping]:
    gts = list(ground_truth)
    for i, g in enumerate(gts):
        for key in ("video", "label", "start", "end"):
            if key not in g:
                raise ValueError(f"ground truth {i} has no {key!r} (expected keys video, label, start, end)")
        s, e = float(g["start"]), float(g["end"])
        if not (math.isfinite(s) and math.isfinite(e)) or e < s:
            raise ValueError(f"ground truth {i} (video {g['video']!r}) has an invalid segment [{s}, {e}]")
    return gts


def drop_ambiguous(predictions: Sequence[Mapping], ambiguous: Mapping[str, Sequence[Sequence[float]]]):
    """Predictions that do not overlap (intersection > 0) any ambiguous segment of their video.

    THUMOS14 marks some test segments "Ambiguous"; detections touching them are neither right nor wrong,
    so they are removed before evaluation (as in the THUMOS14 / W-TALC evaluation code).
    """
    if not ambiguous:
        return list(predictions)
    kept = []
    for p in predictions:
        segs = ambiguous.get(p["video"])
        if segs:
            a = np.asarray(segs, dtype=np.float64).reshape(-1, 2)
            inter = np.minimum(float(p["end"]), a[:, 1]) - np.maximum(float(p["start"]), a[:, 0])
            if (inter > 0).any():
                continue
        kept.append(p)
    return kept


def _class_ap(preds: list[Mapping], gt_by_video: dict[str, np.ndarray], npos: int,
              thresholds: np.ndarray) -> np.ndarray:
    """AP at each threshold for one class (protocol steps 1-3 in the module docstring)."""
    k = len(thresholds)
    if not preds:
        return np.zeros(k)
    scores = np.array([float(p["score"]) for p in preds])
    order = np.argsort(scores, kind="stable")[::-1]
    tp = np.zeros((k, len(preds)))
    fp = np.zeros((k, len(preds)))
    locked = {v: np.zeros((k, len(g)), dtype=bool) for v, g in gt_by_video.items()}
    for rank, i in enumerate(order):
        p = preds[i]
        gts = gt_by_video.get(p["video"])
        if gts is None:
            fp[:, rank] = 1
            continue
        iou = segment_iou((float(p["start"]), float(p["end"])), gts)
        visit = np.argsort(iou, kind="stable")[::-1]
        lock = locked[p["video"]]
        for t, thr in enumerate(thresholds):
            for j in visit:
                if iou[j] < thr:
                    break
                if lock[t, j]:
                    continue
                lock[t, j] = True
                tp[t, rank] = 1
                break
            if tp[t, rank] == 0:
                fp[t, rank] = 1
    tp_c, fp_c = np.cumsum(tp, axis=1), np.cumsum(fp, axis=1)
    recall = tp_c / npos
    precision = tp_c / (tp_c + fp_c)
    return np.array([envelope_ap(precision[t], recall[t]) for t in range(k)])


def detection_ap_per_class(predictions: Iterable[Mapping], ground_truth: Iterable[Mapping],
                           tiou_thresholds: Sequence[float] = THUMOS14_TIOU,
                           ambiguous: Mapping[str, Sequence[Sequence[float]]] | None = None
                           ) -> dict[Hashable, np.ndarray]:
    """Per-class detection AP: ``{label: AP array over tiou_thresholds}`` for every label with ground truth.

    predictions: dicts (video, label, start, end, score); ground_truth: dicts (video, label, start, end);
    times in seconds, labels any hashable (class index or name) used consistently in both.
    Predictions whose label has no ground truth are ignored; a class without predictions gets AP 0.
    ``ambiguous`` (video -> list of (start, end)) removes overlapping predictions first (:func:`drop_ambiguous`).
    Raises ValueError on a NaN score, a non-finite or reversed segment, or an empty ground truth.
    """
    preds = _check_predictions(predictions)
    gts = _check_ground_truth(ground_truth)
    if not gts:
        raise ValueError("detection mAP: the ground truth is empty (no annotated instance to evaluate)")
    thresholds = np.asarray(list(tiou_thresholds), dtype=np.float64).ravel()
    if thresholds.size == 0 or np.isnan(thresholds).any():
        raise ValueError(f"detection mAP: tiou_thresholds must be a non-empty list of numbers, got {tiou_thresholds!r}")
    preds = drop_ambiguous(preds, ambiguous or {})
    gt_lists: dict[Hashable, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for g in gts:
        gt_lists[g["label"]][g["video"]].append((float(g["start"]), float(g["end"])))
    pred_lists: dict[Hashable, list] = defaultdict(list)
    for p in preds:
        pred_lists[p["label"]].append(p)
    out = {}
    for label, by_video in gt_lists.items():
        arrays = {v: np.asarray(s, dtype=np.float64) for v, s in by_video.items()}
        npos = sum(len(s) for s in by_video.values())
        out[label] = _class_ap(pred_lists.get(label, []), arrays, npos, thresholds)
    return out


def detection_map(predictions: Iterable[Mapping], ground_truth: Iterable[Mapping],
                  tiou_thresholds: Sequence[float] = THUMOS14_TIOU,
                  ambiguous: Mapping[str, Sequence[Sequence[float]]] | None = None):
    """Temporal localization mAP, official ActivityNet protocol (see the module docstring).

    Returns ``(mAP per threshold as np.ndarray, average over thresholds as float)``, fractions in [0, 1].
    Arguments as in :func:`detection_ap_per_class`; empty predictions give mAP 0.
    """
    per_class = detection_ap_per_class(predictions, ground_truth, tiou_thresholds, ambiguous)
    m = np.mean(np.stack(list(per_class.values())), axis=0)
    return m, float(m.mean())
