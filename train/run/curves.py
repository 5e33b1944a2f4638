"""``curves.png``: the loss terms of a run against the global step, one panel per term, and the test mAP at
every evaluation, from ``metrics.jsonl``."""
from __future__ import annotations

import json
from pathlib import Path

# The loss panels of curves.png: (term, title). Terms are as logged (both streams, before their weight).
CURVE_PANELS = (("total", "total loss (weighted sum)"), ("clf", "L_clf (both streams)"),
                ("cc", "L_cc (both streams, before cc.weight)"), ("topk_mil", "top-k MIL (before its weight)"),
                ("sparsity", "attention sparsity (before its weight)"), ("casl", "co-activity (before its weight)"))
CURVE_COLUMNS = 3  # panels per row


def curves_figure(metrics: Path):
    """The figure of :func:`plot_curves` (None when ``metrics`` holds neither losses nor evaluations)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    rows = [json.loads(line) for line in open(metrics)]
    train = [r for r in rows if r.get("kind") == "train"]
    evals = sorted((r for r in rows if r.get("kind") == "eval" and "cls_map" in r), key=lambda r: r["step"])
    if not train and not evals:
        return None
    logged = set().union(*(r.keys() for r in train)) if train else set()
    panels = [(k, title) for k, title in CURVE_PANELS if k in logged]
    count = len(panels) + bool(evals)
    columns = min(CURVE_COLUMNS, count)
    lines = -(-count // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(4.2 * columns, 3.0 * lines), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[count:]:
        ax.remove()
    stages = list(dict.fromkeys(r["stage"] for r in train))
    for ax, (k, title) in zip(flat, panels):
        for i, stage in enumerate(stages):
            pts = [(r["step"], r[k]) for r in train if r["stage"] == stage and k in r]
            if pts:
                ax.plot(*zip(*pts), label=stage, color=f"C{i % 10}")
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    if panels:
        flat[0].legend(fontsize=7, title="stage", title_fontsize=7)
    if evals:
        ax = flat[count - 1]
        steps = [r["step"] for r in evals]
        for key, label, style in (("cls_map", "cls", "o-"), ("det_map_avg", "det avg", "s-")):
            ax.plot(steps, [100 * r.get(key, float("nan")) for r in evals], style, label=label, ms=4)
        if any("cls_map_select" in r for r in evals):
            ax.plot(steps, [100 * r.get("cls_map_select", float("nan")) for r in evals], "^--", ms=4,
                    label="cls* (selection)")
        ax.set_title("test mAP", fontsize=9)
        ax.set_ylabel("mAP (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in flat[:count]:
        ax.set_xlabel("global step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no half steps on short runs
    fig.tight_layout()
    return fig


def plot_curves(metrics: Path, out: Path) -> None:
    """Loss terms against the global step, one panel per term (three to a row), one colour per stage;
    and, where evaluations were logged, a last panel with the test mAP (classification and detection
    average)."""
    import matplotlib.pyplot as plt
    fig = curves_figure(metrics)
    if fig is None:
        return
    fig.savefig(out, dpi=100)
    plt.close(fig)
