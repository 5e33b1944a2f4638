"""Evaluate ActivityNet-format detection results against ground truth.

    python -m train.eval --ground-truth gt.json --predictions predictions.json [--subset test]
                         [--tiou 0.1 0.2 ...] [--json out.json] [--no-ambiguous]

Prints mAP at each tIoU threshold and their mean; ``--json`` writes
``{"tiou": [...], "mAP": [...], "average_mAP": x}`` with mAP as fractions in [0, 1].
Default thresholds: 0.1:0.1:0.7 (THUMOS14); ``--tiou activitynet`` gives 0.5:0.05:0.95.
Segments marked ambiguous in the ground truth (THUMOS14) remove the predictions that overlap them.

Without ``--subset`` every ground-truth video is evaluated, and a video without predictions counts as
missed. When the predictions file lists videos of one subset only while the ground truth holds several
(a run's ``predictions.json`` lists the test videos), that would score them against videos they never
tried, so it is refused with the subset to pass; ``--subset all`` evaluates every video anyway.
Predictions with a label that is not a class of the ground truth are not scored (said on stderr).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from ..common import names
from ..common.parsing import OneLineParser
from ..data.activitynet import read_ground_truth_json, read_predictions_file
from .ap import ACTIVITYNET_TIOU, THUMOS14_TIOU, detection_map

ALL = "all"


def _thresholds(values: list[str]) -> list[float]:
    """The --tiou values as numbers in (0, 1]; ValueError naming the option otherwise."""
    if values == ["thumos14"]:
        return list(THUMOS14_TIOU)
    if values == ["activitynet"]:
        return list(ACTIVITYNET_TIOU)
    out = []
    for v in values:
        try:
            x = float(v)
        except ValueError:
            raise ValueError(f"--tiou: expected numbers in (0, 1] or 'thumos14' / 'activitynet', got {v!r}") from None
        if not 0 < x <= 1:
            raise ValueError(f"--tiou: thresholds must be in (0, 1], got {x:g}")
        out.append(x)
    return out


def _covered_subset(gt_path: str, listed: list[str]) -> tuple[str | None, dict]:
    """The one subset the listed videos belong to when the ground truth has several (else None), and
    the ground truth's videos per subset."""
    everything = read_ground_truth_json(gt_path)
    per_subset: dict = {}
    for video, info in everything.videos.items():
        per_subset.setdefault(str(info.get("subset")), []).append(video)
    covered = {str(everything.videos[v].get("subset")) for v in listed if v in everything.videos}
    if len(per_subset) > 1 and len(covered) == 1:
        return covered.pop(), per_subset
    return None, per_subset


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    ap = OneLineParser(prog=names.EVAL, description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ground-truth", required=True, help="ActivityNet ground-truth JSON (with 'database')")
    ap.add_argument("--predictions", required=True,
                    help="ActivityNet results JSON (with 'results'), e.g. a run folder's predictions.json")
    ap.add_argument("--subset", default=None,
                    help="evaluate only ground-truth videos of this subset ('all': every video, even when "
                         "the predictions cover one subset)")
    ap.add_argument("--tiou", nargs="+", default=["thumos14"], help="tIoU thresholds (default 0.1 ... 0.7)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--no-ambiguous", action="store_true", help="ignore the ambiguous segments of the ground truth")
    args = ap.parse_args(argv)

    try:
        tiou = _thresholds(args.tiou)
        preds, listed = read_predictions_file(args.predictions)
        subset = None if args.subset == ALL else args.subset
        if args.subset is None:
            covered, per_subset = _covered_subset(args.ground_truth, listed)
            if covered is not None:
                sizes = ", ".join(f"{s!r} {len(v)}" for s, v in sorted(per_subset.items()))
                raise ValueError(
                    f"{args.predictions} lists videos of subset {covered!r} only, but {args.ground_truth} holds "
                    f"several subsets (videos: {sizes}); pass --subset {covered} to evaluate those videos (or "
                    f"--subset {ALL} to score every ground-truth video, the missing ones as misses)")
        gt = read_ground_truth_json(args.ground_truth, subset=subset)
        outside = sum(p["video"] not in gt.videos for p in preds)
        if outside:
            print(f"note: {outside} of {len(preds)} predictions are on videos outside the evaluated ground truth; "
                  f"they count as false positives (ActivityNet protocol)", file=sys.stderr)
        known = set(gt.classes)
        unknown = sorted({p["label"] for p in preds if p["label"] not in known})
        if unknown:
            n = sum(p["label"] not in known for p in preds)
            print(f"note: {n} of {len(preds)} predictions have a label that is not a class of {args.ground_truth} "
                  f"({', '.join(map(repr, unknown[:5]))}{', ...' if len(unknown) > 5 else ''}); they are not "
                  f"scored", file=sys.stderr)
        m, avg = detection_map(preds, gt.entries, tiou, None if args.no_ambiguous else gt.ambiguous)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
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
