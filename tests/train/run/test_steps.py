"""One training step (train/run/steps.py): the batch of (stage, step) depends on nothing else, the loss
terms are the config's, and the total is their weighted sum."""
from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.run import Run

ROOT = Path(__file__).resolve().parents[3]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def run(cache, tmp_path_factory):
    """A tiny run, untrained, with the W-TALC terms on (top-k MIL, co-activity) and STPN attention."""
    cfg = load_config(TINY, ["model.attention=stpn", "loss.topk_mil=0.5", "loss.casl=0.25", "loss.sparsity=0.01"])
    with Run(cfg, tmp_path_factory.mktemp("run")) as r:
        yield r


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k]
                                        for k in a)


def test_the_batch_of_a_step_depends_on_stage_and_step_only(run):
    later = run.steps.batch(1, 3)
    first = run.steps.batch(0, 0)
    assert _same(run.steps.batch(1, 3), later) and _same(run.steps.batch(0, 0), first)  # in any order
    assert not _same(run.steps.batch(0, 1), first) and not _same(run.steps.batch(1, 0), first)
    b = first
    assert b["features"].shape[:2] == b["mask"].shape and b["labels"].shape[0] == b["features"].shape[0]
    assert b["features"].shape[1] <= run.cfg["data"]["max_seqlen"]
    assert (b["features"][~b["mask"]] == 0).all()  # padding stays 0 after standardisation


def test_the_terms_and_their_weighted_sum(run):
    batch = run.steps.batch(0, 0)
    run.model.eval()
    terms = run.steps.losses(batch, use_cc=False)
    lc = run.cfg["loss"]
    assert set(terms) == {"clf", "topk_mil", "sparsity", "casl", "total"}
    want = terms["clf"] + lc["topk_mil"] * terms["topk_mil"] + lc["sparsity"] * terms["sparsity"] + \
        lc["casl"] * terms["casl"]
    torch.testing.assert_close(terms["total"], want)
    scaled = run.steps.losses(batch, use_cc=False, scale={"clf": 0.5})  # a rank's share of the batch
    torch.testing.assert_close(scaled["clf"], 0.5 * terms["clf"])


def test_a_step_with_the_exemplar_loss_reports_it_and_phis_norm(run):
    run.build_database("db1")
    terms = run.train_step(1, 0, use_cc=True)
    assert {"cc", "phi_norm_rgb", "phi_norm_flow"} <= set(terms) and all(isinstance(v, float) for v in terms.values())
    assert terms["total"] == pytest.approx(terms["clf"] + run.cfg["cc"]["weight"] * terms["cc"] +
                                           run.cfg["loss"]["topk_mil"] * terms["topk_mil"] +
                                           run.cfg["loss"]["sparsity"] * terms["sparsity"] +
                                           run.cfg["loss"]["casl"] * terms["casl"], rel=1e-6)
    assert "cc" not in run.train_step(1, 1, use_cc=False)
