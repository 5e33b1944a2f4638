"""The I3D network (features/i3d.py): TensorFlow padding, shapes, determinism, weight files and their errors."""
import pytest
import torch

from features.i3d import I3D, WeightLoadError, build_i3d, load_i3d_weights, output_size, same_padding


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: tiny convolutions gain nothing from more, and on a shared CPU extra OpenMP
    threads waiting on each other make them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    release = _checkpoint_like_release(src)
    torch.save(release, path)
    torch.manual_seed(2)
    dst = build_i3d("rgb", str(path))
    x = torch.rand(1, 3, 16, 32, 32)
    with torch.inference_mode():
        assert torch.equal(dst(x), src(x))
    # the file's 400-way classifier is loaded as it is, and classify() is it on the pooled features
    with_logits = load_i3d_weights(I3D(3, num_classes=400), str(path)).eval()
    assert torch.equal(with_logits.logits.conv3d.weight, release["logits.conv3d.weight"])
    assert torch.equal(with_logits.logits.conv3d.bias, release["logits.conv3d.bias"])
    with torch.inference_mode():
        assert torch.equal(with_logits(x), src(x))  # the features do not use the classifier
        got = with_logits.classify(x)
        assert got.shape == (1, 400) and torch.isfinite(got).all() and got.std() > 0
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
