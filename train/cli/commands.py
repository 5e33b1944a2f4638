"""The commands of ``python -m train`` (``ccluster-train`` once installed): one function per command,
each given the parsed arguments (:func:`train.cli.entry.parse`) and returning the exit code.

Every command that trains or evaluates opens its runs through :class:`train.run.Run`; errors a user can
cause are raised (:class:`train.config.ConfigError` and the like) and turned into one line by
:mod:`train.cli.entry`.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..common import names
from ..config import DEFAULTS, PRESETS, ConfigError, flatten, load_config, parse_override, to_yaml


class Interrupted(Exception):
    """Ctrl-C: the message says where the run stopped and how to continue."""


def run_dir_of(cfg: dict) -> Path:
    """The run folder of a config: ``run.dir``, or ``runs/<name>``."""
    return Path(cfg["run"]["dir"] or f"runs/{cfg['name']}")


def in_process_group(args, device: str, command) -> int:
    """``command()`` inside the process group torchrun describes (nothing to do in a single process).
    The group is left after a success; after an error the process just exits (destroying a group with
    a peer blocked in a collective can block too; the launcher ends the peers)."""
    from ..common import distributed
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


def need_config(args, command: str) -> None:
    """Without --config and without data.root / data.synthetic overrides there is no data to train on:
    say that --config is missing (the defaults name no dataset)."""
    if args.config or any(_override_value(args.overrides, k) for k in ("data.root", "data.synthetic")):
        return
    raise ConfigError(f"{command}: --config is missing, pass a YAML config (e.g. --config configs/tiny.yaml, or "
                      f"configs/synthetic.yaml) or name the data with data.root=... / data.synthetic=...")


# ----------------------------------------------------------------------------------------------------
# fit


def cmd_fit(args) -> int:
    """Train a new run, or continue one (``--resume``); print its results."""
    from ..run import RunFolder
    if args.resume and not args.config:
        # The config comes from the checkpoint; the device (for the process group) from an override,
        # else from the run folder's config record.
        run_dir = _resume_dir(args)
        device = _override_value(args.overrides, "device")
        if device is None:
            device = (RunFolder(run_dir, main=True).recorded_config() or {}).get("device")
        return in_process_group(args, device or "cpu", lambda: _fit(args, None, run_dir))
    need_config(args, "fit")
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(args.run_dir) if args.run_dir else run_dir_of(cfg)
    return in_process_group(args, cfg["device"], lambda: _fit(args, cfg, run_dir))


def _fit(args, cfg, run_dir: Path) -> int:
    from ..common import distributed
    from ..run import Run
    main = distributed.is_main()
    run = None
    try:
        run = Run.fit(run_dir, cfg, args.overrides, resume=args.resume)
        with run:
            if main and run.resumed:
                print(f"resuming {run_dir} at stage {run.stage_name}, step {run.step} (global {run.global_step})"
                      + (f" with {distributed.world_size()} processes" if distributed.world_size() > 1 else ""),
                      file=sys.stderr)
            results = run.train()
    except KeyboardInterrupt:
        raise Interrupted(_where(run, run_dir)) from None
    if main:
        print(format_table([(name, res) for name, res in results.items()], run.cfg["eval"]["tiou"]))
        print(f"run folder: {run_dir} (predictions.json, cams.npz, results.json, curves.png, checkpoints)")
    return 0


def _where(run, run_dir: Path) -> str:
    """Where a fit stopped and the command that continues it."""
    resume = f"{names.TRAIN} fit --run-dir {run_dir} --resume"
    if run is None or run.saved_at is None:
        if (run_dir / "latest.pt").exists():
            return f"stopped before training went on; continue with: {resume}"
        return "stopped before the first checkpoint, nothing to continue: run the same command again"
    name, step, global_step = run.saved_at
    return (f"stopped in stage {run.stage_name} after step {run.step} (global {run.global_step}), "
            f"{run_dir / 'latest.pt'} holds stage {name} after step {step} (global {global_step}), continue "
            f"with: {resume}")


# ----------------------------------------------------------------------------------------------------
# eval


def cmd_eval(args) -> int:
    """Evaluate a checkpoint on the test subset; its predictions and T-CAMs go into its run folder."""
    from ..config import from_dict
    from ..run import checkpoint as ckpt
    path = Path(args.checkpoint)
    state = ckpt.load(path)  # every rank reads it (read only): its config names the device
    cfg = from_dict(state["config"])
    return in_process_group(args, cfg["device"], lambda: _eval(args, path, state, cfg))


def _eval(args, path: Path, state: dict, cfg: dict) -> int:
    from ..common import distributed
    from ..run import Run
    with Run.load(path, cfg=cfg, state=state) as run:
        res = run.evaluate(figures=args.figures)
    if distributed.is_main():
        if args.json:
            print(json.dumps(res, indent=2))
        print(format_table([(state["stage_name"], res)], cfg["eval"]["tiou"]))
        print(f"predictions and T-CAMs: {run.path}/predictions.json, {run.path}/cams.npz")
    return 0


# ----------------------------------------------------------------------------------------------------
# config, demo, compare


def cmd_config(args) -> int:
    """Print the resolved config (defaults, the YAML file, the overrides) as YAML."""
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def demo_config(overrides=()) -> dict:
    """The demo's config: the synthetic preset (``configs/synthetic.yaml``) with ``overrides``."""
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in flatten(PRESETS["synthetic"]).items()]
                       + list(overrides))


def cmd_demo(args) -> int:
    """The method against its same-batch control (cc.weight 0) from one shared stage 1, one seed."""
    from ..compare import CONTROL, Comparison
    cfg = demo_config(args.overrides)
    out = Path(args.out)
    t0 = time.time()
    comp = Comparison(cfg, {"method": {}}, [cfg["seed"]], out)
    try:
        res = comp.run(fresh=args.fresh)["results"]
    except KeyboardInterrupt:
        again = " ".join([f"{names.TRAIN} demo --out", str(out), *args.overrides])
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
    """Variants against a same-batch control over seeds (:class:`train.compare.Comparison`); print the table."""
    from ..compare import CONTROL, Comparison, load_peer, load_variants, parse_metrics
    need_config(args, "compare")
    cfg = load_config(args.config, args.overrides)
    variants = load_variants(args.variants, args.variant)
    peers = dict(load_peer(p, args.seeds) for p in args.peer)
    metrics = parse_metrics(args.metrics) if args.metrics else None
    out = Path(args.out) if args.out else Path("runs") / f"compare-{cfg['name']}"
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



# ----------------------------------------------------------------------------------------------------
# steptime, the results table


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
    import statistics
    import tempfile

    import torch
    from tqdm.auto import tqdm

    import ccluster
    from ..run import Run
    cfg = load_config(args.config, args.overrides) if args.config else demo_config(args.overrides)
    cfg["run"]["progress"] = False
    threads = cfg["run"]["threads"] or torch.get_num_threads()  # what the run will use
    d = cfg["data"]
    print(f"steptime: {args.steps} pairs of training steps (one without L_cc, one with, alternated) after "
          f"3 warm-up pairs; batch {d['batch_size']} x up to {d['max_seqlen']} segments, embed "
          f"{cfg['model']['embed_dim']}, {threads} torch thread(s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        run = Run.start(cfg, tmp)
        with run:
            videos = _timing_videos(run.dataset, run.ctx.train_idx, cfg["cc"]["size"])
            max_iter = min(cfg["cc"]["fit_max_iter"], 10)
            print(f"steptime: dataset loaded ({len(run.dataset.videos)} videos, {time.perf_counter() - t0:.0f} s); "
                  f"exemplar database from {len(videos)} of {len(run.ctx.train_idx)} training videos, Q fit at "
                  f"most {max_iter} passes (the step cost depends on the database's shape only)", file=sys.stderr,
                  flush=True)
            # untrained network, few videos, a short fit: the database's content does not change the cost
            run.build_database("timing", videos=videos, max_iter=max_iter)
            plain, with_cc, ratios = [], [], []
            bar = tqdm(total=3 + args.steps, desc="steptime", unit="pair", dynamic_ncols=True)
            for i in range(3):  # warm-up
                run.train_step(1, i, False)
                run.train_step(1, i, True)
                bar.update(1)
            for i in range(args.steps):
                pair = []
                for use_cc in ((False, True) if i % 2 == 0 else (True, False)):
                    t0 = time.perf_counter()
                    run.train_step(1, 3 + i, use_cc)
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
          f"{cfg['model']['embed_dim']}, C x n = {run.dataset.num_classes} x {cfg['cc']['size']}, "
          f"compiled ops: {ccluster.has_compiled_ops()}, torch threads: {torch_threads()}")
    print(f"without L_cc: {1e3 * statistics.median(plain):.1f} ms   with L_cc: "
          f"{1e3 * statistics.median(with_cc):.1f} ms   ratio (median of pairs): "
          f"{statistics.median(ratios):.2f}x over {args.steps} pairs")
    return 0


def torch_threads() -> int:
    """torch's intra-op thread count now."""
    import torch
    return torch.get_num_threads()


def format_table(rows, tiou, signed=()) -> str:
    """One line per (name, results): cls mAP, cls* (with test-time selection, only where some row has it:
    cc.select), det mAP per tIoU and their mean (%), and a footnote that explains the columns shown.
    Rows named in ``signed`` are differences, printed with a sign."""
    def cell(v, sign):
        return "    -" if v is None else (f"{100 * v:+5.1f}" if sign else f"{100 * v:5.1f}")
    # cls* exists only with cc.select: without it a column of dashes would say nothing
    select = any(r.get("cls_map_select") is not None for _, r in rows)
    head = f"{'':<40} {'cls':>5} " + (f"{'cls*':>5} " if select else "") + " ".join(f"{t:>5g}" for t in tiou) \
        + f" {'avg':>5}"
    lines = [head]
    for name, r in rows:
        def pct(v, sign=name in signed):
            return cell(v, sign)
        det = " ".join(pct(r.get(f"det_map@{t:g}")) for t in tiou)
        star = f"{pct(r.get('cls_map_select'))} " if select else ""
        lines.append(f"{name:<40} {pct(r.get('cls_map'))} {star}{det} {pct(r.get('det_map_avg'))}")
    columns = f"columns {tiou[0]:g}-{tiou[-1]:g}" if len(tiou) > 1 else f"column {tiou[0]:g}"
    lines.append("cls: classification mAP (attention-pooled video scores); "
                 + ("cls*: with test-time selection of representative segments; " if select else "")
                 + f"{columns}: detection mAP at tIoU; avg: their mean (all %).")
    return "\n".join(lines)
