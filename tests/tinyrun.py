"""One trained run of the tiny preset for the whole test session: the tests that need a trained model
(checkpoints, evaluation, the command line on a run folder) share it instead of training their own.

    from tinyrun import TINY_RUN, tiny_run    # the fixture; TINY_RUN: its overrides

The run is trained once per session, into a session folder, with its data generated into a session cache
named in its config (``data.root``), so that reopening it never depends on ``CCLUSTER_CACHE``. Tests read
the run; a test that writes into a run folder copies it first (:func:`copy_of`).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Two exemplar rounds with test-time selection, a line of metrics.jsonl per step: every kind of state
# and output a run has. Long enough that a kill can land inside a training stage.
TINY_RUN = ["train.baseline_steps=12", "train.cc_steps=8", "train.log_every=1", "cc.rounds=2", "cc.select=true"]
STEPS = 12 + 2 * 8


@dataclass(frozen=True)
class TinyRun:
    """A finished tiny run: its config, its folder (read only), its results per stage and the data's root."""
    cfg: dict
    folder: Path
    results: dict
    data_root: Path

    def overrides(self) -> list[str]:
        """The ``key=value`` overrides that give this run's config over configs/tiny.yaml."""
        return [*TINY_RUN, f"data.root={self.data_root}"]


_SESSION: dict = {}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The session's tiny run (trained on first use; a test module importing this fixture shares it)."""
    if "run" not in _SESSION:
        from train.config import load_config
        from train.run import Run
        data_root = tmp_path_factory.mktemp("tiny-data") / "synthetic-tiny"
        cfg = load_config(ROOT / "configs" / "tiny.yaml", [*TINY_RUN, f"data.root={data_root}"])
        folder = tmp_path_factory.mktemp("tiny-run") / "tiny"
        with Run(cfg, folder) as run:
            results = run.train()
        _SESSION["run"] = TinyRun(cfg, folder, results, data_root)
    return _SESSION["run"]


def copy_of(run: TinyRun, dest: Path) -> Path:
    """A copy of the run folder at ``dest`` (for tests that write into it)."""
    shutil.copytree(run.folder, dest)
    return dest
