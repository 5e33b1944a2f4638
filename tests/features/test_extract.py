"""The extraction pipeline and its command (features/extract.py, python -m features): snippets, resuming,
damaged inputs, the joint layout."""
import json

import numpy as np
import pytest
import torch


SMALL = dict(short_side=40, crop=32)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: tiny convolutions gain nothing from more, and on a shared CPU extra OpenMP
    threads waiting on each other make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _have(mod):
    try:
        __import__(mod)
        return True
    except ImportError:
        return False


def _have_tvl1():
    if not _have("cv2"):
        return False
    import cv2
    return hasattr(cv2, "optflow") and hasattr(cv2.optflow, "DualTVL1OpticalFlow_create")


def write_video(path, n=40, fps=30, w=64, h=48, codec="mpeg4"):
    """A tiny video of a square moving right over a dark background, plus a circle moving down."""
    import av
    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    for i in range(n):
        img = np.full((h, w, 3), 30, np.uint8)
        x = 2 + (i % (w - 16))
        img[14:26, x:x + 12] = (250, 220, 40)
        y = 2 + (i % (h - 10))
        img[y:y + 8, w - 12:w - 4] = (40, 200, 250)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return str(path)


@pytest.fixture(scope="module")
def extractor():
    if not (_have("av") and _have_tvl1()):
        pytest.skip("needs PyAV and OpenCV contrib (pip install av opencv-contrib-python-headless)")
    from features.extract import ExtractConfig, FeatureExtractor
    ex = FeatureExtractor.from_weights(None, None, ExtractConfig(device="cpu", batch_size=2, flow_threads=2,
                                                                 **SMALL), allow_random=True)
    yield ex
    ex.close()


@pytest.mark.slow
def test_snippets_tail_padding_and_ranges(extractor, tmp_path):
    path = write_video(tmp_path / "v.mp4", n=40, fps=30)   # 1.33 s -> 34 frames at 25 fps = 2 x 16 + 2
    stats = {}
    snips = list(extractor.snippets(path, stats))
    assert stats["frames"] == 34 and len(snips) == 3
    for rgb, flow in snips:
        assert rgb.shape == (16, 32, 32, 3) and flow.shape == (16, 32, 32, 2)
        assert rgb.dtype == flow.dtype == np.float32
        assert rgb.min() >= -1 and rgb.max() <= 1 and flow.min() >= -1 and flow.max() <= 1
    rgb, flow = snips[-1]
    for k in range(2, 16):  # the 2-frame tail is padded by repeating its last frame (RGB and flow)
        np.testing.assert_array_equal(rgb[k], rgb[1])
        np.testing.assert_array_equal(flow[k], flow[1])
    assert np.abs(snips[0][1]).max() > 0.05  # the shapes move: flow is not zero

    res = extractor.extract(path)
    assert res.features.shape == (3, 2048) and res.features.dtype == np.float32
    assert res.frames == 34 and res.duration == pytest.approx(34 / 25)
    again = extractor.extract(path)
    np.testing.assert_array_equal(again.features, res.features)   # deterministic end to end

    extractor.cfg.tail = "drop"
    try:
        dropped = extractor.extract(path).features
        assert dropped.shape == (2, 2048)
        np.testing.assert_array_equal(dropped, res.features[:2])
    finally:
        extractor.cfg.tail = "pad"


@pytest.mark.slow
def test_cli_extract_resume_corrupt_and_joint(tmp_path, capsys):
    if not (_have("av") and _have_tvl1()):
        pytest.skip("needs PyAV and OpenCV contrib (pip install av opencv-contrib-python-headless)")
    from features.__main__ import main
    vids = tmp_path / "videos"
    vids.mkdir()
    write_video(vids / "clip_a.mp4", n=40, fps=30)
    write_video(vids / "clip_b.avi", n=20, fps=25)
    (vids / "broken.mp4").write_bytes(b"this is not a video")  # sorted first: the run must go on after it
    (vids / "notes.txt").write_text("ignored")
    out = tmp_path / "out"
    argv = ["extract", "--videos", str(vids), "--out", str(out), "--random-weights", "--no-progress",
            "--short-side", "40", "--crop", "32", "--batch-size", "2", "--flow-threads", "1",
            "--device", "cpu", "--joint", "Mine"]
    assert main(argv) == 1                       # one video failed, the others were extracted
    err = capsys.readouterr().err
    assert "FAILED" in err and "broken.mp4" in err
    a, b = out / "features" / "clip_a.npy", out / "features" / "clip_b.npy"
    assert np.load(a).shape == (3, 2048) and np.load(b).shape == (2, 2048)   # 34 and 20 frames
    assert not (out / "features" / "broken.npy").exists()
    assert "broken.mp4" in (out / "failed.txt").read_text()
    ann = json.loads((out / "annotations.json").read_text())
    assert set(ann["database"]) == {"clip_a", "clip_b"} and ann["taxonomy"] == []
    assert ann["feature_rate"] == 25 / 16 and ann["rgb_dim"] == 1024
    assert ann["database"]["clip_b"] == {"subset": "validation", "duration": 0.8, "labels": [],
                                         "annotations": [], "num_segments": 2}
    manifest = json.loads((out / "extraction.json").read_text())
    assert manifest["config"]["snippet"] == 16 and manifest["videos"]["clip_a"]["frames"] == 34

    # the user labels the videos; a second run skips finished videos and keeps the labels; a truncated
    # feature file (an interrupted copy, say) is not "finished" and is redone
    assert ann["classes"] == []
    ann["classes"] = ["Jump", "Run"]
    ann["database"]["clip_a"]["annotations"] = [{"label": "Jump", "segment": [0.2, 0.9]}]
    ann["database"]["clip_b"]["labels"] = ["Run"]
    ann["database"]["clip_b"]["subset"] = "test"
    (out / "annotations.json").write_text(json.dumps(ann))
    good_b = np.load(b)
    b.write_bytes(b.read_bytes()[:200])
    mtime_a = a.stat().st_mtime_ns
    assert main(argv[:-2]) == 1
    err = capsys.readouterr().err
    assert "1 video(s) already extracted" in err and "broken.mp4" in err
    assert a.stat().st_mtime_ns == mtime_a
    np.testing.assert_array_equal(np.load(b), good_b)
    ann2 = json.loads((out / "annotations.json").read_text())
    assert ann2["database"]["clip_a"]["annotations"] == [{"label": "Jump", "segment": [0.2, 0.9]}]
    assert ann2["database"]["clip_b"]["labels"] == ["Run"] and ann2["database"]["clip_b"]["subset"] == "test"

    # the output directory is a dataset in the project's native layout
    from train.data.native import read_native
    ds = read_native(str(tmp_path), "out")
    assert ds.classes == ["Jump", "Run"] and ds.rgb_dim == 1024 and ds.feature_rate == 25 / 16
    va, vb = ds.videos
    assert (va.name, va.subset, va.segments, va.num_segments) == ("clip_a", "validation", [(0.2, 0.9, 0)], 3)
    np.testing.assert_array_equal(vb.features, good_b)
    assert vb.labels.tolist() == [0.0, 1.0]

    # a template broken by hand is reported once, naming the file, before any work
    (out / "annotations.json").write_text('{"database": {"clip_a": ')
    assert main(argv[:-2]) == 2
    assert "annotations.json: not valid JSON" in capsys.readouterr().err
    (out / "annotations.json").write_text(json.dumps(ann2))

    # the standard joint layout, rebuilt from the filled annotations, reads back the same
    assert main(["joint", "--out", str(out), "--name", "Mine"]) == 0
    from train.data.standard import read_standard
    std = read_standard(str(out), "Mine")
    assert [v.name for v in std.videos] == ["clip_a", "clip_b"] and std.classes == ds.classes
    np.testing.assert_array_equal(std.videos[0].features, va.features)
    assert std.videos[0].segments == va.segments and std.videos[1].subset == "test"


def test_cli_reports_missing_weights_and_bad_input(tmp_path, capsys):
    from features.__main__ import main
    assert main(["extract", "--videos", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "--rgb-weights and --flow-weights required" in capsys.readouterr().err
    assert main(["extract", "--videos", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                 "--random-weights"]) == 2
    assert "neither a video file nor a directory" in capsys.readouterr().err
    assert main(["joint", "--out", str(tmp_path / "empty")]) == 2
    assert "extract features first" in capsys.readouterr().err
