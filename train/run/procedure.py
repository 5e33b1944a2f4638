"""A run: its folder, its config and the method's procedure, stage by stage, resumable at any step.

Stages (all counts from the config):

1. ``baseline``: train the two-stream attention model without L_cc (``train.baseline_steps``);
2. + 3. ``db<r>``: with the network fixed, collect the exemplar database, set alpha and fit Q
   (:class:`train.run.exemplars.ExemplarState`);
4. ``cc<r>``: fix Q and train with ``L = L_clf + lambda * L_cc`` (``train.cc_steps``,
   :class:`train.run.steps.StepRunner`; the loss is the objective's, :mod:`train.objectives`);
5. repeat 2-4 for ``cc.rounds`` rounds; every train stage ends with an evaluation
   (:class:`train.run.evaluation.Evaluator`).

The plan depends on ``cc.rounds`` only: ``cc.weight: 0`` keeps every stage and trains the same steps on
the same batches without the exemplar loss (the control of ``python -m train compare``); ``cc.rounds: 0``
trains the baseline alone.

:class:`Run` owns a run folder (:class:`train.run.folder.RunFolder`: its lock, config record, checkpoints,
logs and outputs) and the state that changes (optimizer, stage, step, results). Every way of opening one
is a constructor of its own, and every command uses them: ``fit`` (:meth:`Run.fit`), ``eval``
(:meth:`Run.load`), ``compare`` and ``demo`` (:meth:`Run.start`, :meth:`Run.resume`,
:meth:`Run.from_stage1`, :meth:`Run.load`), ``steptime`` (:meth:`Run.start` in a scratch folder). An
open run holds the folder's lock until :meth:`Run.close` (or the end of its ``with`` block).

A checkpoint is written after every ``train.checkpoint_every`` steps (default every step: a SIGKILL loses
no completed step) and at the end of every stage; it holds no trace of the world size, so a run resumes
with any number of processes up to the batch size. Only rank 0 writes files.
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import ccluster
from ..common import distributed, interrupt, names
from ..config import RESUME_MAY_CHANGE, ConfigError, from_dict, with_overrides
from ..data.standardize import FeatureStandardizer, conditioning_warning, relu_unit_fractions
from . import checkpoint as ckpt
from .context import RunContext, build_context
from .evaluation import Evaluator
from .exemplars import ExemplarState
from .folder import RunFolder
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


def config_changes(now: dict, saved: dict, ignore=RESUME_MAY_CHANGE, prefix: str = "") -> list[str]:
    """The keys whose values differ between two configs (except ``ignore``), as ``key (saved, now)``."""
    keys = []
    for k in sorted(set(now) | set(saved)):
        va, vb = now.get(k), saved.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_changes(va, vb, ignore, f"{prefix}{k}.")
        elif va != vb and f"{prefix}{k}" not in ignore:
            keys.append(f"{prefix}{k} ({vb!r} saved, {va!r} now)")
    return keys


class Run:
    """A run in a folder; see the module docstring.

    ``Run(cfg, folder)`` starts a new run (the same as :meth:`start`). Use a run as a context manager, or
    call :meth:`close`, to let go of the folder's lock.

    Args:
        cfg: the validated config.
        folder: the run folder (a path, or a :class:`~train.run.folder.RunFolder`, possibly locked by the
            caller already).
        dataset: the dataset when it is already open (``compare`` opens it once for all its runs).
        fresh: refuse a folder that holds a run (the constructors that restore a checkpoint pass False).
    """

    def __init__(self, cfg: dict, folder: str | os.PathLike | RunFolder, dataset=None, *, fresh: bool = True):
        self.folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        self.folder.acquire()
        try:
            if fresh and self.folder.main and self.folder.has_checkpoint():
                raise ConfigError(f"run folder {self.folder.path} already holds a run ({self.folder.latest}), "
                                  f"continue it (fit --resume) or choose another run.dir / name")
            self._build(cfg, dataset)
        except BaseException:
            self.folder.release()
            raise
        self._closed = False

    def _build(self, cfg: dict, dataset) -> None:
        self.ctx: RunContext = build_context(cfg, dataset)
        self.cfg, self.dataset, self.model = cfg, self.ctx.dataset, self.ctx.model
        if self.ctx.world > 1 and cfg["loss"]["casl"] > 0 and self.ctx.is_main:
            log.warning("loss.casl > 0 with %d processes: the co-activity loss pairs videos of the "
                        "same process only", self.ctx.world)
        self.exemplars = ExemplarState(self.ctx)
        self.steps = StepRunner(self.ctx, self.exemplars)
        self.evaluator = Evaluator(self.ctx, self.exemplars)
        self.optimizer = self._new_optimizer()
        self.plan = stage_plan(cfg)
        self.stage, self.step, self.global_step = 0, 0, 0
        self.results: dict = {}
        self.resumed = False
        self.saved_at: tuple | None = None  # (stage name, stage step, global step) of the last checkpoint
        self._metrics_offset = 0

    # ------------------------------------------------------------------------------------------------
    # ways to open a run

    @classmethod
    def start(cls, cfg: dict, folder: str | os.PathLike | RunFolder, dataset=None) -> "Run":
        """A new run of ``cfg`` in ``folder``, which must not hold one."""
        return cls(cfg, folder, dataset)

    @classmethod
    def resume(cls, folder: str | os.PathLike | RunFolder, dataset=None, cfg: dict | None = None,
               overrides=(), state: dict | None = None) -> "Run":
        """Continue the run in ``folder`` from its latest checkpoint, with the config saved there.

        ``cfg`` (a whole config) or ``overrides`` (``key=value`` over the saved config) may change only the
        keys of phase "may change on resume" (:data:`train.config.RESUME_MAY_CHANGE`); anything else is
        refused naming the keys. ``state``: the checkpoint, when the caller has read it already."""
        folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        with folder.locked():  # taken before the folder is read
            state = folder.load_checkpoint() if state is None else state
            if state is None:
                raise ConfigError(f"--resume: no checkpoint in {folder.path} (no {ckpt.LATEST} there), pass "
                                  f"--run-dir with the folder of the run to continue, or --config FILE to "
                                  f"start a new run")
            saved = from_dict(state["config"])
            now = cfg if cfg is not None else with_overrides(saved, overrides)
            diff = config_changes(now, saved)
            if diff:
                raise ConfigError(f"--resume: the config differs from the one saved in {folder.path}: "
                                  + "; ".join(diff) + f", resume without those changes (only "
                                  f"{', '.join(RESUME_MAY_CHANGE)} may change) or start a new run elsewhere")
            kept = [key.split(".", 1)[1] for key in RESUME_MAY_CHANGE if key != "run.dir"]  # the folder stays
            state["config"]["run"] = {**state["config"]["run"], **{k: now["run"][k] for k in kept}}
            if folder.main and now["run"]["threads"] != saved["run"]["threads"]:
                log.warning("note: run.threads %s -> %s: the rest of the run is not bitwise identical to a run "
                            "at one thread count", saved["run"]["threads"], now["run"]["threads"])
            run = cls(from_dict(state["config"]), folder, dataset, fresh=False)
            try:
                run._restore(state, folder.latest)
            except BaseException:
                run.close()
                raise
            run.resumed = True
            return run

    @classmethod
    def fit(cls, folder: str | os.PathLike | RunFolder, cfg: dict | None = None, overrides=(),
            resume: bool = False) -> "Run":
        """What ``python -m train fit`` opens: a new run of ``cfg`` in ``folder``, or with ``resume`` the run
        there continued (``cfg`` None: with its saved config and ``overrides``). A folder that holds a run
        is refused without ``resume``; ``resume`` in a folder without one starts ``cfg`` (noting it)."""
        folder = folder if isinstance(folder, RunFolder) else RunFolder(folder)
        with folder.locked():  # one writer: two fits cannot both find the folder empty
            state = folder.load_checkpoint()
            if state is None and cfg is None:
                return cls.resume(folder, state=None)  # says that there is nothing to resume
            if state is not None:
                if not resume:
                    raise ConfigError(f"run folder {folder.path} already holds a run ({folder.latest}), pass "
                                      f"--resume to continue it, or choose another run.dir / name")
                return cls.resume(folder, cfg=cfg, overrides=overrides, state=state)
            if resume and folder.main:
                log.warning("--resume: no checkpoint in %s; starting a new run", folder.path)
            return cls(cfg, folder, fresh=False)

    @classmethod
    def from_stage1(cls, cfg: dict, folder: str | os.PathLike | RunFolder, stage1: str | os.PathLike,
                    dataset=None) -> "Run":
        """A new run of ``cfg`` in ``folder`` that continues the finished stage 1 of another run (its
        checkpoint, or its folder): the same model, optimizer state, step counter and random state, so
        its later stages see the batches a run of ``cfg`` from scratch would (``compare``'s variants)."""
        source = Path(stage1)
        source = source / ckpt.LATEST if source.is_dir() else source
        state = ckpt.load(source)
        run = cls(cfg, folder, dataset)
        try:
            run._restore(state, source)
        except BaseException:
            run.close()
            raise
        run._metrics_offset = 0  # this folder's log starts empty
        run.step = 0
        return run

    @classmethod
    def load(cls, checkpoint: str | os.PathLike, cfg: dict | None = None,
             folder: str | os.PathLike | RunFolder | None = None, dataset=None, state: dict | None = None) -> "Run":
        """A trained checkpoint (a file, or a run folder with its ``latest.pt``), to evaluate. ``cfg``: the
        config to evaluate with (default: the checkpoint's); ``folder``: where the outputs go (default: the
        checkpoint's folder, whose lock is taken); ``state``: the checkpoint, when already read."""
        path = Path(checkpoint)
        source = path / ckpt.LATEST if path.is_dir() else path
        state = ckpt.load(path) if state is None else state
        cfg = from_dict(state["config"]) if cfg is None else cfg
        folder = folder if folder is not None else (path if path.is_dir() else path.parent)
        run = cls(cfg, folder, dataset, fresh=False)
        try:
            run._restore(state, source)
        except BaseException:
            run.close()
            raise
        return run

    def close(self) -> None:
        """Let go of the folder's lock (and of TensorBoard); the run stays usable in memory."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.folder.close_log()
        self.folder.release()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # ------------------------------------------------------------------------------------------------
    # state

    @property
    def path(self) -> Path:
        """The run folder's path."""
        return self.folder.path

    @property
    def stage_name(self) -> str:
        """The name of the current stage (of the last one, once every stage is done)."""
        return self.plan[min(self.stage, len(self.plan) - 1)][0]

    @property
    def finished(self) -> bool:
        """Whether the run's last stage is done (its ``results.json`` written)."""
        return self.stage >= len(self.plan) and self.folder.finished

    def _new_optimizer(self):
        t = self.cfg["train"]
        return torch.optim.Adam(self.model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])

    def state_dict(self) -> dict:
        """Everything a checkpoint holds (:mod:`train.run.checkpoint`): model, optimizer, exemplar state,
        stage, step, RNG states, config, results, the input statistics."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            **self.exemplars.state_dict(),
            "stage": self.stage, "stage_name": self.stage_name,
            "step": self.step, "global_step": self.global_step,
            "rng": ckpt.rng_state(),
            "config": self.cfg,
            "results": self.results,
            "metrics_offset": self._metrics_offset,
            "classes": list(self.dataset.classes),
            "standardizer": (self.ctx.standardizer.state_dict() if self.ctx.standardizer is not None
                             else None),
        }

    def _restore(self, state: dict, source: str | os.PathLike = "the checkpoint") -> None:
        """Restore a :meth:`state_dict`. A state that lacks an entry or does not fit the model its config
        describes raises :class:`train.run.checkpoint.CheckpointError` naming ``source`` (the file)."""
        try:
            self._restore_entries(state)
        except KeyError as exc:
            raise ckpt.CheckpointError(f"checkpoint {source} has no {exc.args[0]!r} entry: not a complete ccluster "
                                       f"training checkpoint, pass a latest.pt or stage-<name>.pt written by "
                                       f"{names.TRAIN} fit") from None
        except (RuntimeError, ValueError, TypeError) as exc:
            lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
            detail = "; ".join(lines[1:3] if len(lines) > 1 else lines)
            raise ckpt.CheckpointError(f"checkpoint {source} does not fit the model and data its config describes "
                                       f"({detail[:300]}), pass a checkpoint written by {names.TRAIN} fit for "
                                       f"this data") from None

    def _restore_entries(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        saved = state.get("standardizer")  # absent in checkpoints older than data.standardize: none
        self.ctx.standardizer = FeatureStandardizer.from_state_dict(saved) if saved is not None else None
        if saved is None:
            self.cfg["data"]["standardize"] = "none"
        self.exemplars.load_state_dict(state)
        self.stage, self.step, self.global_step = state["stage"], state["step"], state["global_step"]
        self.results = state["results"]
        self._metrics_offset = state["metrics_offset"]
        ckpt.set_rng_state(state["rng"])
        self.saved_at = (self.stage_name, self.step, self.global_step)

    def save(self, stage_copy: str | None = None) -> None:
        """Write ``latest.pt`` (and ``stage-<stage_copy>.pt``)."""
        if not self.ctx.is_main:
            return
        self.folder.save_checkpoint(self.state_dict(), stage_copy)
        self.saved_at = (self.stage_name, self.step, self.global_step)

    # ------------------------------------------------------------------------------------------------
    # logging

    def _log(self, record: dict) -> None:
        if self.ctx.is_main:
            self._metrics_offset = self.folder.log(record)

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
            if self.ctx.is_main:
                log.warning("warning (%s): %s", stage, message)
            self._log({"kind": "warning", "stage": stage, "step": self.global_step, "guard": guard,
                       "message": message})

    # ------------------------------------------------------------------------------------------------
    # units of the procedure, one at a time (steptime times them)

    def train_step(self, stage: int, step: int, use_cc: bool) -> dict:
        """One optimisation step on the batch of ``(stage, step)`` (:meth:`train.run.steps.StepRunner.train_step`);
        returns the loss terms."""
        return self.steps.train_step(self.optimizer, stage, step, use_cc)

    def build_database(self, name: str, videos: list | None = None, max_iter: int | None = None) -> dict:
        """Collect the exemplar database and fit Q with the network as it is
        (:meth:`train.run.exemplars.ExemplarState.build`); returns the collection's summary."""
        return self.exemplars.build(name, videos, max_iter)

    def evaluate(self, progress: bool | None = None, figures: int = 0, outputs: bool = True) -> dict:
        """Evaluate on the test subset; ``outputs`` also writes predictions and T-CAMs into the run
        folder (:mod:`train.run.evaluation`)."""
        return self.evaluator.evaluate(self.folder, self.stage_name, progress, figures, outputs)

    def evaluate_results(self, evaluated_from: str) -> dict:
        """Evaluate the loaded model as this run's final stage and write ``results.json`` with
        ``evaluated_from`` (the run whose training it is): ``compare``'s variants that differ from a trained
        run in evaluation settings only. Returns the results per stage."""
        results = dict(self.results)
        results[self.plan[-1][0]] = self.evaluate(progress=False)
        self.folder.write_results({**results, "evaluated_from": evaluated_from})
        return results

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
                    found = phi_shrink_warnings(norms, self.exemplars.phi_norms(), self.cfg,
                                                "since the last collection")
                    shrink_warned |= {m.split(":")[0] for _, m in found}
                    self._warn(name, found)
            if t["eval_every"] and self.step % t["eval_every"] == 0 and self.step < steps:
                self._log({"kind": "eval", "stage": name, "step": self.global_step,
                           **self.evaluate(progress=False, outputs=False)})
            if self.step % t["checkpoint_every"] == 0 or self.step == steps:
                self.save()
            bar.update(1)

    def train(self) -> dict:
        """Train every remaining stage; returns ``{stage name: evaluation results}`` of train stages."""
        distributed.barrier()  # every rank has built (or loaded) its state before rank 0 writes
        self.folder.write_config(self.cfg)
        self.folder.open_log(self._metrics_offset, self.cfg["run"]["tensorboard"])
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
        if self.ctx.is_main:
            self.folder.write_results(self.results)
            self.folder.draw_curves()
            self.folder.close_log()
        distributed.barrier()  # the files are complete when any rank returns
        return self.results

