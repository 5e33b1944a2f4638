"""Synthetic benchmark: determinism, statistics, both layouts through the loaders, planted structure."""
import os

import numpy as np
import pytest

from train.data import load_dataset, synthetic
from train.eval import detection_map, read_ground_truth_json


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    return synthetic.generate(root, "tiny", seed=0)


def test_tiny_is_small_and_loads_in_both_layouts(tiny):
    root, name = tiny
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    assert size < 5e6
    native = load_dataset(root, name)
    standard = load_dataset(root, name, layout="standard")
    memory = synthetic.build_dataset("tiny", seed=0)
    assert native.feature_dim == 64 and native.rgb_dim == 32
    for ds in (standard, memory):
        assert ds.classes == native.classes and ds.ambiguous == native.ambiguous
        for a, b in zip(native.videos, ds.videos):
            assert (a.name, a.subset, a.duration, a.segments) == (b.name, b.subset, b.duration, b.segments)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.features, b.features)
    assert synthetic.generate(root, "tiny", seed=0) == (root, name)  # cached: same preset and seed


def test_ground_truth_json_evaluates_to_one_on_itself(tiny):
    root, name = tiny
    gt = read_ground_truth_json(os.path.join(root, name, "annotations.json"), subset="test")
    ds = load_dataset(root, name)
    assert len(gt.entries) == len(ds.ground_truth("test")) > 0
    preds = [dict(g, score=1.0) for g in gt.entries]
    m, avg = detection_map(preds, gt.entries, [0.5, 0.9], gt.ambiguous)
    assert avg == pytest.approx(1.0)


def test_deterministic_from_seed():
    a = synthetic.build_dataset("tiny", seed=0)
    b = synthetic.build_dataset("tiny", seed=0)
    c = synthetic.build_dataset("tiny", seed=1)
    np.testing.assert_array_equal(a.videos[3].features, b.videos[3].features)
    assert [v.segments for v in a.videos] == [v.segments for v in b.videos]
    assert [v.segments for v in a.videos] != [v.segments for v in c.videos]


def test_thumos14_preset_matches_thumos14_statistics():
    spec, plans, _ = synthetic.sample_layout("thumos14", seed=0)
    s = synthetic.layout_statistics(plans, spec.feature_rate)
    assert s["labelled_videos"] == 412 and s["distractors"] == 2 * spec.num_distractors
    assert s["two_label_videos"] == 50 and s["labels_per_video"] == pytest.approx(1.12, abs=0.01)
    assert 13 <= s["instances_per_video"] <= 18 and s["max_instances"] > 150
    assert s["instance_median_s"] == pytest.approx(3.0, abs=0.3)
    assert s["instance_mean_s"] == pytest.approx(4.3, abs=0.4)
    assert s["duration_mean_s"] == pytest.approx(213, rel=0.1)
    assert s["duration_min_s"] >= 9 and s["duration_max_s"] <= 1680
    assert s["inside_action_frac"] == pytest.approx(0.31, abs=0.04)
    assert spec.feature_dim == 2048


def test_demo_preset_size():
    spec, plans, _ = synthetic.sample_layout("demo", seed=0)
    s = synthetic.layout_statistics(plans, spec.feature_rate)
    assert s["per_subset"] == {"validation": 62, "test": 62} and s["labelled_videos"] == 120
    assert s["segments"] < 20000 and spec.feature_dim == 2048


def test_planted_structure():
    spec, plans, groups = synthetic.sample_layout("demo", seed=0)
    assert all(len(g) >= 2 for g in groups)
    assert set().union(*map(set, groups)) == set(range(spec.num_classes))
    distractors = [p for p in plans if p.distractor]
    assert distractors and all(not p.classes and not p.instances and p.fillers for p in distractors)
    # context right before or after instances, of the instance's class
    adjacent = sum(1 for p in plans for s, e, c, *_ in p.instances for fs, fe, kind, idx in p.fillers
                   if kind == "context" and idx == c and (abs(fe - s) < 0.02 or abs(fs - e) < 0.02))
    n_inst = sum(len(p.instances) for p in plans)
    assert adjacent > 0.8 * n_inst
    assert any(kind == "hard" for p in plans for *_, kind, _ in p.fillers)
    assert len({sub for p in plans for _, _, _, sub, _, _ in p.instances}) == spec.subclusters
    assert any(amb for p in plans for *_, amb in p.instances)  # some test instances are ambiguous
    with pytest.raises(ValueError, match="unknown synthetic preset"):
        synthetic.sample_layout("huge")
