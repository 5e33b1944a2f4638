"""Checkpoints (train/run/checkpoint.py) open with ``torch.load(weights_only=True)``; a file carrying a
pickled object is refused; the RNG states survive the trip exactly; an older checkpoint you trust can be
converted; one without the input statistics evaluates unstandardised."""
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyrun import tiny_run  # noqa: F401 (a fixture)
from train.config import load_config
from train.run import checkpoint as ckpt
from train.run import Run
from train.run.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def trainer(tiny_run):
    """The session's tiny run: every kind of state is in its checkpoints (a database, Q, alpha, ...)."""
    return tiny_run


def _plain(obj) -> bool:
    """Only tensors and plain values all the way down."""
    if isinstance(obj, dict):
        return all(isinstance(k, (str, int)) and _plain(v) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return all(_plain(v) for v in obj)
    return obj is None or isinstance(obj, (torch.Tensor, bool, int, float, str))


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only(trainer):
    path = trainer.folder / "latest.pt"
    raw = torch.load(path, weights_only=True)  # raises if anything in it is a pickled object
    assert raw["format"] == ckpt.FORMAT and isinstance(raw["config"], str)
    assert _plain(raw)
    state = ckpt.load(path)
    assert state["config"] == trainer.cfg  # the YAML text comes back as the same config
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    for name in ("stage-baseline.pt", "stage-db1.pt", "stage-cc1.pt"):
        torch.load(trainer.folder / name, weights_only=True)


def test_a_pickled_object_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "was-run"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.ones(2)}, "config": "{}", "extra": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt carries a pickled Python object \(io\.open\).*"
                                              r"refused"):
        ckpt.load(path)
    assert not marker.exists()


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow
def test_damaged_and_foreign_files(trainer, tmp_path):
    whole = (trainer.folder / "latest.pt").read_bytes()
    for size in (0, 100, len(whole) // 2, len(whole) - 10):
        cut = tmp_path / f"cut{size}.pt"
        cut.write_bytes(whole[:size])
        with pytest.raises(CheckpointError, match=rf"cut{size}\.pt is damaged"):
            ckpt.load(cut)
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(3)}, other)  # safe, but not a training checkpoint
    with pytest.raises(CheckpointError, match=r"weights\.pt is not a ccluster training checkpoint"):
        ckpt.load(other)
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*none\.pt"):
        ckpt.load(tmp_path / "none.pt")


def _draws():
    return (torch.rand(3), np.random.standard_normal(3), np.random.randint(0, 1 << 30, 3), random.random(),
            random.gauss(0, 1))


def test_rng_states_survive_a_checkpoint_exactly(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.standard_normal()  # an odd number of normal draws: numpy holds a cached gaussian
    random.gauss(0, 1)           # and so does Python's random
    state = ckpt.rng_state()
    assert state["numpy"]["has_gauss"] == 1 and state["python"]["gauss_next"] is not None
    expected = _draws()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    _draws()  # move every generator on
    ckpt.set_rng_state(loaded)
    got = _draws()
    assert torch.equal(got[0], expected[0])
    assert np.array_equal(got[1], expected[1]) and np.array_equal(got[2], expected[2])
    assert got[3] == expected[3] and got[4] == expected[4]


@pytest.mark.slow
def test_upgrade_converts_an_older_checkpoint(trainer, tmp_path):
    state = _state_of(trainer)
    old = dict(state, rng={"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                           "python": random.getstate()})  # the former layout: pickled numpy and tuples
    path = tmp_path / "old.pt"
    torch.save(old, path)
    with pytest.raises(CheckpointError, match=r"pickled Python object.*python -m train\.run\.checkpoint upgrade"):
        ckpt.load(path)
    assert ckpt.main(["upgrade", str(path), "--out", str(tmp_path / "new.pt")]) == 0
    new = ckpt.load(tmp_path / "new.pt")
    assert new["config"] == trainer.cfg and new["step"] == state["step"]
    assert torch.equal(new["rng"]["numpy"]["keys"], torch.from_numpy(old["rng"]["numpy"][1].astype(np.int64)))
    assert all(torch.equal(new["model"][k], v) for k, v in state["model"].items())


def test_upgrade_refuses_a_crafted_file_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "was-run"
    path = tmp_path / "old.pt"
    torch.save({"model": {}, "config": {}, "rng": {"numpy": np.random.get_state()}, "x": _Payload(str(marker))},
               path)
    assert ckpt.main(["upgrade", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {path} carries a pickled Python object (io.open)") and "refused" in err
    assert not marker.exists()


def test_a_file_that_is_not_a_checkpoint_is_not_called_damaged(tmp_path):
    for name, content in (("config.yaml", (ROOT / "configs" / "tiny.yaml").read_bytes()),
                          ("notes.txt", b"hello"), ("data.npy", b"\x93NUMPY\x01\x00")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(CheckpointError) as exc:
            ckpt.load(path)
        message = str(exc.value)
        assert message.startswith(f"{path} is not a checkpoint (not a file written by torch.save")
        assert "damaged" not in message and "start the run again" not in message


def _state_of(trainer):
    """The run's latest checkpoint, as a state in memory (the config a dict)."""
    return ckpt.load(trainer.folder / "latest.pt")


@pytest.mark.slow
def test_a_checkpoint_without_an_entry_or_of_another_shape_names_the_file(trainer, tmp_path):
    state = _state_of(trainer)
    state.pop("model")
    with pytest.raises(CheckpointError, match=r"checkpoint .*x\.pt has no 'model' entry: not a complete ccluster"):
        Run.load(tmp_path / "x.pt", state=state)
    state = _state_of(trainer)
    weight = next(k for k in state["model"] if k.endswith("weight"))
    state["model"][weight] = torch.zeros(3, 3)
    with pytest.raises(CheckpointError, match=rf"checkpoint .*y\.pt does not fit the model and data its config "
                                              rf"describes \(size mismatch for {weight}"):
        Run.load(tmp_path / "y.pt", state=state)
    assert not list(tmp_path.glob(".lock"))  # a run that failed to open let go of its folder


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux) to fail a write with ENOSPC")
def test_a_full_disk_keeps_the_previous_checkpoint_and_names_the_path(trainer, tmp_path, monkeypatch):
    path = tmp_path / "latest.pt"
    ckpt.save(_state_of(trainer), path)
    before = path.read_bytes()
    real_save = torch.save

    def to_a_full_disk(obj, f):  # the bytes go to /dev/full, where every write fails with ENOSPC
        with open("/dev/full", "wb") as full:
            real_save(obj, full)
            full.flush()

    monkeypatch.setattr(ckpt.torch, "save", to_a_full_disk)
    with pytest.raises(CheckpointError) as exc:
        ckpt.save(_state_of(trainer), path)
    assert str(exc.value).startswith(f"could not write checkpoint {path} (No space left on device): latest.pt "
                                     f"still holds the previous checkpoint; free disk space")
    assert path.read_bytes() == before and not list(tmp_path.glob(".*.tmp*"))


@pytest.mark.slow
def test_old_checkpoint_without_standardizer_evaluates_unstandardised(cache, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["train.baseline_steps=6", "train.cc_steps=4",
                                                       "train.log_every=2", "data.standardize=none"])
    run = tmp_path / "old"
    with Run(cfg, run) as r:
        res = r.train()
    state = ckpt.load(run / "latest.pt")
    del state["standardizer"]
    del state["config"]["data"]["standardize"]  # as written before the key existed
    ckpt.save(state, run / "latest.pt")
    with Run.resume(run) as again:
        assert again.ctx.standardizer is None and again.cfg["data"]["standardize"] == "none"
        assert again.evaluate(progress=False) == pytest.approx(res["cc1"])
