"""``python -m train compare`` on the tiny preset: variants share stage 1 and its batches, the summary's
statistics, reproducibility, and a killed comparison resumed to the same table."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.run import checkpoint as ckpt
from train.compare import CONTROL, Comparison, load_variants, parse_variants, quiet, summarize, variant_config
from train.config import ConfigError, load_config
from train.run import Run

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.baseline_steps=10", "train.cc_steps=6", "cc.rounds=1", "eval.figures=0"]
VARIANTS = {"lam1": {"cc": {"weight": 1.0}}, "lam01": {"cc.weight": 0.1, "cc.detach_attention": True}}
SEEDS = [0, 1]


def _base():
    return load_config(ROOT / "configs" / "tiny.yaml", TINY)


@pytest.fixture(scope="module")
def compared(cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    res = Comparison(_base(), parse_variants(VARIANTS), SEEDS, out).run()
    return out, res


def test_variants_parse_and_refuse_stage1_keys(tmp_path):
    assert parse_variants({"a": {"cc": {"weight": 2}}, "b": {"train.cc_steps": 3}, "c": None}) == {
        "a": {"cc.weight": 2}, "b": {"train.cc_steps": 3}, "c": {}}
    with pytest.raises(ConfigError, match=r"variant 'x': key 'seed' is set by the comparison"):
        parse_variants({"x": {"seed": 3}})
    with pytest.raises(ConfigError, match=r"variant name 'stage1'"):
        parse_variants({"stage1": {}})
    path = tmp_path / "v.yaml"
    path.write_text("lam: {cc.weight: 5e-1}\ninput: {cc: {on: input}}\n")
    assert load_variants(str(path), ["det: {cc.detach_attention: true}"]) == {
        "lam": {"cc.weight": 0.5}, "input": {"cc.on": "input"}, "det": {"cc.detach_attention": True}}
    with pytest.raises(ConfigError, match=r"--variant 'oops'"):
        load_variants(None, ["oops"])
    with pytest.raises(ConfigError, match=r"unknown config key 'cc\.nonsense'"):
        Comparison(_base(), {"bad": {"cc.nonsense": 1}}, [0], tmp_path / "c")


def test_summary_statistics_by_hand():
    seeds = [0, 1, 2]
    ctrl = [0.50, 0.60, 0.70]
    var = [0.55, 0.62, 0.78]
    results = {CONTROL: {s: {"cls_map": c} for s, c in zip(seeds, ctrl)},
               "v": {s: {"cls_map": v} for s, v in zip(seeds, var)}}
    row = summarize(results, seeds)["v"]["cls_map"]
    diff = [v - c for v, c in zip(var, ctrl)]                      # 0.05, 0.02, 0.08
    mean = sum(diff) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in diff) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)                   # t(0.975, 2)
    assert row["diff"] == pytest.approx(mean)
    assert row["ci95"] == pytest.approx([mean - half, mean + half])
    assert row["mean"] == pytest.approx(sum(var) / 3)
    assert row["std"] == pytest.approx(math.sqrt(sum((v - sum(var) / 3) ** 2 for v in var) / 2))
    assert "diff" not in summarize(results, seeds)[CONTROL]["cls_map"]


def test_comparison_outputs(compared):
    out, res = compared
    assert set(res["results"]) == {CONTROL, "lam1", "lam01"}
    for name in (CONTROL, "lam1", "lam01"):
        assert set(res["results"][name]) == set(SEEDS)
        for s in SEEDS:
            assert (out / f"seed-{s}" / name / "results.json").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["seeds"] == SEEDS and saved["threads"] == 1
    assert saved["summary"]["lam1"]["cls_map"]["diff"] == pytest.approx(
        sum(res["results"]["lam1"][s]["cls_map"] - res["results"][CONTROL][s]["cls_map"] for s in SEEDS) / 2)
    assert (out / "compare.png").is_file() and "control" in (out / "table.txt").read_text()


def test_variants_share_stage1_and_equal_a_standalone_run(compared, tmp_path):
    out, res = compared
    # every variant of a seed starts from the same stage-1 results
    for s in SEEDS:
        base = [json.loads((out / f"seed-{s}" / v / "results.json").read_text())["baseline"]
                for v in (CONTROL, "lam1", "lam01")]
        assert base[0] == base[1] == base[2]
    # a variant is exactly the run `fit` makes with the same config
    cfg = variant_config(_base(), parse_variants(VARIANTS)["lam01"], 1)
    quiet(cfg)
    with Run(cfg, tmp_path / "alone") as run:
        alone = run.train()
    assert alone["cc1"] == res["results"]["lam01"][1]
    a = ckpt.load(tmp_path / "alone" / "latest.pt")["model"]
    b = ckpt.load(out / "seed-1" / "lam01" / "latest.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the control trains the same steps without the exemplar loss: it differs from lam1
    rows = [json.loads(line) for line in open(out / "seed-0" / CONTROL / "metrics.jsonl")]
    assert [r["stage"] for r in rows if r["kind"] == "database"] == ["db1"]
    assert not any("cc" in r for r in rows if r["kind"] == "train")


def test_a_variant_that_changes_stage1_gets_its_own(cache, tmp_path):
    variants = parse_variants({"nodrop": {"model.dropout": 0.0, "cc.weight": 0.0}, "lam1": {}})
    res = Comparison(_base(), variants, [0], tmp_path).run()
    folders = sorted(p.name for p in (tmp_path / "seed-0").iterdir())
    assert folders[:2] == [CONTROL, "lam1"] and folders[2] == "nodrop" and folders[3] == "stage1"
    assert len(folders) == 5 and folders[4].startswith("stage1-")
    base = [json.loads((tmp_path / "seed-0" / v / "results.json").read_text())["baseline"]
            for v in (CONTROL, "lam1", "nodrop")]
    assert base[0] == base[1] != base[2]
    assert set(res["results"]) == {CONTROL, "lam1", "nodrop"}


def test_evaluation_only_variants_reuse_the_training(cache, tmp_path):
    variants = parse_variants({"smooth3": {"cc.weight": 0.0, "eval.smooth": 3}})
    res = Comparison(_base(), variants, [0], tmp_path).run()
    run = tmp_path / "seed-0" / "smooth3"
    assert not (run / "latest.pt").exists()          # not trained again
    saved = json.loads((run / "results.json").read_text())
    assert saved["evaluated_from"] == CONTROL
    ctrl = res["results"][CONTROL][0]
    assert res["results"]["smooth3"][0]["cls_map"] == ctrl["cls_map"]           # same network
    assert res["results"]["smooth3"][0]["det_map_avg"] != ctrl["det_map_avg"]   # evaluated otherwise


def test_stage1_is_shared_across_comparisons_of_exemplar_settings(tmp_path):
    Comparison(_base(), {}, [0], tmp_path).run()
    stage1 = tmp_path / "seed-0" / "stage1" / "latest.pt"
    before = stage1.stat().st_mtime_ns
    # another base with other exemplar settings: its stage 1 is the same run, its control is not
    other = load_config(ROOT / "configs" / "tiny.yaml", TINY + ["cc.size=4"])
    with pytest.raises(ConfigError, match=r"seed-0/control holds a run with another config \(cc\.size\)"):
        Comparison(other, {}, [0], tmp_path).run()
    assert stage1.stat().st_mtime_ns == before  # reused, not trained again


def test_variants_are_checked_against_the_data_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"variant 'bigk': config key 'cc\.k': expected at most"):
        Comparison(_base(), {"bigk": {"cc.k": 1000}}, [0], tmp_path).run()
    assert not (tmp_path / "seed-0").exists()


def test_same_command_twice_same_table(compared, tmp_path):
    out, res = compared
    again = Comparison(_base(), parse_variants(VARIANTS), SEEDS, tmp_path / "again").run()
    assert again["table"] == res["table"]
    # and rerunning in a finished folder trains nothing and prints the same table
    t0 = time.time()
    assert Comparison(_base(), parse_variants(VARIANTS), SEEDS, out).run()["table"] == res["table"]
    assert time.time() - t0 < 30


def test_killed_comparison_resumes_to_the_same_table(compared, tmp_path):
    out, res = compared
    folder = tmp_path / "killed"
    vfile = tmp_path / "variants.yaml"
    vfile.write_text(json.dumps(VARIANTS))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "train", "compare", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--variants", str(vfile), "--seeds", *map(str, SEEDS), "--out", str(folder), *TINY]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    target = folder / "seed-0" / "lam1" / "metrics.jsonl"   # kill inside the second variant of seed 0
    start = time.time()
    while time.time() - start < 300:
        if proc.poll() is not None:
            raise AssertionError(f"the comparison ended before it could be killed:\n{proc.stderr.read()}")
        if target.exists() and sum('"train"' in line for line in open(target)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (folder / "table.txt").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (folder / "table.txt").read_text() == (out / "table.txt").read_text()
    assert res["table"] in done.stdout
    # the killed process's locks were taken over, each said once, and nothing of it is left
    assert f"note: took over the lock of run folder {folder} from process {proc.pid}" in done.stderr
    assert f"note: took over the lock of run folder {folder / 'seed-0' / 'lam1'} from process {proc.pid}" \
        in done.stderr
    assert not list(folder.rglob(".lock")) and not list(folder.rglob(".*.tmp*"))
    runs = len(SEEDS) * (1 + 1 + len(VARIANTS))  # stage 1, the control and the variants, per seed
    reused = int(done.stdout.splitlines()[-1].split("; ")[1].split(" of ")[0])  # those finished before the kill
    assert 0 < reused < runs and f"; {reused} of {runs} runs were finished in {folder}" in done.stdout
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert f"; all {runs} runs were finished in {folder} already and were reused" in again.stdout.splitlines()[-1]


def test_one_seed_is_said_once_and_the_control_keeps_weight_0(tmp_path):
    from train.compare import format_summary
    results = {CONTROL: {2: {"cls_map": 0.5}}, "v": {2: {"cls_map": 0.52}}}
    table = format_summary(summarize(results, [2]), [2], threads=1)
    assert "\n1 seed (2), 1 thread(s)." in table
    assert "\n2 seeds (0, 1)" in format_summary(summarize(
        {CONTROL: {0: {}, 1: {}}, "v": {0: {}, 1: {}}}, [0, 1]), [0, 1], threads=1)
    with pytest.raises(ConfigError, match=r"variant 'control': the control trains without the exemplar loss "
                                          r"\(cc.weight 0\), got cc.weight 0.5; give this variant another name"):
        Comparison(_base(), {CONTROL: {"cc.weight": 0.5}}, [0], tmp_path)
    comp = Comparison(_base(), load_variants(None, ["control: {eval.smooth: 0}"]), [0], tmp_path)
    assert comp.variants[CONTROL] == {"eval.smooth": 0, "cc.weight": 0.0}  # its other keys apply


def _axes_span(summary):
    import matplotlib.pyplot as plt
    from train.compare import METRICS, summary_figure
    fig = summary_figure(summary)
    spans = [ax.get_xlim() for ax in fig.axes[:len(METRICS)]]
    title = fig._suptitle.get_text()
    plt.close(fig)
    return spans, title


def test_the_comparison_figure_does_not_zoom_a_small_difference(tmp_path):
    from train.compare import MIN_SPAN, plot_summary
    one = {CONTROL: {0: {"cls_map": 0.612, "det_map_avg": 0.2}}, "v": {0: {"cls_map": 0.6145, "det_map_avg": 0.2}}}
    spans, title = _axes_span(summarize(one, [0]))
    lo, hi = spans[0]
    assert hi - lo >= MIN_SPAN and lo <= 61.2 and hi >= 61.45  # cls: a 0.25-point difference in a 5-point axis
    assert "1 seed" in title and "no spread" in title
    wide = {CONTROL: {s: {"cls_map": c} for s, c in enumerate([0.40, 0.55, 0.70])},
            "v": {s: {"cls_map": c} for s, c in enumerate([0.42, 0.56, 0.73])}}
    (lo, hi), *_ = _axes_span(summarize(wide, [0, 1, 2]))[0]
    assert lo < 40 and hi > 73 and hi - lo < 40  # the seeds' spread sets the axis
    plot_summary(summarize(wide, [0, 1, 2]), tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
