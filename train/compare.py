"""``python -m train compare``: variants of the exemplar stages against a same-batch control, over seeds.

Per seed, stage 1 (the baseline) is trained once. Every variant then continues from that checkpoint:
the same model, optimizer state and step counter, and (since the batch and dropout of step ``t`` of
stage ``i`` derive from ``(seed, i, t)``) the same batches in every later stage. The control is the
variant ``control`` (``cc.weight: 0``): the same stages and steps without the exemplar loss. It is
always included. A variant that also changes stage 1 (any key outside :data:`AFTER_STAGE1`, e.g.
``data.standardize`` or ``model.dropout``) gets a stage 1 of its own, still on the same seed's batches.
A variant whose training equals that of a finished run of the same seed in the folder (they differ in
evaluation settings only, :data:`EVALUATION_ONLY`: ``eval.*`` and the test-time selection ``cc.k``,
``cc.select_by``, ``cc.select_top_classes``) is not trained again: that run's final checkpoint is
evaluated with the variant's settings.

Per variant and metric the table gives the mean and standard deviation over seeds, and the paired
difference from the control (variant minus control, per seed) with its 95 % confidence interval
(Student's t over the seeds); ``against`` names another row to take the differences from. ``peers``
adds rows that were not trained here, e.g. W-TALC's own code from ``benchmarks/peer_wtalc.py`` (its
``results.json``, one result per seed): they are paired with the variants by seed, which for a peer (other
code, other random streams) is a comparison of two samples of seeds, valid but not variance-reducing.
``metrics`` chooses the columns (:func:`parse_metrics`). Results are bitwise reproducible at a fixed thread count
(``run.threads``) and differ slightly between thread counts.

Folder layout (``--out``)::

    compare.yaml             a record of the base config, variants and seeds
    seed-<s>/stage1/         stage 1 of seed s (a normal run folder); stage1-<hash>/ for variants
                             that change stage 1
    seed-<s>/<variant>/      each variant's run folder, started from its stage 1's last checkpoint
    results.json             every run's results per seed and variant, and the summary
    table.txt, compare.png   the summary as a table and a plot

Every run folder checkpoints as ``python -m train fit`` does, so a killed comparison rerun with the same
command continues where it stopped and ends with the same table. A finished run is reused by any
comparison in the same folder that asks for the same config (it checks; a stage-1 run serves every
config with the same stage 1), so comparisons of other exemplar settings can share the stage-1 runs.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from . import interrupt
from .config import (ConfigError, _merge_yaml, check_against_data, flatten, load_yaml, resolve_subsets,
                     validate)
from .runlock import LOCK_FILE, RunFolderLock

log = logging.getLogger("train")

CONTROL = "control"
# Keys that act only after stage 1: variants that differ in nothing else share one stage 1.
AFTER_STAGE1 = ("cc.", "train.cc_steps", "train.reset_optimizer", "train.eval_every", "eval.", "name", "run.")
FIXED = ("seed", "run.")  # a comparison sets these itself
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


def parse_variants(tree) -> dict[str, dict]:
    """``{name: {dotted key: value}}`` from a mapping of names to (nested or dotted) overrides."""
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"variants: expected a mapping 'name: {{key: value, ...}}', got "
                          f"{type(tree).__name__}")
    out = {}
    for name, over in tree.items():
        name = str(name)
        if not name or "/" in name or name.startswith((".", "stage1")):
            raise ConfigError(f"variant name {name!r}: expected a plain folder name not starting with "
                              f"'stage1'")
        if over is None:
            over = {}
        if not isinstance(over, dict):
            raise ConfigError(f"variant '{name}': expected a mapping of config keys, got {over!r}")
        flat = flatten(over)
        for key in flat:
            if key.startswith(FIXED):
                raise ConfigError(f"variant '{name}': key '{key}' is set by the comparison (seeds with "
                                  f"--seeds, run.* on the command line)")
        out[name] = flat
    return out


def variant_config(base: dict, overrides: dict, seed: int) -> dict:
    """The base config with a variant's overrides and the seed, validated."""
    cfg = copy.deepcopy(base)
    cfg["seed"] = seed
    tree: dict = {}
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    _merge_yaml(cfg, tree, "variant")
    return validate(cfg)


def stage1_config(base: dict, overrides: dict, seed: int) -> dict:
    """The config of a stage-1 run: the variant's, with ``cc.*`` at its defaults and no rounds (stage 1
    reads none of them), so that comparisons with other exemplar settings can share the run."""
    from .config import DEFAULTS
    cfg = variant_config(base, overrides, seed)
    cfg["cc"] = {**copy.deepcopy(DEFAULTS["cc"]), "rounds": 0}
    Comparison._quiet(cfg)
    return validate(cfg)


def _digest(cfg: dict, ignore: tuple) -> str:
    import hashlib
    kept = {k: v for k, v in flatten(cfg).items() if not k.startswith(ignore)}
    return hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]


def stage1_id(cfg: dict) -> str:
    """A digest of everything in ``cfg`` that stage 1 depends on (all but :data:`AFTER_STAGE1`)."""
    return _digest(cfg, AFTER_STAGE1)


# Keys that act only at evaluation: variants that differ in nothing else share one trained run.
EVALUATION_ONLY = ("eval.", "run.", "name", "cc.select", "cc.k", "cc.select_by", "cc.select_top_classes")


def training_id(cfg: dict) -> str:
    """A digest of everything in ``cfg`` that training depends on (all but :data:`EVALUATION_ONLY`)."""
    return _digest(cfg, EVALUATION_ONLY)


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
    """The summary as a fixed-width table (all in %); metrics no row has are left out."""
    metrics = _measured(summary, metrics)
    def pct(v):
        return "-" if v is None or not math.isfinite(v) else f"{100 * v:.1f}"

    rows = []
    for name, row in summary.items():
        cells = [name]
        for key, _ in metrics:
            e = row[key]
            cells.append(f"{pct(e['mean'])} ± {pct(e['std'])}")
            if "diff" in e:
                lo, hi = e["ci95"]
                ci = f"{100 * e['diff']:+.1f}"
                if math.isfinite(lo):
                    ci += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" + ("*" if lo > 0 or hi < 0 else "")
                cells.append(ci)
            else:
                cells.append("")
        rows.append(cells)
    head = ["variant"] + [h for _, label in metrics for h in (label, "Δ [95% CI]")]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    def line(cells):
        return " | ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [line(head), "-+-".join("-" * w for w in widths)] + [line(r) for r in rows]
    out.append(f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({', '.join(map(str, seeds))}), "
               f"{threads} thread(s). mean ± sd over "
               f"seeds; Δ: paired difference from '{against}' with its 95 % t-interval (* excludes 0). "
               "cls: classification mAP; cls*: with test-time selection; det@t, det avg: detection "
               "mAP at tIoU t and averaged over eval.tiou (all %).")
    return "\n".join(out)


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


class Comparison:
    """Stage 1 once per seed, then every variant from it (see the module docstring).

    Args:
        base: the validated base config (its ``cc.*`` are what a variant without overrides runs).
        variants: ``{name: {dotted key: value}}``; ``control`` is added (``cc.weight: 0``) if absent.
        seeds: the seeds; each gets its own stage 1.
        out: the comparison's folder.
        peers: ``{name: {seed: results}}``, rows not trained here (:func:`load_peer`).
        against: the row the differences are taken from (default the control).
        metrics: the summary's columns (:func:`parse_metrics`).
    """

    def __init__(self, base: dict, variants: dict[str, dict], seeds: list[int], out: str | Path,
                 peers: dict | None = None, against: str = CONTROL, metrics: tuple = METRICS):
        if not seeds:
            raise ConfigError("compare: expected at least one seed, got none")
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"compare: seeds must not repeat, got {seeds}")
        if base["cc"]["rounds"] < 1:
            raise ConfigError("config key 'cc.rounds': compare needs at least one exemplar round, got 0")
        self.base = base
        self.variants = {CONTROL: {"cc.weight": 0.0}, **{k: v for k, v in variants.items() if k != CONTROL}}
        if CONTROL in variants:
            weight = variants[CONTROL].get("cc.weight", 0.0)
            if weight != 0:
                raise ConfigError(f"variant '{CONTROL}': the control trains without the exemplar loss "
                                  f"(cc.weight 0), got cc.weight {weight!r}; give this variant another name")
            self.variants[CONTROL] = {**variants[CONTROL], "cc.weight": 0.0}
        self.seeds = list(seeds)
        self.out = Path(out)
        self.peers = dict(peers or {})
        self.against, self.metrics = against, metrics
        clash = set(self.peers) & set(self.variants)
        if clash:
            raise ConfigError(f"compare: peer name(s) {', '.join(sorted(clash))} are also variant names")
        if against not in self.variants and against not in self.peers:
            raise ConfigError(f"--against: expected a variant or peer name ({', '.join([*self.variants, *self.peers])}), "
                              f"got {against!r}")
        for name, over in self.variants.items():  # fail before any training
            try:
                variant_config(base, over, self.seeds[0])
            except ConfigError as exc:
                raise ConfigError(f"variant '{name}': {exc}") from None
        self.dataset = None
        self._ids: dict = {}  # run folder -> training_id, of finished runs seen
        self.runs = 0    # runs the last run() went through (stage 1 and variants)
        self.reused = 0  # of those, finished runs found in the folder and not trained or evaluated again

    def _manifest(self) -> dict:
        cfg = copy.deepcopy(self.base)
        cfg["run"] = {"threads": cfg["run"]["threads"]}  # progress bars and the like may change
        return {"config": cfg, "variants": self.variants, "seeds": self.seeds}

    def _check_folder(self) -> None:
        """Record what this comparison runs in ``compare.yaml`` (merged with an earlier record there).
        Every run folder checks its own config when it is reused, so a folder can be shared by
        comparisons whose runs agree."""
        path = self.out / "compare.yaml"
        self.out.mkdir(parents=True, exist_ok=True)
        manifest = yaml.safe_load(yaml.safe_dump(self._manifest(), sort_keys=False))
        if path.exists():
            saved = yaml.safe_load(path.read_text())
            manifest["variants"] = {**saved["variants"], **manifest["variants"]}
            manifest["seeds"] = sorted(set(saved["seeds"]) | set(self.seeds))
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(manifest, sort_keys=False))
        tmp.replace(path)

    def _run(self, cfg: dict, run_dir: Path, start: dict | None, start_path: Path | None = None):
        """Train ``cfg`` in ``run_dir`` to its end (resuming it if it was started) and return its
        results; ``start`` is the stage-1 checkpoint a variant begins from (read from ``start_path``)."""
        with RunFolderLock(run_dir):
            return self._run_locked(cfg, run_dir, start, start_path)

    def _run_locked(self, cfg: dict, run_dir: Path, start: dict | None, start_path: Path | None):
        from .procedure import Trainer
        from .config import from_dict
        if (run_dir / ckpt.LATEST).exists():
            state = ckpt.load(run_dir / ckpt.LATEST)
            saved = from_dict(state["config"])
            same = stage1_id(saved) == stage1_id(cfg) if start is None else saved == cfg
            if not same:  # a stage-1 run serves every config with the same stage 1
                diff = [k for k, v in flatten(cfg).items() if flatten(saved).get(k) != v]
                raise ConfigError(f"compare: {run_dir} holds a run with another config ({', '.join(diff)}); "
                                  f"remove it or choose another --out")
            if (run_dir / "results.json").exists():  # written when a run has finished
                self.reused += 1
                return state["results"]
            trainer = Trainer.resume(run_dir, self.dataset, state=state, source=run_dir / ckpt.LATEST)
        else:
            trainer = Trainer(cfg, run_dir, self.dataset)
            if start is not None:
                trainer.load_state_dict(start, source=start_path)
                trainer.metrics_offset = 0
                trainer.step = 0
        return trainer.run()

    def run(self, fresh: bool = False) -> dict:
        """Train whatever is missing, then write and return the summary. ``fresh``: delete what the
        folder holds first (under its lock, so never under a comparison that runs there)."""
        with RunFolderLock(self.out):
            if fresh:
                for p in self.out.iterdir():
                    if p.name != LOCK_FILE:
                        shutil.rmtree(p) if p.is_dir() else p.unlink()
            return self._run_all()

    def _run_all(self) -> dict:
        from .context import open_dataset
        self.reused, self.runs = 0, 0
        self._check_folder()
        self.dataset = open_dataset(self.base)
        configs = {v: variant_config(self.base, over, self.seeds[0]) for v, over in self.variants.items()}
        for name, cfg in configs.items():  # checks that need the data, before any training
            try:
                check_against_data(cfg, self.dataset, *resolve_subsets(cfg, self.dataset))
            except ConfigError as exc:
                raise ConfigError(f"variant '{name}': {exc}") from None
        base_id = stage1_id(variant_config(self.base, {}, self.seeds[0]))
        stage1 = {}  # stage-1 folder name -> the overrides of the first variant that needs it
        for v, cfg in configs.items():
            sid = stage1_id(cfg)
            stage1.setdefault("stage1" if sid == base_id else f"stage1-{sid}", self.variants[v])
        folder_of = {v: "stage1" if stage1_id(cfg) == base_id else f"stage1-{stage1_id(cfg)}"
                     for v, cfg in configs.items()}
        jobs = [(s, f, None) for s in self.seeds for f in stage1] + \
               [(s, folder_of[v], v) for s in self.seeds for v in self.variants]
        results = {v: {} for v in self.variants}
        with tqdm(jobs, desc="compare", unit="run", dynamic_ncols=True,
                  disable=not self.base["run"]["progress"]) as bar:  # closed before an interruption is reported
            self._jobs(bar, stage1, folder_of, results)
        results.update(self.peers)
        summary = summarize(results, self.seeds, self.against, self.metrics)
        threads = self.base["run"]["threads"]
        table = format_summary(summary, self.seeds, threads, self.against, self.metrics)
        payload = {"seeds": self.seeds, "threads": threads, "variants": self.variants,
                   "peers": sorted(self.peers), "against": self.against,
                   "results": {v: {str(s): r for s, r in per.items()} for v, per in results.items()},
                   "summary": summary}
        (self.out / "results.json").write_text(json.dumps(payload, indent=1))
        (self.out / "table.txt").write_text(table + "\n")
        try:
            plot_summary(summary, self.out / "compare.png", self.against, self.metrics)
        except Exception as exc:  # a figure is never a reason to lose a finished comparison
            log.warning("could not draw the comparison: %s", exc)
        return {"summary": summary, "table": table, "results": results}

    def _jobs(self, bar, stage1: dict, folder_of: dict, results: dict) -> None:
        """Every stage-1 run, then every variant's run, in the order of ``bar``'s jobs."""
        for seed, s1, variant in bar:
            interrupt.check()
            bar.set_postfix_str(f"seed {seed} {variant or s1}")
            self.runs += 1
            folder = self.out / f"seed-{seed}"
            if variant is None:
                cfg = stage1_config(self.base, stage1[s1], seed)
                res = self._run(cfg, folder / s1, None)
                log.info("seed %d %s: cls %.1f, det avg %.1f", seed, s1, 100 * res["baseline"]["cls_map"],
                         100 * res["baseline"]["det_map_avg"])
                continue
            cfg = variant_config(self.base, self.variants[variant], seed)
            self._quiet(cfg)
            trained = None if (folder / variant / ckpt.LATEST).exists() else \
                self._trained_like(folder, training_id(cfg), exclude=variant)
            if trained is not None:
                res = self._evaluate(cfg, trained, folder / variant)
            else:
                start = ckpt.load(folder / s1 / ckpt.LATEST)
                res = self._run(cfg, folder / variant, start, folder / s1 / ckpt.LATEST)
            final = res[[k for k in res if k != "baseline"][-1]]
            results[variant][seed] = final
            log.info("seed %d %s: cls %.1f, cls* %.1f, det avg %.1f", seed, variant, 100 * final["cls_map"],
                     100 * final.get("cls_map_select", math.nan), 100 * final["det_map_avg"])

    def _trained_like(self, folder: Path, tid: str, exclude: str) -> Path | None:
        """A finished, trained run in ``folder`` (one seed's) whose training equals ``tid``
        (:func:`training_id`), if any; first in name order."""
        from .config import from_dict
        for run in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("stage1")):
            if run.name == exclude or not (run / "results.json").exists() or not (run / ckpt.LATEST).exists():
                continue
            if run not in self._ids:
                self._ids[run] = training_id(from_dict(ckpt.load(run / ckpt.LATEST)["config"]))
            if self._ids[run] == tid:
                return run
        return None

    def _evaluate(self, cfg: dict, trained: Path, run_dir: Path) -> dict:
        """The final checkpoint of the finished run in ``trained`` evaluated with ``cfg``'s evaluation
        settings, into ``run_dir/results.json`` (the same form as a trained run's)."""
        with RunFolderLock(run_dir):
            return self._evaluate_locked(cfg, trained, run_dir)

    def _evaluate_locked(self, cfg: dict, trained: Path, run_dir: Path) -> dict:
        from .procedure import Trainer
        done = run_dir / "results.json"
        if done.exists():
            self.reused += 1
            results = json.loads(done.read_text())
            results.pop("evaluated_from", None)
            return results
        state = ckpt.load(trained / ckpt.LATEST)
        trainer = Trainer(cfg, run_dir, self.dataset)
        trainer.load_state_dict(state, source=trained / ckpt.LATEST)
        results = dict(state["results"])
        results[trainer.plan[-1][0]] = trainer.evaluate(progress=False)
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / "results.json.tmp"
        tmp.write_text(json.dumps({**results, "evaluated_from": trained.name}, indent=2))
        tmp.replace(done)
        return results

    @staticmethod
    def _quiet(cfg: dict) -> None:
        """Inner runs: no per-run bars or TensorBoard (the comparison reports progress itself)."""
        cfg["run"]["progress"] = False
        cfg["run"]["tensorboard"] = False


def load_variants(path: str | None, inline: list[str]) -> dict[str, dict]:
    """Variants from a YAML file (``name: {key: value}``) and ``--variant 'name: {key: value}'``."""
    tree = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"variants file not found: {path}")
        try:
            tree.update(load_yaml(p.read_text()) or {})
        except yaml.YAMLError as exc:
            raise ConfigError(f"variants file {path}: invalid YAML ({exc})") from None
    for text in inline:
        try:
            item = load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--variant {text!r}: invalid YAML ({exc})") from None
        if not isinstance(item, dict) or len(item) != 1:
            raise ConfigError(f"--variant {text!r}: expected 'name: {{key: value, ...}}'")
        tree.update(item)
    return parse_variants(tree)

