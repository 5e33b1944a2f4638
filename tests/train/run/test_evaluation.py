"""Evaluating a run (train/run/evaluation.py): the checkpoint's input statistics and the smoothing are what
evaluation uses."""
from pathlib import Path

import numpy as np
import pytest
import torch

import train.eval as ev
from train.config import load_config
from train.data.standardize import FeatureStandardizer
from train.run import checkpoint as ckpt
from train.run import Run


ROOT = Path(__file__).resolve().parents[3]
TINY = ["train.baseline_steps=6", "train.cc_steps=4", "train.log_every=2", "cc.rounds=1"]


@pytest.mark.slow
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


@pytest.mark.slow
@pytest.mark.parametrize("rule,function", [("multi", "tcam_proposals"), ("wtalc", "wtalc_proposals")])
def test_smoothing_is_applied_in_evaluation(cache, tmp_path, monkeypatch, rule, function):
    cfg = load_config(ROOT / "configs" / "tiny.yaml", TINY + ["eval.smooth=5", f"eval.proposals={rule}"])
    trainer = Run(cfg, tmp_path / "s")
    trainer.train()
    captured = []
    orig = getattr(ev, function)

    def spy(*args, **kw):
        captured.append(kw.get("smooth"))
        return orig(*args, **kw)
    monkeypatch.setattr(ev, function, spy)
    trainer.evaluate(progress=False)
    trainer.close()
    assert captured and set(captured) == {5}
