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

from conftest import private_cache
from tinyrun import copy_of, tiny_run  # noqa: F401 (a fixture)
from train.cli.entry import main
from train.run import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "tiny.yaml")
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The tiny synthetic preset, generated once into a private cache folder (also for subprocesses)."""
    with private_cache(tmp_path_factory.mktemp("cache")) as path:
        ENV["CCLUSTER_CACHE"] = str(path)
        yield path


@pytest.fixture(scope="module")
def run(tiny_run):
    """The session's finished tiny run (tests/tinyrun.py): read only, copied by the tests that write."""
    return tiny_run.folder


@pytest.fixture(scope="module")
def dataset_dir(tiny_run):
    """The tiny set's native folder (annotations.json + features/)."""
    return tiny_run.data_root / "SynthTiny"


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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("module", ["train", "train.eval", "train.eval.plot", "train.run.checkpoint"])
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
    from train.run.checkpoint import CheckpointError
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        main(["eval", "--checkpoint", str(bad), "--debug"])
    monkeypatch.setenv("CCLUSTER_DEBUG", "1")
    with pytest.raises(CheckpointError, match="is not a checkpoint"):
        main(["eval", "--checkpoint", str(bad)])


@pytest.mark.slow
def test_config_errors_still_name_the_key(tmp_path, capsys):
    assert main(["fit", "--config", TINY, "cc.size=0", f"run.dir={tmp_path}"]) == 2
    _one_error_line(capsys.readouterr().err, "cc.size")


# ---------------------------------------------------------------------------------------------------
# overrides anywhere, resume with the saved config


@pytest.mark.slow
def test_overrides_after_flags_and_resume_without_config(tiny_run, tmp_path, capsys):
    run = copy_of(tiny_run, tmp_path / "run")
    # a finished run resumed: nothing left to train, the same results
    assert main(["fit", "--run-dir", str(run), "--resume", "run.progress=false"]) == 0
    assert main(["fit", "--config", TINY, *tiny_run.overrides(), f"run.dir={run}", "--resume",
                 "run.tensorboard=false"]) == 0
    assert json.loads((run / "results.json").read_text()) == tiny_run.results
    capsys.readouterr()
    # a key that changes the run is refused after --resume too, with the key named
    assert main(["fit", "--run-dir", str(run), "--resume", "cc.size=3"]) == 2
    _one_error_line(capsys.readouterr().err, "cc.size", run)


@pytest.mark.slow
def test_ctrl_c_during_fit_says_where_and_how_to_continue(cache, tmp_path):
    folder = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "train", "fit", "--config", TINY, "train.baseline_steps=1000",
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
    assert ckpt.load(folder / "latest.pt")["global_step"] == 1000 + 4


# ---------------------------------------------------------------------------------------------------
# what a run folder holds


@pytest.mark.slow
def test_run_folder_predictions_work_with_train_eval(run, dataset_dir, capsys):
    from train.eval.__main__ import main as eval_main
    results = json.loads((run / "results.json").read_text())
    preds = json.loads((run / "predictions.json").read_text())
    gt = json.loads((dataset_dir / "annotations.json").read_text())
    test_videos = {v for v, info in gt["database"].items() if info["subset"] == "test"}
    assert set(preds["results"]) == test_videos  # every test video, with or without detections
    assert (run / "predictions-baseline.json").is_file() and (run / "predictions-cc1.json").is_file()
    assert preds == json.loads((run / "predictions-cc2.json").read_text())  # the latest evaluation
    out_json = run.parent / "eval.json"
    assert eval_main(["--ground-truth", str(dataset_dir / "annotations.json"), "--predictions",
                      str(run / "predictions.json"), "--subset", "test", "--json", str(out_json)]) == 0
    got = json.loads(out_json.read_text())
    # the official-protocol evaluation of the file gives the run's own numbers
    assert got["average_mAP"] == pytest.approx(results["cc2"]["det_map_avg"], abs=1e-12)
    for t, m in zip(got["tiou"], got["mAP"]):
        assert m == pytest.approx(results["cc2"][f"det_map@{t:g}"], abs=1e-12)


@pytest.mark.slow
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


def test_the_results_table_shows_and_explains_cls_star_only_where_it_was_computed():
    from train.cli.commands import format_table
    plain = {"cls_map": 0.9, "det_map@0.1": 0.5, "det_map@0.5": 0.2, "det_map_avg": 0.35}
    head, row, diff, note = format_table([("control", plain), ("diff", {"cls_map": -0.012})], [0.1, 0.5],
                                         signed={"diff"}).splitlines()
    assert head.split() == ["cls", "0.1", "0.5", "avg"]  # cc.select off: no cls* column
    assert row.split() == ["control", "90.0", "50.0", "20.0", "35.0"]
    assert diff.split() == ["diff", "-1.2", "-", "-", "-"]
    assert note == ("cls: classification mAP (attention-pooled video scores); columns 0.1-0.5: detection mAP at "
                    "tIoU; avg: their mean (all %).")
    head, base, cc1, note = format_table([("baseline", plain), ("cc1", {**plain, "cls_map_select": 0.8})],
                                         [0.5]).splitlines()
    assert head.split() == ["cls", "cls*", "0.5", "avg"]
    assert base.split()[2] == "-" and cc1.split()[2] == "80.0"
    assert note == ("cls: classification mAP (attention-pooled video scores); cls*: with test-time selection of "
                    "representative segments; column 0.5: detection mAP at tIoU; avg: their mean (all %).")


@pytest.mark.slow
def test_run_folder_cams_record_the_evaluation_settings_the_plot_uses(tiny_run, dataset_dir, tmp_path, monkeypatch):
    """A run's cams.npz holds the run's eval.smooth and eval.tiou, and python -m train.eval.plot draws the
    T-CAM with that smoothing when --smooth is not given."""
    import matplotlib.pyplot as plt
    from train.config import load_config
    from train.eval import smooth_sequence
    from train.eval.plot import main as plot_main
    from train.run import Run
    with np.load(tiny_run.folder / "cams.npz", allow_pickle=False) as z:
        assert int(z["smooth"]) == tiny_run.cfg["eval"]["smooth"]
        assert z["tiou"].tolist() == tiny_run.cfg["eval"]["tiou"]
    # settings other than the defaults: the file follows the run's config, not a default
    cfg = load_config(TINY, [*tiny_run.overrides(), "eval.smooth=3", "eval.tiou=[0.25, 0.5]", "eval.figures=0"])
    with Run.load(tiny_run.folder, cfg=cfg, folder=tmp_path / "again") as again:
        again.evaluate(progress=False)
    cams = tmp_path / "again" / "cams.npz"
    with np.load(cams, allow_pickle=False) as z:
        assert int(z["smooth"]) == 3 and z["tiou"].tolist() == [0.25, 0.5]
        video, classes = str(z["videos"][0]), [str(c) for c in z["classes"]]
        tcam = z[f"tcam/{video}"].astype(np.float64)
    figs = []
    monkeypatch.setattr(plt, "close", figs.append)  # keep the figure plot_video would close
    assert plot_main(["--cam", str(cams), "--ground-truth", str(dataset_dir / "annotations.json"), "--video", video,
                      "--out", str(tmp_path / "v.png")]) == 0
    ax = figs[0].axes[0]
    assert ax.get_ylabel().startswith("T-CAM (moving average of 3")
    curves = {line.get_label(): np.asarray(line.get_ydata()) for line in ax.lines if line.get_label() in classes}
    assert curves
    for name, drawn in curves.items():
        c = classes.index(name)
        np.testing.assert_allclose(drawn, smooth_sequence(tcam[:, c], 3), rtol=1e-12, atol=0)
        assert not np.allclose(drawn, tcam[:, c])  # the smoothing shows


@pytest.mark.slow
def test_eval_command_writes_the_outputs_too(run, tmp_path, capsys):
    folder = tmp_path / "copy"
    shutil.copytree(run, folder)
    for name in ("predictions.json", "cams.npz", "predictions-cc2.json", "cams-cc2.npz"):
        (folder / name).unlink()
    assert main(["eval", "--checkpoint", str(folder / "stage-cc2.pt")]) == 0
    assert (folder / "predictions.json").read_text() == (run / "predictions.json").read_text()
    assert (folder / "cams-cc2.npz").is_file()


@pytest.mark.slow
def test_curves_get_a_test_map_panel(run, tmp_path):
    import matplotlib.image
    import matplotlib.pyplot as plt
    from train.run.curves import CURVE_COLUMNS, curves_figure, plot_curves
    rows = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert any(r["kind"] == "eval" for r in rows)
    losses_only = tmp_path / "train-only.jsonl"
    losses_only.write_text("".join(json.dumps(r) + "\n" for r in rows if r["kind"] != "eval"))
    a, b = curves_figure(losses_only), curves_figure(run / "metrics.jsonl")
    assert len(b.axes) == len(a.axes) + 1 and b.axes[-1].get_title() == "test mAP"
    for fig in (a, b):
        assert all(ax.get_ylabel() and ax.get_xlabel() == "global step" for ax in fig.axes)  # every axis labelled
        for ax in fig.axes:  # a short run (10 steps) gets whole-step ticks only
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
        assert fig.get_size_inches()[0] <= 4.2 * CURVE_COLUMNS + 1e-9  # rows of panels, not one long strip
        plt.close(fig)
    plot_curves(run / "metrics.jsonl", tmp_path / "b.png")
    height, width = matplotlib.image.imread(tmp_path / "b.png").shape[:2]
    assert width <= 3 * height  # 4 panels on two rows: about 1260 x 600, not 1600 x 300


# ---------------------------------------------------------------------------------------------------
# one writer per run folder


def _wait_for_lines(proc, path, n, what):
    start = time.time()
    while not (path.exists() and sum(1 for _ in open(path)) >= n):
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() - start < 180, f"{what} did not start"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_second_fit_in_a_folder_in_use_is_refused(cache, tmp_path):
    folder = tmp_path / "shared"
    cmd = [sys.executable, "-m", "train", "fit", "--config", TINY, "train.baseline_steps=2000", f"run.dir={folder}"]
    first = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_lines(first, folder / "metrics.jsonl", 2, "the first fit")
        second = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first fit ended before the second was refused"
        assert second.returncode == 2
        _one_error_line(second.stderr, f"run folder {folder} is in use by process {first.pid}",
                        folder / ".lock")
        # resuming it is refused as well, and so is evaluating into it
        resume = subprocess.run([sys.executable, "-m", "train", "fit", "--run-dir", str(folder), "--resume"],
                                env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert resume.returncode == 2 and f"process {first.pid}" in resume.stderr, resume.stderr
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130
    rows = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    assert [r["kind"] for r in rows].count("start") == 1  # nothing of the refused runs in the folder
    steps = [r["step"] for r in rows if r["kind"] == "train"]
    assert steps == sorted(set(steps))
    assert not (folder / ".lock").exists()  # released on the way out


@pytest.mark.slow
def test_the_lock_of_a_killed_writer_is_taken_over(cache, tmp_path, caplog):
    folder = tmp_path / "killed"
    folder.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (folder / ".lock").write_text(f"{gone.pid}\n")  # what a SIGKILLed fit leaves
    (folder / f".latest.pt.tmp{gone.pid}").write_bytes(b"PK\x03\x04 half a checkpoint")
    with caplog.at_level("WARNING", logger="train"):
        assert main(["fit", "--config", TINY, f"run.dir={folder}"]) == 0
    notes = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    assert notes == [f"note: took over the lock of run folder {folder} from process {gone.pid}, which no longer "
                     f"runs; removed what it left half-written: .latest.pt.tmp{gone.pid}"]
    assert not list(folder.glob(".*.tmp*")) and not (folder / ".lock").exists()
    assert ckpt.load(folder / "latest.pt")["stage_name"] == "cc1"


@pytest.mark.slow
@pytest.mark.parametrize("flock", [True, False])
def test_every_writer_command_holds_the_lock(run, cache, tmp_path, capsys, monkeypatch, flock):
    from train.run import lock as runlock
    if not flock:  # where the system has no flock: the lock file alone, created exclusively
        monkeypatch.setattr(runlock, "_flock", lambda: None)
    folder = tmp_path / "copy"
    shutil.copytree(run, folder)
    with runlock.RunFolderLock(folder):
        for argv in (["fit", "--run-dir", str(folder), "--resume"], ["eval", "--checkpoint", str(folder)],
                     ["fit", "--config", TINY, f"run.dir={folder}"]):
            assert main(argv) == 2
            _one_error_line(capsys.readouterr().err, f"run folder {folder} is in use by process {os.getpid()}")
        out = tmp_path / "cmp"
        with runlock.RunFolderLock(out / "seed-0" / "stage1"):  # one of a comparison's runs
            assert main(["compare", "--config", TINY, "--seeds", "0", "--out", str(out)]) == 2
            _one_error_line(capsys.readouterr().err, f"run folder {out / 'seed-0' / 'stage1'} is in use")
        with runlock.RunFolderLock(out):  # the comparison's folder
            assert main(["compare", "--config", TINY, "--seeds", "0", "--out", str(out)]) == 2
            _one_error_line(capsys.readouterr().err, f"run folder {out} is in use")
    assert main(["eval", "--checkpoint", str(folder)]) == 0  # free again
    if not flock:  # a stale lock file without flock: its pid no longer runs
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (folder / ".lock").write_text(f"{gone.pid}\n")
        assert main(["eval", "--checkpoint", str(folder)]) == 0
        assert not (folder / ".lock").exists()


# ---------------------------------------------------------------------------------------------------
# Ctrl-C stops every time; bars never run through other lines

TINY_DEMO = ["data.synthetic=tiny", "model.embed_dim=16", "train.baseline_steps=6", "train.cc_steps=4", "cc.size=8",
             "cc.k=2", "data.max_seqlen=64", "data.batch_size=4", "cc.rounds=1", "cc.fit_max_iter=100"]


def test_a_ctrl_c_dropped_inside_a_weakref_callback_still_stops():
    import weakref
    from train.common import interrupt

    class Thing:
        pass

    def callback(ref):  # the KeyboardInterrupt raised in here is dropped by Python
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)

    with interrupt.stop_on_ctrl_c():
        thing = Thing()
        ref = weakref.ref(thing, callback)
        del thing  # the callback runs: Python ignores the exception raised in it
        assert ref() is None and interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()  # the next safe point raises it again
    assert not interrupt.requested()
    interrupt.check()  # outside: nothing pending


@pytest.mark.slow
def test_the_loops_stop_at_their_next_step_after_a_dropped_ctrl_c(cache, tmp_path, monkeypatch):
    from train.common import interrupt
    from train.compare import Comparison
    from train.config import load_config
    from train.run import Run
    cfg = load_config(TINY)
    run = Run(cfg, tmp_path / "r")
    monkeypatch.setattr(interrupt, "_requested", True)  # as after a KeyboardInterrupt Python dropped
    for unit in (run.train, lambda: run.build_database("db1"), lambda: run.evaluate(outputs=False),
                 lambda: Comparison(cfg, {}, [0], tmp_path / "cmp").run()):
        with pytest.raises(KeyboardInterrupt):
            unit()
    assert run.global_step == 0
    run.close()


@pytest.mark.slow
def test_ctrl_c_stops_compare_every_time(cache, tmp_path):
    import random
    rng = random.Random(0)
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "train", "compare", "--config", TINY, "--seeds", "0", "1", "--out", str(out),
           "--variant", "w1: {cc.weight: 1.0}", "train.baseline_steps=60", "train.cc_steps=40"]
    for attempt in range(8):  # at random points: imports, stage 1, a variant, a collection, an evaluation
        proc = subprocess.Popen(cmd, env=ENV, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        time.sleep(rng.uniform(0.5, 6.0))
        if proc.poll() is not None:  # it finished: nothing left to interrupt
            break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        # 130; or ended by SIGINT, when the KeyboardInterrupt passed through exec()'d code (dataclasses
        # during a lazy import): CPython then ends the process so, whatever main returned (shells show 130)
        assert proc.returncode in (130, -signal.SIGINT), f"attempt {attempt}: {err}"
        lines = [line for line in err.splitlines() if line.strip()]
        # during the imports, before anything ran: "interrupted"; later, where the runs are kept
        assert lines[-1] == "interrupted" or lines[-1].startswith(
            "interrupted: the finished runs and the checkpoints are kept in"), err
        assert "Traceback" not in err and "Exception ignored" not in err, err
    final = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    assert (out / "table.txt").read_text().startswith("variant")


@pytest.mark.slow
def test_log_lines_are_not_drawn_into_a_progress_bar(cache, tmp_path):
    out = subprocess.run([sys.executable, "-m", "train", "demo", "--out", str(tmp_path / "demo"), *TINY_DEMO],
                         env=ENV, cwd=tmp_path, capture_output=True, timeout=600)  # bytes: keep each \r
    err = out.stderr.decode()
    assert out.returncode == 0, err
    logged = [line for line in err.split("\n") if ": cls " in line]
    assert len(logged) == 3 and "compare:" in err and "\r" in err  # three log lines; bars were drawn
    assert b"cls*" not in out.stdout and "cls*" not in err  # cc.select off: no cls* to print
    for line in logged:
        parts = line.split("\r")
        assert parts[-1].startswith("seed 0 "), repr(line)  # the line begins where the bar was cleared
        assert len(parts) == 1 or not parts[-2].strip(), repr(line)
    # the same command again reads the finished runs back, and says so
    again = subprocess.run([sys.executable, "-m", "train", "demo", "--out", str(tmp_path / "demo"), *TINY_DEMO],
                           env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert (f"; all 3 runs were finished in {tmp_path / 'demo'} already and were reused, --fresh starts over;"
            in again.stdout.splitlines()[-1])


@pytest.mark.slow
def test_the_ctrl_c_message_of_fit_is_the_last_thing_printed(cache, tmp_path):
    folder = tmp_path / "bars"
    proc = subprocess.Popen([sys.executable, "-m", "train", "fit", "--config", TINY, "train.baseline_steps=2000",
                             "run.progress=true", f"run.dir={folder}"], env=ENV, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # bytes: keep each \r
    _wait_for_lines(proc, folder / "metrics.jsonl", 3, "the fit")
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == 130, err
    assert err.count("interrupted: ") == 1 and "\r" in err  # a bar was drawn, the message once
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("interrupted: stopped in stage baseline"), repr(last)  # no bar drawn after it


# ---------------------------------------------------------------------------------------------------
# causes in the user's input: exit 2, one line naming the file or the key


def _native_copy(dataset_dir, tmp_path, change=None, features=None):
    root = tmp_path / "data"
    shutil.copytree(dataset_dir, root / "SynthTiny")
    ann = root / "SynthTiny" / "annotations.json"
    if change:
        data = json.loads(ann.read_text())
        change(data)
        ann.write_text(json.dumps(data))
    if features:
        features(root / "SynthTiny" / "features")
    return root, ann, [f"data.root={root}", "data.name=SynthTiny", "data.synthetic=", "data.layout=native"]


def _first_test_video(data):
    return next(v for v, info in data["database"].items() if info["subset"] == "test")


def _nan_in(folder, which):
    path = sorted(folder.glob(f"video_{which}_*.npy"))[0]
    x = np.load(path)
    x[2, 1] = np.nan
    np.save(path, x)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["duration", "annotations", "num_segments", "nan_train", "nan_test", "width"])
def test_bad_data_is_exit_2_before_training(dataset_dir, tmp_path, capsys, case):
    def set_field(key, value):
        def change(data):
            data["database"][_first_test_video(data)][key] = value
        return change
    changes = {"duration": set_field("duration", "abc"), "annotations": set_field("annotations", None),
               "num_segments": set_field("num_segments", "x")}
    features = {"nan_train": lambda d: _nan_in(d, "validation"), "nan_test": lambda d: _nan_in(d, "test"),
                "width": lambda d: np.save(d / "video_test_0000002.npy", np.load(d / "video_test_0000002.npy")[:, 1:])}
    root, ann, data = _native_copy(dataset_dir, tmp_path, changes.get(case), features.get(case))
    folder = tmp_path / "r"
    assert main(["fit", "--config", TINY, *data, f"run.dir={folder}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    if case in changes:
        assert str(ann) in line and f"field '{case}'" in line
    else:
        assert str(root / "SynthTiny" / "features") in line and "video '" in line
    assert not folder.exists()  # refused before anything was written


@pytest.mark.slow
@pytest.mark.parametrize("argv, needle", [
    (["seed=99999999999999999999"], "config key 'seed': expected an integer in [0, 2**64 - 1]"),
    (["data.rgb_dim=100000"], "config key 'data.rgb_dim': expected an integer in [1, 63]"),
    (["data.train_subset=test"], "expected two different subsets"),
])
def test_bad_keys_are_exit_2_naming_the_key(cache, tmp_path, capsys, argv, needle):
    assert main(["fit", "--config", TINY, *argv, f"run.dir={tmp_path / 'r'}"]) == 2
    _one_error_line(capsys.readouterr().err, needle)


@pytest.mark.slow
def test_checkpoints_that_do_not_fit_are_exit_2_naming_the_file(run, tmp_path, capsys):
    import torch
    for name, change in (("nomodel.pt", lambda s: s.pop("model")),
                         ("shape.pt", lambda s: s["model"].update(
                             {k: torch.zeros(2, 2) for k in list(s["model"])[:1]}))):
        folder = tmp_path / name.split(".")[0]
        shutil.copytree(run, folder)
        raw = torch.load(folder / "latest.pt", weights_only=True)
        change(raw)
        torch.save(raw, folder / "latest.pt")
        for argv in (["eval", "--checkpoint", str(folder / "latest.pt")], ["fit", "--run-dir", str(folder), "--resume"]):
            assert main(argv) == 2
            _one_error_line(capsys.readouterr().err, f"checkpoint {folder / 'latest.pt'}",
                            "has no 'model' entry" if name == "nomodel.pt" else "does not fit the model")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fail a write with ENOSPC")
def test_a_full_disk_during_fit_is_exit_2_naming_the_checkpoint(cache, tmp_path, capsys, monkeypatch):
    import torch
    real_save, calls = torch.save, []

    def fills_up(obj, f):  # the fifth checkpoint write meets a full disk
        calls.append(1)
        if len(calls) < 5:
            return real_save(obj, f)
        with open("/dev/full", "wb") as full:
            real_save(obj, full)
            full.flush()

    monkeypatch.setattr(ckpt.torch, "save", fills_up)
    folder = tmp_path / "full"
    assert main(["fit", "--config", TINY, f"run.dir={folder}"]) == 2
    _one_error_line(capsys.readouterr().err, f"could not write checkpoint {folder / 'latest.pt'}",
                    "still holds the previous checkpoint", "--resume")
    assert ckpt.load(folder / "latest.pt")["global_step"] == 3  # the fourth write, whole
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert main(["fit", "--run-dir", str(folder), "--resume"]) == 0  # and the run continues from it


@pytest.mark.slow
def test_messages_that_say_what_to_do(tmp_path, capsys):
    assert main(["fit", f"run.dir={tmp_path / 'r'}"]) == 2
    _one_error_line(capsys.readouterr().err, "fit: --config is missing", "configs/tiny.yaml")
    assert main(["compare", "--out", str(tmp_path / "c")]) == 2
    _one_error_line(capsys.readouterr().err, "compare: --config is missing")
    assert main(["fit", "--config", str(ROOT / "configs" / "thumos14.yaml"), f"data.root={tmp_path / 'nothing'}",
                 f"run.dir={tmp_path / 'r'}"]) == 2
    _one_error_line(capsys.readouterr().err, f"dataset folder not found: {tmp_path / 'nothing'}",
                    "Thumos14reduced-I3D-JOINTFeatures.npy and the folder Thumos14reduced-Annotations/")
    assert main(["eval", "--checkpoint", TINY]) == 2
    line = _one_error_line(capsys.readouterr().err, f"{TINY} is not a checkpoint")
    assert "damaged" not in line and "start the run again" not in line


class _Touch:
    """Unpickling this would create ``path`` (as a crafted data file would run any code)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.slow
def test_a_crafted_feature_file_in_the_synthetic_cache_runs_nothing(dataset_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(dataset_dir.parent, cache / "synthetic-tiny")
    victim = cache / "synthetic-tiny" / "SynthTiny-I3D-JOINTFeatures.npy"
    feats = np.load(victim, allow_pickle=True)  # our own file, as the generator wrote it
    marker = tmp_path / "ran"
    feats[0] = _Touch(marker)
    np.save(victim, feats, allow_pickle=True)
    out = subprocess.run([sys.executable, "-m", "train", "fit", "--config", TINY, "data.layout=standard",
                          f"run.dir={tmp_path / 'r'}"], env={**ENV, "CCLUSTER_CACHE": str(cache)}, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    _one_error_line(out.stderr, f"file {victim} refused: its pickle calls posix.system", "nothing in it was run")
    assert not marker.exists()


def test_peer_failures_are_recognised():
    """A rank blocked in a collective whose peer died must not be reported as the root cause: its
    error is recognised (and held back a little over a second, see train.cli.entry), other errors are not."""
    import torch.distributed as dist
    from train.cli.entry import is_peer_failure
    assert is_peer_failure(RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                                         "[127.0.0.1]:38542"))
    assert is_peer_failure(dist.DistBackendError("NCCL communicator was aborted"))
    assert not is_peer_failure(ValueError("features of video 'v3' contain NaN"))
