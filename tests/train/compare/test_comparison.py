"""The comparison (train/compare/comparison.py) on the tiny preset: variants share stage 1 and its batches,
evaluation-only variants reuse a training, reproducibility, and a killed comparison resumed to the same table."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from train.compare import CONTROL, Comparison, load_variants, parse_variants, quiet, summarize, variant_config
from train.config import ConfigError, load_config
from train.run import checkpoint as ckpt
from train.run import Run


ROOT = Path(__file__).resolve().parents[3]
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_same_command_twice_same_table(compared, tmp_path):
    out, res = compared
    again = Comparison(_base(), parse_variants(VARIANTS), SEEDS, tmp_path / "again").run()
    assert again["table"] == res["table"]
    # and rerunning in a finished folder trains and evaluates nothing, and prints the same table
    written = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.parent != out}
    rerun = Comparison(_base(), parse_variants(VARIANTS), SEEDS, out)
    assert rerun.run()["table"] == res["table"]
    assert rerun.reused == rerun.runs == len(SEEDS) * (1 + 1 + len(VARIANTS))  # every run read back
    assert {p: p.stat().st_mtime_ns for p in written} == written


@pytest.mark.slow
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


@pytest.mark.slow
def test_cls_star_is_logged_and_shown_only_where_it_was_computed(cache, tmp_path, caplog):
    """cc.select off (the default): the run's log line and the table have no cls*; on: both have it."""
    variants = parse_variants({"select": {"cc.weight": 0.0, "cc.select": True}})
    with caplog.at_level("INFO", logger="train"):
        res = Comparison(_base(), variants, [0], tmp_path).run()
    lines = {m.split(":")[0]: m for m in (r.getMessage() for r in caplog.records) if ": cls " in m}
    assert "cls*" not in lines[f"seed 0 {CONTROL}"]
    select = res["results"]["select"][0]["cls_map_select"]
    assert f", cls* {100 * select:.1f}, " in lines["seed 0 select"]
    head = [h.strip() for h in res["table"].splitlines()[0].split("|")]
    assert head[:4] == ["variant", "cls", "Δ", "cls*"]
