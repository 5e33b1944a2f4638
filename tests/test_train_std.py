"""Standardised inputs and T-CAM smoothing in the training procedure (tiny synthetic preset)."""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

import train.eval as ev
from train.run import checkpoint as ckpt
from train.config import load_config
from train.data.standardize import FeatureStandardizer
from train.run import Run
from train.run.context import open_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.baseline_steps=6", "train.cc_steps=4", "train.log_every=2", "cc.rounds=1"]


def _affine(dataset, scale=250.0, shift=40.0):
    """The same dataset with every feature dimension scaled and shifted (a badly conditioned copy)."""
    out = copy.deepcopy(dataset)
    d = out.feature_dim
    a = scale * (1 + np.arange(d) / d)
    for v in out.videos:
        v.features = (v.features.astype(np.float64) * a + shift).astype(np.float32)
    return out


def test_standardizer_in_checkpoint_and_used_at_evaluation(cache, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", TINY + ["data.standardize=zscore"])
    run = tmp_path / "z"
    with Run(cfg, run) as trainer:
        results = trainer.train()
    state = torch.load(run / "latest.pt", weights_only=False)
    assert set(state["standardizer"]) == {"count", "mean", "m2", "scale", "min_std_ratio"}
    with Run.resume(run) as again:
        np.testing.assert_array_equal(again.ctx.standardizer.mean, trainer.ctx.standardizer.mean)
        np.testing.assert_array_equal(again.ctx.standardizer.scale, trainer.ctx.standardizer.scale)
        assert again.evaluate(progress=False) == pytest.approx(results["cc1"])
    # evaluation reads the checkpoint's statistics, not new ones: perturbed statistics change the result
    shifted = ckpt.load(run / "latest.pt")
    shifted["standardizer"]["mean"] = shifted["standardizer"]["mean"] + 5 * shifted["standardizer"]["scale"]
    with Run.load(run, state=shifted, folder=tmp_path / "shifted") as perturbed:
        assert isinstance(perturbed.ctx.standardizer, FeatureStandardizer)
        assert perturbed.evaluate(progress=False) != pytest.approx(results["cc1"])


def test_zscore_makes_training_invariant_to_per_dimension_affine_maps(cache, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", TINY + ["data.standardize=zscore", "cc.weight=0"])
    ds = open_dataset(cfg)
    with Run(cfg, tmp_path / "a", ds) as run:
        a = run.train()
        n_test = len(run.ctx.test_idx)
    with Run(cfg, tmp_path / "b", _affine(ds)) as run:
        b = run.train()
    for stage in a:
        # equal up to float rounding: every metric within 1e-3, and the test-time selection (a discrete
        # choice per segment) differs by at most one segment in one video
        sa, sb = a[stage].pop("selected_segments", 0.0), b[stage].pop("selected_segments", 0.0)
        assert a[stage] == pytest.approx(b[stage], abs=1e-3)
        assert abs(sa - sb) <= 1 / n_test + 1e-12
    with Run(load_config(ROOT / "configs" / "tiny.yaml", TINY + ["data.standardize=none"]), tmp_path / "c",
             _affine(ds)) as t:
        assert t.ctx.standardizer is None


def test_smoothing_is_applied_in_evaluation(cache, tmp_path, monkeypatch):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", TINY + ["eval.smooth=5"])
    trainer = Run(cfg, tmp_path / "s")
    trainer.train()
    captured = []
    orig = ev.tcam_proposals

    def spy(*args, **kw):
        captured.append(kw.get("smooth"))
        return orig(*args, **kw)
    monkeypatch.setattr(ev, "tcam_proposals", spy)
    trainer.evaluate(progress=False)
    trainer.close()
    assert captured and set(captured) == {5}


def test_old_checkpoint_without_standardizer_evaluates_unstandardised(cache, tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", TINY + ["data.standardize=none"])
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
