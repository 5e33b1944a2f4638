"""Plot one video: T-CAM and attention over time, ground-truth and predicted segments (PNG).

Command line::

    python -m train.eval.plot --cam cams.npz --ground-truth gt.json [--predictions predictions.json]
                              --video NAME --out video.png [--top-k 10] [--smooth W]

``cam.npz`` holds either one video, ``tcam`` [T, C] and optionally ``attention`` [T], or several, as
``tcam/<video>`` and ``attention/<video>`` (the ``cams.npz`` a training run writes into its folder);
optionally ``feature_rate`` (segments per second, default 25/16), ``classes`` (names; default: the
ground-truth file's classes) and ``smooth`` (the run's ``eval.smooth``). The attention is drawn divided
by its maximum. ``--smooth W`` draws the T-CAM and attention after the moving average of W segments that
proposals use, with the raw curves faint behind them; without ``--smooth`` the file's ``smooth`` is used
(so a run's figure shows the curves its proposals came from), else none. The predictions are drawn as
they are in the results file (this command does not recompute proposals).

In the lower panel a solid bar is a ground-truth instance and a bar with a black edge a prediction,
shaded by its score (the legend gives the scores of the lightest and the darkest).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

import numpy as np

__all__ = ["plot_video", "main", "MAX_POINTS", "MAX_PREDICTIONS"]

# A figure's cost does not grow with the video: a curve of more than MAX_POINTS segments is drawn as
# its envelope (the minimum and maximum of each of MAX_POINTS / 2 bins, so no peak is lost), and each
# shown class gets its MAX_PREDICTIONS best-scored predictions.
MAX_POINTS = 4000
MAX_PREDICTIONS = 50


def envelope(t: np.ndarray, y: np.ndarray, max_points: int = MAX_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """``(t, y)`` as they are when ``len(y) <= max_points``; else ``max_points`` points tracing the
    minimum and the maximum of ``y`` over ``max_points // 2`` consecutive bins, at the bins' centres."""
    y = np.asarray(y)
    if len(y) <= max_points:
        return t, y
    starts = np.linspace(0, len(y), max_points // 2 + 1).astype(np.int64)
    lo, hi = np.minimum.reduceat(y, starts[:-1]), np.maximum.reduceat(y, starts[:-1])
    centre = (t[starts[:-1]] + t[starts[1:] - 1]) / 2
    return np.repeat(centre, 2), np.stack([lo, hi], 1).ravel()


def _as_segments(items, with_score: bool) -> list[tuple]:
    out = []
    for it in items or []:
        if isinstance(it, Mapping):
            out.append((float(it["start"]), float(it["end"]), it["label"], float(it.get("score", 1.0))))
        else:
            it = tuple(it)
            out.append((float(it[0]), float(it[1]), it[2], float(it[3]) if with_score and len(it) > 3 else 1.0))
    return out


def plot_video(path_png: str, tcam: np.ndarray, attention: np.ndarray | None, gt_segments, pred_segments,
               feature_rate: float, class_names: Sequence[str], *, title: str | None = None,
               max_classes: int = 5, smooth: int = 0, max_predictions: int = MAX_PREDICTIONS) -> str:
    """Draw the T-CAM (top panel, one line per shown class), the attention (dashed, right axis) and the
    ground-truth / predicted segments (bottom panel, one row pair per shown class) of one video to a PNG.

    tcam: [T, C]; attention: [T] or None; gt_segments: (start, end, label) tuples or dicts with those keys;
    pred_segments: (start, end, label, score) tuples or dicts (video, label, start, end, score); labels are
    class indices or names; times in seconds. Shown classes: those in the ground truth and predictions,
    then the most activated, up to ``max_classes``. ``smooth`` > 1: the T-CAM and the attention are drawn
    after the moving average of ``smooth`` segments that :func:`~train.eval.proposals.tcam_proposals`
    applies with the same argument (solid), the raw curves faint behind them. Returns ``path_png``.

    The cost is bounded whatever the video's length: curves longer than :data:`MAX_POINTS` segments are
    drawn as their envelope (:func:`envelope`), and each shown class gets its ``max_predictions`` best
    predictions (the legend says how many there were).
    """
    from .proposals import smooth_sequence, smoothing_weights
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tcam = np.asarray(tcam, dtype=np.float64)
    if tcam.ndim != 2:
        raise ValueError(f"plot_video: tcam must be [T, C], got shape {tcam.shape}")
    names = list(class_names)
    if len(names) != tcam.shape[1]:
        raise ValueError(f"plot_video: {len(names)} class names for a T-CAM with {tcam.shape[1]} classes")
    try:
        smoothing_weights(smooth)
    except ValueError:
        raise ValueError(f"plot_video: smooth must be an integer >= 0 (segments), got {smooth!r}") from None
    smoothed = smooth > 1
    raw_tcam = tcam
    if smoothed:
        tcam = smooth_sequence(tcam, smooth)

    def index(label):
        if isinstance(label, str):
            if label not in names:
                raise ValueError(f"plot_video: unknown class {label!r}; known: {names}")
            return names.index(label)
        return int(label)

    gts = [(s, e, index(l), sc) for s, e, l, sc in _as_segments(gt_segments, False)]
    preds = [(s, e, index(l), sc) for s, e, l, sc in _as_segments(pred_segments, True)]
    shown: list[int] = []
    for c in [g[2] for g in gts] + [p[2] for p in sorted(preds, key=lambda p: -p[3])] + \
            list(np.argsort(-tcam.max(axis=0))):
        if int(c) not in shown and len(shown) < max_classes:
            shown.append(int(c))
    t = (np.arange(tcam.shape[0]) + 0.5) / feature_rate
    end_time = max([tcam.shape[0] / feature_rate] + [g[1] for g in gts] + [p[1] for p in preds])
    colors = plt.get_cmap("tab10")

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(12, 3.2 + 0.55 * len(shown)), sharex=True,
                                  gridspec_kw={"height_ratios": [3, max(1.2, 0.55 * len(shown))]})
    for k, c in enumerate(shown):
        if smoothed:
            ax.plot(*envelope(t, raw_tcam[:, c]), color=colors(k % 10), lw=0.7, alpha=0.35)
        ax.plot(*envelope(t, tcam[:, c]), color=colors(k % 10), lw=1.3, label=names[c])
    ax.set_ylabel(f"T-CAM (moving average of {smooth}; faint: raw)" if smoothed else "T-CAM")
    ax.set_xlim(0, end_time)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if attention is not None:
        att = np.asarray(attention, dtype=np.float64).ravel()
        if att.shape != (tcam.shape[0],):
            raise ValueError(f"plot_video: attention must have T={tcam.shape[0]} entries, got {att.shape}")
        axr = ax.twinx()
        if smoothed:
            axr.plot(*envelope(t, att), color="black", ls="--", lw=0.7, alpha=0.35)
            att = smooth_sequence(att, smooth)
        line, = axr.plot(*envelope(t, att), color="black", ls="--", lw=1.2, label="attention")
        axr.set_ylim(-0.02, 1.05)
        axr.set_ylabel("attention / max")
        handles.append(line)
        labels.append("attention")
    ax.legend(handles, labels, loc="upper right", fontsize=8, ncol=min(6, len(labels)))
    if title:
        ax.set_title(title)

    max_score = max([p[3] for p in preds] + [1e-12])
    min_score = min([p[3] for p in preds] + [0.0])
    yticks, ylabels = [], []
    left_out = 0
    for k, c in enumerate(shown):
        row = len(shown) - 1 - k  # first shown class on top
        y_gt, y_pr = 2 * row + 1, 2 * row
        color = colors(k % 10)
        mine = [(s, e - s) for s, e, lc, _ in gts if lc == c]
        if mine:
            ax2.broken_barh(mine, (y_gt + 0.1, 0.8), facecolors=color)
        theirs = sorted((p for p in preds if p[2] == c), key=lambda p: -p[3])
        left_out += max(0, len(theirs) - max_predictions)
        theirs = theirs[:max_predictions]
        if theirs:
            shades = [(*color[:3], 0.25 + 0.75 * (sc - min_score) / max(max_score - min_score, 1e-12))
                      for _, _, _, sc in theirs]
            ax2.broken_barh([(s, e - s) for s, e, _, _ in theirs], (y_pr + 0.1, 0.8), facecolors=shades,
                            edgecolor="black", linewidth=0.4)
        yticks += [y_gt + 0.5, y_pr + 0.5]
        ylabels += [f"GT {names[c]}", f"pred {names[c]}"]
    from matplotlib.patches import Patch
    legend = [Patch(facecolor="0.35", label="ground truth")]
    if preds:
        legend += [Patch(facecolor="0.35", alpha=0.25, edgecolor="black", linewidth=0.4,
                         label=f"prediction, score {min_score:.2f} (lightest)"),
                   Patch(facecolor="0.35", alpha=1.0, edgecolor="black", linewidth=0.4,
                         label=f"prediction, score {max_score:.2f} (darkest)")]
    if left_out:
        legend.append(Patch(facecolor="none", edgecolor="none",
                            label=f"(best {max_predictions} per class drawn, {left_out} more not)"))
    ax2.legend(handles=legend, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    ax2.set_yticks(yticks)
    ax2.set_yticklabels(ylabels, fontsize=8)  # one tick per row, in the order drawn
    ax2.set_ylim(0, 2 * max(1, len(shown)))
    ax2.set_xlabel("time (s)")
    ax2.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path_png)), exist_ok=True)
    fig.savefig(path_png, dpi=110)
    plt.close(fig)
    return path_png


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    from ..common import names
    from ..common.parsing import OneLineParser, non_negative_int
    ap = OneLineParser(prog=names.module("eval.plot"), description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cam", required=True,
                    help="npz with tcam [T, C] (or tcam/<video>, as a run's cams.npz), optional attention, "
                         "feature_rate, classes")
    ap.add_argument("--ground-truth", required=True, help="ActivityNet ground-truth JSON")
    ap.add_argument("--predictions", help="ActivityNet results JSON (optional)")
    ap.add_argument("--video", required=True, help="video name")
    ap.add_argument("--out", required=True, help="output PNG path")
    ap.add_argument("--top-k", type=non_negative_int, default=10,
                    help="plot at most this many predictions (best first)")
    ap.add_argument("--smooth", type=non_negative_int, default=None,
                    help="draw the T-CAM and attention after a moving average of this many segments (0: raw; "
                         "default: the evaluation's eval.smooth recorded in --cam, else 0)")
    args = ap.parse_args(argv)
    try:
        return _plot(ap, args)
    except (FileNotFoundError, ValueError) as exc:  # a file that cannot be read: one line, naming it
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


def _plot(ap, args) -> int:
    from ..data.activitynet import read_ground_truth_json, read_predictions_json
    if not os.path.isfile(args.cam):
        ap.error(f"--cam: file not found: {args.cam}")
    try:
        z = np.load(args.cam, allow_pickle=False)
    except Exception as exc:  # numpy raises many types for a file that is not an npz
        raise ValueError(f"--cam {args.cam}: cannot read it as an .npz file ({str(exc).splitlines()[0]})") from None
    with z:
        if "tcam" in z:
            tcam, attention = z["tcam"], (z["attention"] if "attention" in z else None)
        elif f"tcam/{args.video}" in z:
            tcam = z[f"tcam/{args.video}"]
            attention = z[f"attention/{args.video}"] if f"attention/{args.video}" in z else None
        else:
            held = sorted(k[len("tcam/"):] for k in z.files if k.startswith("tcam/"))
            if held:
                ap.error(f"--cam {args.cam} has no T-CAM of video {args.video!r}; it holds {len(held)} videos: "
                         f"{', '.join(held[:5])}{', ...' if len(held) > 5 else ''}")
            ap.error(f"--cam {args.cam}: no 'tcam' array (found {sorted(z.files)})")
        if attention is not None:
            attention = attention / max(float(np.max(attention)), 1e-12) if attention.size else attention
        rate = float(z["feature_rate"]) if "feature_rate" in z else 25 / 16
        classes = [str(c) for c in z["classes"]] if "classes" in z else None
        smooth = args.smooth if args.smooth is not None else int(z["smooth"]) if "smooth" in z else 0
    gt = read_ground_truth_json(args.ground_truth)
    if args.video not in gt.videos:
        ap.error(f"--video {args.video!r} is not in {args.ground_truth}")
    classes = classes or gt.classes
    gts = [g for g in gt.entries if g["video"] == args.video]
    preds = []
    if args.predictions:
        preds = sorted((p for p in read_predictions_json(args.predictions) if p["video"] == args.video),
                       key=lambda p: -p["score"])[:args.top_k]
    plot_video(args.out, tcam, attention, gts, preds, rate, classes, title=args.video, smooth=smooth)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
