"""ActivityNet-format JSON (train/data/activitynet.py): round trips, and fields of the wrong kind named."""
import pytest

from train.eval import read_ground_truth_json, read_predictions_json, write_ground_truth_json, write_predictions_json


def P(video, label, start, end, score):
    return {"video": video, "label": label, "start": start, "end": end, "score": score}


def G(video, label, start, end):
    return {"video": video, "label": label, "start": start, "end": end}


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


def test_json_round_trip(tmp_path):
    gt_path, pred_path = _write_case(tmp_path)
    gt = read_ground_truth_json(str(gt_path), subset="test")
    assert gt.classes == ["Jump", "Run"] and list(gt.videos) == ["a"]
    assert gt.entries == [G("a", "Jump", 0.0, 10.0), G("a", "Run", 20.0, 30.0)]
    assert gt.ambiguous == {"a": [(40.0, 50.0)]}
    preds = read_predictions_json(str(pred_path))
    assert preds[1] == P("a", "Run", 21.0, 30.0, 0.8)
    with pytest.raises(ValueError, match="subset 'nope'"):
        read_ground_truth_json(str(gt_path), subset="nope")
    with pytest.raises(ValueError, match="no 'results'"):
        read_predictions_json(str(gt_path))


def test_ground_truth_fields_of_the_wrong_kind_are_named(tmp_path):
    db = {"a": {"subset": "test", "duration": 10.0, "annotations": None}}
    path = tmp_path / "gt.json"
    write_ground_truth_json(str(path), db, classes=["A"])
    with pytest.raises(ValueError, match=r"gt.json: video 'a' field 'annotations' must be a list, got null"):
        read_ground_truth_json(str(path))
    write_ground_truth_json(str(path), {"a": {"subset": "test", "duration": 10.0}}, classes=None,
                            meta={"classes": "A"})
    with pytest.raises(ValueError, match=r"gt.json: field 'classes' must be a list of class names, got str"):
        read_ground_truth_json(str(path))
