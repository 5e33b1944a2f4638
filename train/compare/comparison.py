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
import shutil
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from ..common import interrupt
from ..config import ConfigError, check_against_data, flatten, from_dict, resolve_subsets
from ..run import Run, RunFolder
from ..run import checkpoint as ckpt
from ..run.context import open_dataset
from ..run.lock import LOCK_FILE, RunFolderLock
from .summary import CONTROL, METRICS, format_summary, plot_summary, summarize
from .variants import quiet, stage1_config, stage1_id, training_id, variant_config

log = logging.getLogger("train")


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

    def _run(self, cfg: dict, run_dir: Path, stage1: Path | None = None) -> dict:
        """Train ``cfg`` in ``run_dir`` to its end (resuming it if it was started) and return its
        results; ``stage1``: the folder of the stage-1 run a variant continues (None: a stage-1 run)."""
        folder = RunFolder(run_dir)
        with folder.locked():
            state = folder.load_checkpoint()
            if state is not None:
                saved = from_dict(state["config"])
                same = stage1_id(saved) == stage1_id(cfg) if stage1 is None else saved == cfg
                if not same:  # a stage-1 run serves every config with the same stage 1
                    diff = [k for k, v in flatten(cfg).items() if flatten(saved).get(k) != v]
                    raise ConfigError(f"compare: {run_dir} holds a run with another config ({', '.join(diff)}); "
                                      f"remove it or choose another --out")
                if folder.finished:
                    self.reused += 1
                    return state["results"]
                run = Run.resume(folder, self.dataset, state=state)
            elif stage1 is None:
                run = Run.start(cfg, folder, self.dataset)
            else:
                run = Run.from_stage1(cfg, folder, stage1, self.dataset)
            with run:
                return run.train()

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
                res = self._run(cfg, folder / s1)
                log.info("seed %d %s: cls %.1f, det avg %.1f", seed, s1, 100 * res["baseline"]["cls_map"],
                         100 * res["baseline"]["det_map_avg"])
                continue
            cfg = variant_config(self.base, self.variants[variant], seed)
            quiet(cfg)
            trained = None if RunFolder(folder / variant).has_checkpoint() else \
                self._trained_like(folder, training_id(cfg), exclude=variant)
            if trained is not None:
                res = self._evaluate(cfg, trained, folder / variant)
            else:
                res = self._run(cfg, folder / variant, folder / s1)
            final = res[[k for k in res if k != "baseline"][-1]]
            results[variant][seed] = final
            # cls* only where it was computed (cc.select)
            star = f", cls* {100 * final['cls_map_select']:.1f}" if "cls_map_select" in final else ""
            log.info("seed %d %s: cls %.1f%s, det avg %.1f", seed, variant, 100 * final["cls_map"], star,
                     100 * final["det_map_avg"])

    def _trained_like(self, folder: Path, tid: str, exclude: str) -> Path | None:
        """A finished, trained run in ``folder`` (one seed's) whose training equals ``tid``
        (:func:`training_id`), if any; first in name order."""
        for run in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("stage1")):
            found = RunFolder(run)
            if run.name == exclude or not found.finished or not found.has_checkpoint():
                continue
            if run not in self._ids:
                self._ids[run] = training_id(from_dict(ckpt.load(found.latest)["config"]))
            if self._ids[run] == tid:
                return run
        return None

    def _evaluate(self, cfg: dict, trained: Path, run_dir: Path) -> dict:
        """The final checkpoint of the finished run in ``trained`` evaluated with ``cfg``'s evaluation
        settings, into ``run_dir/results.json`` (the same form as a trained run's)."""
        folder = RunFolder(run_dir)
        with folder.locked():
            if folder.finished:
                self.reused += 1
                results = folder.results()
                results.pop("evaluated_from", None)
                return results
            with Run.load(trained, cfg=cfg, folder=folder, dataset=self.dataset) as run:
                return run.evaluate_results(trained.name)
