"""The peer benchmark (benchmarks/peer_wtalc.py) with stand-ins for W-TALC's code: its plumbing, and its
results as a row of compare (--peer, --against, --metrics)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.config import ConfigError, load_config


ROOT = Path(__file__).resolve().parents[2]


def _fake_wtalc(folder: Path) -> None:
    """Stand-ins with W-TALC's interfaces (options, Dataset, Model, train), so that the benchmark's
    plumbing is tested without W-TALC's code."""
    folder.mkdir()
    for name in ("main.py", "utils.py", "classificationMAP.py", "detectionMAP.py", "test.py"):
        (folder / name).write_text("")
    (folder / "options.py").write_text(
        "import argparse\nparser = argparse.ArgumentParser()\n"
        "for a in ('--lr', '--batch-size', '--max-seqlen', '--seed', '--max-iter'):\n"
        "    parser.add_argument(a, type=float if a == '--lr' else int)\n"
        "for a in ('--dataset-name', '--model-name', '--num-class', '--feature-size'):\n"
        "    parser.add_argument(a)\n")
    (folder / "tensorboard_logger.py").write_text("class Logger:\n    def __init__(self, *a):\n        pass\n")
    (folder / "model.py").write_text(
        "import torch\nclass Model(torch.nn.Module):\n"
        "    def __init__(self, n_feature, n_class):\n"
        "        super().__init__()\n        self.classifier = torch.nn.Linear(n_feature, n_class)\n"
        "    def forward(self, x, is_training=True):\n        return x, self.classifier(x)\n")
    (folder / "video_dataset.py").write_text(
        "import numpy as np\nclass Dataset:\n    def __init__(self, args):\n"
        "        self.features = np.load(args.dataset_name + '-I3D-JOINTFeatures.npy', allow_pickle=True)\n"
        "        self.feature_size, self.num_class = args.feature_size, args.num_class\n")
    (folder / "train.py").write_text(
        "import numpy as np, torch\n"
        "def train(itr, dataset, args, model, optimizer, logger, device):\n"
        "    f = torch.from_numpy(np.asarray(dataset.features[np.random.randint(len(dataset.features))]))\n"
        "    loss = model(f.float())[1].square().mean()\n"
        "    optimizer.zero_grad(); loss.backward(); optimizer.step()\n"
        "    print('Iteration: %d, Loss: %.3f' % (itr, float(loss)))\n")


@pytest.mark.slow
def test_peer_benchmark_plumbing_and_compare_row(cache, tmp_path):
    """benchmarks/peer_wtalc.py on the tiny preset with a stand-in for W-TALC: data exported standardised
    in W-TALC's layout, one training subprocess per seed, results per seed that `compare --peer` shows."""
    fake = tmp_path / "wtalc"
    _fake_wtalc(fake)
    out = tmp_path / "peer"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "peer_wtalc.py"), "--wtalc", str(fake), "--config",
           str(ROOT / "configs" / "tiny.yaml"), "--seeds", "0", "1", "--out", str(out), "--iterations", "3",
           "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert res["peer"] == "wtalc-peer" and set(res["results"]) == {"0", "1"}
    for r in res["results"].values():
        assert 0 <= r["cls_map"] <= 1 and 0 <= r["det_map@0.7"] <= 1 and r["train_seconds"] >= 0
    info = json.loads((out / "data" / "export.json").read_text())
    from train.data.standard import read_standard
    ds = read_standard(str(out / "data"), "Peer")
    from train.config import resolve_subsets
    from train.run.context import open_dataset
    from train.data.standardize import fit_standardizer
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    raw = open_dataset(cfg)
    stats = fit_standardizer(raw, resolve_subsets(cfg, raw)[0])   # the statistics a run computes
    by_name = {v.name: v for v in raw.videos}
    for v in ds.videos:
        np.testing.assert_array_equal(v.features, stats.apply(by_name[v.name].features).astype(np.float32))
    assert info["train"] + info["test"] == len(ds.videos)
    assert all(v.labels.any() for v in ds.videos if v.subset == "validation")
    # a second call reuses the finished seeds (no training: the stand-in's log is not rewritten)
    stamp = (out / "seed-0" / "train.log").stat().st_mtime_ns
    assert subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).returncode == 0
    assert (out / "seed-0" / "train.log").stat().st_mtime_ns == stamp
    # not W-TALC's code: one line, exit 2
    bad = subprocess.run(cmd[:3] + [str(tmp_path)] + cmd[4:], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "not W-TALC's code" in bad.stderr

    from train.compare import CONTROL, format_summary, load_peer, parse_metrics, summarize
    name, per_seed = load_peer(out / "results.json", [0, 1])
    with pytest.raises(ConfigError, match=r"no result for seed\(s\) 2"):
        load_peer(out / "results.json", [0, 2])
    results = {CONTROL: {s: {k: v + 0.1 for k, v in r.items()} for s, r in per_seed.items()}, name: per_seed}
    metrics = parse_metrics(["cls", "det@all", "det-avg"])
    assert [label for _, label in metrics][:3] == ["cls", "det@0.1", "det@0.2"] and len(metrics) == 9
    summary = summarize(results, [0, 1], against=name, metrics=metrics)
    assert math.isclose(summary[CONTROL]["det_map@0.7"]["diff"], 0.1)
    assert "diff" not in summary[name]["cls_map"]
    assert "paired difference from 'wtalc-peer'" in format_summary(summary, [0, 1], 1, name, metrics)
    with pytest.raises(ConfigError, match="unknown metric"):
        parse_metrics(["mAP"])
