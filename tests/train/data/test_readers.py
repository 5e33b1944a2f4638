"""The two dataset layouts (train/data/native.py, standard.py, dataset.py): round trips, and every damaged or
inconsistent file named with its video and field."""
import json
import os

import numpy as np
import pytest

from train.data import load_dataset, write_native, write_standard


CLASSES = ["Jump", "Run", "Swim"]


def _objects(items):
    out = np.empty(len(items), dtype=object)
    for i, x in enumerate(items):
        out[i] = x
    return out


def _write_wtalc(root, name="Toy", n_feat=(12, 3, 30), dim=8):
    """Standard files as the real THUMOS14 release stores them: names as bytes, segment labels as str,
    labels_all mixing both; no ccluster metadata."""
    ann = os.path.join(root, f"{name}-Annotations")
    os.makedirs(ann)
    rng = np.random.default_rng(0)
    np.save(os.path.join(root, f"{name}-I3D-JOINTFeatures.npy"),
            _objects([rng.normal(size=(t, dim)).astype(np.float64) for t in n_feat]), allow_pickle=True)
    np.save(os.path.join(ann, "videoname.npy"), np.array([b"video_validation_1", b"video_test_1", b"video_test_2"]))
    np.save(os.path.join(ann, "subset.npy"), np.array([b"validation", b"test", b"test"]))
    np.save(os.path.join(ann, "classlist.npy"), np.array([c.encode() for c in CLASSES]))
    np.save(os.path.join(ann, "duration.npy"), np.array([[7.7], [2.0], [19.2]]))  # [V, 1] as in the W-TALC release
    np.save(os.path.join(ann, "segments.npy"), _objects([[[1.0, 2.5], [4.0, 6.0]], [], [[3.2, 9.6]]]),
            allow_pickle=True)
    np.save(os.path.join(ann, "labels.npy"), _objects([["Jump", "Run"], [], ["Swim"]]), allow_pickle=True)
    np.save(os.path.join(ann, "labels_all.npy"), _objects([[b"Jump", "Run"], ["Run"], [b"Swim"]]), allow_pickle=True)
    with open(os.path.join(ann, "Ambiguous_test.txt"), "w") as f:
        f.write("video_test_2  10.1 11.3\nvideo_test_2  12 13.5\n")
    return ann


def test_read_real_style_standard_files(tmp_path):
    _write_wtalc(str(tmp_path))
    ds = load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    assert ds.classes == CLASSES and ds.rgb_dim == 4 and ds.feature_dim == 8
    assert ds.feature_rate == pytest.approx(25 / 16)
    assert [v.name for v in ds.videos] == ["video_validation_1", "video_test_1", "video_test_2"]
    assert ds.indices("test") == [1, 2] and ds.train_subset == "validation" and ds.test_subset == "test"
    v0, v1 = ds.videos[0], ds.videos[1]
    assert v0.segments == [(1.0, 2.5, 0), (4.0, 6.0, 1)]
    assert v0.labels.tolist() == [1, 1, 0] and v0.labels.dtype == np.float32
    assert v0.features.dtype == np.float32 and v0.features.shape == (12, 8)
    assert v1.segments == [] and v1.labels.tolist() == [0, 1, 0]  # no temporal annotation, still labelled
    assert ds.ambiguous == {"video_test_2": [(10.1, 11.3), (12.0, 13.5)]}
    assert ds.ground_truth("test") == [{"video": "video_test_2", "label": 2, "start": 3.2, "end": 9.6}]
    assert load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4, feature_rate=2.5).feature_rate == 2.5


def test_native_and_standard_round_trip(tmp_path):
    _write_wtalc(str(tmp_path))
    ds = load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    out = str(tmp_path / "out")
    write_native(ds, out, "Toy")
    write_standard(ds, out, "Toy")
    for layout in ("native", "standard"):
        back = load_dataset(out, "Toy", layout=layout)  # rgb_dim comes from the stored metadata
        assert back.rgb_dim == 4 and back.classes == ds.classes and back.ambiguous == ds.ambiguous
        for a, b in zip(ds.videos, back.videos):
            assert (a.name, a.subset, a.duration, a.segments) == (b.name, b.subset, b.duration, b.segments)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.features, b.features)


def test_standard_errors_name_the_file(tmp_path):
    ann = _write_wtalc(str(tmp_path))
    np.save(os.path.join(ann, "subset.npy"), np.array([b"validation", b"test"]))
    with pytest.raises(ValueError, match=r"subset\.npy has 2 entries but .*videoname\.npy has 3"):
        load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    np.save(os.path.join(ann, "subset.npy"), np.array([b"validation", b"test", b"test"]))
    np.save(os.path.join(ann, "labels.npy"), _objects([["Jump", "Fly"], [], ["Swim"]]), allow_pickle=True)
    with pytest.raises(ValueError, match=r"labels\.npy: video 'video_validation_1' has unknown class 'Fly'"):
        load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    np.save(os.path.join(ann, "labels.npy"), _objects([["Jump"], [], ["Swim"]]), allow_pickle=True)
    with pytest.raises(ValueError, match=r"labels\.npy: video 'video_validation_1' has 1 segment labels"):
        load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    os.remove(os.path.join(ann, "duration.npy"))
    with pytest.raises(FileNotFoundError, match=r"duration\.npy"):
        load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    with pytest.raises(ValueError, match="the default 1024 does not split the 8-dimensional"):  # need rgb_dim
        _write_wtalc(str(tmp_path / "b"))
        load_dataset(str(tmp_path / "b"), "Toy", layout="standard")
    with pytest.raises(FileNotFoundError, match="Nope-Annotations"):
        load_dataset(str(tmp_path), "Nope", layout="standard")
    with pytest.raises(ValueError, match="layout"):
        load_dataset(str(tmp_path), "Toy", layout="pickle")


def test_native_errors_name_the_file(tmp_path):
    _write_wtalc(str(tmp_path))
    ds = load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    ann_path, feat_dir = write_native(ds, str(tmp_path / "n"), "Toy")
    np.save(os.path.join(feat_dir, "video_test_1.npy"), np.zeros((5, 8), np.float32))
    with pytest.raises(ValueError, match=r"video_test_1\.npy has 5 segments but .*num_segments=3"):
        load_dataset(str(tmp_path / "n"), "Toy")
    os.remove(os.path.join(feat_dir, "video_test_1.npy"))
    with pytest.raises(FileNotFoundError, match=r"video_test_1\.npy"):
        load_dataset(str(tmp_path / "n"), "Toy")
    with open(ann_path) as f:
        data = json.load(f)
    data["database"]["video_test_2"]["annotations"][0]["label"] = "Fly"
    with open(ann_path, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=r"annotations\.json: video 'video_test_2' has unknown class 'Fly'"):
        load_dataset(str(tmp_path / "n"), "Toy")
    with pytest.raises(FileNotFoundError, match="annotations.json"):
        load_dataset(str(tmp_path / "missing"), "Toy")


def _native_toy(tmp_path):
    _write_wtalc(str(tmp_path))
    ds = load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    ann_path, feat_dir = write_native(ds, str(tmp_path / "n"), "Toy")
    return str(tmp_path / "n"), ann_path, feat_dir


def _edit(path, change):
    with open(path) as f:
        data = json.load(f)
    change(data)
    with open(path, "w") as f:
        json.dump(data, f)


def _video(key, value, video="video_test_2"):
    def change(data):
        data["database"][video][key] = value
    return change


@pytest.mark.parametrize("change, needles", [
    (_video("duration", 0), ["video 'video_test_2' field 'duration'", "> 0, got 0"]),
    (_video("duration", -4.5), ["field 'duration'", "got -4.5"]),
    (_video("duration", "abc"), ["field 'duration'", "got 'abc'"]),
    (_video("duration", None), ["field 'duration'", "got None"]),
    (_video("num_segments", "x"), ["video 'video_test_2' field 'num_segments': expected an integer >= 1, got 'x'"]),
    (_video("annotations", None), ["video 'video_test_2' field 'annotations' must be a list, got null"]),
    (_video("annotations", [{"segment": [-1.0, 2.0], "label": "Swim"}]),
     ["video 'video_test_2' field 'annotations' [-1, 2]", "0 <= start <= end <= duration (19.2 s)"]),
    (_video("annotations", [{"segment": [3.0, 25.0], "label": "Swim"}]), ["field 'annotations' [3, 25]"]),
    (_video("subset", 3), ["video 'video_test_2' field 'subset'", "got 3"]),
    (_video("labels", "Swim"), ["video 'video_test_2' field 'labels': expected a list of class names, got 'Swim'"]),
    (_video("labels", ["Fly"]), ["video 'video_test_2' field 'labels' has 'Fly'"]),
    (lambda d: d.update(classes="Jump"), ["field 'classes' must be a list of class names, got str"]),
    (lambda d: d.update(database={}), ["field 'database' holds no video"]),
    (lambda d: d.update(feature_rate=0), ["field 'feature_rate': expected a number of segments per second > 0, got 0"]),
    (lambda d: d.update(feature_rate=-1.5), ["field 'feature_rate'", "got -1.5"]),
    (lambda d: d.update(feature_rate="fast"), ["field 'feature_rate'", "got 'fast'"]),
    (lambda d: d.update(rgb_dim=0), ["field 'rgb_dim': expected an integer in [1, 7]", "got 0"]),
    (lambda d: d.update(rgb_dim=100000), ["field 'rgb_dim'", "got 100000"]),
])
def test_native_annotation_errors_name_the_file_video_and_field(tmp_path, change, needles):
    from train.data import DatasetError
    root, ann_path, _ = _native_toy(tmp_path)
    _edit(ann_path, change)
    with pytest.raises(DatasetError) as exc:
        load_dataset(root, "Toy")
    message = str(exc.value)
    assert message.startswith(ann_path) and "\n" not in message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("video", ["video_validation_1", "video_test_2"])  # a training and a test video
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_features_are_refused_when_the_data_is_opened(tmp_path, video, bad):
    from train.data import DatasetError
    root, _, feat_dir = _native_toy(tmp_path)
    path = os.path.join(feat_dir, video + ".npy")
    x = np.load(path)
    x[1, 3] = bad
    np.save(path, x)
    with pytest.raises(DatasetError, match=rf"{path}: video '{video}' has 1 NaN or infinite feature values "
                                           rf"\(in 1 of {len(x)} segments, first 1\)"):
        load_dataset(root, "Toy")
    # the standard layout too
    ds_dir = tmp_path / "s"
    _write_wtalc(str(ds_dir))
    feats = np.load(ds_dir / "Toy-I3D-JOINTFeatures.npy", allow_pickle=True)
    names = ["video_validation_1", "video_test_1", "video_test_2"]
    feats[names.index(video)][0, 0] = bad
    np.save(ds_dir / "Toy-I3D-JOINTFeatures.npy", feats, allow_pickle=True)
    with pytest.raises(DatasetError, match=rf"JOINTFeatures\.npy: video '{video}' has 1 NaN or infinite"):
        load_dataset(str(ds_dir), "Toy", layout="standard", rgb_dim=4)


def test_a_feature_file_of_another_width_is_named(tmp_path):
    from train.data import DatasetError
    root, _, feat_dir = _native_toy(tmp_path)
    path = os.path.join(feat_dir, "video_test_2.npy")
    np.save(path, np.load(path)[:, :5])
    with pytest.raises(DatasetError, match=rf"{path}: video 'video_test_2' has 5-dimensional features, the videos "
                                           r"before it 8-dimensional"):
        load_dataset(root, "Toy")


@pytest.mark.parametrize("file, value, needles", [
    ("classlist", np.array(b"Jump"), ["classlist.npy: expected a 1-d array with one entry per class, got ()"]),
    ("videoname", np.array([[b"a", b"b", b"c"]]), ["videoname.npy: expected a 1-d array"]),
    ("duration", np.array([7.7, 0.0, 19.2]), ["duration.npy: video 'video_test_1' field 'duration'", "got 0.0"]),
    ("duration", np.array([7.7, np.nan, 19.2]), ["duration.npy: video 'video_test_1' field 'duration'", "got nan"]),
    ("segments", _objects([[[1.0, 2.5], [4.0, 60.0]], [], [[3.2, 9.6]]]),
     ["segments.npy: video 'video_validation_1' field 'segment' [4, 60]"]),
    ("segments", _objects([[[1.0, 2.5], [4.0, 6.0]], [], 5.0]), ["segments.npy: video 'video_test_2' has 5.0"]),
])
def test_standard_annotation_errors_name_the_file_and_video(tmp_path, file, value, needles):
    from train.data import DatasetError
    ann = _write_wtalc(str(tmp_path))
    np.save(os.path.join(ann, f"{file}.npy"), value, allow_pickle=True)
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    for needle in needles:
        assert needle in str(exc.value), str(exc.value)


def test_a_video_of_neither_subset_is_an_error_naming_it(tmp_path):
    from train.config import ConfigError, load_config, resolve_subsets
    from train.data import DatasetError
    root, ann_path, _ = _native_toy(tmp_path)
    cfg = load_config(None, [f"data.root={root}", "data.train_subset=validation", "data.test_subset=test"])
    assert resolve_subsets(cfg, load_dataset(root, "Toy")) == ([0], [1, 2])
    _edit(ann_path, _video("subset", "tset"))
    with pytest.raises(DatasetError, match=rf"{ann_path}: video 'video_test_2' field 'subset' is 'tset', neither "
                                           r"the training subset 'validation' nor the test subset 'test'"):
        resolve_subsets(cfg, load_dataset(root, "Toy"))
    ann = _write_wtalc(str(tmp_path / "s"))
    np.save(os.path.join(ann, "subset.npy"), np.array([b"validation", b"test", b"tset"]))
    with pytest.raises(DatasetError, match=r"subset\.npy: video 'video_test_2' field 'subset' is 'tset'"):
        resolve_subsets(cfg, load_dataset(str(tmp_path / "s"), "Toy", layout="standard", rgb_dim=4))
    with pytest.raises(ConfigError, match="expected two different subsets, got 'test' for both"):
        resolve_subsets(load_config(None, [f"data.root={root}", "data.train_subset=test"]),
                        load_dataset(root, "Toy"))
