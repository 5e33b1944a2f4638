"""Command line: ``python -m train {fit,eval,demo,steptime,config}``.

    python -m train fit --config configs/synthetic.yaml [key=value ...] [--resume]
    python -m train eval --checkpoint runs/synthetic/latest.pt
    python -m train demo [--out runs/demo] [key=value ...]
    python -m train compare --config configs/calibrated.yaml --variants variants.yaml --seeds 0 1 2 3 4
    python -m train steptime [--config ...] [key=value ...]   # a training step with vs without L_cc
    python -m train config --config configs/thumos14.yaml [key=value ...]   # print the resolved config

Several processes (data-parallel, torch.distributed; see train/distributed.py):

    torchrun --nproc_per_node=K -m train fit --config ... [key=value ...] [--resume]
    torchrun --nproc_per_node=K -m train eval --checkpoint runs/thumos14/latest.pt
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import DEFAULTS, ConfigError, PRESETS, from_dict, load_config, to_yaml

log = logging.getLogger("train")

def run_dir_of(cfg: dict) -> Path:
    return Path(cfg["run"]["dir"] or f"runs/{cfg['name']}")


def _config_diff(a: dict, b: dict, prefix="") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            keys.append(f"{prefix}{k} ({vb!r} saved, {va!r} now)")
    return keys


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


def cmd_fit(args) -> int:
    cfg = load_config(args.config, args.overrides)
    return _in_process_group(args, cfg["device"], lambda: _fit(args, cfg))


def _fit(args, cfg) -> int:
    from . import checkpoint as ckpt
    from . import distributed
    from .procedure import Trainer
    run_dir = Path(args.run_dir) if args.run_dir else run_dir_of(cfg)
    latest = run_dir / ckpt.LATEST
    main = distributed.is_main()
    state = _load_on_rank0(latest) if distributed.world_size() > 1 else (
        ckpt.load(latest) if latest.exists() else None)
    if state is not None:
        if not args.resume:
            raise ConfigError(f"run folder {run_dir} already holds a run ({latest}); pass --resume to "
                              f"continue it, or choose another run.dir / name")
        saved = from_dict(state["config"])
        if args.config or args.overrides:
            diff = _config_diff(cfg, saved)
            if diff:
                raise ConfigError(f"--resume: the config differs from the one saved in {run_dir}: "
                                  + "; ".join(diff))
        trainer = Trainer.resume(run_dir, state=state)
        if main:
            print(f"resuming {run_dir} at stage "
                  f"{trainer.plan[min(trainer.stage, len(trainer.plan) - 1)][0]}, step {trainer.step} "
                  f"(global {trainer.global_step})"
                  + (f" with {distributed.world_size()} processes" if distributed.world_size() > 1 else ""),
                  file=sys.stderr)
    else:
        if args.resume and main:
            print(f"--resume: no checkpoint in {run_dir}; starting a new run", file=sys.stderr)
        trainer = Trainer(cfg, run_dir)
    results = trainer.run()
    if main:
        print(format_table([(name, res) for name, res in results.items()], cfg["eval"]["tiou"]))
        print(f"run folder: {run_dir}")
    return 0


def cmd_eval(args) -> int:
    from . import checkpoint as ckpt
    path = Path(args.checkpoint)
    state = ckpt.load(path)  # every rank reads it (read only)
    cfg = from_dict(state["config"])
    return _in_process_group(args, cfg["device"], lambda: _eval(args, path, state, cfg))


def _eval(args, path, state, cfg) -> int:
    from . import distributed
    from .procedure import Trainer
    run_dir = path.parent if path.is_file() else path
    trainer = Trainer(cfg, run_dir)
    trainer.load_state_dict(state)
    res = trainer.evaluate(figures=args.figures)
    if distributed.is_main():
        if args.json:
            print(json.dumps(res, indent=2))
        print(format_table([(state["stage_name"], res)], cfg["eval"]["tiou"]))
    return 0


def cmd_config(args) -> int:
    print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def demo_config(overrides=()) -> dict:
    """The demo's config: the synthetic preset (``configs/synthetic.yaml``) with ``overrides``."""
    return load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flat(PRESETS["synthetic"])]
                       + list(overrides))


def _flat(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def cmd_demo(args) -> int:
    """The method against its same-batch control (cc.weight 0) from one shared stage 1, one seed."""
    from .compare import CONTROL, Comparison
    cfg = demo_config(args.overrides)
    out = Path(args.out)
    if args.fresh and out.exists():
        import shutil
        shutil.rmtree(out)
    t0 = time.time()
    comp = Comparison(cfg, {"method": {}}, [cfg["seed"]], out)
    res = comp.run()["results"]
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
    print(f"({time.time() - t0:.0f} s; both continue from the same {t['baseline_steps']}-step stage 1 "
          f"on the same batches; runs in {out}/seed-{seed}; table in {out}/table.txt)")
    return 0


def cmd_compare(args) -> int:
    from .compare import Comparison, load_variants
    cfg = load_config(args.config, args.overrides)
    variants = load_variants(args.variants, args.variant)
    out = Path(args.out) if args.out else Path("runs") / f"compare-{cfg['name']}"
    t0 = time.time()
    res = Comparison(cfg, variants, args.seeds, out).run()
    print(res["table"])
    print(f"({time.time() - t0:.0f} s; runs, results.json, table.txt and compare.png in {out})")
    return 0


def cmd_steptime(args) -> int:
    """Median time of a training step with L_cc and without, alternated in one process."""
    import statistics
    import tempfile

    import ccluster
    from .procedure import Trainer
    cfg = load_config(args.config, args.overrides) if args.config else demo_config(args.overrides)
    cfg["run"]["progress"] = False
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(cfg, tmp)
        trainer.build_database("timing")  # untrained network: the database's content does not change the cost
        for i in range(3):  # warm-up
            trainer.train_step(1, i, False)
            trainer.train_step(1, i, True)
        plain, with_cc, ratios = [], [], []
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
    d = cfg["data"]
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
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from torch.distributed.elastic.multiprocessing.errors import record
        return record(_main)(argv)
    return _main(argv)


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fit", help="train (baseline, then the rounds with L_cc), evaluate, save")
    p.add_argument("--config", help="YAML file (keys of train/config.py DEFAULTS)")
    p.add_argument("--run-dir", help="run folder (default run.dir, or runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder")
    _dist_args(p)
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_fit)
    p = sub.add_parser("eval", help="evaluate a checkpoint on the test subset")
    p.add_argument("--checkpoint", required=True, help="a checkpoint file or a run folder")
    p.add_argument("--figures", type=int, default=0, help="draw T-CAM figures of this many videos")
    p.add_argument("--json", action="store_true", help="also print the results as JSON")
    _dist_args(p)
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("demo", help="synthetic data: the method vs its same-batch control, one table")
    p.add_argument("--out", default="runs/demo", help="folder of the runs (default runs/demo)")
    p.add_argument("--fresh", action="store_true", help="delete earlier demo runs in --out first")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("compare", help="variants vs a same-batch control over seeds: mean, sd, paired 95% CI")
    p.add_argument("--config", help="YAML file: the base config (its cc.* is what an empty variant runs)")
    p.add_argument("--variants", help="YAML file of variants: 'name: {key: value, ...}' per line")
    p.add_argument("--variant", action="append", default=[], metavar="'NAME: {KEY: VALUE}'",
                   help="one more variant (repeatable), e.g. --variant 'lam01: {cc.weight: 0.1}'")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--out", help="comparison folder (default runs/compare-<name>)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_compare)
    p = sub.add_parser("steptime", help="time a training step with and without L_cc")
    p.add_argument("--config", help="YAML file (default: the synthetic demo preset)")
    p.add_argument("--steps", type=int, default=20, help="pairs of steps to time")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_steptime)
    p = sub.add_parser("config", help="print the resolved config")
    p.add_argument("--config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=cmd_config)
    args = parser.parse_args(argv)
    from .distributed import env_rank
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in ("fit", "eval"):
        print(f"error: '{args.command}' runs in one process; under torchrun only fit and eval run "
              f"in parallel", file=sys.stderr)
        return 2
    # other ranks: warnings and errors only (rank 0 reports progress)
    logging.basicConfig(level=logging.INFO if env_rank() == 0 else logging.WARNING, format="%(message)s",
                        stream=sys.stderr)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


__all__ = ["main", "format_table", "demo_config", "DEFAULTS"]
