"""One video's figure (train/eval/plot.py and python -m train.eval.plot): what it draws, smoothing, long
videos."""
import numpy as np
import pytest

from train.eval import plot_video, smooth_sequence, write_ground_truth_json, write_predictions_json
from train.eval.plot import main as plot_main


def P(video, label, start, end, score):
    return {"video": video, "label": label, "start": start, "end": end, "score": score}


# ------------------------------------------------------------------ T-CAM smoothing
def _gap_cam(t_len=45, start=10, end=31, gap=20):
    """Class 1 on [start, end) at height 1 with segment ``gap`` dropped to the background 0."""
    tcam = np.zeros((t_len, 3))
    tcam[start:end, 1] = 1.0
    tcam[gap, 1] = 0.0
    return tcam, np.array([0.05, 0.9, 0.02])


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


def test_plot_video(tmp_path, monkeypatch):
    """What the figure holds: each shown class's T-CAM column against the segments' centres in seconds,
    the attention scaled by its maximum, and per class a row of ground truth and a row of predictions
    spanning their seconds; the PNG is that figure."""
    import matplotlib.image
    figs = _captured_figure(monkeypatch)
    rate = 25 / 16
    tcam = np.zeros((60, 3))
    tcam[10:20, 1] = 2.0
    att = np.linspace(0, 1, 60)
    path = plot_video(str(tmp_path / "v.png"), tcam, att, [(6.4, 12.8, 1)],
                      [{"label": 1, "start": 6.0, "end": 13.0, "score": 0.9}], rate, ["A", "B", "C"], title="v")
    ax, ax2, axr = figs[0].axes
    t = (np.arange(60) + 0.5) / rate
    by_label = {line.get_label(): line for line in ax.lines}
    assert list(by_label)[0] == "B"  # the class of the ground truth and the prediction first
    np.testing.assert_allclose(by_label["B"].get_xdata(), t)
    np.testing.assert_array_equal(by_label["B"].get_ydata(), tcam[:, 1])
    np.testing.assert_allclose(axr.lines[0].get_ydata(), att)
    assert ax.get_title() == "v" and ax.get_xlim() == (0, 60 / rate)
    rows = {tick.get_text(): tick.get_position()[1] for tick in ax2.get_yticklabels()}
    assert rows["GT B"] > rows["pred B"]
    spans = {}
    for bars in ax2.collections:  # broken_barh: one PolyCollection per row
        (x0, y0), (x1, _) = bars.get_paths()[0].vertices.min(0), bars.get_paths()[0].vertices.max(0)
        spans[round(y0)] = (x0, x1)
    assert spans[round(rows["GT B"] - 0.4)] == pytest.approx((6.4, 12.8))
    assert spans[round(rows["pred B"] - 0.4)] == pytest.approx((6.0, 13.0))
    height, width = matplotlib.image.imread(path).shape[:2]
    assert (width, height) == tuple(int(110 * v) for v in figs[0].get_size_inches())  # the figure at 110 dpi
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
