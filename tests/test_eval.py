"""Evaluation: AP on hand-computed cases, agreement with a literal reading of the ActivityNet protocol,
robustness cases, proposals, ActivityNet JSON, the command line and the plot."""
import json

import numpy as np
import pytest

from train.eval import (ACTIVITYNET_TIOU, THUMOS14_TIOU, average_precision, classification_map,
                        detection_ap_per_class, detection_map, plot_video, read_ground_truth_json,
                        read_predictions_json, smooth_sequence, smoothing_weights, tcam_proposals, temporal_nms,
                        write_ground_truth_json, write_predictions_json)
from train.eval.__main__ import main as eval_main
from train.eval.plot import main as plot_main


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


# ------------------------------------------------------------------ proposals
def test_proposals_from_a_step_cam_with_attention():
    rate = 25 / 16
    tcam = np.zeros((20, 3))
    tcam[5:9, 1] = 5.0
    props = tcam_proposals(tcam, np.array([0.05, 0.9, 0.02]), rate, attention=np.where(tcam[:, 1] > 0, 1.0, 0.1))
    assert {p["label"] for p in props} == {1}
    best = props[0]
    assert (best["start"], best["end"]) == pytest.approx((5 / rate, 9 / rate))
    assert best["score"] == pytest.approx(1.0 + 0.5 * 0.9)  # OIC 1 - 0 plus 0.5 x video score
    assert len(props) == 1  # the same run at every threshold is proposed once


@pytest.mark.parametrize("t_len", [1, 2, 3, 7])
def test_proposals_short_sequences(t_len):
    rng = np.random.default_rng(t_len)
    props = tcam_proposals(rng.normal(size=(t_len, 4)), rng.random(4), 25 / 16, attention=rng.random(t_len),
                           scoring="mean", duration=t_len / (25 / 16) - 0.1)
    assert props, "the top class always yields at least one proposal"
    for p in props:
        assert 0 <= p["start"] <= p["end"] <= t_len / (25 / 16) - 0.1 + 1e-9


def test_proposals_reject_bad_inputs():
    with pytest.raises(ValueError, match="video_scores"):
        tcam_proposals(np.zeros((5, 3)), np.zeros(2), 1.0)
    with pytest.raises(ValueError, match="NaN"):
        tcam_proposals(np.full((5, 3), np.nan), np.zeros(3), 1.0)
    with pytest.raises(ValueError, match="attention"):
        tcam_proposals(np.zeros((5, 3)), np.zeros(3), 1.0, attention=np.zeros(4))


# ------------------------------------------------------------------ T-CAM smoothing
def _gap_cam(t_len=45, start=10, end=31, gap=20):
    """Class 1 on [start, end) at height 1 with segment ``gap`` dropped to the background 0."""
    tcam = np.zeros((t_len, 3))
    tcam[start:end, 1] = 1.0
    tcam[gap, 1] = 0.0
    return tcam, np.array([0.05, 0.9, 0.02])


def _iou(a, b):
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    return inter / (max(a[1], b[1]) - min(a[0], b[0]))


def test_smoothing_bridges_a_one_segment_gap():
    rate = 25 / 16
    tcam, scores = _gap_cam()
    raw = tcam_proposals(tcam, scores, rate, thresholds=(0.5,))
    assert np.allclose([(p["start"] * rate, p["end"] * rate) for p in raw], [(10, 20), (21, 31)])
    for w in (3, 4, 5, 6, 7):
        smooth = tcam_proposals(tcam, scores, rate, thresholds=(0.5,), smooth=w)
        assert len(smooth) == 1, w
        assert (smooth[0]["start"] * rate, smooth[0]["end"] * rate) == pytest.approx((10, 31)), w
    # the default threshold grid: the best-ranked proposal is the whole instance only with smoothing
    truth = (10 / rate, 31 / rate)
    raw = tcam_proposals(tcam, scores, rate)
    assert len(raw) == 2 and max(_iou((p["start"], p["end"]), truth) for p in raw) < 0.5
    best = tcam_proposals(tcam, scores, rate, smooth=5)[0]
    assert _iou((best["start"], best["end"]), truth) > 0.9


def test_smoothing_applies_to_the_attention():
    rate = 1.0
    tcam = np.ones((40, 2))  # flat class 0: the localization signal is the attention alone
    att = np.zeros(40)
    att[10:30] = 1.0
    att[19] = 0.0  # the gap is in the attention
    raw = tcam_proposals(tcam, np.array([0.9, 0.1]), rate, attention=att, classes=[0], thresholds=(0.5,))
    assert [(p["start"], p["end"]) for p in raw] == [(10.0, 19.0), (20.0, 30.0)]
    smooth = tcam_proposals(tcam, np.array([0.9, 0.1]), rate, attention=att, classes=[0], thresholds=(0.5,),
                            smooth=5)
    assert [(p["start"], p["end"]) for p in smooth] == [(10.0, 30.0)]


@pytest.mark.parametrize("t_len", [1, 2, 3, 6, 40])
@pytest.mark.parametrize("window", [0, 1, 2, 3, 4, 5, 8, 51])
def test_smoothing_keeps_constants_and_matches_the_definition(t_len, window):
    const = np.full((t_len, 3), -2.75)
    if window <= 1:
        np.testing.assert_array_equal(smooth_sequence(const[:, 0], window), const[:, 0])
    np.testing.assert_allclose(smooth_sequence(const, window), const, rtol=1e-14, atol=0)  # edges included
    x = np.random.default_rng(t_len * 100 + window).normal(size=(t_len, 3))
    taps = smoothing_weights(window)
    half = len(taps) // 2
    expect = np.empty_like(x)
    for t in range(t_len):  # literal definition: in-range taps, renormalised
        idx = [(t + j - half, k) for j, k in enumerate(taps) if 0 <= t + j - half < t_len]
        expect[t] = sum(k * x[i] for i, k in idx) / sum(k for _, k in idx)
    np.testing.assert_allclose(smooth_sequence(x, window), expect, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(smooth_sequence(x[:, 1], window), expect[:, 1], rtol=1e-13, atol=1e-13)


def test_smoothing_window_zero_and_one_are_identity_and_taps_are_centred():
    x = np.random.default_rng(0).normal(size=(17, 4))
    for w in (0, 1):
        np.testing.assert_array_equal(smooth_sequence(x, w), x)
        tcam, scores = _gap_cam()
        assert tcam_proposals(tcam, scores, 1.0, smooth=w) == tcam_proposals(tcam, scores, 1.0)
    np.testing.assert_allclose(smoothing_weights(5), [0.2] * 5)
    np.testing.assert_allclose(smoothing_weights(4), [0.125, 0.25, 0.25, 0.25, 0.125])
    for w in range(2, 10):
        taps = smoothing_weights(w)
        assert taps.sum() == pytest.approx(1.0) and np.array_equal(taps, taps[::-1])
        assert (np.arange(len(taps)) - len(taps) // 2) @ taps == pytest.approx(0.0)  # no shift
    ramp = np.arange(30, dtype=float)  # a linear signal is unchanged away from the ends
    np.testing.assert_allclose(smooth_sequence(ramp, 6)[3:-3], ramp[3:-3], atol=1e-12)


def test_smoothing_rejects_bad_windows():
    tcam, scores = _gap_cam()
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match=r"tcam_proposals: smooth must be an integer >= 0"):
            tcam_proposals(tcam, scores, 1.0, smooth=bad)
        with pytest.raises(ValueError, match=r"smoothing_weights: window must be an integer >= 0"):
            smooth_sequence(tcam, bad)
    with pytest.raises(ValueError, match=r"smooth_sequence: x must be \[T\] or \[T, C\]"):
        smooth_sequence(np.zeros((2, 3, 4)), 3)
    with pytest.raises(ValueError, match="smooth_sequence: x contains NaN"):
        smooth_sequence(np.array([0.0, np.nan]), 3)


def test_temporal_nms():
    segs = np.array([[0, 10], [1, 10], [20, 30], [0, 9.5]])
    assert temporal_nms(segs, np.array([0.9, 0.8, 0.7, 0.95]), 0.5) == [3, 2]


# ------------------------------------------------------------------ JSON, command line, plot
def _write_case(tmp_path):
    db = {"a": {"subset": "test", "duration": 100.0,
                "annotations": [{"segment": [0, 10], "label": "Jump"}, {"segment": [20, 30], "label": "Run"}],
                "ambiguous": [[40, 50]]},
          "b": {"subset": "validation", "duration": 50.0, "annotations": [{"segment": [5, 8], "label": "Jump"}]}}
    gt_path, pred_path = tmp_path / "gt.json", tmp_path / "res.json"
    write_ground_truth_json(str(gt_path), db, classes=["Jump", "Run"])
    preds = [P("a", 0, 0, 10, 0.9), P("a", 1, 21, 30, 0.8), P("a", 1, 41, 45, 0.99), P("a", 0, 60, 70, 0.3)]
    write_predictions_json(str(pred_path), preds, class_names=["Jump", "Run"])
    return gt_path, pred_path


def test_json_round_trip(tmp_path):
    gt_path, pred_path = _write_case(tmp_path)
    gt = read_ground_truth_json(str(gt_path), subset="test")
    assert gt.classes == ["Jump", "Run"] and list(gt.videos) == ["a"]
    assert gt.entries == [G("a", "Jump", 0.0, 10.0), G("a", "Run", 20.0, 30.0)]
    assert gt.ambiguous == {"a": [(40.0, 50.0)]}
    preds = read_predictions_json(str(pred_path))
    assert preds[1] == P("a", "Run", 21.0, 30.0, 0.8)
    with pytest.raises(ValueError, match="subset 'nope'"):
        read_ground_truth_json(str(gt_path), subset="nope")
    with pytest.raises(ValueError, match="no 'results'"):
        read_predictions_json(str(gt_path))


def test_cli(tmp_path, capsys):
    gt_path, pred_path = _write_case(tmp_path)
    out = tmp_path / "out.json"
    rc = eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--subset", "test",
                    "--tiou", "0.5", "0.7", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["tiou"] == [0.5, 0.7]
    # Jump: TP then FP -> 1; Run: ambiguous one dropped, then IoU 0.9 TP -> 1
    assert res["mAP"] == pytest.approx([1.0, 1.0]) and res["average_mAP"] == pytest.approx(1.0)
    assert "avg" in capsys.readouterr().out
    assert eval_main(["--ground-truth", str(tmp_path / "missing.json"), "--predictions", str(pred_path)]) == 2
    assert "missing.json" in capsys.readouterr().err


def test_plot_video(tmp_path):
    rate = 25 / 16
    tcam = np.zeros((60, 3))
    tcam[10:20, 1] = 2.0
    path = plot_video(str(tmp_path / "v.png"), tcam, np.linspace(0, 1, 60), [(6.4, 12.8, 1)],
                      [{"label": 1, "start": 6.0, "end": 13.0, "score": 0.9}], rate, ["A", "B", "C"])
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="class names"):
        plot_video(str(tmp_path / "w.png"), tcam, None, [], [], rate, ["A"])


def _captured_figure(monkeypatch):
    import matplotlib.pyplot as plt
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure plot_video would close
    return figs


def test_plot_video_draws_the_smoothed_curves(tmp_path, monkeypatch):
    figs = _captured_figure(monkeypatch)
    tcam, _ = _gap_cam()
    att = np.linspace(0, 1, len(tcam))
    att[5] = 0.0
    plot_video(str(tmp_path / "s.png"), tcam, att, [(10, 31, 1)], [], 1.0, ["A", "B", "C"], smooth=5)
    ax, axr = figs[0].axes[0], figs[0].axes[2]
    curves = [line.get_ydata() for line in ax.lines]
    assert any(np.allclose(c, smooth_sequence(tcam[:, 1], 5)) for c in curves)
    assert any(np.array_equal(c, tcam[:, 1]) for c in curves)  # the raw curve, drawn faint
    att_curves = [line.get_ydata() for line in axr.lines]
    assert any(np.allclose(c, smooth_sequence(att, 5)) for c in att_curves)
    with pytest.raises(ValueError, match=r"plot_video: smooth must be an integer >= 0"):
        plot_video(str(tmp_path / "t.png"), tcam, None, [], [], 1.0, ["A", "B", "C"], smooth=-2)


def test_plot_cli_smooth(tmp_path, capsys, monkeypatch):
    gt_path, pred_path = _write_case(tmp_path)
    tcam = np.zeros((160, 2))
    tcam[0:16, 0] = 1.0
    np.savez(tmp_path / "cam.npz", tcam=tcam, attention=np.ones(160), feature_rate=1.6)
    figs = _captured_figure(monkeypatch)
    out = tmp_path / "a.png"
    assert plot_main(["--cam", str(tmp_path / "cam.npz"), "--ground-truth", str(gt_path), "--predictions",
                      str(pred_path), "--video", "a", "--out", str(out), "--smooth", "3"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curves = [line.get_ydata() for line in figs[0].axes[0].lines]
    assert any(np.allclose(c, smooth_sequence(tcam[:, 0], 3)) for c in curves)
    with pytest.raises(SystemExit):
        plot_main(["--cam", str(tmp_path / "cam.npz"), "--ground-truth", str(gt_path), "--video", "a",
                   "--out", str(out), "--smooth", "-1"])
    assert "--smooth: expected an integer >= 0" in capsys.readouterr().err


def test_plot_video_bars_have_a_legend(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    drawn = []
    monkeypatch.setattr(plt, "close", lambda fig=None: drawn.append(fig))  # keep the figure to inspect
    tcam = np.zeros((60, 3))
    plot_video(str(tmp_path / "v.png"), tcam, None, [(6.4, 12.8, 1)],
               [{"label": 1, "start": 6.0, "end": 13.0, "score": 0.9},
                {"label": 1, "start": 20.0, "end": 22.0, "score": 0.3}], 25 / 16, ["A", "B", "C"])
    bars = drawn[0].axes[1].get_legend()
    assert [t.get_text() for t in bars.get_texts()] == [
        "ground truth", "prediction, score 0.00 (lightest)", "prediction, score 0.90 (darkest)"]


def test_wtalc_proposals_follow_wtalcs_rule():
    from train.eval import topk_video_scores, wtalc_proposals
    T = 16
    tcam = np.zeros((T, 3))
    tcam[2:6, 0] = 4.0       # class 0: one run of 4 segments above half its range
    tcam[9, 0] = 4.0         # ... and a one-segment run, below min_length 2
    tcam[:, 1] = -1.0        # class 1: negative video score, never proposed
    tcam[1:3, 2] = 2.0       # class 2: runs at 1-2 and 12-15
    tcam[12:16, 2] = 3.0
    v = topk_video_scores(tcam, 8)   # top-2 mean per class
    np.testing.assert_allclose(v, [4.0, -1.0, 3.0])
    props = wtalc_proposals(tcam, 2.0, video_scores=v)
    got = [(p["label"], p["start"], p["end"], round(p["score"], 6)) for p in props]
    assert got == [(0, 1.0, 3.0, round(4 + 0.7 * 4, 6)),
                   (2, 0.5, 1.5, round(2 + 0.7 * 3, 6)), (2, 6.0, 8.0, round(3 + 0.7 * 3, 6))]
    # the default video score is the top-T/8 mean; duration clips the ends; a constant column has no run
    assert wtalc_proposals(tcam, 2.0) == props
    assert max(p["end"] for p in wtalc_proposals(tcam, 2.0, duration=7.5)) == 7.5
    assert wtalc_proposals(np.ones((5, 2)), 1.0) == []
    with pytest.raises(ValueError, match="tcam must be"):
        wtalc_proposals(np.zeros((0, 2)), 1.0)
    with pytest.raises(ValueError, match="feature_rate"):
        wtalc_proposals(tcam, 0.0)
    with pytest.raises(ValueError, match="ratio"):
        topk_video_scores(tcam, 0)


def _one_error_line(err: str, *needles) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def test_cli_refuses_predictions_of_one_subset_scored_against_every_subset(tmp_path, capsys):
    gt_path, pred_path = _write_case(tmp_path)  # ground truth: a (test), b (validation); predictions: a
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path)]) == 2
    _one_error_line(capsys.readouterr().err, pred_path, "subset 'test' only", "--subset test")
    out = tmp_path / "all.json"
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--subset", "all",
                      "--json", str(out)]) == 0
    # every video scored: b's Jump instance is missed (Jump AP 1/2, Run AP 1)
    assert json.loads(out.read_text())["average_mAP"] == pytest.approx(0.75)
    # predictions that list videos of both subsets need no --subset
    write_predictions_json(str(pred_path), [P("a", "Jump", 0, 10, 0.9), P("b", "Jump", 5, 8, 0.8)],
                           videos=["a", "b"])
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["average_mAP"] == pytest.approx(0.5)  # Run: no prediction


def test_cli_says_which_labels_it_does_not_score(tmp_path, capsys):
    gt_path, pred_path = _write_case(tmp_path)
    write_predictions_json(str(pred_path), [P("a", "Jump", 0, 10, 0.9), P("a", "jump", 0, 10, 0.95)])
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--subset", "test"]) == 0
    err = capsys.readouterr().err
    assert "note: 1 of 2 predictions have a label that is not a class of" in err and "'jump'" in err


@pytest.mark.parametrize("score", ["Infinity", "-Infinity", "NaN", '"high"', "null", "true"])
def test_cli_refuses_a_score_that_is_not_a_finite_number(tmp_path, capsys, score):
    gt_path, _ = _write_case(tmp_path)
    pred_path = tmp_path / "bad.json"
    pred_path.write_text('{"results": {"a": [{"label": "Jump", "segment": [0, 10], "score": %s}]}}' % score)
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--subset", "test"]) == 2
    _one_error_line(capsys.readouterr().err, pred_path, "video 'a'", "expected a finite number")


@pytest.mark.parametrize("tiou, needle", [("1.5", "--tiou: thresholds must be in (0, 1], got 1.5"),
                                          ("0", "got 0"), ("x", "--tiou: expected numbers")])
def test_cli_bad_tiou_is_one_error_line(tmp_path, capsys, tiou, needle):
    gt_path, pred_path = _write_case(tmp_path)
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--tiou", tiou]) == 2
    _one_error_line(capsys.readouterr().err, needle)


def test_ground_truth_fields_of_the_wrong_kind_are_named(tmp_path):
    db = {"a": {"subset": "test", "duration": 10.0, "annotations": None}}
    path = tmp_path / "gt.json"
    write_ground_truth_json(str(path), db, classes=["A"])
    with pytest.raises(ValueError, match=r"gt.json: video 'a' field 'annotations' must be a list, got null"):
        read_ground_truth_json(str(path))
    write_ground_truth_json(str(path), {"a": {"subset": "test", "duration": 10.0}}, classes=None,
                            meta={"classes": "A"})
    with pytest.raises(ValueError, match=r"gt.json: field 'classes' must be a list of class names, got str"):
        read_ground_truth_json(str(path))


def test_envelope_keeps_every_peak_in_few_points():
    from train.eval.plot import envelope
    rng = np.random.default_rng(0)
    y = rng.random(100_003)
    y[12345], y[777] = 5.0, -3.0
    t = np.arange(len(y)) / 1.5625
    tx, ty = envelope(t, y, 4000)
    assert len(tx) == len(ty) <= 4000
    assert ty.max() == 5.0 and ty.min() == -3.0
    assert tx[0] >= t[0] and tx[-1] <= t[-1] and np.all(np.diff(tx) >= 0)
    same = envelope(t[:50], y[:50], 4000)
    assert np.array_equal(same[0], t[:50]) and np.array_equal(same[1], y[:50])  # short curves as they are


def test_plot_video_of_a_very_long_video_draws_a_bounded_figure(tmp_path, monkeypatch):
    from train.eval.plot import MAX_POINTS, MAX_PREDICTIONS
    figs = _captured_figure(monkeypatch)
    T, rate = 100_000, 25 / 16
    rng = np.random.default_rng(1)
    tcam = rng.random((T, 3))
    tcam[54321, 2] = 9.0
    starts = rng.uniform(0, T / rate - 5, size=124_145)
    preds = [{"label": int(c), "start": float(s), "end": float(s) + 3.0, "score": float(sc)}
             for s, c, sc in zip(starts, rng.integers(0, 3, len(starts)), rng.random(len(starts)))]
    gts = [(100.0, 110.0, 1), (5000.0, 5020.0, 2)]
    path = plot_video(str(tmp_path / "long.png"), tcam, rng.random(T), gts, preds, rate, ["A", "B", "C"], smooth=5)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ax, ax2, axr = figs[0].axes
    assert all(len(line.get_xdata()) <= MAX_POINTS for line in ax.lines + axr.lines)
    assert max(line.get_ydata().max() for line in ax.lines) == 9.0  # the raw curve's peak is drawn
    bars = sum(len(c.get_paths()) for c in ax2.collections)
    assert bars == 3 * MAX_PREDICTIONS + len(gts)
    texts = [t.get_text() for t in ax2.get_legend().get_texts()]
    assert f"(best {MAX_PREDICTIONS} per class drawn, {len(preds) - 3 * MAX_PREDICTIONS} more not)" in texts


def test_plot_cli_uses_the_smoothing_recorded_in_the_cam_file(tmp_path, monkeypatch):
    gt_path, pred_path = _write_case(tmp_path)
    tcam = np.zeros((160, 2))
    tcam[0:16, 0] = 1.0
    np.savez(tmp_path / "cam.npz", tcam=tcam, attention=np.ones(160), feature_rate=1.6, smooth=np.array(5))
    figs = _captured_figure(monkeypatch)
    args = ["--cam", str(tmp_path / "cam.npz"), "--ground-truth", str(gt_path), "--video", "a",
            "--out", str(tmp_path / "a.png")]
    assert plot_main(args) == 0
    curves = [line.get_ydata() for line in figs[0].axes[0].lines]
    assert any(np.allclose(c, smooth_sequence(tcam[:, 0], 5)) for c in curves)
    assert figs[0].axes[0].get_ylabel().startswith("T-CAM (moving average of 5")
    assert plot_main(args + ["--smooth", "0"]) == 0  # the command line still decides when given
    assert figs[1].axes[0].get_ylabel() == "T-CAM"
    assert [np.asarray(line.get_ydata()).tolist() for line in figs[1].axes[0].lines] == tcam.T.tolist()
