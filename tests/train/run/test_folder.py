"""The run folder (train/run/folder.py) and what a Run does with it: one writer (a reentrant lock), the
config record, checkpoints, the metrics log cut back on resume, results written whole; a folder that holds
a run is not started again."""
import json
from pathlib import Path

import pytest
import torch

from tinyrun import copy_of, tiny_run  # noqa: F401 (a fixture)
from train.config import ConfigError, load_config
from train.run import Run, RunFolder
from train.run.lock import RunFolderBusy, RunFolderLock

ROOT = Path(__file__).resolve().parents[3]


def test_the_lock_is_reentrant_and_excludes_other_writers(tmp_path):
    folder = RunFolder(tmp_path / "run", main=True)
    with folder.locked():
        with folder.locked():  # a Run opened by a caller that already holds the folder
            assert (tmp_path / "run" / ".lock").exists()
        assert (tmp_path / "run" / ".lock").exists()  # still held by the outer block
        with pytest.raises(RunFolderBusy, match=r"run folder .*run is in use by process \d+"):
            RunFolderLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run").exists()  # let go, and the folder it created for nothing removed


def test_config_record_checkpoints_log_and_results(tmp_path):
    folder = RunFolder(tmp_path / "run", main=True)
    assert folder.recorded_config() is None and folder.load_checkpoint() is None and not folder.finished
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    folder.write_config(cfg)
    assert folder.recorded_config() == cfg
    folder.save_checkpoint({"config": cfg, "w": torch.arange(3)}, stage_copy="baseline")
    state = folder.load_checkpoint()
    assert state["config"] == cfg and torch.equal(state["w"], torch.arange(3))
    assert (tmp_path / "run" / "stage-baseline.pt").read_bytes() == folder.latest.read_bytes()
    folder.open_log(0, tensorboard=False)
    offset = folder.log({"kind": "train", "step": 1})
    folder.log({"kind": "train", "step": 2})
    folder.open_log(offset, tensorboard=False)  # resumed from a checkpoint taken after step 1
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1]
    folder.write_results({"cc1": {"cls_map": 0.5}})
    assert folder.finished and folder.results() == {"cc1": {"cls_map": 0.5}}
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_rank_that_does_not_write_leaves_the_folder_alone(tmp_path):
    folder = RunFolder(tmp_path / "run", main=False)
    with folder.locked():
        folder.write_config({"a": 1})
        folder.write_results({"x": 1})
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_folder_that_holds_a_run_is_not_started_again(tiny_run, tmp_path):
    folder = copy_of(tiny_run, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"run folder .*run already holds a run"):
        Run(tiny_run.cfg, folder)
    assert not (folder / ".lock").exists()  # the refused run let go of the folder
    with Run.resume(folder) as run:  # resumed, a finished run has nothing left to train
        assert run.resumed and run.finished and run.train() == tiny_run.results
