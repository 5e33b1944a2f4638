"""Tests of ccluster.selection.select_representative against a dense float64 brute force."""
import math

import pytest
import torch

from ccluster import reference
from ccluster.database import ExemplarDatabase
from ccluster.selection import select_representative

C, N_SLOTS, M = 5, 4, 6


def make_db(seed=0, empty=(3,), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    db = torch.randn(C, N_SLOTS, M, generator=g, dtype=dtype)
    lq = torch.rand(C, N_SLOTS, generator=g, dtype=dtype).log()
    lq[1, 2:] = -math.inf  # partially filled class
    for c in empty:
        lq[c] = -math.inf
        db[c] = 0
    finite = torch.isfinite(lq).any(-1, keepdim=True)
    lq = torch.where(finite, lq - torch.logsumexp(lq, -1, keepdim=True), lq)
    return db, lq


def make_video(T, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, M, generator=g, dtype=dtype)
    att = torch.softmax(torch.randn(T, generator=g, dtype=dtype), 0)
    return x, att


def brute_force(x, att, db, lq, alpha, k, metric, classes):
    """Dense logz in float64, L = -p log z, stable argsort per class; -1 rows for empty classes."""
    logz = reference.exemplar_logsumexp(x.double(), db.double(), lq.double(), alpha, metric)
    rows = []
    for c in classes:
        if not torch.isfinite(lq[c]).any():
            rows.append([-1] * min(k, x.shape[0]))
            continue
        loss = (-att.double() * logz[:, c]).tolist()
        order = sorted(range(x.shape[0]), key=lambda s: (loss[s], s))
        rows.append(order[:k])
    return torch.tensor(rows, dtype=torch.int64).reshape(len(classes), min(k, x.shape[0]))


@pytest.mark.parametrize("metric", ["sqeuclidean", "euclidean"])
@pytest.mark.parametrize("classes", [None, [4, 0, 1], torch.tensor([2])])
def test_matches_brute_force(metric, classes):
    db, lq = make_db()
    x, att = make_video(T=11)
    k, alpha = 3, 0.7
    sel = select_representative(x, att, db, lq, alpha, k, metric=metric, classes=classes)
    cls = list(range(C)) if classes is None else [int(c) for c in classes]
    want = brute_force(x, att, db, lq, alpha, k, metric, cls)
    assert torch.equal(sel.classes, torch.tensor(cls))
    assert torch.equal(sel.per_class, want)
    assert torch.equal(sel.indices, torch.unique(want[want >= 0]))
    assert sel.indices.dtype == torch.int64 and sel.per_class.dtype == torch.int64
    # the reported loss is L_cc of the picks, non-negative and ascending per row
    logz = reference.exemplar_logsumexp(x, db, lq, alpha, metric)
    for i, c in enumerate(cls):
        if want[i, 0] >= 0:
            assert torch.allclose(sel.loss[i], -att[want[i]] * logz[want[i], c])
            assert (sel.loss[i] >= 0).all() and (sel.loss[i, :-1] <= sel.loss[i, 1:]).all()


def test_float32_and_database_object():
    db, lq = make_db(seed=2, empty=())
    x, att = make_video(T=9, seed=3)
    # Fill an ExemplarDatabase so that slot j of class c holds db[c, j] (score -j keeps the order).
    edb = ExemplarDatabase(C, N_SLOTS, M)
    cls = torch.arange(C).repeat_interleave(N_SLOTS)
    slot = torch.arange(N_SLOTS).repeat(C)
    scores = torch.zeros(C * N_SLOTS, C)
    scores[torch.arange(C * N_SLOTS), cls] = -slot.float()
    labels = torch.nn.functional.one_hot(cls, C).bool()
    edb.update(db.reshape(-1, M).float(), scores, labels, torch.stack([cls, slot], 1))
    assert torch.equal(edb.features, db.float()) and (edb.count == N_SLOTS).all()
    lq[1] = torch.log(torch.rand(N_SLOTS, dtype=torch.float64) + 0.1)  # every slot filled here
    lq[1] -= torch.logsumexp(lq[1], 0)
    edb.set_log_q(lq)
    sel = select_representative(x.float(), att.float(), edb, None, 0.5, 2)
    want = brute_force(x, att, db, lq, 0.5, 2, "sqeuclidean", list(range(C)))
    assert torch.equal(sel.per_class, want)


def test_only_requested_classes_are_computed(monkeypatch):
    import ccluster.selection as selection
    seen = []

    def spy(x, db, log_q, alpha, metric="sqeuclidean", pairs=None):
        seen.append(pairs.clone())
        return reference.exemplar_logsumexp(x, db, log_q, alpha, metric, pairs)

    monkeypatch.setattr(selection, "exemplar_logsumexp", spy)
    db, lq = make_db()
    x, att = make_video(T=5)
    select_representative(x, att, db, lq, 1.0, 2, classes=[4, 1])
    assert len(seen) == 1
    assert torch.equal(seen[0].any(0), torch.tensor([False, True, False, False, True]))
    assert seen[0][:, [1, 4]].all()


def test_fewer_segments_than_k_and_empty_video():
    db, lq = make_db()
    x, att = make_video(T=3)
    sel = select_representative(x, att, db, lq, 1.0, k=10)
    assert sel.per_class.shape == (C, 3)
    for c in range(C):
        if c == 3:
            assert (sel.per_class[c] == -1).all()
        else:
            assert sorted(sel.per_class[c].tolist()) == [0, 1, 2]
    assert torch.equal(sel.indices, torch.tensor([0, 1, 2]))

    sel = select_representative(x[:0], att[:0], db, lq, 1.0, k=4, classes=[0, 2])
    assert sel.per_class.shape == (2, 0) and sel.indices.numel() == 0
    assert torch.equal(sel.classes, torch.tensor([0, 2]))


def test_empty_class_picks_nothing():
    db, lq = make_db(empty=(0, 3))
    x, att = make_video(T=8)
    sel = select_representative(x, att, db, lq, 1.0, k=2, classes=[0, 3])
    assert (sel.per_class == -1).all() and sel.indices.numel() == 0
    assert torch.isinf(sel.loss).all()
    sel = select_representative(x, att, db, lq, 1.0, k=2, classes=[3, 2])
    assert (sel.per_class[0] == -1).all() and (sel.per_class[1] >= 0).all()
    assert torch.equal(sel.indices, sel.per_class[1].sort().values)


def test_ties_go_to_lower_index():
    db, lq = make_db()
    x, _ = make_video(T=3)
    x = torch.cat([x, x, x])               # segments s, s+3, s+6 are identical
    att = torch.full((9,), 1 / 9, dtype=torch.float64)
    sel = select_representative(x, att, db, lq, 1.0, k=9, classes=[0])
    picks = sel.per_class[0].tolist()
    for s in range(3):  # each triple of equal-loss segments appears in increasing index order
        pos = [picks.index(s), picks.index(s + 3), picks.index(s + 6)]
        assert pos == sorted(pos)
    # zero attention gives L = 0 (not -0.0) for all: plain index order
    sel = select_representative(x, torch.zeros(9, dtype=torch.float64), db, lq, 1.0, k=4)
    assert (sel.per_class[torch.tensor([0, 1, 2, 4])] == torch.arange(4)).all()


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(classes=[0, 5]), ValueError, r"classes must be in \[0, C\) = \[0, 5\)"),
    (dict(classes=[1, 1]), ValueError, "classes must not repeat"),
    (dict(classes=torch.ones(5, dtype=torch.bool)), TypeError, "integer class indices"),
    (dict(k=0), ValueError, "k must be >= 1, got 0"),
    (dict(attention=torch.full((7,), 0.1, dtype=torch.float64)), ValueError,
     r"attention must be \[T\] = \[6\], got shape \[7\]"),
    (dict(x=torch.zeros(6, M + 1, dtype=torch.float64)), ValueError, "does not match db's m=6"),
])
def test_errors(kwargs, exc, match):
    db, lq = make_db()
    x, att = make_video(T=6)
    args = dict(x=x, attention=att, db=db, log_q=lq, alpha=1.0, k=2)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        select_representative(**args)
