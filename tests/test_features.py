"""Tests of train.features: the I3D network, weight loading, decoding, flow, and the extraction CLI.

Tests that decode video or compute flow need the optional extras (``pip install av
opencv-contrib-python-headless``, i.e. ``ccluster[features]``) and are skipped, saying so, only when those
are absent. Everything runs on tiny clips (32 x 32 crops) to stay fast on CPU.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch

from features.i3d import I3D, WeightLoadError, build_i3d, load_i3d_weights, output_size, same_padding

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


needs_av = pytest.mark.skipif(not _have("av"), reason="PyAV not installed (pip install av, or ccluster[features])")
needs_cv2 = pytest.mark.skipif(not _have_tvl1(), reason="OpenCV contrib not installed "
                               "(pip install opencv-contrib-python-headless, or ccluster[features])")


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


# ------------------------------------------------------------------------------------------ network

def test_same_padding_matches_tensorflow():
    # 224 input, 7x7x7 kernel, stride 2 -> 112 output, 5 padding split 2 before / 3 after (W, H, T order)
    assert same_padding((16, 224, 224), (7, 7, 7), (2, 2, 2)) == [2, 3, 2, 3, 2, 3]
    assert same_padding((16, 56, 56), (3, 3, 3), (1, 1, 1)) == [1, 1] * 3
    assert same_padding((8, 28, 28), (3, 3, 3), (2, 2, 2)) == [0, 1] * 3
    assert same_padding((3, 7, 7), (2, 2, 2), (2, 2, 2)) == [0, 1] * 3  # odd input: ceil(n / 2) outputs
    assert output_size(16, 224, 224) == (2, 7, 7)


def test_i3d_small_shapes_deterministic_and_batch_independent():
    torch.manual_seed(0)
    rgb, flow = I3D(3).eval(), I3D(2).eval()
    assert sum(p.numel() for p in rgb.parameters()) == 12_287_264  # Inception-v1 I3D trunk, RGB
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 32, 32, generator=g) * 2 - 1
    f = torch.rand(2, 2, 16, 32, 32, generator=g) * 2 - 1
    with torch.inference_mode():
        assert rgb.trunk(x).shape == (2, 1024, 2, 1, 1)
        a, b = rgb(x), rgb(x)
        assert a.shape == (2, 1024) and flow(f).shape == (2, 1024)
        assert torch.equal(a, b)                                    # deterministic
        assert torch.allclose(rgb(x[1:]), a[1:], atol=1e-5)        # rows do not depend on the batch
        assert flow(f[:, :, :7, :20, :24]).shape == (2, 1024)      # odd sizes: SAME padding + mean pool
    with pytest.raises(ValueError, match=r"expected input \[B, 3, T, H, W\]"):
        rgb(f)


def test_i3d_full_size_shape():
    torch.manual_seed(0)
    model = I3D(2).eval()
    with torch.inference_mode():
        fmap = model.trunk(torch.zeros(1, 2, 16, 224, 224))
    assert fmap.shape == (1, 1024, 2, 7, 7)  # the 2x7x7 map the original average pool covers exactly


# ------------------------------------------------------------------------------------ weight loading

def _checkpoint_like_release(model, num_classes=400):
    """A state dict as in the released conversion: no num_batches_tracked, a 400-way logits layer."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["logits.conv3d.weight"] = torch.randn(num_classes, 1024, 1, 1, 1)
    sd["logits.conv3d.bias"] = torch.randn(num_classes)
    return sd


def test_weights_round_trip_from_file(tmp_path):
    torch.manual_seed(1)
    src = I3D(3).eval()
    for m in src.modules():  # non-trivial BN statistics, so a wrong mapping would show
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(_checkpoint_like_release(src), path)
    torch.manual_seed(2)
    dst = build_i3d("rgb", str(path))
    x = torch.rand(1, 3, 16, 32, 32)
    with torch.inference_mode():
        assert torch.equal(dst(x), src(x))
    with_logits = load_i3d_weights(I3D(3, num_classes=400), str(path))
    assert with_logits.logits is not None
    with torch.inference_mode():
        assert with_logits.eval().classify(x).shape == (1, 400)
    # DataParallel-saved ("module." prefix) and wrapped {"state_dict": ...} files load too
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "wrapped.pt")
    load_i3d_weights(I3D(3), str(tmp_path / "wrapped.pt"))


def test_weight_loading_errors(tmp_path):
    torch.manual_seed(0)
    rgb_sd = _checkpoint_like_release(I3D(3))
    flow_sd = _checkpoint_like_release(I3D(2))

    with pytest.raises(FileNotFoundError, match="nope.pt"):
        build_i3d("rgb", str(tmp_path / "nope.pt"))

    missing = dict(rgb_sd)
    del missing["Mixed_4c.b1b.bn.running_var"]
    missing["Mixed_9z.b0.conv3d.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pt"
    torch.save(missing, path)
    with pytest.raises(WeightLoadError) as e:
        build_i3d("rgb", str(path))
    msg = str(e.value)
    assert str(path) in msg and "RGB (3-channel)" in msg
    assert "missing 1 key(s): Mixed_4c.b1b.bn.running_var" in msg
    assert "unexpected 1 key(s): Mixed_9z.b0.conv3d.weight" in msg

    torch.save(flow_sd, tmp_path / "flow_imagenet.pt")
    with pytest.raises(WeightLoadError, match=r"wrong shape: Conv3d_1a_7x7\.conv3d\.weight \(file \(64, 2, 7, 7, 7\), "
                                              r"model \(64, 3, 7, 7, 7\)\).*swapped"):
        build_i3d("rgb", str(tmp_path / "flow_imagenet.pt"))

    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(WeightLoadError, match="expected a state dict"):
        build_i3d("flow", str(tmp_path / "list.pt"))
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(WeightLoadError, match="could not be read"):
        build_i3d("flow", str(tmp_path / "text.pt"))
    with pytest.raises(ValueError, match="modality"):
        build_i3d("depth")


# ------------------------------------------------------------------------------------- preprocessing

def test_rgb_and_flow_scaling_ranges():
    from features.flow import normalize_flow, rgb_to_unit
    px = np.array([0, 127, 255], np.uint8)
    np.testing.assert_allclose(rgb_to_unit(px), [-1.0, 127 / 127.5 - 1, 1.0], atol=1e-6)
    flow = np.array([-100.0, -20.0, -10.0, 0.0, 5.0, 20.0, 31.0], np.float32)
    out = normalize_flow(flow)
    np.testing.assert_allclose(out, [-1, -1, -0.5, 0, 0.25, 1, 1], atol=1e-7)
    assert out.dtype == np.float32
    with pytest.raises(TypeError, match="uint8"):
        rgb_to_unit(np.zeros(3, np.float32))


@needs_cv2
def test_tvl1_flow_direction_and_range():
    import cv2
    from features.flow import TVL1
    rng = np.random.default_rng(0)
    tex = cv2.GaussianBlur(rng.integers(0, 255, (48, 72), dtype=np.uint8), (0, 0), 2)
    a, b = np.ascontiguousarray(tex[:, 6:70]), np.ascontiguousarray(tex[:, 3:67])  # content moves 3 px right
    tvl1 = TVL1(threads=2)
    try:
        raw = tvl1(a, b)
        assert raw.shape == (48, 64, 2) and raw.dtype == np.float32
        inner = raw[8:-8, 8:-8]
        assert abs(float(np.median(inner[..., 0])) - 3.0) < 0.5 and abs(float(np.median(inner[..., 1]))) < 0.5
        flows = tvl1.many([a, b, a], normalize=True)
        assert len(flows) == 2 and all(f.min() >= -1 and f.max() <= 1 for f in flows)
        assert abs(float(np.median(flows[0][8:-8, 8:-8, 0])) - 3 / 20) < 0.03
        assert float(np.median(flows[1][8:-8, 8:-8, 0])) < 0  # and back
    finally:
        tvl1.close()


def test_missing_optional_packages_say_what_to_install(monkeypatch):
    from features import flow, video
    monkeypatch.setitem(sys.modules, "av", None)
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"pip install 'ccluster\[features\]'"):
        video.require_av()
    with pytest.raises(ImportError, match="opencv-contrib-python-headless"):
        flow.require_cv2()


# ------------------------------------------------------------------------------------------- decoding

@needs_av
def test_decode_resamples_to_25fps_resizes_and_crops(tmp_path):
    from features.video import iter_frames, probe, resized_shape
    path = write_video(tmp_path / "moving.mp4", n=60, fps=30)
    info = probe(path)
    assert (info.width, info.height) == (64, 48) and info.fps == pytest.approx(30)
    frames = list(iter_frames(path, fps=25, short_side=40, crop=None))
    assert len(frames) == 50                                   # 2 s at 25 fps
    assert frames[0].shape == (40, 53, 3) and frames[0].dtype == np.uint8
    assert resized_shape(180, 320, 256) == (256, 455) and resized_shape(320, 180, 256) == (455, 256)
    crops = list(iter_frames(path, fps=25, short_side=40, crop=32))
    assert len(crops) == 50 and crops[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(crops[7], frames[7][4:36, 10:42])   # centre crop of the resized frame

    def square_x(img):  # centroid column of the yellow square
        mask = (img[..., 0] > 150) & (img[..., 1] > 150) & (img[..., 2] < 120)
        return np.nonzero(mask)[1].mean()
    xs = [square_x(f) for f in frames[:40]]
    assert all(b >= a - 0.5 for a, b in zip(xs, xs[1:])) and xs[-1] - xs[0] > 20   # it moves right
    same_rate = list(iter_frames(write_video(tmp_path / "25.mp4", n=20, fps=25), fps=25, short_side=40, crop=32))
    assert len(same_rate) == 20


@needs_av
def test_unreadable_video_raises_decode_error(tmp_path):
    from features.video import VideoDecodeError, iter_frames
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    with pytest.raises(VideoDecodeError, match="broken.mp4"):
        list(iter_frames(str(bad)))
    with pytest.raises(VideoDecodeError, match="no such file"):
        list(iter_frames(str(tmp_path / "absent.mp4")))


# ---------------------------------------------------------------------------------------- extraction

@pytest.fixture(scope="module")
def extractor():
    if not (_have("av") and _have_tvl1()):
        pytest.skip("needs PyAV and OpenCV contrib (pip install av opencv-contrib-python-headless)")
    from features.extract import ExtractConfig, FeatureExtractor
    ex = FeatureExtractor.from_weights(None, None, ExtractConfig(device="cpu", batch_size=2, flow_threads=2,
                                                                 **SMALL), allow_random=True)
    yield ex
    ex.close()


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
