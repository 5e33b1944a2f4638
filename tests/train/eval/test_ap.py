"""Classification and detection mAP (train/eval/ap.py) against hand computations and a literal implementation
of the official protocol."""
import numpy as np
import pytest

from train.eval import (ACTIVITYNET_TIOU, THUMOS14_TIOU, average_precision, classification_map,
                        detection_ap_per_class, detection_map)


def P(video, label, start, end, score):
    return {"video": video, "label": label, "start": start, "end": end, "score": score}


def G(video, label, start, end):
    return {"video": video, "label": label, "start": start, "end": end}


# ------------------------------------------------------------------ classification
def test_classification_ap_hand_computed():
    s = np.array([0.9, 0.8, 0.7, 0.6])
    y = np.array([1, 0, 1, 0])
    # precision at the positives: 1 and 2/3
    assert average_precision(s, y, "none") == pytest.approx((1 + 2 / 3) / 2)
    assert average_precision(s, y, "envelope") == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # 11-point: recall 0..0.5 -> 1 (6 points), 0.6..1 -> 2/3 (5 points)
    assert average_precision(s, y, "11point") == pytest.approx((6 + 5 * 2 / 3) / 11)


def test_classification_ap_ties_do_not_depend_on_order():
    # a tie between a positive and a negative is one operating point: P=1/2 at R=1/2, then P=2/3 at R=1
    expected = 0.5 * 0.5 + 0.5 * 2 / 3
    assert average_precision([0.9, 0.9, 0.5], [1, 0, 1]) == pytest.approx(expected)
    assert average_precision([0.9, 0.9, 0.5], [0, 1, 1]) == pytest.approx(expected)


def test_classification_map_skips_classes_without_positives_and_rejects_nan():
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.8, 0.4]])
    labels = np.array([[1, 0, 0], [0, 1, 0]])
    m, ap = classification_map(scores, labels)
    assert np.isnan(ap[2]) and m == pytest.approx(1.0)
    scores[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        classification_map(scores, labels)
    with pytest.raises(ValueError, match="shape"):
        classification_map(scores[:, :2], labels)


# ------------------------------------------------------------------ detection, hand-computed
def test_detection_duplicate_detection_is_false_positive():
    gt = [G("a", 0, 0, 10), G("a", 0, 20, 30)]
    preds = [P("a", 0, 0, 10, 0.9), P("a", 0, 0, 10, 0.8), P("a", 0, 20, 29, 0.7)]
    m, avg = detection_map(preds, gt, [0.5, 0.95])
    # 0.5: TP FP TP -> P = 1, 1/2, 2/3 at R = 1/2, 1/2, 1 -> AP = 1/2 + 1/2 * 2/3
    assert m[0] == pytest.approx(0.5 + 1 / 3)
    # 0.95: the third has IoU 0.9 -> TP FP FP -> AP = 1/2
    assert m[1] == pytest.approx(0.5)
    assert avg == pytest.approx((0.5 + 1 / 3 + 0.5) / 2)


def test_detection_visits_ground_truth_by_iou_and_skips_matched():
    gt = [G("a", 0, 0, 10), G("a", 0, 2, 14)]
    # IoU with [0, 10]: 1; with [2, 14]: 8/14. The second copy finds [0, 10] taken and matches [2, 14].
    preds = [P("a", 0, 0, 10, 0.9), P("a", 0, 0, 10, 0.8)]
    m, _ = detection_map(preds, gt, [0.5, 0.6])
    assert m[0] == pytest.approx(1.0)
    assert m[1] == pytest.approx(0.5)  # 8/14 < 0.6: the copy is a false positive


def test_detection_score_ties_follow_the_official_order():
    # equal scores: the prediction listed later is ranked first (official argsort()[::-1] on a stable sort)
    gt = [G("a", 0, 0, 10)]
    hit, miss = P("a", 0, 0, 10, 0.5), P("a", 0, 50, 60, 0.5)
    assert detection_map([hit, miss], gt, [0.5])[0][0] == pytest.approx(0.5)
    assert detection_map([miss, hit], gt, [0.5])[0][0] == pytest.approx(1.0)


def test_prediction_on_video_without_ground_truth_is_false_positive():
    gt = [G("a", 0, 0, 10)]
    m, _ = detection_map([P("b", 0, 0, 10, 0.9), P("a", 0, 0, 10, 0.5)], gt, [0.5])
    assert m[0] == pytest.approx(0.5)


# ------------------------------------------------------------------ detection vs a literal protocol reading
def _reference_map(preds, gts, thresholds):
    """The ActivityNet protocol written as plainly as possible (no ties in the inputs used here)."""
    classes = sorted({g["label"] for g in gts})
    out = np.zeros((len(thresholds), len(classes)))
    for ci, c in enumerate(classes):
        cg = [g for g in gts if g["label"] == c]
        cp = sorted([p for p in preds if p["label"] == c], key=lambda p: -p["score"])
        for ti, thr in enumerate(thresholds):
            used = set()
            tps, fps = [], []
            for p in cp:
                cands = []
                for gi, g in enumerate(cg):
                    if g["video"] != p["video"]:
                        continue
                    inter = max(0.0, min(p["end"], g["end"]) - max(p["start"], g["start"]))
                    union = (p["end"] - p["start"]) + (g["end"] - g["start"]) - inter
                    cands.append((inter / union, gi))
                cands.sort(reverse=True)
                tp = 0
                for iou, gi in cands:
                    if iou < thr:
                        break
                    if gi in used:
                        continue
                    used.add(gi)
                    tp = 1
                    break
                tps.append(tp)
                fps.append(1 - tp)
            tp_c, fp_c = np.cumsum(tps), np.cumsum(fps)
            rec = list(tp_c / len(cg)) if cp else []
            prec = list(tp_c / np.maximum(tp_c + fp_c, 1)) if cp else []
            mrec, mprec = [0.0] + rec + [1.0], [0.0] + prec + [0.0]
            for i in range(len(mprec) - 2, -1, -1):
                mprec[i] = max(mprec[i], mprec[i + 1])
            out[ti, ci] = sum((mrec[i] - mrec[i - 1]) * mprec[i] for i in range(1, len(mrec))
                              if mrec[i] != mrec[i - 1])
    return out.mean(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detection_matches_literal_protocol(seed):
    rng = np.random.default_rng(seed)
    videos = [f"v{i}" for i in range(6)]
    gts, preds = [], []
    for v in videos:
        for _ in range(rng.integers(1, 6)):
            s = rng.uniform(0, 90)
            gts.append(G(v, int(rng.integers(3)), s, s + rng.uniform(1, 10)))
    for g in gts:  # noisy copies of the ground truth plus random junk
        for _ in range(rng.integers(0, 3)):
            s = g["start"] + rng.normal(0, 2)
            preds.append(P(g["video"], g["label"], s, s + (g["end"] - g["start"]) * rng.uniform(0.5, 1.5),
                           float(rng.random())))
    for _ in range(30):
        s = rng.uniform(0, 95)
        preds.append(P(str(rng.choice(videos + ["other"])), int(rng.integers(3)), s, s + rng.uniform(0.5, 8),
                       float(rng.random())))
    for thr in (THUMOS14_TIOU, ACTIVITYNET_TIOU):
        m, avg = detection_map(preds, gts, thr)
        np.testing.assert_allclose(m, _reference_map(preds, gts, thr), atol=1e-6)
        assert avg == pytest.approx(float(np.mean(m)), abs=1e-12)


# ------------------------------------------------------------------ robustness
def test_class_without_predictions_scores_zero_only_for_itself():
    gt = [G("a", 0, 0, 10), G("a", 1, 20, 30)]
    per_class = detection_ap_per_class([P("a", 0, 0, 10, 0.9)], gt, [0.5])
    assert per_class[0][0] == pytest.approx(1.0) and per_class[1][0] == 0.0
    assert detection_map([P("a", 0, 0, 10, 0.9)], gt, [0.5])[0][0] == pytest.approx(0.5)


def test_empty_predictions_and_bad_inputs():
    gt = [G("a", 0, 0, 10)]
    m, avg = detection_map([], gt, THUMOS14_TIOU)
    assert m.shape == (7,) and not m.any() and avg == 0.0
    with pytest.raises(ValueError, match="NaN"):
        detection_map([P("a", 0, 0, 10, float("nan"))], gt)
    with pytest.raises(ValueError, match="empty"):
        detection_map([P("a", 0, 0, 10, 1.0)], [])
    with pytest.raises(ValueError, match="invalid segment"):
        detection_map([P("a", 0, 10, 0, 1.0)], gt)


def test_ambiguous_overlaps_are_ignored():
    gt = [G("a", 0, 0, 10)]
    preds = [P("a", 0, 40, 45, 0.9), P("a", 0, 0, 10, 0.5)]  # the false positive sits on an ambiguous part
    assert detection_map(preds, gt, [0.5])[0][0] == pytest.approx(0.5)
    assert detection_map(preds, gt, [0.5], ambiguous={"a": [(44.0, 50.0)]})[0][0] == pytest.approx(1.0)
