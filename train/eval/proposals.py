"""Action proposals from a class activation sequence (T-CAM).

Two rules, chosen by ``eval.proposals``: W-TALC's (:func:`wtalc_proposals`, ``"wtalc"``, the default: one
threshold per class half way up its logits' range, no attention) and the multi-threshold pipeline below
(:func:`tcam_proposals`, ``"multi"``), which was the default before it measured 15 points of det avg lower.

The multi-threshold pipeline (:func:`tcam_proposals`), for one video:

0. smoothing (``smooth`` = w segments, 0 = off): every T-CAM column, and the attention when one is given,
   is replaced by its centred moving average over w segments (:func:`smooth_sequence`), before anything
   else below (class selection uses the video scores and is unaffected);
1. classes: those with video score >= ``class_threshold`` (0.1), and always the top-scoring class;
2. per kept class c, the localization signal is the T-CAM column min-max normalized over time to [0, 1]
   (``normalize="minmax"``), multiplied by the attention when one is given (attention-weighted T-CAM, with
   attention expected in [0, 1]);
3. at each threshold in ``thresholds`` (default 0.1, 0.2, ..., 0.9), every maximal run of segments with
   signal >= threshold becomes a candidate [first segment, last segment + 1) converted to seconds
   (segment t covers [t / feature_rate, (t + 1) / feature_rate));
4. score (``scoring="oic"``): outer-inner contrast, mean signal inside minus mean signal in the flanks
   (``inflation`` x length on each side, at least one segment, clipped to the video), plus
   ``video_weight`` x the video score of c. ``scoring="mean"``: mean signal inside + ``video_weight`` x video
   score (the W-TALC style);
5. per-class greedy NMS: a candidate overlapping a higher-scored kept one with IoU > ``nms_threshold``
   (0.5) is dropped (``nms_threshold=None`` disables it).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["DEFAULT_THRESHOLDS", "tcam_proposals", "wtalc_proposals", "topk_video_scores", "runs_above",
           "temporal_nms", "smooth_sequence", "smoothing_weights"]

DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(1, 10))


def smoothing_weights(window: int) -> np.ndarray:
    """Taps of the centred moving average of width ``window`` segments (sum 1, symmetric).

    Odd ``w``: ``w`` equal taps ``1 / w`` (offsets ``-(w - 1) / 2 ... (w - 1) / 2``). Even ``w``: ``w + 1``
    taps, ``1 / w`` inside and ``1 / (2 w)`` at both ends (offsets ``-w / 2 ... w / 2``): the average of
    the two moving averages of width ``w`` that start half a segment left and right of the centre, so the
    result is not shifted by half a segment. ``window`` 0 or 1: the single tap ``[1.0]`` (identity).
    """
    if isinstance(window, (bool, np.bool_)) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"smoothing_weights: window must be an integer >= 0 (segments), got {window!r}")
    w = int(window)
    if w <= 1:
        return np.ones(1)
    if w % 2:
        return np.full(w, 1.0 / w)
    taps = np.full(w + 1, 1.0 / w)
    taps[0] = taps[-1] = 0.5 / w
    return taps


def smooth_sequence(x: np.ndarray, window: int) -> np.ndarray:
    """Centred moving average of width ``window`` segments along axis 0 of ``x`` ([T] or [T, C]).

    Taps: :func:`smoothing_weights`. At the ends the window is cut to the segments that exist and its
    remaining taps are renormalised to sum 1 (``y_t = sum_j k_j x_{t+j} / sum_j k_j`` over the j with
    ``0 <= t + j < T``), so no zero padding pulls the first and last segments down: a constant stays that
    constant everywhere, and a step at the start of the video keeps its height. Output: float64, same shape.
    ``window`` 0 (off) or 1 returns a float64 copy of ``x``. A window longer than the video averages over
    what there is (the whole video for the middle segment).
    """
    taps = smoothing_weights(window)
    x = np.asarray(x, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"smooth_sequence: x must be [T] or [T, C], got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError("smooth_sequence: x contains NaN")
    if taps.size == 1 or x.shape[0] == 0:
        return x.copy()
    t_len, half = x.shape[0], taps.size // 2
    total = np.zeros_like(x)
    weight = np.zeros(t_len)
    for j, k in enumerate(taps):
        off = j - half  # y_t += k * x_{t + off} where t + off is inside the video
        lo, hi = max(0, -off), min(t_len, t_len - off)
        if lo >= hi:
            continue
        total[lo:hi] += k * x[lo + off:hi + off]
        weight[lo:hi] += k
    return total / (weight if x.ndim == 1 else weight[:, None])


def runs_above(signal: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Maximal runs [start, end) (end exclusive) of indices where ``signal >= threshold``."""
    on = np.concatenate([[False], np.asarray(signal) >= threshold, [False]])
    edges = np.flatnonzero(on[1:] != on[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def temporal_nms(segments: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy NMS on [N, 2] segments; returns kept indices by decreasing score (stable on ties)."""
    segments = np.asarray(segments, dtype=np.float64).reshape(-1, 2)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    keep: list[int] = []
    starts, ends = segments[:, 0], segments[:, 1]
    alive = np.ones(len(order), dtype=bool)
    for pos, i in enumerate(order):
        if not alive[pos]:
            continue
        keep.append(int(i))
        rest = order[pos + 1:]
        inter = np.clip(np.minimum(ends[i], ends[rest]) - np.maximum(starts[i], starts[rest]), 0, None)
        union = (ends[i] - starts[i]) + (ends[rest] - starts[rest]) - inter
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        alive[pos + 1:] &= ~(iou > iou_threshold)
    return keep


def tcam_proposals(tcam: np.ndarray, video_scores: np.ndarray, feature_rate: float, *,
                   attention: np.ndarray | None = None, classes: Sequence[int] | None = None,
                   class_threshold: float = 0.1, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                   normalize: str = "minmax", scoring: str = "oic", inflation: float = 0.25,
                   video_weight: float = 0.5, nms_threshold: float | None = 0.5,
                   duration: float | None = None, max_per_class: int | None = None,
                   smooth: int = 0) -> list[dict]:
    """Temporal proposals for one video from its T-CAM (see the module docstring for the pipeline).

    tcam: [T, C] class activations (logits or probabilities); video_scores: [C] video-level class scores in
    [0, 1] (e.g. sigmoid/softmax of the video logits); feature_rate: segments per second;
    attention: [T] in [0, 1] or None; classes: class indices to localize (default: by ``class_threshold``);
    normalize: "minmax" (per class over time) or "none" (use the T-CAM as it is, e.g. probabilities);
    scoring: "oic" or "mean"; duration: clip end times to it (seconds); max_per_class: keep the best N;
    smooth: moving-average window in segments applied to the T-CAM and the attention before
    normalization and thresholding (:func:`smooth_sequence`; 0 = off, 1 = identity).
    Returns a list of dict(label, start, end, score), times in seconds, best first within each class.
    """
    tcam = np.asarray(tcam, dtype=np.float64)
    if tcam.ndim != 2 or tcam.shape[0] == 0:
        raise ValueError(f"tcam_proposals: tcam must be [T, C] with T >= 1, got shape {tcam.shape}")
    t_len, n_cls = tcam.shape
    video_scores = np.asarray(video_scores, dtype=np.float64).ravel()
    if video_scores.shape != (n_cls,):
        raise ValueError(f"tcam_proposals: video_scores must have {n_cls} entries (tcam has {n_cls} classes), "
                         f"got {video_scores.shape}")
    if np.isnan(tcam).any() or np.isnan(video_scores).any():
        raise ValueError("tcam_proposals: tcam or video_scores contain NaN")
    if attention is not None:
        attention = np.asarray(attention, dtype=np.float64).ravel()
        if attention.shape != (t_len,):
            raise ValueError(f"tcam_proposals: attention must have T={t_len} entries, got {attention.shape}")
        if np.isnan(attention).any():
            raise ValueError("tcam_proposals: attention contains NaN")
    if not feature_rate > 0:
        raise ValueError(f"tcam_proposals: feature_rate must be > 0 segments per second, got {feature_rate}")
    if normalize not in ("minmax", "none"):
        raise ValueError(f"tcam_proposals: normalize must be 'minmax' or 'none', got {normalize!r}")
    if scoring not in ("oic", "mean"):
        raise ValueError(f"tcam_proposals: scoring must be 'oic' or 'mean', got {scoring!r}")
    if isinstance(smooth, (bool, np.bool_)) or not isinstance(smooth, (int, np.integer)) or smooth < 0:
        raise ValueError(f"tcam_proposals: smooth must be an integer >= 0 (segments), got {smooth!r}")
    if smooth > 1:
        tcam = smooth_sequence(tcam, smooth)
        if attention is not None:
            attention = smooth_sequence(attention, smooth)

    if classes is None:
        classes = [c for c in range(n_cls) if video_scores[c] >= class_threshold]
        top = int(np.argmax(video_scores))
        if top not in classes:
            classes.append(top)
    out: list[dict] = []
    for c in classes:
        c = int(c)
        if not 0 <= c < n_cls:
            raise ValueError(f"tcam_proposals: class index {c} out of range [0, {n_cls})")
        sig = tcam[:, c].copy()
        if normalize == "minmax":
            lo, hi = sig.min(), sig.max()
            sig = (sig - lo) / (hi - lo) if hi > lo else np.ones_like(sig)
        if attention is not None:
            sig = sig * attention
        runs = sorted({r for thr in thresholds for r in runs_above(sig, thr)})
        if not runs:
            continue
        segs = np.array(runs, dtype=np.float64)
        scores = np.empty(len(runs))
        for k, (s, e) in enumerate(runs):
            inner = sig[s:e].mean()
            if scoring == "oic":
                pad = max(1, int(round(inflation * (e - s))))
                outer = np.concatenate([sig[max(0, s - pad):s], sig[e:min(t_len, e + pad)]])
                inner = inner - (outer.mean() if outer.size else 0.0)
            scores[k] = inner + video_weight * video_scores[c]
        keep = temporal_nms(segs, scores, nms_threshold) if nms_threshold is not None else \
            list(np.argsort(-scores, kind="stable"))
        if max_per_class is not None:
            keep = keep[:max_per_class]
        for k in keep:
            start, end = segs[k, 0] / feature_rate, segs[k, 1] / feature_rate
            if duration is not None:
                end = min(end, float(duration))
                start = min(start, end)
            out.append({"label": c, "start": float(start), "end": float(end), "score": float(scores[k])})
    return out


def topk_video_scores(tcam: np.ndarray, ratio: int = 8) -> np.ndarray:
    """Per class, the mean of the ``max(1, T // ratio)`` largest T-CAM values over time: W-TALC's video
    score at test time (``[T, C] -> [C]``)."""
    tcam = np.asarray(tcam, dtype=np.float64)
    if tcam.ndim != 2 or tcam.shape[0] == 0:
        raise ValueError(f"topk_video_scores: tcam must be [T, C] with T >= 1, got shape {tcam.shape}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, np.integer)) or ratio < 1:
        raise ValueError(f"topk_video_scores: ratio must be an integer >= 1, got {ratio!r}")
    k = max(1, tcam.shape[0] // int(ratio))
    return -np.sort(-tcam, axis=0)[:k].mean(0)


def wtalc_proposals(tcam: np.ndarray, feature_rate: float, *, video_scores: np.ndarray | None = None,
                    topk_ratio: int = 8, video_weight: float = 0.7, min_length: int = 2,
                    duration: float | None = None, smooth: int = 0) -> list[dict]:
    """Proposals by W-TALC's rule (its ``detectionMAP.py``), for one video.

    ``tcam`` ``[T, C]`` holds segment class logits. Per class c with a positive video score ``v_c``
    (default: :func:`topk_video_scores` of the T-CAM, W-TALC's top-``T/8`` mean), the threshold is half
    way between the column's minimum and maximum over time; every maximal run of at least ``min_length``
    segments strictly above it is a proposal, scored ``max over the run + video_weight * v_c``. No NMS.
    ``smooth`` (segments) applies :func:`smooth_sequence` to the T-CAM first (W-TALC: none). Times are
    segment indices over ``feature_rate``, ends clipped to ``duration`` when given. Returns dicts
    (label, start, end, score) like :func:`tcam_proposals`, in class order then time order.
    """
    tcam = np.asarray(tcam, dtype=np.float64)
    if tcam.ndim != 2 or tcam.shape[0] == 0:
        raise ValueError(f"wtalc_proposals: tcam must be [T, C] with T >= 1, got shape {tcam.shape}")
    if np.isnan(tcam).any():
        raise ValueError("wtalc_proposals: tcam contains NaN")
    if not feature_rate > 0:
        raise ValueError(f"wtalc_proposals: feature_rate must be > 0 segments per second, got {feature_rate}")
    if isinstance(smooth, (bool, np.bool_)) or not isinstance(smooth, (int, np.integer)) or smooth < 0:
        raise ValueError(f"wtalc_proposals: smooth must be an integer >= 0 (segments), got {smooth!r}")
    if video_scores is None:
        video_scores = topk_video_scores(tcam, topk_ratio)
    video_scores = np.asarray(video_scores, dtype=np.float64).ravel()
    if video_scores.shape != (tcam.shape[1],):
        raise ValueError(f"wtalc_proposals: video_scores must have {tcam.shape[1]} entries, got "
                         f"{video_scores.shape}")
    if smooth > 1:
        tcam = smooth_sequence(tcam, smooth)
    out: list[dict] = []
    for c in np.flatnonzero(video_scores > 0):
        sig = tcam[:, c]
        hi, lo = sig.max(), sig.min()
        threshold = hi - (hi - lo) * 0.5
        on = np.concatenate([[False], sig > threshold, [False]])
        edges = np.flatnonzero(on[1:] != on[:-1])
        for s, e in zip(edges[0::2].tolist(), edges[1::2].tolist()):
            if e - s < min_length:
                continue
            start, end = s / feature_rate, e / feature_rate
            if duration is not None:
                end = min(end, float(duration))
                start = min(start, end)
            out.append({"label": int(c), "start": float(start), "end": float(end),
                        "score": float(sig[s:e].max() + video_weight * video_scores[c])})
    return out
