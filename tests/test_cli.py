"""``python -m train`` as a user meets it: every error a user can cause is one line naming the file or key
(exit code 2, no traceback), Ctrl-C says where the run stopped and how to continue, overrides stand
anywhere on the line, and a run folder's predictions and T-CAMs work with ``python -m train.eval`` and
``python -m train.eval.plot`` as they are."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from train import checkpoint as ckpt
from conftest import private_cache
from train.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny synthetic preset, generated once into a private cache folder (also for subprocesses)."""
    with private_cache(tmp_path_factory.mktemp("cache")) as path:
        ENV["CCLUSTER_CACHE"] = str(path)
        yield path


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    """One finished tiny run (fit through the command line)."""
    folder = tmp_path_factory.mktemp("run") / "tiny"
    assert main(["fit", "--config", TINY, f"run.dir={folder}"]) == 0
    return folder


@pytest.fixture(scope="module")
def dataset_dir(run, cache):
    """The tiny set's native folder (annotations.json + features/)."""
    return cache / "synthetic-tiny" / "SynthTiny"


def _one_error_line(err: str, *needles) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert str(needle) in lines[0], f"{needle!r} not in: {lines[0]}"
    return lines[0]


def _damaged_copy(dataset_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny set's native folder with one feature file truncated: (root, that file)."""
    root = tmp_path / "data"
    shutil.copytree(dataset_dir, root / "SynthTiny")
    victim = sorted((root / "SynthTiny" / "features").glob("*.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:300])
    return root, victim


# ---------------------------------------------------------------------------------------------------
# errors: one line, exit code 2, the file named


def test_truncated_feature_file(dataset_dir, tmp_path, capsys):
    root, victim = _damaged_copy(dataset_dir, tmp_path)
    data = [f"data.root={root}", "data.name=SynthTiny", "data.synthetic=", "data.layout=native"]
    assert main(["fit", "--config", TINY, *data, f"run.dir={tmp_path / 'r'}"]) == 2
    _one_error_line(capsys.readouterr().err, "feature file", victim, "damaged")
    # the same through compare (and a real process: no traceback, exit code 2)
    out = subprocess.run([sys.executable, "-m", "train", "compare", "--config", TINY, *data, "--seeds", "0",
                          "--out", str(tmp_path / "cmp")], env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2
    _one_error_line(out.stderr, victim, "damaged")


def test_truncated_feature_file_in_the_synthetic_cache_says_how_to_regenerate(dataset_dir, tmp_path, capsys,
                                                                            monkeypatch):
    cache = tmp_path / "cache"
    shutil.copytree(dataset_dir.parent, cache / "synthetic-tiny")
    victim = sorted((cache / "synthetic-tiny" / "SynthTiny" / "features").glob("*.npy"))[0]
    victim.write_bytes(victim.read_bytes()[:300])
    monkeypatch.setenv("CCLUSTER_CACHE", str(cache))
    assert main(["demo", "--out", str(tmp_path / "demo"), "data.synthetic=tiny"]) == 2
    line = _one_error_line(capsys.readouterr().err, victim, "damaged")
    assert f"delete {cache / 'synthetic-tiny' / 'SynthTiny'} and the next run with data.synthetic" in line


def test_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "nonexistent.pt"
    assert main(["eval", "--checkpoint", str(missing)]) == 2
    _one_error_line(capsys.readouterr().err, "checkpoint not found", missing)


@pytest.mark.parametrize("command", ["eval", "resume"])
def test_truncated_checkpoint(run, tmp_path, capsys, command):
    folder = tmp_path / "copy"
    shutil.copytree(run, folder)
    latest = folder / "latest.pt"
    latest.write_bytes(latest.read_bytes()[:5000])
    argv = (["eval", "--checkpoint", str(latest)] if command == "eval" else
            ["fit", "--run-dir", str(folder), "--resume"])
    assert main(argv) == 2
    line = _one_error_line(capsys.readouterr().err, latest, "damaged", "stage-baseline.pt", "stage-cc1.pt")
    assert f"cp {folder / 'stage-'}" in line  # the command that restores a stage copy


def test_resume_in_an_empty_folder_without_config(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["fit", "--run-dir", str(empty), "--resume"]) == 2
    _one_error_line(capsys.readouterr().err, f"no checkpoint in {empty}", "--config")


def test_a_pickled_object_in_a_checkpoint_is_refused(tmp_path, capsys):
    import torch
    marker = tmp_path / "ran"
    bad = tmp_path / "bad.pt"
    torch.save({"model": {}, "payload": _Payload(str(marker))}, bad)
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    _one_error_line(capsys.readouterr().err, bad, "pickled Python object", "refused")
    assert not marker.exists()  # nothing in the file was run


class _Payload:
    """Unpickling this would create a file: the loader must never get that far."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fit", "--config", TINY, "--no-such-option"])
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, "--no-such-option", "python -m train fit --help")


@pytest.mark.parametrize("argv", [[], ["fit"], ["eval"], ["demo"], ["compare"], ["steptime"], ["config"]])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_command_prints_its_help(argv, flag, capsys):
    with pytest.raises(SystemExit) as exc:
        main([*argv, flag])
    assert exc.value.code == 0
    out = capsys.readouterr()
    assert out.out.startswith("usage: python -m train") and not out.err
    if not argv:  # the overview names every command
        for command in ("fit", "eval", "demo", "compare", "steptime", "config"):
            assert command in out.out.split("\n\n")[1]


@pytest.mark.parametrize("module", ["train", "train.eval", "train.eval.plot", "train.checkpoint"])
def test_every_module_command_prints_its_help_in_a_real_process(module, tmp_path):
    out = subprocess.run([sys.executable, "-m", module, "--help"], env=ENV, cwd=tmp_path, capture_output=True,
                         text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: ") and not out.stderr, out.stderr


@pytest.mark.parametrize("argv, needle", [
    (["steptime", "--steps", "0"], "argument --steps: expected an integer >= 1, got 0"),
    (["eval", "--checkpoint", "x.pt", "--figures", "-3"], "argument --figures: expected an integer >= 0, got -3"),
    (["eval", "--checkpoint", "x.pt", "--figures", "many"], "expected an integer >= 0, got 'many'"),
])
def test_counts_out_of_range_are_refused_by_the_parser(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    _one_error_line(capsys.readouterr().err, needle)


def test_debug_brings_the_traceback_back(tmp_path, monkeypatch):
    from train.checkpoint import CheckpointError
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="damaged"):
        main(["eval", "--checkpoint", str(bad), "--debug"])
    monkeypatch.setenv("CCLUSTER_DEBUG", "1")
    with pytest.raises(CheckpointError, match="damaged"):
        main(["eval", "--checkpoint", str(bad)])


def test_config_errors_still_name_the_key(tmp_path, capsys):
    assert main(["fit", "--config", TINY, "cc.size=0", f"run.dir={tmp_path}"]) == 2
    _one_error_line(capsys.readouterr().err, "cc.size")


# ---------------------------------------------------------------------------------------------------
# overrides anywhere, resume with the saved config


def test_overrides_after_flags_and_resume_without_config(run, capsys):
    # a finished run resumed: nothing left to train, the same results
    assert main(["fit", "--run-dir", str(run), "--resume", "run.progress=false"]) == 0
    assert main(["fit", "--config", TINY, f"run.dir={run}", "--resume", "run.tensorboard=false"]) == 0
    capsys.readouterr()
    # a key that changes the run is refused after --resume too, with the key named
    assert main(["fit", "--run-dir", str(run), "--resume", "cc.size=3"]) == 2
    _one_error_line(capsys.readouterr().err, "cc.size", run)


def test_ctrl_c_during_fit_says_where_and_how_to_continue(cache, tmp_path):
    folder = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "train", "fit", "--config", TINY, "train.baseline_steps=300",
           f"run.dir={folder}"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = folder / "metrics.jsonl"
    start = time.time()
    while not (metrics.exists() and sum(1 for _ in open(metrics)) >= 4):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - start < 120, "the run did not start"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: stopped in stage baseline"), err
    assert "Traceback" not in err
    resume = lines[0].split("continue with: ")[1]
    assert resume == f"python -m train fit --run-dir {folder} --resume"
    state = ckpt.load(folder / "latest.pt")
    assert f"after step {state['step']} (global {state['global_step']})" in lines[0]
    # the printed command, as printed, continues the run to its end
    out = subprocess.run([sys.executable, *resume.split()[1:]], env=ENV, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and "resuming" in out.stderr, out.stderr
    assert ckpt.load(folder / "latest.pt")["global_step"] == 300 + 4


# ---------------------------------------------------------------------------------------------------
# what a run folder holds


def test_run_folder_predictions_work_with_train_eval(run, dataset_dir, capsys):
    from train.eval.__main__ import main as eval_main
    results = json.loads((run / "results.json").read_text())
    preds = json.loads((run / "predictions.json").read_text())
    gt = json.loads((dataset_dir / "annotations.json").read_text())
    test_videos = {v for v, info in gt["database"].items() if info["subset"] == "test"}
    assert set(preds["results"]) == test_videos  # every test video, with or without detections
    assert (run / "predictions-baseline.json").is_file() and (run / "predictions-cc1.json").is_file()
    assert preds == json.loads((run / "predictions-cc1.json").read_text())  # the latest evaluation
    out_json = run.parent / "eval.json"
    assert eval_main(["--ground-truth", str(dataset_dir / "annotations.json"), "--predictions",
                      str(run / "predictions.json"), "--subset", "test", "--json", str(out_json)]) == 0
    got = json.loads(out_json.read_text())
    # the official-protocol evaluation of the file gives the run's own numbers
    assert got["average_mAP"] == pytest.approx(results["cc1"]["det_map_avg"], abs=1e-12)
    for t, m in zip(got["tiou"], got["mAP"]):
        assert m == pytest.approx(results["cc1"][f"det_map@{t:g}"], abs=1e-12)


def test_run_folder_cams_work_with_train_eval_plot(run, dataset_dir, tmp_path):
    from train.eval.plot import main as plot_main
    with np.load(run / "cams.npz", allow_pickle=False) as z:
        videos = [str(v) for v in z["videos"]]
        classes = [str(c) for c in z["classes"]]
        assert len(classes) == 5 and float(z["feature_rate"]) > 0
        for v in videos:
            tcam, att = z[f"tcam/{v}"], z[f"attention/{v}"]
            assert tcam.ndim == 2 and tcam.shape[1] == len(classes) and att.shape == (tcam.shape[0],)
            assert np.isfinite(tcam).all() and (att >= 0).all()
    out = tmp_path / "v.png"
    assert plot_main(["--cam", str(run / "cams.npz"), "--ground-truth", str(dataset_dir / "annotations.json"),
                      "--predictions", str(run / "predictions.json"), "--video", videos[0],
                      "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    with pytest.raises(SystemExit):  # a video the file does not hold: said so
        plot_main(["--cam", str(run / "cams.npz"), "--ground-truth", str(dataset_dir / "annotations.json"),
                   "--video", "no-such-video", "--out", str(out)])


def test_eval_command_writes_the_outputs_too(run, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(run, folder)
    for name in ("predictions.json", "cams.npz", "predictions-cc1.json", "cams-cc1.npz"):
        (folder / name).unlink()
    assert main(["eval", "--checkpoint", str(folder / "stage-cc1.pt")]) == 0
    assert (folder / "predictions.json").read_text() == (run / "predictions.json").read_text()
    assert (folder / "cams-cc1.npz").is_file()


def test_curves_get_a_test_map_panel(run, tmp_path):
    import matplotlib.image
    from train.procedure import plot_curves
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert any(r["kind"] == "eval" for r in rows)
    losses_only = tmp_path / "train-only.jsonl"
    losses_only.write_text("".join(json.dumps(r) + "\n" for r in rows if r["kind"] != "eval"))
    plot_curves(losses_only, tmp_path / "a.png")
    plot_curves(run / "metrics.jsonl", tmp_path / "b.png")
    width = [matplotlib.image.imread(tmp_path / f"{n}.png").shape[1] for n in "ab"]
    assert width[1] == width[0] + 400  # one more 4-inch panel at 100 dpi: the test mAP
