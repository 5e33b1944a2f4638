"""The training procedure (train/run/procedure.py, Run) end to end on the tiny synthetic preset: what the
results mean, the files, determinism, resuming after SIGKILL (real subprocesses), the stage plan, the
learning-rate schedule."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyrun import STEPS, copy_of, tiny_run  # noqa: F401 (a fixture)
from train.cli.entry import format_table, main
from train.config import load_config
from train.data.activitynet import read_ground_truth_json, read_predictions_json
from train.eval import classification_map, detection_map
from train.run import checkpoint as ckpt
from train.run import Run, stage_plan
from train.run.context import open_dataset

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _params(run_dir):
    return ckpt.load(Path(run_dir) / "latest.pt")["model"]


@pytest.mark.slow
def test_end_to_end_tiny(tiny_run):
    cfg, run, results = tiny_run.cfg, tiny_run.folder, tiny_run.results
    assert list(results) == ["baseline", "cc1", "cc2"]
    assert [name for name, _ in stage_plan(cfg)] == ["baseline", "db1", "cc1", "db2", "cc2"]
    tiou = cfg["eval"]["tiou"]
    for res in results.values():
        assert [k for k in res if k.startswith("det_map@")] == [f"det_map@{t:g}" for t in tiou]
        assert res["det_map_avg"] == pytest.approx(np.mean([res[f"det_map@{t:g}"] for t in tiou]), rel=1e-12)
        assert 0 < res["gt_share"] < 1 and 0 <= res["att_in_gt"] <= 1
    assert "cls_map_select" not in results["baseline"] and "selected_segments" in results["cc2"]
    for name in ("config.yaml", "metrics.jsonl", "results.json", "curves.png", "latest.pt",
                 "stage-baseline.pt", "stage-db1.pt", "stage-cc2.pt"):
        assert (run / name).is_file(), name
    assert list((run / "figures").glob("tcam-*.png"))
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, STEPS + 1))  # every step once
    db = [r for r in rows if r["kind"] == "database"]
    assert len(db) == 2 and all(r["alpha_rgb"] > 0 and r["alpha_flow"] > 0 for r in db)  # logged
    assert all("cc" in r for r in train_rows if r["stage"].startswith("cc"))
    state = ckpt.load(run / "latest.pt")
    assert state["stage"] == 5 and state["global_step"] == STEPS
    assert set(state) >= {"model", "optimizer", "database", "log_q", "alpha", "stage", "step", "rng",
                          "config"}
    db_state = state["database"]
    C, n, m = db_state["features"].shape
    assert (C, n, m) == (5, cfg["cc"]["size"], 2 * cfg["model"]["embed_dim"])
    for s in ("rgb", "flow"):
        assert torch.allclose(state["log_q"][s].logsumexp(1), torch.zeros(C), atol=1e-4)
    table = format_table(list(results.items()), cfg["eval"]["tiou"])
    assert "cc2" in table and "0.7" in table


@pytest.mark.slow
def test_the_results_are_the_metrics_of_the_final_model_and_its_detections(tiny_run, tmp_path):
    """The final stage's cls and cls* are the classification mAP of the model's video scores (plain and
    with test-time selection) on the test videos, and its detection mAPs are those of the detections it
    wrote (predictions.json) against the dataset's ground truth."""
    final = tiny_run.results["cc2"]
    with Run.load(tiny_run.folder, folder=tmp_path / "outputs") as run:
        test = run.ctx.test_idx
        labels = np.stack([np.asarray(run.dataset.videos[i].labels) for i in test])
        plain, select = zip(*((p["video"].numpy(), p["video_select"].numpy())
                              for p in (run.evaluator.predict(i, selection=True) for i in test)))
    assert final["cls_map"] == pytest.approx(float(classification_map(np.stack(plain), labels)[0]), rel=1e-12)
    assert final["cls_map_select"] == pytest.approx(float(classification_map(np.stack(select), labels)[0]),
                                                    rel=1e-12)
    truth = read_ground_truth_json(str(tiny_run.data_root / "SynthTiny" / "annotations.json"), subset="test")
    per_tiou, avg = detection_map(read_predictions_json(str(tiny_run.folder / "predictions.json")), truth.entries,
                                  tiny_run.cfg["eval"]["tiou"], ambiguous=truth.ambiguous)
    assert [final[f"det_map@{t:g}"] for t in tiny_run.cfg["eval"]["tiou"]] == pytest.approx(list(per_tiou), abs=1e-9)
    assert final["det_map_avg"] == pytest.approx(avg, abs=1e-9)


@pytest.mark.slow
def test_deterministic(tiny_run, tmp_path):
    cfg, run, results = tiny_run.cfg, tiny_run.folder, tiny_run.results
    with Run(cfg, tmp_path / "again") as r:
        again = r.train()
    assert again == results
    ref, new = _params(run), _params(tmp_path / "again")
    assert all(torch.equal(ref[k], new[k]) for k in ref)


def _wait_for(path, predicate, proc, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it could be killed:\n{proc.stderr.read()}")
        if path.exists():
            rows = [json.loads(line) for line in open(path) if line.endswith("\n")]
            if predicate(rows):
                return rows
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
def test_resume_after_sigkill(tiny_run, tmp_path):
    """SIGKILL in the baseline stage and again in an L_cc stage: each resume loses no completed step
    and the final model equals the uninterrupted run's, bit for bit."""
    ref_run = tiny_run.folder
    run = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "train", "fit", "--config", TINY, *tiny_run.overrides(), f"run.dir={run}"]
    kill_at = [lambda rows: sum(r["kind"] == "train" for r in rows) >= 5,
               lambda rows: any(r.get("stage") == "cc1" and r.get("stage_step", 0) >= 3 for r in rows)]
    for i, predicate in enumerate(kill_at):
        proc = subprocess.Popen(cmd + (["--resume"] if i else []), env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        rows = _wait_for(run / "metrics.jsonl", predicate, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        last_logged = max(r["step"] for r in rows if r["kind"] == "train")
        state = ckpt.load(run / "latest.pt")  # loadable: written atomically
        # The step being logged when the kill came may not have reached its checkpoint; all before did.
        assert state["global_step"] >= last_logged - 1
    # Without --resume an existing run is refused.
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "--resume" in out.stderr
    out = subprocess.run(cmd + ["--resume"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "resuming" in out.stderr
    assert json.loads((run / "results.json").read_text()) == json.loads(
        (ref_run / "results.json").read_text())
    ref, new = _params(ref_run), _params(run)
    assert all(torch.equal(ref[k], new[k]) for k in ref)
    # metrics.jsonl holds every step exactly once (lines after the last checkpoint were dropped).
    steps = [json.loads(line)["step"] for line in open(run / "metrics.jsonl")
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))


@pytest.mark.slow
def test_eval_command(tiny_run, tmp_path, capsys):
    run = copy_of(tiny_run, tmp_path / "run")
    assert main(["eval", "--checkpoint", str(run / "latest.pt"), "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[:out.index("}") + 1]) == tiny_run.results["cc2"]


@pytest.mark.slow
def test_resume_refuses_a_different_config(tiny_run, tmp_path, capsys):
    code = main(["fit", "--config", TINY, *tiny_run.overrides(), "cc.size=3", f"run.dir={tiny_run.folder}",
                 "--resume"])
    assert code == 2 and "cc.size" in capsys.readouterr().err


def test_weight_zero_keeps_the_stages_rounds_zero_drops_them():
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["cc.weight=0", "cc.rounds=2"])
    assert [n for n, _ in stage_plan(cfg)] == ["baseline", "db1", "cc1", "db2", "cc2"]
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["cc.rounds=0"])
    assert stage_plan(cfg) == [("baseline", "train")]


def test_open_dataset_missing_files(tmp_path):
    from train.config import ConfigError
    cfg = load_config(None, [f"data.root={tmp_path}", "data.name=Missing", "data.layout=native"])
    with pytest.raises(ConfigError, match=r"data\.root.*Missing"):
        open_dataset(cfg)


@pytest.mark.slow
def test_test_time_selection_is_opt_in(cache, tmp_path):
    """cc.select (default off): without it no cls* is computed; with it the same run reports cls*."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.baseline_steps=4", "train.cc_steps=2",
                                                       "eval.figures=0"])
    assert cfg["cc"]["select"] is False
    with Run(cfg, tmp_path / "run") as run:
        results = run.train()
    assert "cls_map_select" not in results["cc1"]
    with Run.load(tmp_path / "run", cfg=load_config(ROOT / "configs" / "tiny.yaml", [
            "train.baseline_steps=4", "train.cc_steps=2", "eval.figures=0", "cc.select=true"]),
            folder=tmp_path / "again") as run:
        again = run.evaluate(progress=False)
    assert "cls_map_select" in again and 0 < again["selected_segments"]
    assert again["cls_map"] == results["cc1"]["cls_map"] and again["det_map_avg"] == results["cc1"]["det_map_avg"]


def test_the_database_line_counts_the_background_slots(cache, tmp_path, caplog):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["cc.loss=contrastive", "cc.background=true"])
    with Run(cfg, tmp_path) as run, caplog.at_level("INFO", logger="train"):
        info = run.build_database("db1")
    slots = cfg["cc"]["size"] * (run.dataset.num_classes + 1)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("db1: "))
    assert line.startswith(f"db1: {info['filled']}/{slots} exemplar slots filled") and info["filled"] <= slots


@pytest.mark.slow
def test_cosine_schedule_restarts_in_every_stage(cache, tmp_path):
    """train.lr_schedule cosine: step t of an S-step stage uses lr (1 + cos(pi t / S)) / 2."""
    import math
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.baseline_steps=5", "train.cc_steps=3",
                                                       "train.lr_schedule=cosine", "eval.figures=0"])
    seen = []

    class Recording(Run):
        def train_step(self, stage, step, use_cc):
            seen.append(self.optimizer.param_groups[0]["lr"])
            return super().train_step(stage, step, use_cc)

    with Recording(cfg, tmp_path / "run") as run:
        run.train()
    lr = cfg["train"]["lr"]
    want = [lr * (1 + math.cos(math.pi * t / 5)) / 2 for t in range(5)] + \
           [lr * (1 + math.cos(math.pi * t / 3)) / 2 for t in range(3)]
    assert seen == pytest.approx(want, rel=1e-12)
