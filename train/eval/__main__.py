"""Evaluate ActivityNet-format detection results against ground truth.

    python -m train.eval --ground-truth gt.json --predictions results.json [--subset test]
                         [--tiou 0.1 0.2 ...] [--json out.json] [--no-ambiguous]

Prints mAP at each tIoU threshold and their mean; ``--json`` writes
``{"tiou": [...], "mAP": [...], "average_mAP": x}`` with mAP as fractions in [0, 1].
Default thresholds: 0.1:0.1:0.7 (THUMOS14); ``--tiou activitynet`` gives 0.5:0.05:0.95.
Segments marked ambiguous in the ground truth (THUMOS14) remove the predictions that overlap them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from .anet_json import read_ground_truth_json, read_predictions_json
from .ap import ACTIVITYNET_TIOU, THUMOS14_TIOU, detection_map


def _thresholds(values: list[str]) -> list[float]:
    if values == ["thumos14"]:
        return list(THUMOS14_TIOU)
    if values == ["activitynet"]:
        return list(ACTIVITYNET_TIOU)
    out = []
    for v in values:
        try:
            x = float(v)
        except ValueError:
            raise SystemExit(f"--tiou: expected numbers in (0, 1] or 'thumos14' / 'activitynet', got {v!r}")
        if not 0 < x <= 1:
            raise SystemExit(f"--tiou: thresholds must be in (0, 1], got {x}")
        out.append(x)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = argparse.ArgumentParser(prog="python -m train.eval", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ground-truth", required=True, help="ActivityNet ground-truth JSON (with 'database')")
    ap.add_argument("--predictions", required=True, help="ActivityNet results JSON (with 'results')")
    ap.add_argument("--subset", default=None, help="evaluate only ground-truth videos of this subset")
    ap.add_argument("--tiou", nargs="+", default=["thumos14"], help="tIoU thresholds (default 0.1 ... 0.7)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--no-ambiguous", action="store_true", help="ignore the ambiguous segments of the ground truth")
    args = ap.parse_args(argv)

    tiou = _thresholds(args.tiou)
    try:
        gt = read_ground_truth_json(args.ground_truth, subset=args.subset)
        preds = read_predictions_json(args.predictions)
        outside = sum(p["video"] not in gt.videos for p in preds)
        if outside:
            print(f"note: {outside} of {len(preds)} predictions are on videos outside the evaluated ground truth; "
                  f"they count as false positives (ActivityNet protocol)", file=sys.stderr)
        m, avg = detection_map(preds, gt.entries, tiou, None if args.no_ambiguous else gt.ambiguous)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{'tIoU':>6}  {'mAP':>6}")
    for t, v in zip(tiou, m):
        print(f"{t:>6.2f}  {100 * v:6.2f}")
    print(f"{'avg':>6}  {100 * avg:6.2f}   (mAP in %, {len(gt.videos)} videos, {len(gt.entries)} instances, "
          f"{len(preds)} predictions)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"tiou": tiou, "mAP": [float(v) for v in m], "average_mAP": avg}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
