"""W-TALC's own code as a peer: trained on the same data with the same budget, scored by our evaluator.

    python benchmarks/peer_wtalc.py --wtalc PATH/TO/W-TALC --config configs/calibrated.yaml \
        --seeds 0 1 2 --out runs/peer-wtalc [key=value ...]

What it does, per seed:

1. **Data** (once): the config's dataset, its training and test subsets as the config resolves them, the
   features standardised with the training subset's per-dimension mean and std (``data.standardize:
   zscore``, the statistics a run of the config computes), written in the W-TALC layout under
   ``OUT/data``. Training videos without a label are left out: W-TALC's MIL loss divides by the label
   count (a video without one makes the loss NaN); test videos are all kept.
2. **Training**: W-TALC's own ``model.py``, ``train.py`` (its MIL + co-activity loss and its sampler of
   similar pairs) and ``video_dataset.py`` from ``--wtalc``, imported unchanged and run in a subprocess in
   ``OUT/seed-<s>``, for ``--iterations`` steps of ``--batch-size`` videos cropped to ``data.max_seqlen``
   segments, Adam at ``train.lr`` with W-TALC's weight decay 5e-4. The loop is W-TALC's ``main.py`` without
   its periodic test: torch *and* numpy are seeded with the seed (``main.py`` seeds torch only, so its
   batches would differ between runs), and the model is saved at the end.
3. **Scoring**: W-TALC's T-CAM (its segment logits on the whole video) turned into proposals by W-TALC's
   rule (:func:`train.eval.wtalc_proposals`, the same as its ``detectionMAP.py``: per class a threshold
   half way up the T-CAM's range, classes with a positive top-T/8 video score, runs of at least two
   segments, score = max + 0.7 x video score); detection mAP by the project's evaluator (ActivityNet
   protocol, ambiguous instances as in the dataset) at ``eval.tiou``; classification mAP of W-TALC's test
   score (softmax of the top-T/8 mean logits).

The default budget matches the config's: ``--batch-size`` 10 (W-TALC's) and as many iterations as make the
same number of training videos as the config's stages (``data.batch_size x (train.baseline_steps +
cc.rounds x train.cc_steps)``).

Output: ``OUT/results.json`` with per seed the same keys as a run's results (``cls_map``,
``det_map@<t>``, ``det_map_avg``), which ``python -m train compare --peer OUT/results.json`` shows as a
row beside the variants; ``OUT/seed-<s>/predictions.json`` (ActivityNet result format) for
``python -m train.eval``. A finished seed is not trained again. Cost on one CPU core: about 0.5 s per
iteration at the calibrated set's sizes (2048-d features, crops of 200), so about 11 minutes per seed.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WTALC_FILES = ("main.py", "model.py", "train.py", "video_dataset.py", "utils.py", "options.py",
               "tensorboard_logger.py", "classificationMAP.py", "detectionMAP.py", "test.py")
NAME = "Peer"  # the dataset name inside OUT/data


def budget_iterations(cfg: dict, batch_size: int) -> int:
    """Iterations of ``batch_size`` videos that see as many training videos as the config's run."""
    steps = cfg["train"]["baseline_steps"] + cfg["cc"]["rounds"] * cfg["train"]["cc_steps"]
    return max(1, round(cfg["data"]["batch_size"] * steps / batch_size))


def export_data(cfg: dict, out: Path) -> dict:
    """Write the config's dataset, standardised, in the W-TALC layout under ``out`` (see step 1);
    returns a description (videos, classes, feature size, the statistics' digest)."""
    from train.run.context import open_dataset
    from train.config import resolve_subsets
    from train.data import FeatureDataset
    from train.data.standard import write_standard
    from train.data.standardize import fit_standardizer

    done = out / "export.json"
    if done.exists():
        return json.loads(done.read_text())
    ds = open_dataset(cfg)
    train_idx, test_idx = resolve_subsets(cfg, ds)
    stats = fit_standardizer(ds, train_idx)
    videos = []
    dropped = 0
    for i in train_idx + test_idx:
        v = ds.videos[i]
        if i in train_idx and not np.asarray(v.labels).any():
            dropped += 1
            continue
        z = stats.apply(v.features).astype(np.float32)
        subset = "validation" if i in train_idx else "test"  # the names W-TALC's reader expects
        videos.append(type(v)(name=v.name, subset=subset, duration=v.duration, labels=v.labels,
                              segments=list(v.segments), features=z))
    peer = FeatureDataset(ds.classes, videos, feature_rate=ds.feature_rate, rgb_dim=ds.rgb_dim,
                          ambiguous=ds.ambiguous, name=NAME)
    out.mkdir(parents=True, exist_ok=True)
    write_standard(peer, str(out), NAME)
    # W-TALC reads duration as an [V, 1] array (duration[i, 0])
    ann = out / f"{NAME}-Annotations"
    np.save(ann / "duration.npy", np.array([[v.duration] for v in videos], dtype=np.float64))
    info = {"videos": len(videos), "train": len(train_idx) - dropped, "test": len(test_idx),
            "unlabelled_train_dropped": dropped, "classes": len(ds.classes), "feature_size": ds.feature_dim,
            "feature_rate": ds.feature_rate}
    done.write_text(json.dumps(info, indent=1))
    return info


def _driver(args) -> None:
    """Inside ``OUT/seed-<s>`` (the subprocess): W-TALC's main loop with both generators seeded."""
    sys.path.insert(0, args.wtalc)
    import torch
    import options
    from model import Model
    from video_dataset import Dataset
    from train import train
    from tensorboard_logger import Logger

    wargs = options.parser.parse_args([
        "--dataset-name", NAME, "--lr", repr(args.lr), "--batch-size", str(args.batch_size),
        "--max-seqlen", str(args.max_seqlen), "--seed", str(args.seed), "--max-iter", str(args.iterations),
        "--model-name", "peer"])
    wargs.num_class, wargs.feature_size = int(args.num_class), int(args.feature_size)
    torch.manual_seed(wargs.seed)
    np.random.seed(wargs.seed)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    dataset = Dataset(wargs)
    model = Model(dataset.feature_size, dataset.num_class).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=wargs.lr, weight_decay=0.0005)
    logger = Logger("logs")
    for itr in range(wargs.max_iter):
        train(itr, dataset, wargs, model, optimizer, logger, device)
    os.makedirs("ckpt", exist_ok=True)
    torch.save(model.state_dict(), "ckpt/peer.tmp")
    os.replace("ckpt/peer.tmp", "ckpt/peer.pkl")


def score(cfg: dict, wtalc: str, run: Path, data: Path, info: dict) -> dict:
    """Classification and detection mAP of a trained peer (step 3), and its predictions file."""
    import torch
    from train.data.standard import read_standard
    from train.eval import classification_map, detection_map, write_predictions_json
    from train.eval.proposals import topk_video_scores, wtalc_proposals

    sys.path.insert(0, wtalc)
    from model import Model  # W-TALC's
    sys.path.pop(0)
    model = Model(info["feature_size"], info["classes"])
    model.load_state_dict(torch.load(run / "ckpt" / "peer.pkl", map_location="cpu", weights_only=True))
    model.eval()
    ds = read_standard(str(data), NAME, feature_rate=info["feature_rate"])
    test = [v for v in ds.videos if v.subset == "test"]
    scores, predictions = [], []
    with torch.no_grad():
        for v in test:
            _, logits = model(torch.from_numpy(v.features), is_training=False)
            tcam = logits.double().numpy()
            video = topk_video_scores(tcam, 8)
            e = np.exp(video - video.max())
            scores.append(e / e.sum())
            predictions += [dict(video=v.name, **p) for p in wtalc_proposals(tcam, ds.feature_rate,
                                                                                video_scores=video)]
    labels = np.stack([v.labels for v in test])
    write_predictions_json(str(run / "predictions.json"), predictions, class_names=list(ds.classes),
                           videos=[v.name for v in test])
    tiou = cfg["eval"]["tiou"]
    gt = [{"video": v.name, "label": int(c), "start": float(s), "end": float(e)}
          for v in test for s, e, c in v.segments]
    per, avg = detection_map(predictions, gt, tiou, ambiguous=ds.ambiguous)
    res = {"cls_map": float(classification_map(np.stack(scores), labels)[0])}
    res.update({f"det_map@{t:g}": float(m) for t, m in zip(tiou, per)})
    res["det_map_avg"] = float(avg)
    return res


def run_seed(args, cfg: dict, info: dict, seed: int, iterations: int) -> dict:
    """Train (unless finished) and score one seed in ``OUT/seed-<seed>``."""
    from tqdm.auto import tqdm
    out, data = Path(args.out), Path(args.out) / "data"
    run = out / f"seed-{seed}"
    done = run / "results.json"
    if done.exists():
        return json.loads(done.read_text())
    run.mkdir(parents=True, exist_ok=True)
    for name in (f"{NAME}-I3D-JOINTFeatures.npy", f"{NAME}-Annotations"):
        link = run / name
        if not link.exists():
            link.symlink_to((data / name).resolve())
    if not (run / "ckpt" / "peer.pkl").exists():
        cmd = [sys.executable, str(Path(__file__).resolve()), "_train", "--wtalc", str(Path(args.wtalc).resolve()),
               "--seed", str(seed), "--iterations", str(iterations), "--batch-size", str(args.batch_size),
               "--max-seqlen", str(cfg["data"]["max_seqlen"]), "--lr", repr(cfg["train"]["lr"]),
               "--num-class", str(info["classes"]), "--feature-size", str(info["feature_size"]),
               "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
        start = time.monotonic()
        with open(run / "train.log", "w", buffering=1) as log, \
                tqdm(total=iterations, desc=f"W-TALC seed {seed}", unit="it", dynamic_ncols=True,
                     disable=not args.progress) as bar:
            proc = subprocess.Popen(cmd, cwd=run, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            for line in proc.stdout:
                log.write(line)
                if line.startswith("Iteration:"):
                    bar.update(1)
            if proc.wait() != 0:
                raise SystemExit(f"error: W-TALC's training of seed {seed} failed (exit {proc.returncode}), "
                                 f"see {run / 'train.log'}")
        (run / "train_seconds.txt").write_text(f"{time.monotonic() - start:.1f}\n")
    res = score(cfg, args.wtalc, run, data, info)
    res["train_seconds"] = float((run / "train_seconds.txt").read_text())
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(done)
    return res


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["_train"]:
        p = argparse.ArgumentParser(prog="peer_wtalc.py _train")
        for name, kind in (("--wtalc", str), ("--seed", int), ("--iterations", int), ("--batch-size", int),
                           ("--max-seqlen", int), ("--lr", float), ("--num-class", int),
                           ("--feature-size", int), ("--threads", int)):
            p.add_argument(name, type=kind, required=True)
        _driver(p.parse_args(argv[1:]))
        return 0
    p = argparse.ArgumentParser(
        description="Train W-TALC's own code on a config's data with the same budget and score it with the "
                    "project's evaluator (see the module docstring).")
    p.add_argument("--wtalc", required=True, help="folder of W-TALC's code (model.py, train.py, ...)")
    p.add_argument("--config", required=True, help="the project config whose data, crops, lr and budget to use")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", required=True, help="output folder (data, one folder per seed, results.json)")
    p.add_argument("--batch-size", type=int, default=10, help="videos per iteration (W-TALC's default 10)")
    p.add_argument("--iterations", type=int, default=0,
                   help="training iterations (0: the config's budget in videos, see the module docstring)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training and scoring")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    missing = [f for f in WTALC_FILES if not (Path(args.wtalc) / f).is_file()]
    if missing:
        print(f"error: --wtalc {args.wtalc}: not W-TALC's code (missing {', '.join(missing)})", file=sys.stderr)
        return 2
    if args.batch_size < 7:
        print(f"error: --batch-size: W-TALC puts 3 pairs of similar videos in every batch, expected at least 7, "
              f"got {args.batch_size}", file=sys.stderr)
        return 2
    from train.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(args.threads)
    iterations = args.iterations or budget_iterations(cfg, args.batch_size)
    out = Path(args.out)
    info = export_data(cfg, out / "data")
    results = {}
    for seed in args.seeds:
        res = run_seed(args, cfg, info, seed, iterations)
        results[str(seed)] = res
        print(f"seed {seed}: cls {100 * res['cls_map']:.1f}, "
              + ", ".join(f"det@{t:g} {100 * res[f'det_map@{t:g}']:.1f}" for t in cfg["eval"]["tiou"])
              + f", det avg {100 * res['det_map_avg']:.1f} ({res['train_seconds']:.0f} s of training)")
        # every finished seed so far, so that an interrupted run keeps them
        payload = {"peer": "wtalc-peer", "wtalc": str(Path(args.wtalc).resolve()),
                   "config": args.config, "overrides": args.overrides, "iterations": iterations,
                   "batch_size": args.batch_size, "max_seqlen": cfg["data"]["max_seqlen"],
                   "lr": cfg["train"]["lr"], "threads": args.threads, "data": info, "results": results}
        tmp = out / "results.json.tmp"
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
