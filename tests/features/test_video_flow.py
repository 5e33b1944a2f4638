"""Decoding and optical flow (features/video.py, features/flow.py): resampling, resizing, cropping, scaling,
TV-L1, and what to install when a package is missing."""
import os
import sys

import numpy as np
import pytest
import torch


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
