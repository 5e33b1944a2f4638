"""python -m train.eval (train/eval/__main__.py): mAP of a result file, and one error line for every input it
cannot score."""
import json

import pytest

from train.eval import write_ground_truth_json, write_predictions_json
from train.eval.__main__ import main as eval_main


def P(video, label, start, end, score):
    return {"video": video, "label": label, "start": start, "end": end, "score": score}


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


def test_cli(tmp_path, capsys):
    gt_path, pred_path = _write_case(tmp_path)
    out = tmp_path / "out.json"
    rc = eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--subset", "test",
                    "--tiou", "0.5", "0.7", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["tiou"] == [0.5, 0.7]
    # Jump: TP then FP -> 1; Run: ambiguous one dropped, then IoU 0.9 TP -> 1
    assert res["mAP"] == pytest.approx([1.0, 1.0]) and res["average_mAP"] == pytest.approx(1.0)
    assert "avg" in capsys.readouterr().out
    assert eval_main(["--ground-truth", str(tmp_path / "missing.json"), "--predictions", str(pred_path)]) == 2
    assert "missing.json" in capsys.readouterr().err


def _one_error_line(err: str, *needles) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def test_cli_refuses_predictions_of_one_subset_scored_against_every_subset(tmp_path, capsys):
    gt_path, pred_path = _write_case(tmp_path)  # ground truth: a (test), b (validation); predictions: a
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path)]) == 2
    _one_error_line(capsys.readouterr().err, pred_path, "subset 'test' only", "--subset test")
    out = tmp_path / "all.json"
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--subset", "all",
                      "--json", str(out)]) == 0
    # every video scored: b's Jump instance is missed (Jump AP 1/2, Run AP 1)
    assert json.loads(out.read_text())["average_mAP"] == pytest.approx(0.75)
    # predictions that list videos of both subsets need no --subset
    write_predictions_json(str(pred_path), [P("a", "Jump", 0, 10, 0.9), P("b", "Jump", 5, 8, 0.8)],
                           videos=["a", "b"])
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--json", str(out)]) == 0
    assert json.loads(out.read_text())["average_mAP"] == pytest.approx(0.5)  # Run: no prediction


def test_cli_says_which_labels_it_does_not_score(tmp_path, capsys):
    gt_path, pred_path = _write_case(tmp_path)
    write_predictions_json(str(pred_path), [P("a", "Jump", 0, 10, 0.9), P("a", "jump", 0, 10, 0.95)])
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--subset", "test"]) == 0
    err = capsys.readouterr().err
    assert "note: 1 of 2 predictions have a label that is not a class of" in err and "'jump'" in err


@pytest.mark.parametrize("score", ["Infinity", "-Infinity", "NaN", '"high"', "null", "true"])
def test_cli_refuses_a_score_that_is_not_a_finite_number(tmp_path, capsys, score):
    gt_path, _ = _write_case(tmp_path)
    pred_path = tmp_path / "bad.json"
    pred_path.write_text('{"results": {"a": [{"label": "Jump", "segment": [0, 10], "score": %s}]}}' % score)
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--subset", "test"]) == 2
    _one_error_line(capsys.readouterr().err, pred_path, "video 'a'", "expected a finite number")


@pytest.mark.parametrize("tiou, needle", [("1.5", "--tiou: thresholds must be in (0, 1], got 1.5"),
                                          ("0", "got 0"), ("x", "--tiou: expected numbers")])
def test_cli_bad_tiou_is_one_error_line(tmp_path, capsys, tiou, needle):
    gt_path, pred_path = _write_case(tmp_path)
    assert eval_main(["--ground-truth", str(gt_path), "--predictions", str(pred_path), "--tiou", tiou]) == 2
    _one_error_line(capsys.readouterr().err, needle)
