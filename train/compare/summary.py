"""The summary of a comparison: per variant and metric the mean and standard deviation over seeds, and
the paired difference from the control (or the row ``against``) with its 95 % t-interval; the table and the
figure of it; the rows of peers (code not trained here, e.g. ``benchmarks/peer_wtalc.py``)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..config import ConfigError

CONTROL = "control"
# The summary's metrics: (results key, column label).
METRICS = (("cls_map", "cls"), ("cls_map_select", "cls*"), ("det_map@0.5", "det@0.5"),
           ("det_map_avg", "det avg"))


def parse_metrics(names: list[str]) -> tuple:
    """Columns of the summary from their labels: ``cls``, ``cls*``, ``det@<tIoU>`` (e.g. ``det@0.7``),
    ``det-avg``; ``det@all`` stands for ``det@0.1`` ... ``det@0.7``."""
    out = []
    for name in names:
        if name == "cls":
            out.append(("cls_map", "cls"))
        elif name == "cls*":
            out.append(("cls_map_select", "cls*"))
        elif name in ("det-avg", "det_avg", "det avg"):
            out.append(("det_map_avg", "det avg"))
        elif name == "det@all":
            out += [(f"det_map@{t / 10:g}", f"det@{t / 10:g}") for t in range(1, 8)]
        elif name.startswith("det@"):
            try:
                t = float(name[4:])
            except ValueError:
                t = math.nan
            if not 0 < t < 1:
                raise ConfigError(f"--metrics: expected det@<tIoU in (0, 1)>, got {name!r}")
            out.append((f"det_map@{t:g}", f"det@{t:g}"))
        else:
            raise ConfigError(f"--metrics: unknown metric {name!r}; expected cls, cls*, det@<tIoU>, det@all "
                              f"or det-avg")
    if not out:
        raise ConfigError("--metrics: expected at least one metric")
    return tuple(out)


def summarize(results: dict, seeds: list[int], against: str = CONTROL, metrics: tuple = METRICS) -> dict:
    """Per variant and metric: mean, std over seeds, and the paired difference from the row ``against``
    (the control by default) with its 95 % interval. ``results[variant][seed]`` are final-stage
    results."""
    from scipy import stats
    out = {}
    for name, per_seed in results.items():
        row = {}
        for key, _ in metrics:
            vals = np.array([per_seed[s].get(key, math.nan) for s in seeds], dtype=float)
            ctrl = np.array([results[against][s].get(key, math.nan) for s in seeds], dtype=float)
            diff = vals - ctrl
            n = len(seeds)
            entry = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if n > 1 else math.nan,
                     "values": vals.tolist()}
            if name != against:
                d_mean = float(np.mean(diff))
                if n > 1:
                    half = float(stats.t.ppf(0.975, n - 1) * np.std(diff, ddof=1) / math.sqrt(n))
                else:
                    half = math.nan
                entry.update({"diff": d_mean, "ci95": [d_mean - half, d_mean + half]})
            row[key] = entry
        out[name] = row
    return out


def _measured(summary: dict, metrics: tuple) -> tuple:
    """The metrics some row has a value for (cls* only exists with cc.select)."""
    return tuple((k, label) for k, label in metrics
                 if any(math.isfinite(row[k]["mean"]) for row in summary.values())) or metrics


def format_summary(summary: dict, seeds: list[int], threads: int, against: str = CONTROL,
                   metrics: tuple = METRICS) -> str:
    """The summary as a fixed-width table (all in %) with a footnote that explains what it shows; metrics
    no row has are left out, and so is the 95 % interval where there is none (one seed)."""
    metrics = _measured(summary, metrics)
    def pct(v):
        return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"

    interval = any(math.isfinite(row[k].get("ci95", [math.nan])[0]) for row in summary.values() for k, _ in metrics)
    rows = []
    for name, row in summary.items():
        cells = [name]
        for key, _ in metrics:
            e = row[key]
            cells.append(f"{pct(e['mean'])} ± {pct(e['std'])}")
            if "diff" in e:
                lo, hi = e["ci95"]
                ci = f"{100 * e['diff']:+.1f}" if math.isfinite(e["diff"]) else "-"  # a row without this metric
                if math.isfinite(lo):
                    ci += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" + ("*" if lo > 0 or hi < 0 else "")
                cells.append(ci)
            else:
                cells.append("")
        rows.append(cells)
    delta = "Δ [95% CI]" if interval else "Δ"
    head = ["variant"] + [h for _, label in metrics for h in (label, delta)]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    def line(cells):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    if len(seeds) == 1:
        spread = f"one seed: no sd and no interval; Δ: difference from '{against}'."
    elif interval:
        spread = (f"mean ± sd over seeds; Δ: paired difference from '{against}' with its 95 % t-interval "
                  "(* excludes 0).")
    else:
        spread = f"mean ± sd over seeds; Δ: paired difference from '{against}'."
    out.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}), "
               f"{threads} thread(s). {spread} {_legend(metrics)}")
    return "\n".join(out)


def _legend(metrics: tuple) -> str:
    """What the metric columns shown are, and only those."""
    labels = [label for _, label in metrics]
    parts = [text for label, text in (("cls", "cls: classification mAP"), ("cls*", "cls*: with test-time selection"))
             if label in labels]
    at, avg = any(label.startswith("det@") for label in labels), "det avg" in labels
    if at and avg:
        parts.append("det@t, det avg: detection mAP at tIoU t and averaged over eval.tiou")
    elif at:
        parts.append("det@t: detection mAP at tIoU t")
    elif avg:
        parts.append("det avg: detection mAP averaged over eval.tiou")
    return "; ".join(parts) + " (all %)."


MIN_SPAN = 5.0  # percentage points: the narrowest value axis of compare.png


def summary_figure(summary: dict, against: str = CONTROL, metrics: tuple = METRICS):
    """The figure of :func:`plot_summary`: per metric, each variant's seeds as dots and its mean as a
    bar, the mean of ``against`` (the control) as a line. The value axis spans the seeds' values, and at
    least :data:`MIN_SPAN` points, so that a difference far below the seeds' spread does not fill the
    panel."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(summary)
    metrics = _measured(summary, metrics)
    seeds = max(len(summary[n][metrics[0][0]]["values"]) for n in names)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 0.5 * len(names) + 1.8),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics):
        ctrl = summary[against][key]["mean"]
        shown = []
        for i, name in enumerate(names):
            vals = [100 * v for v in summary[name][key]["values"]]
            ax.scatter(vals, [i] * len(vals), s=12, color="C0", alpha=0.6)
            ax.scatter([100 * summary[name][key]["mean"]], [i], marker="|", s=200, color="k")
            shown += [v for v in vals if math.isfinite(v)]
        if math.isfinite(ctrl):
            ax.axvline(100 * ctrl, color="C3", lw=1, ls="--", label=f"{against} mean")
        if shown:
            lo, hi = min(shown), max(shown)
            half = max(0.55 * (hi - lo), MIN_SPAN / 2)
            left = max((lo + hi) / 2 - half, min(lo, 0.0))  # no room below 0 % unless a value is there
            ax.set_xlim(left, left + 2 * half)
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels(names if ax is axes[0][0] else [])
        ax.invert_yaxis()
        ax.set_title(label)
        ax.set_xlabel("mAP (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"{seeds} seed{'s' if seeds != 1 else ''}: dots are seeds, bars their mean"
                 + (" (one seed: no spread to judge a difference by)" if seeds == 1 else ""), fontsize=9)
    fig.tight_layout()
    return fig


def plot_summary(summary: dict, out: Path, against: str = CONTROL, metrics: tuple = METRICS) -> None:
    """Write :func:`summary_figure` to ``out``."""
    import matplotlib.pyplot as plt
    fig = summary_figure(summary, against, metrics)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def load_peer(path: str | Path, seeds: list[int]) -> tuple[str, dict]:
    """``(name, {seed: results})`` from a peer's ``results.json`` (``benchmarks/peer_wtalc.py``), checked
    to hold every seed of the comparison."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
        name, per_seed = str(data["peer"]), {int(s): r for s, r in data["results"].items()}
    except FileNotFoundError:
        raise ConfigError(f"--peer: file not found: {path}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"--peer {path}: expected a peer's results.json ('peer', 'results' per seed), "
                          f"could not read it ({exc})") from None
    missing = [s for s in seeds if s not in per_seed]
    if missing:
        raise ConfigError(f"--peer {path}: no result for seed(s) {', '.join(map(str, missing))} (it has "
                          f"{', '.join(map(str, sorted(per_seed))) or 'none'}); run the peer with those seeds")
    return name, {s: per_seed[s] for s in seeds}
