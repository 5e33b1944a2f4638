"""The summary of a comparison (train/compare/summary.py): the statistics by hand, the table's wording, the
figure's axes."""
import math

import pytest

from train.compare import CONTROL, summarize


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


def test_the_table_explains_only_the_columns_it_shows():
    """cls* exists only with cc.select and the 95 % interval only with two seeds or more: each is shown, and
    explained under the table, only where it is there."""
    from train.compare import format_summary
    plain = {CONTROL: {s: {"cls_map": 0.5 + s / 100, "det_map_avg": 0.3} for s in (0, 1)},
             "v": {s: {"cls_map": 0.52, "det_map_avg": 0.31 + s / 100} for s in (0, 1)}}
    table = format_summary(summarize(plain, [0, 1]), [0, 1], threads=1)
    head, note = table.splitlines()[0], table.splitlines()[-1]
    assert [h.strip() for h in head.split("|")] == ["variant", "cls", "Δ [95% CI]", "det avg", "Δ [95% CI]"]
    assert "cls*" not in table and "selection" not in note and "det@t" not in note
    assert note.endswith("mean ± sd over seeds; Δ: paired difference from 'control' with its 95 % t-interval "
                         "(* excludes 0). cls: classification mAP; det avg: detection mAP averaged over eval.tiou "
                         "(all %).")
    selected = {name: {s: {**r, "cls_map_select": r["cls_map"] - 0.1} for s, r in per.items()}
                for name, per in plain.items()}
    table = format_summary(summarize(selected, [0, 1]), [0, 1], threads=1)
    assert [h.strip() for h in table.splitlines()[0].split("|")][1:4] == ["cls", "Δ [95% CI]", "cls*"]
    assert "cls: classification mAP; cls*: with test-time selection; det avg:" in table.splitlines()[-1]
    one = {name: {0: per[0]} for name, per in plain.items()}
    table = format_summary(summarize(one, [0]), [0], threads=1)
    head, note = table.splitlines()[0], table.splitlines()[-1]
    assert [h.strip() for h in head.split("|")] == ["variant", "cls", "Δ", "det avg", "Δ"]
    assert "95" not in table and "interval (*" not in note and "[" not in table
    assert note.startswith("1 seed (0), 1 thread(s). one seed: no sd and no interval; Δ: difference from 'control'.")


def test_a_row_without_a_metric_shows_a_dash_not_nan():
    """A variant evaluated at fewer tIoUs than the reference row has no det@0.7: its cells are dashes."""
    from train.compare import format_summary
    results = {CONTROL: {s: {"cls_map": 0.5, "det_map@0.7": 0.2 + s / 100} for s in (0, 1)},
               "short": {s: {"cls_map": 0.5} for s in (0, 1)}}
    metrics = (("cls_map", "cls"), ("det_map@0.7", "det@0.7"))
    table = format_summary(summarize(results, [0, 1], metrics=metrics), [0, 1], threads=1, metrics=metrics)
    row = next(line for line in table.splitlines() if line.startswith("short"))
    assert "nan" not in table
    assert [c.strip() for c in row.split("|")][3:] == ["- ± -", "-"]
