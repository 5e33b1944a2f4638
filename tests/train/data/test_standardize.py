"""train/data/standardize.py: streamed float64 statistics, the z-score map, its state, the conditioning
diagnostics and the ReLU unit fractions."""
import io
import math

import numpy as np
import pytest
import torch

from train.data import FeatureDataset, VideoRecord
from train.data.standardize import (FeatureStandardizer, conditioning_warning, dead_unit_fraction,
                                    fit_standardizer, relu_unit_fractions)


def _videos(seed=0, lengths=(7, 1, 30, 12, 0, 5), dim=6, offset=5.0, spread=1.1, dtype=np.float32):
    rng = np.random.default_rng(seed)
    base = offset * (1 + rng.random(dim))
    return [(base + spread * rng.normal(size=(t, dim)) * rng.random(dim)).astype(dtype) for t in lengths]


def _dataset(videos):
    recs = [VideoRecord(f"v{i}", "validation" if i % 2 == 0 else "test", 10.0, np.array([1.0, 0.0]),
                        [], v) for i, v in enumerate(videos)]
    return FeatureDataset(["a", "b"], recs, rgb_dim=2)


def test_statistics_equal_numpy_on_the_concatenation():
    videos = _videos()
    st = FeatureStandardizer.fit(videos)
    whole = np.concatenate(videos).astype(np.float64)
    assert st.count == whole.shape[0] and st.dim == whole.shape[1]
    np.testing.assert_allclose(st.mean, whole.mean(0), rtol=1e-12, atol=0)
    np.testing.assert_allclose(st.std, whole.std(0), rtol=1e-12, atol=0)
    assert st.mean.dtype == np.float64 and st.std.dtype == np.float64


def test_streaming_in_any_chunks_gives_the_same():
    videos = _videos(seed=1, lengths=(40, 3, 17, 1, 25))
    whole = np.concatenate(videos)
    one = FeatureStandardizer.fit([whole])
    per_video = FeatureStandardizer.fit(videos)
    rng = np.random.default_rng(2)
    cuts = np.sort(rng.integers(0, len(whole), size=9))
    pieces = np.split(whole, cuts)  # includes empty pieces
    chunked = FeatureStandardizer(whole.shape[1])
    for p in pieces:
        chunked.update(torch.from_numpy(p) if len(p) % 2 else p)  # numpy and torch chunks mixed
    rows = FeatureStandardizer.fit(list(whole))  # one segment at a time
    for st in (per_video, chunked, rows):
        assert st.count == one.count
        np.testing.assert_allclose(st.mean, one.mean, rtol=1e-13, atol=0)
        np.testing.assert_allclose(st.std, one.std, rtol=1e-12, atol=0)
    batched = FeatureStandardizer.fit([whole[None]])  # [1, N, D]
    np.testing.assert_allclose(batched.std, one.std, rtol=1e-13)  # leading dimensions are flattened


def test_large_offset_is_not_cancelled():
    # mean 1e4, spread 1e-3: sums of squares in float64 lose every digit of the variance; the merge does not
    rng = np.random.default_rng(3)
    videos = [1e4 + 1e-3 * rng.normal(size=(n, 3)) for n in (50, 80, 30, 200)]
    whole = np.concatenate(videos)
    exact_mean = np.array([math.fsum(whole[:, d]) / len(whole) for d in range(3)])
    exact_std = np.array([math.sqrt(math.fsum((whole[:, d] - exact_mean[d]) ** 2) / len(whole)) for d in range(3)])
    st = FeatureStandardizer.fit(videos)
    np.testing.assert_allclose(st.std, exact_std, rtol=1e-8)
    naive = np.sqrt(np.maximum((whole ** 2).mean(0) - whole.mean(0) ** 2, 0))
    assert np.abs(naive / exact_std - 1).max() > 1e-3  # what the textbook formula would have given


def test_apply_standardises_the_training_data_and_inverts():
    videos = _videos(seed=4, dtype=np.float64)
    st = FeatureStandardizer.fit(videos)
    z = np.concatenate([st.apply(v) for v in videos])
    np.testing.assert_allclose(z.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(0), 1, rtol=1e-12)
    for v in videos:
        np.testing.assert_allclose(st.invert(st.apply(v)), v, rtol=1e-13, atol=1e-13)
    v32 = torch.from_numpy(videos[2].astype(np.float32))
    out = st.apply(v32)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.shape == v32.shape
    np.testing.assert_allclose(out.double().numpy(), st.apply(videos[2].astype(np.float64)), rtol=1e-5, atol=1e-5)
    assert st.apply(videos[2].astype(np.float32)).dtype == np.float32
    assert torch.equal(st.invert(st.apply(v32)).round(decimals=3), v32.round(decimals=3))
    v32_copy = v32.clone()
    st.apply(v32)
    assert torch.equal(v32, v32_copy)  # the input is not modified


def test_apply_masks_padding_and_checks_shapes():
    st = FeatureStandardizer.fit(_videos(seed=5))
    batch = torch.zeros(2, 4, 6)
    batch[0, :3] = torch.from_numpy(_videos(seed=6)[0][:3])
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    out = st.apply(batch, mask)
    assert torch.equal(out[0, 3], torch.zeros(6)) and torch.equal(out[1, 1:], torch.zeros(3, 6))
    assert torch.allclose(out[0, :3], st.apply(batch[0, :3]))
    assert (out[1, 0] != 0).all()  # a real segment of zeros is standardised, not masked
    np.testing.assert_array_equal(st.apply(batch.numpy(), mask.numpy()), out.numpy())
    with pytest.raises(ValueError, match=r"FeatureStandardizer.apply: features must be \[\.\.\., 6\], got shape "
                                         r"\(2, 5\)"):
        st.apply(np.zeros((2, 5), np.float32))
    with pytest.raises(ValueError, match=r"FeatureStandardizer.apply: mask must have shape \(2, 4\)"):
        st.apply(batch, mask[:, :3])
    with pytest.raises(TypeError, match=r"FeatureStandardizer.apply: features must be floating point"):
        st.apply(np.zeros((2, 6), np.int64))
    with pytest.raises(RuntimeError, match=r"FeatureStandardizer.apply: no statistics yet"):
        FeatureStandardizer().apply(np.zeros((2, 6)))


def test_state_dict_round_trip_with_weights_only(tmp_path):
    st = FeatureStandardizer.fit(_videos(seed=7))
    buf = io.BytesIO()
    torch.save({"standardizer": st.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)["standardizer"]
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    again = FeatureStandardizer.from_state_dict(state)
    x = torch.from_numpy(_videos(seed=8)[2])
    assert torch.equal(again.apply(x), st.apply(x))
    np.testing.assert_array_equal(again.mean, st.mean)
    np.testing.assert_array_equal(again.std, st.std)
    assert again.count == st.count and again.min_std_ratio == st.min_std_ratio
    # the saved scale is used as saved, even if the floor rule would now give another one
    state = st.state_dict()
    state["scale"] = state["scale"] * 2
    halved = FeatureStandardizer.from_state_dict(state)
    assert torch.allclose(halved.apply(x.double()), (x.double() - torch.from_numpy(st.mean)) / state["scale"])
    with pytest.raises(ValueError, match=r"load_state_dict: missing keys \['scale'\]"):
        FeatureStandardizer().load_state_dict({k: v for k, v in st.state_dict().items() if k != "scale"})
    with pytest.raises(ValueError, match=r"load_state_dict: state has D=6, this standardizer D=4"):
        FeatureStandardizer(4).load_state_dict(st.state_dict())
    # streaming continues after a load
    more = _videos(seed=9)
    cont = FeatureStandardizer.from_state_dict(st.state_dict())
    for v in more:
        cont.update(v)
    ref = FeatureStandardizer.fit(_videos(seed=7) + more)
    np.testing.assert_allclose(cont.std, ref.std, rtol=1e-12)


def test_constant_and_tiny_dimensions():
    rng = np.random.default_rng(10)
    x = rng.normal(size=(50, 4))
    x[:, 1] = 3.25                      # constant
    x[:, 2] = 0.0                       # all zero
    x[:, 3] = 7 + 1e-9 * rng.normal(size=50)  # spread far below the others'
    st = FeatureStandardizer.fit([x[:20], x[20:]])
    assert st.std[1] == 0 and st.std[2] == 0
    floor = 1e-3 * np.median(st.std[st.std > 0])
    np.testing.assert_allclose(st.scale[1:], floor)
    assert st.scale[0] == st.std[0]
    z = st.apply(x)
    assert np.isfinite(z).all()
    np.testing.assert_array_equal(z[:, 1:3], 0.0)  # centred only
    assert np.abs(z[:, 3]).max() < 1e-3  # not blown up to unit variance
    allconst = FeatureStandardizer.fit([np.full((5, 3), 2.0)])
    np.testing.assert_array_equal(allconst.scale, 1e-3)  # reference 1 when every dimension is constant
    np.testing.assert_array_equal(allconst.apply(np.full((2, 3), 2.0)), 0.0)
    zero_floor = FeatureStandardizer(min_std_ratio=0).update(np.full((5, 3), 2.0))
    assert np.isfinite(zero_floor.apply(np.ones((2, 3)))).all()


def test_global_scale_does_not_change_the_standardised_features():
    videos = _videos(seed=11)
    a = FeatureStandardizer.fit(videos)
    b = FeatureStandardizer.fit([1000.0 * v.astype(np.float64) for v in videos])
    np.testing.assert_allclose(b.apply(1000.0 * videos[0].astype(np.float64)),
                               a.apply(videos[0].astype(np.float64)), rtol=1e-10, atol=1e-10)


def test_bad_inputs_name_the_function_and_video():
    st = FeatureStandardizer(3)
    with pytest.raises(ValueError, match=r"FeatureStandardizer.update: features must have D=3 dimensions"):
        st.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"FeatureStandardizer.update: features contain 1 NaN or infinite"):
        st.update(np.array([[0.0, np.nan, 1.0]]))
    assert st.count == 0  # nothing was half-added
    with pytest.raises(TypeError, match=r"FeatureStandardizer.update: features must be real numbers"):
        st.update(np.zeros((2, 3), dtype=bool))
    videos = _videos(seed=12)
    videos[3] = videos[3].copy()
    videos[3][0, 0] = np.inf
    with pytest.raises(ValueError, match=r"fit_standardizer: video 'v3': FeatureStandardizer.update: features contain"):
        fit_standardizer(_dataset(videos), [1, 3])
    with pytest.raises(ValueError, match=r"fit_standardizer: indices is empty"):
        fit_standardizer(_dataset(_videos(seed=12)), [])


def test_fit_standardizer_uses_only_the_given_videos():
    videos = _videos(seed=13, lengths=(6, 9, 4, 11))
    ds = _dataset(videos)
    train = ds.indices("validation")
    st = fit_standardizer(ds, train)
    whole = np.concatenate([videos[i] for i in train]).astype(np.float64)
    np.testing.assert_allclose(st.mean, whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.std, whole.std(0), rtol=1e-12)


def test_conditioning_warning():
    rng = np.random.default_rng(14)
    mean = 1 + rng.random(64)
    narrow = mean * (1 + 0.22 * rng.normal(size=(2000, 64)))  # std 0.22 of the mean in every dimension
    msg = conditioning_warning(FeatureStandardizer.fit([narrow]))
    assert msg is not None and "spread is small against the offset" in msg and "zscore" in msg
    assert "0.2" in msg.split("||std|| / ||mean|| = ")[1][:4]
    assert conditioning_warning(FeatureStandardizer.fit([narrow]), "zscore") is None  # standardisation fixes it
    # non-negative, ReLU-like features with a spread comparable to their mean: fine
    relu_like = np.maximum(rng.normal(0.2, 0.6, size=(2000, 64)), 0)
    assert conditioning_warning(FeatureStandardizer.fit([relu_like])) is None
    tiny = FeatureStandardizer.fit([1e-4 * rng.normal(size=(500, 16))])
    assert "scale is far from 1" in conditioning_warning(tiny)
    assert conditioning_warning(tiny, "zscore") is None
    dead = rng.normal(size=(500, 16))
    dead[:, :4] = 1.0  # 25 % constant dimensions
    for mode in ("none", "zscore"):
        msg = conditioning_warning(FeatureStandardizer.fit([dead]), mode)
        assert msg is not None and "4 of 16 dimensions are (nearly) constant" in msg
        assert "data.standardize" not in msg  # standardisation would not change this finding
    with pytest.raises(ValueError, match=r"conditioning_warning: standardize must be 'none' or 'zscore'"):
        conditioning_warning(tiny, "minmax")


def test_relu_unit_fractions():
    pre = torch.tensor([[[-1.0, 2.0, 0.5, -3.0], [-2.0, 1.0, -0.5, 9.0]],
                        [[-0.1, 3.0, 1.0, 9.0], [5.0, -9.0, 9.0, 9.0]]])  # [B=2, T=2, H=4]
    mask = torch.tensor([[True, True], [True, False]])  # the last row is padding
    dead, always = relu_unit_fractions(pre, mask)
    assert (dead, always) == (0.25, 0.25)  # unit 0 dead, unit 1 always on, units 2 and 3 mixed
    assert relu_unit_fractions(pre) == (0.0, 0.0)  # with the padding row every unit changes sign
    assert dead_unit_fraction(pre.numpy(), mask.numpy()) == 0.25
    assert relu_unit_fractions(torch.zeros(3, 5)) == (1.0, 0.0)  # exactly 0 counts as off
    with pytest.raises(ValueError, match=r"relu_unit_fractions: mask must have shape \(2, 2\)"):
        relu_unit_fractions(pre, mask[:, :1])
    with pytest.raises(ValueError, match=r"relu_unit_fractions: no row"):
        relu_unit_fractions(pre, torch.zeros(2, 2, dtype=torch.bool))
