"""The exemplar state (train/run/exemplars.py): the bandwidth rules, one record per stream, its checkpoint
round trip."""
import math
from pathlib import Path

import pytest
import torch

from train.config import load_config
from train.run import Run
from train.run.exemplars import ExemplarState, auto_alpha

ROOT = Path(__file__).resolve().parents[3]


def test_auto_alpha_rules():
    # two exemplars at squared distance 4 in each class: lashkari = n^2 log n / sum_ij d = 4 log 2 / 8
    y = torch.zeros(2, 3, 2)
    y[:, 1, 0] = 2.0
    count = torch.tensor([2, 2])
    assert auto_alpha(y, count, "lashkari") == pytest.approx(4 * math.log(2) / 8)
    assert auto_alpha(y, count, "median") == pytest.approx(1 / 4)
    assert auto_alpha(y, count, "median", metric="euclidean") == pytest.approx(1 / 2)
    assert math.isnan(auto_alpha(y, torch.tensor([1, 0]), "lashkari"))


@pytest.fixture(scope="module")
def collected(cache, tmp_path_factory):
    """A tiny run's first collection (untrained network): the run, its summary, its exemplar state."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", ["cc.alpha_scale=2"])
    with Run(cfg, tmp_path_factory.mktemp("run")) as run:
        info = run.build_database("db1")
    return run, info


def test_one_record_per_stream_holds_its_slice_q_alpha_and_loss(collected):
    run, info = collected
    ex = run.exemplars
    assert ex.ready and run.ctx.streams == ("rgb", "flow")
    db = ex.database
    start = 0
    for s, width in zip(run.ctx.streams, run.ctx.stream_dims):
        stream = ex.stream(s)
        assert torch.equal(stream.features, db.features[..., start:start + width])  # its slice of the database
        start += width
        filled = db.count > 0
        # Q: a distribution over each filled class's slots, -inf on empty slots; not the database's start
        torch.testing.assert_close(stream.log_q[filled].logsumexp(1), torch.zeros(int(filled.sum()),
                                                                                  dtype=stream.log_q.dtype))
        assert not torch.equal(stream.log_q, db.log_q)
        assert stream.alpha == info[f"alpha_{s}"] > 0 and stream.criterion.alpha == stream.alpha
        assert stream.loss_scale == info[f"loss_scale_{s}"] and stream.phi_norm == info[f"phi_norm_{s}"]
    # alpha from the data: the rule on the stream's exemplars, times cc.alpha_scale
    rgb = ex.stream("rgb")
    assert rgb.alpha == pytest.approx(2 * auto_alpha(rgb.features, db.count, "lashkari"), rel=1e-12)


def test_the_state_round_trips_through_a_checkpoint(collected):
    run, _ = collected
    state = run.exemplars.state_dict()
    again = ExemplarState(run.ctx)
    assert not again.ready and again.phi_norms() == {"rgb": None, "flow": None}
    again.load_state_dict(state)
    for s in run.ctx.streams:
        a, b = run.exemplars.stream(s), again.stream(s)
        assert torch.equal(a.features, b.features) and torch.equal(a.log_q, b.log_q)
        assert (a.alpha, a.loss_scale, a.phi_norm) == (b.alpha, b.loss_scale, b.phi_norm)
        assert b.criterion.alpha == a.alpha and type(b.criterion) is type(a.criterion)
    assert again.info == run.exemplars.info and again.phi_norms() == run.exemplars.phi_norms()
