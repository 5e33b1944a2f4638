"""The method's training procedure, stage by stage, resumable at any step.

Stages (all counts from the config):

1. ``baseline``: train the two-stream attention model without L_cc (``train.baseline_steps``);
2. + 3. ``db<r>``: with the network fixed, collect the exemplar database, set alpha and fit Q
   (:class:`train.exemplars.ExemplarState`);
4. ``cc<r>``: fix Q and train with ``L = L_clf + lambda * L_cc`` (``train.cc_steps``,
   :class:`train.steps.StepRunner`);
5. repeat 2-4 for ``cc.rounds`` rounds; every train stage ends with an evaluation
   (:class:`train.evaluation.Evaluator`).

The plan depends on ``cc.rounds`` only: ``cc.weight: 0`` keeps every stage and trains the same steps on
the same batches without the exemplar loss (the control of ``python -m train compare``); ``cc.rounds: 0``
trains the baseline alone.

:class:`Trainer` holds the state that changes (optimizer, stage, step, results), writes the run folder
and checkpoints, and runs the stages in order. A checkpoint is written after every
``train.checkpoint_every`` steps (default every step: a SIGKILL loses no completed step) and at the end
of every stage; it holds no trace of the world size, so a run resumes with any number of processes up
to the batch size. Only rank 0 writes files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import ccluster
from . import checkpoint as ckpt
from . import distributed, interrupt
from .config import from_dict, save_config
from .data.standardize import FeatureStandardizer, conditioning_warning, relu_unit_fractions
from .context import STREAMS, RunContext, build_context, default_cache, mix_seed, open_dataset  # noqa: F401
from .evaluation import Evaluator
from .exemplars import ExemplarState, auto_alpha  # noqa: F401
from .guards import collection_warnings, phi_shrink_warnings
from .steps import StepRunner

log = logging.getLogger("train")


def stage_plan(cfg: dict) -> list[tuple[str, str]]:
    """``[(name, kind)]``: ``("baseline", "train")``, then per round ``("db<r>", "database")`` and
    ``("cc<r>", "train")``."""
    plan = [("baseline", "train")]
    for r in range(1, cfg["cc"]["rounds"] + 1):
        plan += [(f"db{r}", "database"), (f"cc{r}", "train")]
    return plan


class Trainer:
    """Runs (or resumes) the staged procedure in ``run_dir``; see the module docstring.

    ``Trainer(cfg, run_dir)`` starts a run; :meth:`Trainer.resume` continues one from its latest
    checkpoint. :meth:`run` trains to the end and returns the evaluation results per train stage.
    """

    def __init__(self, cfg: dict, run_dir: str | os.PathLike, dataset=None):
        self.ctx: RunContext = build_context(cfg, dataset)
        self.cfg, self.dataset, self.model = cfg, self.ctx.dataset, self.ctx.model
        self.run_dir = Path(run_dir)
        self.is_main = self.ctx.is_main
        if self.ctx.world > 1 and cfg["loss"]["casl"] > 0 and self.is_main:
            log.warning("loss.casl > 0 with %d processes: the co-activity loss pairs videos of the "
                        "same process only", self.ctx.world)
        self.exemplars = ExemplarState(self.ctx)
        self.steps = StepRunner(self.ctx, self.exemplars)
        self.evaluator = Evaluator(self.ctx, self.exemplars)
        self.optimizer = self._new_optimizer()
        self.plan = stage_plan(cfg)
        self.stage, self.step, self.global_step = 0, 0, 0
        self.results: dict = {}
        self.metrics_offset = 0
        self.saved_at: tuple | None = None  # (stage name, stage step, global step) of the last checkpoint
        self._writer = None

    # exemplar state, as the procedure's tests and tools read it
    @property
    def db(self):
        return self.exemplars.db

    @property
    def log_q(self) -> dict:
        return self.exemplars.log_q

    @property
    def alpha(self) -> dict:
        return self.exemplars.alpha

    @property
    def stage_name(self) -> str:
        return self.plan[min(self.stage, len(self.plan) - 1)][0]

    # ------------------------------------------------------------------------------------------------
    # state

    def _new_optimizer(self):
        t = self.cfg["train"]
        return torch.optim.Adam(self.model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self.exemplars.state_dict(),
            "stage": self.stage, "stage_name": self.stage_name,
            "step": self.step, "global_step": self.global_step,
            "rng": ckpt.rng_state(),
            "config": self.cfg,
            "results": self.results,
            "metrics_offset": self.metrics_offset,
            "classes": list(self.dataset.classes),
            "standardizer": (self.ctx.standardizer.state_dict() if self.ctx.standardizer is not None
                             else None),
        }

    def load_state_dict(self, state: dict, source: str | os.PathLike = "the checkpoint") -> None:
        """Restore a :meth:`state_dict`. A state that lacks an entry or does not fit the model its
        config describes raises :class:`train.checkpoint.CheckpointError` naming ``source`` (the file)."""
        try:
            self._load_state_dict(state)
        except KeyError as exc:
            raise ckpt.CheckpointError(f"checkpoint {source} has no {exc.args[0]!r} entry: not a complete ccluster "
                                       f"training checkpoint, pass a latest.pt or stage-<name>.pt written by "
                                       f"python -m train fit") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = "; ".join(lines[1:3] if len(lines) > 1 else lines)
            raise ckpt.CheckpointError(f"checkpoint {source} does not fit the model and data its config describes "
                                       f"({detail[:300]}), pass a checkpoint written by python -m train fit for "
                                       f"this data") from None

    def _load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state.get("standardizer")  # absent in checkpoints older than data.standardize: none
        self.ctx.standardizer = FeatureStandardizer.from_state_dict(saved) if saved is not None else None
        if saved is None:
            self.cfg["data"]["standardize"] = "none"
        self.exemplars.load_state_dict(state)
        self.stage, self.step, self.global_step = state["stage"], state["step"], state["global_step"]
        self.results = state["results"]
        self.metrics_offset = state["metrics_offset"]
        ckpt.set_rng_state(state["rng"])
        self.saved_at = (self.stage_name, self.step, self.global_step)

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, dataset=None, state: dict | None = None,
               source: str | os.PathLike | None = None) -> "Trainer":
        """Continue the run in ``run_dir`` from its latest checkpoint (or from ``state``, that
        checkpoint already loaded, e.g. by rank 0 and broadcast; ``source`` names its file)."""
        source = source or Path(run_dir) / ckpt.LATEST
        if state is None:
            state = ckpt.load(source)
        trainer = cls(from_dict(state["config"]), run_dir, dataset)
        trainer.load_state_dict(state, source=source)
        return trainer

    def save(self, stage_copy: str | None = None) -> None:
        """Write ``latest.pt`` (and ``stage-<stage_copy>.pt``), loadable with ``weights_only=True``."""
        if not self.is_main:
            return
        state = ckpt.encode(self.state_dict())
        ckpt.save_atomic(state, self.run_dir / ckpt.LATEST)
        if stage_copy:
            ckpt.save_atomic(state, self.run_dir / f"stage-{stage_copy}.pt")
        self.saved_at = (self.stage_name, self.step, self.global_step)

    # ------------------------------------------------------------------------------------------------
    # logging

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            self.metrics_offset = f.tell()
        if self._writer is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def _open_logs(self) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        path = self.run_dir / "metrics.jsonl"
        # Drop lines written after the checkpoint we resume from (their steps are redone).
        if path.exists():
            with open(path, "r+") as f:
                f.truncate(self.metrics_offset)
        if self.cfg["run"]["tensorboard"] and self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self._writer = None

    @torch.no_grad()
    def unit_health(self) -> dict:
        """Fractions of dead and always-on first-layer ReLUs per stream on the current stage's first
        batch (real segments only): ``dead_rgb``, ``always_on_rgb``, ``dead_flow``, ``always_on_flow``."""
        batch = self.steps.batch(self.stage, 0)
        out = {}
        for s, x in zip(self.model.streams, self.model.split(batch["features"])):
            dead, on = relu_unit_fractions(getattr(self.model, s).phi[0](x), batch["mask"])
            out[f"dead_{s}"], out[f"always_on_{s}"] = dead, on
        return out

    def _warn(self, stage: str, warnings: list[tuple[str, str]]) -> None:
        """Print each ``(guard, message)`` and record it in metrics.jsonl."""
        for guard, message in warnings:
            if self.is_main:
                log.warning("warning (%s): %s", stage, message)
            self._log({"kind": "warning", "stage": stage, "step": self.global_step, "guard": guard,
                       "message": message})

    # ------------------------------------------------------------------------------------------------
    # the units, as tools call them one at a time

    def train_step(self, stage: int, step: int, use_cc: bool) -> dict:
        return self.steps.train_step(self.optimizer, stage, step, use_cc)

    def build_database(self, name: str) -> dict:
        return self.exemplars.build(name)

    def predict(self, index: int, selection: bool) -> dict:
        return self.evaluator.predict(index, selection)

    def evaluate(self, progress: bool | None = None, figures: int = 0, outputs: bool = True) -> dict:
        """Evaluate on the test subset; ``outputs`` also writes predictions and T-CAMs into the run
        folder (:mod:`train.evaluation`)."""
        return self.evaluator.evaluate(self.run_dir, self.stage_name, progress, figures, outputs)

    # ------------------------------------------------------------------------------------------------
    # the whole procedure

    def _train_stage(self, name: str, steps: int, use_cc: bool) -> None:
        t = self.cfg["train"]
        if self.step == 0 and use_cc and t["reset_optimizer"]:
            self.optimizer = self._new_optimizer()
        with tqdm(total=steps, initial=self.step, desc=name, unit="step", dynamic_ncols=True,
                  disable=not self.ctx.progress) as bar:  # closed before an interruption is reported
            self._train_steps(name, steps, use_cc, bar)

    def _train_steps(self, name: str, steps: int, use_cc: bool, bar) -> None:
        t = self.cfg["train"]
        running = {}
        shrink_warned = set()
        health_checked = self.step > 0
        while self.step < steps:
            interrupt.check()
            t0 = time.perf_counter()
            if t["lr_schedule"] == "cosine":  # from the stage's step: the same after a resume
                for group in self.optimizer.param_groups:
                    group["lr"] = t["lr"] * 0.5 * (1 + math.cos(math.pi * self.step / steps))
            terms = self.train_step(self.stage, self.step, use_cc)
            dt = time.perf_counter() - t0
            self.step += 1
            self.global_step += 1
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + v
            running["n"] = running.get("n", 0) + 1
            if self.step % t["log_every"] == 0 or self.step == steps:
                n = running.pop("n")
                rec = {k: v / n for k, v in running.items()}
                if not health_checked:  # once per stage, after its first logged steps
                    health_checked = True
                    rec.update(self.unit_health())
                    dead = max(rec[f"dead_{s}"] for s in self.model.streams)
                    if dead > 0.5:
                        self._warn(name, [("dead_units", f"{100 * dead:.0f} % of a stream's first-layer ReLUs "
                                                         f"are dead on the stage's first batch; the inputs "
                                                         f"may be badly conditioned (data.standardize: zscore "
                                                         f"standardises them)")])
                self._log({"kind": "train", "stage": name, "step": self.global_step, "stage_step": self.step,
                           "step_time": dt, **rec})
                bar.set_postfix(loss=f"{rec['total']:.3f}")
                running = {}
                if use_cc:
                    norms = {s: rec.get(f"phi_norm_{s}") for s in self.model.streams if s not in shrink_warned}
                    found = phi_shrink_warnings(norms, self.exemplars.phi_norm, self.cfg,
                                                "since the last collection")
                    shrink_warned |= {m.split(":")[0] for _, m in found}
                    self._warn(name, found)
            if t["eval_every"] and self.step % t["eval_every"] == 0 and self.step < steps:
                self._log({"kind": "eval", "stage": name, "step": self.global_step,
                           **self.evaluate(progress=False, outputs=False)})
            if self.step % t["checkpoint_every"] == 0 or self.step == steps:
                self.save()
            bar.update(1)

    def run(self) -> dict:
        """Train every remaining stage; returns ``{stage name: evaluation results}`` of train stages."""
        distributed.barrier()  # every rank has built (or loaded) its state before rank 0 writes
        self._open_logs()
        if self.stage == 0 and self.step == 0 and self.global_step == 0:
            self._log({"kind": "start", "config": self.cfg, "train_videos": len(self.ctx.train_idx),
                       "test_videos": len(self.ctx.test_idx), "compiled_ops": ccluster.has_compiled_ops()})
            found = conditioning_warning(self.ctx.feature_stats, self.cfg["data"]["standardize"])
            if found:
                self._warn("start", [("input_conditioning", found)])
            self.save()
        t = self.cfg["train"]
        while self.stage < len(self.plan):
            name, kind = self.plan[self.stage]
            if kind == "database":
                previous = self.exemplars.info
                info = self.build_database(name)
                self._log({"kind": "database", "stage": name, "step": self.global_step, **info})
                self._warn(name, collection_warnings(info, previous, self.cfg))
            else:
                use_cc = name != "baseline" and self.cfg["cc"]["weight"] > 0
                self._train_stage(name, t["baseline_steps"] if name == "baseline" else t["cc_steps"], use_cc)
                last = self.stage == len(self.plan) - 1
                res = self.evaluate(figures=self.cfg["eval"]["figures"] if last else 0)
                self.results[name] = res
                self._log({"kind": "eval", "stage": name, "step": self.global_step, **res})
            self.stage += 1
            self.step = 0
            self.save(stage_copy=name)
        self.finish()
        distributed.barrier()  # the files are complete when any rank returns
        return self.results

    def finish(self) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "results.json", "w") as f:
            json.dump(self.results, f, indent=2)
        try:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        except Exception as exc:  # figures are a convenience, never a reason to fail a finished run
            log.warning("could not draw the curves: %s", exc)
        if self._writer is not None:
            self._writer.close()


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
