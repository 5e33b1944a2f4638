"""What a run shares (train/run/context.py): standardised inputs make training invariant to per-dimension
affine maps of the features."""
import copy
from pathlib import Path

import numpy as np
import pytest

from train.config import load_config
from train.run import Run
from train.run.context import open_dataset


ROOT = Path(__file__).resolve().parents[3]
TINY = ["train.baseline_steps=6", "train.cc_steps=4", "train.log_every=2", "cc.rounds=1"]


def _affine(dataset, scale=250.0, shift=40.0):
    """The same dataset with every feature dimension scaled and shifted (a badly conditioned copy)."""
    out = copy.deepcopy(dataset)
    d = out.feature_dim
    a = scale * (1 + np.arange(d) / d)
    for v in out.videos:
        v.features = (v.features.astype(np.float64) * a + shift).astype(np.float32)
    return out


@pytest.mark.slow
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
