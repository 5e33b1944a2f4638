"""Command line: ``python -m train {fit,eval,demo,compare,steptime,config}``.

    python -m train fit --config configs/synthetic.yaml [key=value ...] [--resume]
    python -m train eval --checkpoint runs/synthetic/latest.pt
    python -m train demo [--out runs/demo] [key=value ...]
    python -m train compare --config configs/calibrated.yaml --variants variants.yaml --seeds 0 1 2 3 4
    python -m train steptime [--config ...] [key=value ...]   # a training step with vs without L_cc
    python -m train config --config configs/thumos14.yaml [key=value ...]   # print the resolved config

Several processes (data-parallel, torch.distributed; see train/distributed.py):

    torchrun --nproc_per_node=K -m train fit --config ... [key=value ...] [--resume]
    torchrun --nproc_per_node=K -m train eval --checkpoint runs/thumos14/latest.pt

``key=value`` overrides may stand anywhere on the line. ``fit --run-dir DIR --resume`` continues the run
in DIR with the config saved there (``run.progress``, ``run.tensorboard`` and ``run.threads`` may be
changed on resume, nothing else).

Errors a user can cause (a config key, a missing or damaged file, a checkpoint that cannot be used)
print one line, ``error: <what>, <which file or key>, <what to do>``, and exit with code 2; Ctrl-C
prints where the run stopped and how to continue, and exits with 130 (stopping at once, whatever it was
doing, see :mod:`train.interrupt`; when the interruption passed through code that Python ran with
``exec``, as during a lazy import, CPython ends the process by SIGINT instead, which shells report as 130
too). ``--debug`` (or ``CCLUSTER_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import interrupt
from .argparsing import OneLineParser, non_negative_int, positive_int
from .config import DEFAULTS, ConfigError, PRESETS, flatten, from_dict, load_config, parse_override, to_yaml, validate
from .runlock import RunFolderLock

log = logging.getLogger("train")

# Keys that may change when a run is resumed: they change neither the data nor the computation's
# meaning (run.threads changes the last bits of the results: a run is bitwise reproducible at a fixed
# thread count only).
RESUME_MAY_CHANGE = ("run.dir", "run.progress", "run.tensorboard", "run.threads")


class Interrupted(Exception):
    """Ctrl-C: the message says where the run stopped and how to continue."""


def run_dir_of(cfg: dict) -> Path:
    return Path(cfg["run"]["dir"] or f"runs/{cfg['name']}")


def _config_diff(a: dict, b: dict, prefix="", ignore=RESUME_MAY_CHANGE) -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_diff(va, vb, f"{prefix}{k}.", ignore)
        elif va != vb and f"{prefix}{k}" not in ignore:
            keys.append(f"{prefix}{k} ({vb!r} saved, {va!r} now)")
    return keys


def _with_overrides(base: dict, overrides) -> dict:
    """``base`` (a validated config) with ``key=value`` overrides applied, validated."""
    import copy
    from .config import _set
    cfg = copy.deepcopy(base)
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, f"override {text!r}")
    return validate(cfg)


def apply_threads(cfg: dict) -> None:
    """``run.threads`` > 0: torch's intra-op thread count (0 leaves torch's default)."""
    if cfg["run"]["threads"] > 0:
        import torch
        torch.set_num_threads(cfg["run"]["threads"])


def _load_on_rank0(path: Path):
    """The checkpoint at ``path`` as rank 0 reads it (None if absent), on every rank: only rank 0 needs
    the run folder, so nodes need not share a file system for it."""
    from . import checkpoint as ckpt
    from . import distributed
    state = None
    if distributed.is_main():
        try:
            state = ckpt.load(path)
        except FileNotFoundError:
            state = None
    return distributed.broadcast_object(state)


def _in_process_group(args, device: str, command) -> int:
    """``command()`` inside the process group torchrun describes (nothing to do in a single process).
    The group is left after a success; after an error the process just exits (destroying a group with
    a peer blocked in a collective can block too; the launcher ends the peers)."""
    from . import distributed
    distributed.init(device, args.dist_backend, args.dist_timeout)
    code = command()
    distributed.cleanup()
    return code


def _override_value(overrides, key: str):
    """The value a ``key=value`` override gives ``key`` (the last one wins), or None."""
    found = None
    for text in overrides:
        k, v = parse_override(text)
        if k == key:
            found = v
    return found


def _resume_dir(args) -> Path:
    """The run folder of ``fit --resume`` without --config: --run-dir, run.dir=, or runs/<name>."""
    if args.run_dir:
        return Path(args.run_dir)
    return Path(_override_value(args.overrides, "run.dir") or
                f"runs/{_override_value(args.overrides, 'name') or DEFAULTS['name']}")


def cmd_fit(args) -> int:
    if args.resume and not args.config:
        # The config comes from the checkpoint; the device (for the process group) from an override,
        # else from the run folder's config.yaml.
        run_dir = _resume_dir(args)
        device = _override_value(args.overrides, "device")
        if device is None and (run_dir / "config.yaml").is_file():
            import yaml
            try:
                device = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("device")
            except yaml.YAMLError:
                device = None
        return _in_process_group(args, device or "cpu", lambda: _fit(args, None, run_dir))
    _need_config(args, "fit")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else run_dir_of(cfg)
    return _in_process_group(args, cfg["device"], lambda: _fit(args, cfg, run_dir))


def _need_config(args, command: str) -> None:
    """Without --config and without data.root / data.synthetic overrides there is no data to train on:
    say that --config is missing (the defaults name no dataset)."""
    if args.config or any(_override_value(args.overrides, k) for k in ("data.root", "data.synthetic")):
        return
    raise ConfigError(f"{command}: --config is missing, pass a YAML config (e.g. --config configs/tiny.yaml, or "
                      f"configs/synthetic.yaml) or name the data with data.root=... / data.synthetic=...")


def _fit(args, cfg, run_dir: Path) -> int:
    from . import distributed
    # one writer per run folder: taken before the folder is read, so that two fits cannot both find
    # it empty (only rank 0 writes there)
    with RunFolderLock(run_dir) if distributed.is_main() else contextlib.nullcontext():
        return _fit_locked(args, cfg, run_dir)


def _fit_locked(args, cfg, run_dir: Path) -> int:
    from . import checkpoint as ckpt
    from . import distributed
    from .procedure import Trainer
    latest = run_dir / ckpt.LATEST
    main = distributed.is_main()
    trainer = None
    try:
        state = _load_on_rank0(latest) if distributed.world_size() > 1 else (
            ckpt.load(latest) if latest.exists() else None)
        if state is None and cfg is None:
            raise ConfigError(f"--resume: no checkpoint in {run_dir} (no {ckpt.LATEST} there), pass "
                              f"--run-dir with the folder of the run to continue, or --config FILE to "
                              f"start a new run")
        if state is not None:
            if not args.resume:
                raise ConfigError(f"run folder {run_dir} already holds a run ({latest}), pass --resume to "
                                  f"continue it, or choose another run.dir / name")
            saved = from_dict(state["config"])
            now = cfg if cfg is not None else _with_overrides(saved, args.overrides)
            diff = _config_diff(now, saved)
            if diff:
                raise ConfigError(f"--resume: the config differs from the one saved in {run_dir}: "
                                  + "; ".join(diff) + f", resume without those changes (only "
                                  f"{', '.join(RESUME_MAY_CHANGE)} may change) or start a new run elsewhere")
            state["config"]["run"] = {**state["config"]["run"],
                                      **{k: now["run"][k] for k in ("progress", "tensorboard", "threads")}}
            if main and now["run"]["threads"] != saved["run"]["threads"]:
                print(f"note: run.threads {saved['run']['threads']} -> {now['run']['threads']}: the rest of "
                      f"the run is not bitwise identical to a run at one thread count", file=sys.stderr)
            apply_threads(now)
            trainer = Trainer.resume(run_dir, state=state, source=latest)
            if main:
                print(f"resuming {run_dir} at stage "
                      f"{trainer.plan[min(trainer.stage, len(trainer.plan) - 1)][0]}, step {trainer.step} "
                      f"(global {trainer.global_step})"
                      + (f" with {distributed.world_size()} processes" if distributed.world_size() > 1 else ""),
                      file=sys.stderr)
        else:
            if args.resume and main:
                print(f"--resume: no checkpoint in {run_dir}; starting a new run", file=sys.stderr)
            apply_threads(cfg)
            trainer = Trainer(cfg, run_dir)
        results = trainer.run()
    except KeyboardInterrupt:
        raise Interrupted(_where(trainer, run_dir)) from None
    if main:
        print(format_table([(name, res) for name, res in results.items()], trainer.cfg["eval"]["tiou"]))
        print(f"run folder: {run_dir} (predictions.json, cams.npz, results.json, curves.png, checkpoints)")
    return 0


def _where(trainer, run_dir: Path) -> str:
    """Where a fit stopped and the command that continues it."""
    resume = f"python -m train fit --run-dir {run_dir} --resume"
    if trainer is None or trainer.saved_at is None:
        if (run_dir / "latest.pt").exists():
            return f"stopped before training went on; continue with: {resume}"
        return "stopped before the first checkpoint, nothing to continue: run the same command again"
    name, step, global_step = trainer.saved_at
    return (f"stopped in stage {trainer.stage_name} after step {trainer.step} (global {trainer.global_step}), "
            f"{run_dir / 'latest.pt'} holds stage {name} after step {step} (global {global_step}), continue "
            f"with: {resume}")


def cmd_eval(args) -> int:
    from . import checkpoint as ckpt
    path = Path(args.checkpoint)
    state = ckpt.load(path)  # every rank reads it (read only)
    cfg = from_dict(state["config"])
    apply_threads(cfg)
    return _in_process_group(args, cfg["device"], lambda: _eval(args, path, state, cfg))


def _eval(args, path, state, cfg) -> int:
    from . import distributed
    run_dir = path.parent if path.is_file() else path
    # eval writes predictions and T-CAMs into the run folder: one writer at a time there too
    with RunFolderLock(run_dir) if distributed.is_main() else contextlib.nullcontext():
        return _eval_locked(args, path, state, cfg, run_dir)


def _eval_locked(args, path, state, cfg, run_dir: Path) -> int:
    from . import checkpoint as ckpt
    from . import distributed
    from .procedure import Trainer
    trainer = Trainer(cfg, run_dir)
    trainer.load_state_dict(state, source=path / ckpt.LATEST if path.is_dir() else path)
    res = trainer.evaluate(figures=args.figures)
    if distributed.is_main():
        if args.json:
            print(json.dumps(res, indent=2))
        print(format_table([(state["stage_name"], res)], cfg["eval"]["tiou"]))
        print(f"predictions and T-CAMs: {run_dir}/predictions.json, {run_dir}/cams.npz")
    return 0


def cmd_config(args) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def demo_config(overrides=()) -> dict:
    """The demo's config: the synthetic preset (``configs/synthetic.yaml``) with ``overrides``."""
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in flatten(PRESETS["synthetic"]).items()]
                       + list(overrides))


def cmd_demo(args) -> int:
    """The method against its same-batch control (cc.weight 0) from one shared stage 1, one seed."""
    from .compare import CONTROL, Comparison
    cfg = demo_config(args.overrides)
    out = Path(args.out)
    apply_threads(cfg)
    t0 = time.time()
    comp = Comparison(cfg, {"method": {}}, [cfg["seed"]], out)
    try:
        res = comp.run(fresh=args.fresh)["results"]
    except KeyboardInterrupt:
        again = " ".join(["python -m train demo --out", str(out), *args.overrides])
        raise Interrupted(f"the finished runs and the checkpoints are kept in {out}; continue with: "
                          f"{again}") from None
    seed = cfg["seed"]
    c, t = cfg["cc"], cfg["train"]
    ctrl, method = res[CONTROL][seed], res["method"][seed]
    diff = {k: method[k] - ctrl[k] for k in method if k in ctrl and isinstance(method[k], float)}
    rows = [(f"control (lambda 0, +{c['rounds']}x{t['cc_steps']} steps)", ctrl),
            (f"method (lambda {c['weight']:g}, +{c['rounds']}x{t['cc_steps']} steps)", method),
            ("method - control", diff)]
    table = format_table(rows, cfg["eval"]["tiou"], signed={"method - control"})
    (out / "table.txt").write_text(table + "\n")
    print(table)
    print(f"({time.time() - t0:.0f} s at {torch_threads()} thread(s){_reused(comp, out)}; both continue from "
          f"the same {t['baseline_steps']}-step stage 1 on the same batches; runs in {out}/seed-{seed}; table in "
          f"{out}/table.txt)")
    return 0


def _reused(comp, out: Path) -> str:
    """How many of a comparison's runs were finished already (and only read back)."""
    if not comp.reused:
        return ""
    if comp.reused == comp.runs:
        return f"; all {comp.runs} runs were finished in {out} already and were reused, --fresh starts over"
    return f"; {comp.reused} of {comp.runs} runs were finished in {out} already and were reused"


def cmd_compare(args) -> int:
    from .compare import CONTROL, Comparison, load_peer, load_variants, parse_metrics
    _need_config(args, "compare")
    cfg = load_config(args.config, args.overrides)
    variants = load_variants(args.variants, args.variant)
    peers = dict(load_peer(p, args.seeds) for p in args.peer)
    metrics = parse_metrics(args.metrics) if args.metrics else None
    out = Path(args.out) if args.out else Path("runs") / f"compare-{cfg['name']}"
    apply_threads(cfg)
    t0 = time.time()
    kwargs = {"metrics": metrics} if metrics else {}
    comp = Comparison(cfg, variants, args.seeds, out, peers=peers, against=args.against or CONTROL, **kwargs)
    try:
        res = comp.run()
    except KeyboardInterrupt:
        raise Interrupted(f"the finished runs and the checkpoints are kept in {out}; run the same command "
                          f"again to continue where it stopped") from None
    print(res["table"])
    print(f"({time.time() - t0:.0f} s{_reused(comp, out)}; runs, results.json, table.txt and compare.png in {out})")
    return 0


def _timing_videos(dataset, train_idx, size: int) -> list:
    """Training videos enough to fill every class's ``size`` exemplar slots (the step cost depends on
    the database's shape, not on which segments fill it)."""
    import numpy as np
    need = np.full(dataset.num_classes, size)
    chosen = []
    for i in train_idx:
        labels = np.flatnonzero(dataset.videos[i].labels > 0)
        if (need[labels] > 0).any():
            chosen.append(i)
            need[labels] -= len(dataset.videos[i].features)
        if (need <= 0).all():
            break
    return chosen


def cmd_steptime(args) -> int:
    """Median time of a training step with L_cc and without, alternated in one process."""
    import copy
    import dataclasses
    import statistics
    import tempfile

    from tqdm.auto import tqdm

    import ccluster
    from .procedure import Trainer
    cfg = load_config(args.config, args.overrides) if args.config else demo_config(args.overrides)
    cfg["run"]["progress"] = False
    apply_threads(cfg)
    d = cfg["data"]
    print(f"steptime: {args.steps} pairs of training steps (one without L_cc, one with, alternated) after "
          f"3 warm-up pairs; batch {d['batch_size']} x up to {d['max_seqlen']} segments, embed "
          f"{cfg['model']['embed_dim']}, {torch_threads()} torch thread(s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        trainer = Trainer(cfg, tmp)
        ctx = trainer.exemplars.ctx
        videos = _timing_videos(ctx.dataset, ctx.train_idx, cfg["cc"]["size"])
        print(f"steptime: dataset loaded ({len(ctx.dataset.videos)} videos, {time.perf_counter() - t0:.0f} s); "
              f"exemplar database from {len(videos)} of {len(ctx.train_idx)} training videos, Q fit at most "
              f"10 passes (the step cost depends on the database's shape only)", file=sys.stderr, flush=True)
        # untrained network, few videos, a short fit: the database's content does not change the cost
        quick = copy.deepcopy(cfg)
        quick["cc"]["fit_max_iter"] = min(cfg["cc"]["fit_max_iter"], 10)
        trainer.exemplars.ctx = dataclasses.replace(ctx, cfg=quick, train_idx=videos)
        try:
            trainer.build_database("timing")
        finally:
            trainer.exemplars.ctx = ctx
        plain, with_cc, ratios = [], [], []
        bar = tqdm(total=3 + args.steps, desc="steptime", unit="pair", dynamic_ncols=True)
        for i in range(3):  # warm-up
            trainer.train_step(1, i, False)
            trainer.train_step(1, i, True)
            bar.update(1)
        for i in range(args.steps):
            pair = []
            for use_cc in ((False, True) if i % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                trainer.train_step(1, 3 + i, use_cc)
                pair.append((use_cc, time.perf_counter() - t0))
            t = dict(pair)
            plain.append(t[False])
            with_cc.append(t[True])
            ratios.append(t[True] / t[False])
            bar.update(1)
            bar.set_postfix_str(f"{1e3 * statistics.median(plain):.0f} / "
                                f"{1e3 * statistics.median(with_cc):.0f} ms")
        bar.close()
    print(f"training step, batch {d['batch_size']} x up to {d['max_seqlen']} segments, embed "
          f"{cfg['model']['embed_dim']}, C x n = {trainer.dataset.num_classes} x {cfg['cc']['size']}, "
          f"compiled ops: {ccluster.has_compiled_ops()}, torch threads: {torch_threads()}")
    print(f"without L_cc: {1e3 * statistics.median(plain):.1f} ms   with L_cc: "
          f"{1e3 * statistics.median(with_cc):.1f} ms   ratio (median of pairs): "
          f"{statistics.median(ratios):.2f}x over {args.steps} pairs")
    return 0


def torch_threads() -> int:
    import torch
    return torch.get_num_threads()


def format_table(rows, tiou, signed=()) -> str:
    """One line per (name, results): cls mAP (plain, selection), det mAP per tIoU and their mean (%).
    Rows named in ``signed`` are differences, printed with a sign."""
    def cell(v, sign):
        return "    -" if v is None else (f"{100 * v:+5.1f}" if sign else f"{100 * v:5.1f}")
    head = f"{'':<40} {'cls':>5} {'cls*':>5} " + " ".join(f"{t:>5g}" for t in tiou) + f" {'avg':>5}"
    lines = [head]
    for name, r in rows:
        def pct(v, sign=name in signed):
            return cell(v, sign)
        det = " ".join(pct(r.get(f"det_map@{t:g}")) for t in tiou)
        lines.append(f"{name:<40} {pct(r.get('cls_map'))} {pct(r.get('cls_map_select'))} {det} "
                     f"{pct(r.get('det_map_avg'))}")
    lines.append("cls: classification mAP (attention-pooled video scores); cls*: with test-time selection of "
                 "representative segments; columns 0.1-0.7: detection mAP at tIoU; avg: their mean (all %).")
    return "\n".join(lines)


def _dist_args(p) -> None:
    g = p.add_argument_group("several processes (under torchrun; ignored in a single process)")
    g.add_argument("--dist-backend", default="auto", choices=("auto", "nccl", "gloo"),
                   help="torch.distributed backend (auto: nccl for device=cuda, gloo for cpu)")
    g.add_argument("--dist-timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="timeout of every collective: a rank that waits longer for the others fails "
                        "(default 1800)")


def main(argv=None) -> int:
    """Entry point; under torchrun (WORLD_SIZE > 1) an exception is also recorded for the launcher,
    which then ends the other ranks and reports this rank's error."""
    with interrupt.stop_on_ctrl_c():  # from the start: Ctrl-C during the (long) imports is no traceback
        try:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                from torch.distributed.elastic.multiprocessing.errors import record
                return record(_after_peer_failures_wait(_main))(argv)
            return _main(argv)
        except KeyboardInterrupt:
            if "--debug" in (sys.argv[1:] if argv is None else argv) or _debug_env():
                raise
            _close_progress_bars()
            print("interrupted", file=sys.stderr)
            return 130


def _debug_env() -> bool:
    return os.environ.get("CCLUSTER_DEBUG", "") not in ("", "0")


# Messages of a collective that failed because another rank went away (gloo, NCCL).
_PEER_GONE = ("closed by peer", "reset by peer", "connection refused", "broken pipe", "nccl")


def _is_peer_failure(exc: BaseException) -> bool:
    import torch.distributed as dist
    text = str(exc).lower()
    return isinstance(exc, dist.DistError) or any(m in text for m in _PEER_GONE)


def _after_peer_failures_wait(func):
    """``func``, but a collective that failed because a peer stopped waits a little over a second
    before raising: the launcher names the earliest recorded error the root cause and its timestamps
    are whole seconds (ties go to the lowest rank), so without the wait a rank blocked in a
    collective could be reported instead of the rank that actually failed."""
    def wrapped(argv=None):
        try:
            return func(argv)
        except Exception as exc:
            if _is_peer_failure(exc):
                time.sleep(1.5)
            raise
    return wrapped


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (``key=value`` overrides are collected separately, see :func:`parse`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: environment CCLUSTER_DEBUG=1)")
    parser = OneLineParser(prog="python -m train", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("fit", parents=[common],
                       help="train (baseline, then the rounds with L_cc), evaluate, save")
    p.add_argument("--config", help="YAML file (keys of train/config.py DEFAULTS)")
    p.add_argument("--run-dir", help="run folder (default run.dir, or runs/<name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder (without --config: with its saved config)")
    _dist_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("eval", parents=[common], help="evaluate a checkpoint on the test subset")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or a run folder")
    p.add_argument("--figures", type=non_negative_int, default=0,
                   help="draw T-CAM figures of this many videos (default 0)")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    _dist_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", parents=[common],
                       help="synthetic data: the method vs its same-batch control, one table")
    p.add_argument("--out", default="runs/demo", help="folder of the runs (default runs/demo)")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo runs in --out first")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("compare", parents=[common],
                       help="variants vs a same-batch control over seeds: mean, sd, paired 95%% CI")
    p.add_argument("--config", help="YAML file: the base config (its cc.* is what an empty variant runs)")
    p.add_argument("--variants", help="YAML file of variants: 'name: {key: value, ...}' per line")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME: {KEY: VALUE}'",
                   help="one more variant (repeatable), e.g. --variant 'lam01: {cc.weight: 0.1}'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--out", help="comparison folder (default runs/compare-<name>)")
    p.add_argument("--peer", action="append", default=[], metavar="RESULTS_JSON",
                   help="a row not trained here, paired by seed: the results.json of "
                        "benchmarks/peer_wtalc.py (W-TALC's own code); repeatable")
    p.add_argument("--against", metavar="NAME",
                   help="the row the differences are taken from (default: control), e.g. a peer's name")
    p.add_argument("--metrics", nargs="+", metavar="M",
                   help="columns: cls, cls*, det@<tIoU>, det@all (0.1-0.7), det-avg "
                        "(default: cls cls* det@0.5 det-avg)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("steptime", parents=[common], help="time a training step with and without L_cc")
    p.add_argument("--config", help="YAML file (default: the synthetic demo preset)")
    p.add_argument("--steps", type=positive_int, default=20, help="pairs of steps to time (default 20)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_steptime)
    p = sub.add_parser("config", parents=[common], help="print the resolved config")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_config)
    return parser


def parse(argv=None) -> argparse.Namespace:
    """Parse the command line; ``key=value`` overrides are accepted anywhere on it (also after options
    such as ``--resume``), in the order given."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    rest = []
    for text in extra:
        if hasattr(args, "overrides") and "=" in text and not text.startswith("-"):
            args.overrides.append(text)
        else:
            rest.append(text)
    if rest:
        print(f"error: unrecognized arguments: {' '.join(rest)}, see {parser.prog} {args.command} --help",
              file=sys.stderr)
        sys.exit(2)
    return args


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _main(argv=None) -> int:
    args = parse(argv)
    from .distributed import env_rank
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("fit", "eval"):
        print(f"error: '{args.command}' runs in one process, under torchrun only fit and eval run "
              f"in parallel", file=sys.stderr)
        return 2
    # other ranks: warnings and errors only (rank 0 reports progress); log lines go through tqdm, which
    # clears its bars, writes the line, and draws them again below it
    if not logging.getLogger().handlers:
        handler = _ThroughProgressBars()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.basicConfig(level=logging.INFO if env_rank() == 0 else logging.WARNING, handlers=[handler])
    try:
        return _run_command(args, args.debug or _debug_env())
    finally:
        _close_progress_bars()


class _ThroughProgressBars(logging.Handler):
    """Writes to stderr with ``tqdm.write``: a log line never lands inside a progress bar."""

    def emit(self, record):
        try:
            from tqdm.auto import tqdm
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # as logging.StreamHandler: a failed log line is reported, never raised
            self.handleError(record)


def _close_progress_bars() -> None:
    """Close the bars an exception left open (an interrupted loop's bar is otherwise closed, and drawn
    once more, only when its frame is freed: after the message that says where the run stopped)."""
    from tqdm.auto import tqdm
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _run_command(args, debug: bool) -> int:
    from .checkpoint import CheckpointError
    from .data import DatasetError
    try:
        return args.func(args)
    except Interrupted as exc:
        _close_progress_bars()
        print(f"interrupted: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if debug:
            raise
        _close_progress_bars()
        print("interrupted", file=sys.stderr)
        return 130
    except (ConfigError, CheckpointError, DatasetError) as exc:
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a missing file, a full disk, a folder without permission
        if debug:
            raise
        if exc.filename is not None and exc.strerror:
            what = f"{exc.strerror.lower()}: {exc.filename}"
            if exc.filename2:
                what += f" -> {exc.filename2}"
            print(f"error: {what}, check the path (or the disk), then run the command again", file=sys.stderr)
        else:
            print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except MemoryError:
        if debug:
            raise
        print("error: out of memory, reduce data.batch_size or data.max_seqlen (or cc.size)", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug or int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise  # under torchrun the launcher reports the traceback as the root cause
        print(f"error: {type(exc).__name__}: {_one_line(exc)} (unexpected: rerun with --debug or "
              f"CCLUSTER_DEBUG=1 for the traceback, and report it)", file=sys.stderr)
        return 1


__all__ = ["main", "parse", "format_table", "demo_config", "apply_threads", "DEFAULTS"]
