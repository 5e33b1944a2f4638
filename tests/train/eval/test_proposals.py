"""Proposals from a T-CAM (train/eval/proposals.py): thresholds and scores, smoothing, NMS, W-TALC's rule."""
import numpy as np
import pytest

from train.eval import smooth_sequence, smoothing_weights, tcam_proposals, temporal_nms


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
