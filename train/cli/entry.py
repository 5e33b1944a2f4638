"""Command line: ``python -m train {fit,eval,demo,compare,steptime,config}`` (``ccluster-train`` once
installed): the parser, and the one-line handling of every error a user can cause. The commands are in
:mod:`train.cli.commands`.

    python -m train fit --config configs/synthetic.yaml [key=value ...] [--resume]
    python -m train eval --checkpoint runs/synthetic/latest.pt
    python -m train demo [--out runs/demo] [key=value ...]
    python -m train compare --config configs/calibrated.yaml --variants variants.yaml --seeds 0 1 2 3 4
    python -m train steptime [--config ...] [key=value ...]   # a training step with vs without L_cc
    python -m train config --config configs/thumos14.yaml [key=value ...]   # print the resolved config

Several processes (data-parallel, torch.distributed; see :mod:`train.common.distributed`):

    torchrun --nproc_per_node=K -m train fit --config ... [key=value ...] [--resume]
    torchrun --nproc_per_node=K -m train eval --checkpoint runs/thumos14/latest.pt

``key=value`` overrides may stand anywhere on the line. ``fit --run-dir DIR --resume`` continues the run
in DIR with the config saved there (``run.progress``, ``run.tensorboard`` and ``run.threads`` may be
changed on resume, nothing else).

Errors a user can cause (a config key, a missing or damaged file, a checkpoint that cannot be used)
print one line, ``error: <what>, <which file or key>, <what to do>``, and exit with code 2; Ctrl-C
prints where the run stopped and how to continue, and exits with 130 (stopping at once, whatever it was
doing, see :mod:`train.common.interrupt`; when the interruption passed through code that Python ran with
``exec``, as during a lazy import, CPython ends the process by SIGINT instead, which shells report as 130
too). ``--debug`` (or ``CCLUSTER_DEBUG=1``) shows the traceback instead.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..common import interrupt, names
from ..common.parsing import OneLineParser, non_negative_int, positive_int
from ..config import ConfigError
from .commands import (Interrupted, cmd_compare, cmd_config, cmd_demo, cmd_eval, cmd_fit, cmd_steptime, demo_config,
                       format_table)

log = logging.getLogger("train")


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


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away (gloo, NCCL)."""
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
            if is_peer_failure(exc):
                time.sleep(1.5)
            raise
    return wrapped


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command (``key=value`` overrides are collected separately, see :func:`parse`)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also: environment CCLUSTER_DEBUG=1)")
    parser = OneLineParser(prog=names.TRAIN, description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    p = sub.add_parser("fit", parents=[common],
                       help="train (baseline, then the rounds with L_cc), evaluate, save")
    p.add_argument("--config", help="YAML file (keys: docs/config.md, train/config/schema.py)")
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
    from ..common.distributed import env_rank
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
    from ..run.checkpoint import CheckpointError
    from ..data import DatasetError
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


__all__ = ["main", "parse", "build_parser", "format_table", "demo_config"]
