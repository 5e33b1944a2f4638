"""Evaluation: classification mAP, temporal localization mAP (official ActivityNet protocol),
proposals from a T-CAM, ActivityNet JSON, and a per-video plot.

Command line: ``python -m train.eval --ground-truth gt.json --predictions predictions.json`` (see ``__main__``)
and ``python -m train.eval.plot`` (see :mod:`train.eval.plot`).
"""
from ..data.activitynet import (GroundTruthFile, read_ground_truth_json, read_predictions_json,
                        write_ground_truth_json, write_predictions_json)
from .ap import (ACTIVITYNET_TIOU, THUMOS14_TIOU, average_precision, classification_map,
                 detection_ap_per_class, detection_map, drop_ambiguous, segment_iou)
from .proposals import (DEFAULT_THRESHOLDS, runs_above, smooth_sequence, smoothing_weights, tcam_proposals,
                        temporal_nms, topk_video_scores, wtalc_proposals)

__all__ = [
    "classification_map", "average_precision", "detection_map", "detection_ap_per_class", "segment_iou",
    "drop_ambiguous", "THUMOS14_TIOU", "ACTIVITYNET_TIOU", "tcam_proposals", "wtalc_proposals",
    "topk_video_scores", "temporal_nms", "runs_above",
    "DEFAULT_THRESHOLDS", "smooth_sequence", "smoothing_weights", "plot_video", "GroundTruthFile",
    "read_ground_truth_json", "write_ground_truth_json", "read_predictions_json", "write_predictions_json",
]


def __getattr__(name):
    # plot_video is imported on first use, so that ``python -m train.eval.plot`` runs its module cleanly
    if name == "plot_video":
        from .plot import plot_video
        return plot_video
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
