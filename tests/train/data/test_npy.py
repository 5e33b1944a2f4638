"""The restricted reader of pickled release files (train/data/npy.py): what the release holds is read,
anything that would run code is refused."""
import os

import numpy as np
import pytest

from train.data import load_dataset


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
    np.save(os.path.join(ann, "duration.npy"), np.array([7.7, 2.0, 19.2]))
    np.save(os.path.join(ann, "segments.npy"), _objects([[[1.0, 2.5], [4.0, 6.0]], [], [[3.2, 9.6]]]),
            allow_pickle=True)
    np.save(os.path.join(ann, "labels.npy"), _objects([["Jump", "Run"], [], ["Swim"]]), allow_pickle=True)
    np.save(os.path.join(ann, "labels_all.npy"), _objects([[b"Jump", "Run"], ["Run"], [b"Swim"]]), allow_pickle=True)
    with open(os.path.join(ann, "Ambiguous_test.txt"), "w") as f:
        f.write("video_test_2  10.1 11.3\nvideo_test_2  12 13.5\n")
    return ann


class _Runs:
    """An object whose unpickling calls ``func(*args)``: what a crafted file would carry."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _crafted(marker):
    return [_Runs(open, str(marker), "w"), _Runs(os.system, f"touch {marker}")]


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("file", ["features", "segments", "videoname"])
def test_a_crafted_pickle_is_refused_and_nothing_in_it_runs(tmp_path, which, file):
    from train.data import DatasetError
    ann = _write_wtalc(str(tmp_path))
    marker = tmp_path / "ran"
    path = (tmp_path / "Toy-I3D-JOINTFeatures.npy" if file == "features" else os.path.join(ann, f"{file}.npy"))
    good = np.load(path, allow_pickle=True)
    good = _objects(list(good)) if good.dtype != object else good
    good[1] = _crafted(marker)[which]  # one video's entry is the payload
    np.save(path, good, allow_pickle=True)
    with pytest.raises(DatasetError) as exc:
        load_dataset(str(tmp_path), "Toy", layout="standard", rgb_dim=4)
    message = str(exc.value)
    assert message.startswith(f"file {path} refused: its pickle calls ") and "nothing in it was run" in message
    assert ("open" in message) if which == 0 else ("system" in message)
    assert not marker.exists()


def test_a_crafted_bare_pickle_is_refused(tmp_path):
    import pickle
    from train.data.npy import RefusedPickle, read_npy
    marker = tmp_path / "ran"
    path = tmp_path / "bare.npy"
    path.write_bytes(pickle.dumps([np.zeros(3), _crafted(marker)[0]], protocol=2))
    with pytest.raises(RefusedPickle):
        read_npy(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_the_restricted_reader_reads_what_the_release_holds(tmp_path, protocol):
    import pickle
    from train.data.npy import read_npy
    value = _objects([np.arange(6, dtype=np.float32).reshape(2, 3), [b"name", "label", 1.5, np.float64(2.0)],
                      {"a": (1, 2)}, {3, 4}, np.array([b"x", b"yz"]), None])
    path = tmp_path / "objects.npy"
    with open(path, "wb") as f:  # np.save with the pickle protocol of the file's era
        np.lib.format.write_array_header_1_0(f, {"descr": "|O", "fortran_order": False, "shape": value.shape})
        pickle.dump(value, f, protocol=protocol)
    back = read_npy(path)
    assert back.dtype == object and len(back) == len(value)
    assert np.array_equal(back[0], value[0]) and back[0].dtype == np.float32
    assert back[1] == value[1] and back[2] == value[2] and back[3] == value[3] and back[5] is None
    assert np.array_equal(back[4], value[4])
    plain = tmp_path / "plain.npy"
    np.save(plain, np.arange(4.0))
    assert np.array_equal(read_npy(plain), np.arange(4.0))
