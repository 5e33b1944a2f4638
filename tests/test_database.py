"""Tests of ccluster.database.ExemplarDatabase: streaming top-n per class, merge, serialisation, errors."""
import math

import pytest
import torch

from ccluster.database import ExemplarDatabase

C, N_SLOTS, M = 4, 5, 3


def make_data(num_videos=8, seg_per_video=7, seed=0, levels=4):
    """Segments of several videos; scores on a coarse grid so that many ties occur."""
    g = torch.Generator().manual_seed(seed)
    N = num_videos * seg_per_video
    video = torch.arange(num_videos).repeat_interleave(seg_per_video)
    seg = torch.arange(seg_per_video).repeat(num_videos)
    ids = torch.stack([video, seg], 1)
    vid_labels = torch.rand(num_videos, C, generator=g) < 0.5
    vid_labels[0] = True  # every class has candidates
    labels = vid_labels[video]
    scores = torch.randint(0, levels, (N, C), generator=g).float() / levels
    feats = torch.randn(N, M, generator=g)
    return feats, scores, labels, ids


def brute_force(feats, scores, labels, ids, n=N_SLOTS):
    """Per class: sort labelled segments by (score desc, id asc) in Python and keep the first n."""
    out = []
    for c in range(C):
        rows = [r for r in range(feats.shape[0]) if labels[r, c]]
        rows.sort(key=lambda r: (-float(scores[r, c]), int(ids[r, 0]), int(ids[r, 1])))
        out.append(rows[:n])
    return out


def assert_same(a, b):
    for k in ("features", "log_q", "scores", "ids", "count"):
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def single_pass(feats, scores, labels, ids, n=N_SLOTS):
    return ExemplarDatabase(C, n, M).update(feats, scores, labels, ids)


def test_single_pass_matches_brute_force_and_invariants():
    feats, scores, labels, ids = make_data()
    db = single_pass(feats, scores, labels, ids)
    want = brute_force(feats, scores, labels, ids)
    filled = db.filled_mask()
    for c in range(C):
        k = len(want[c])
        assert int(db.count[c]) == k
        assert torch.equal(db.ids[c, :k], ids[want[c]])
        assert torch.equal(db.features[c, :k], feats[want[c]])
        assert torch.equal(db.scores[c, :k], scores[want[c], c])
        # descending scores, empty tail
        assert (db.scores[c, : k - 1] >= db.scores[c, 1:k]).all()
        assert (db.scores[c, k:] == -math.inf).all() and (db.ids[c, k:] == -1).all()
        assert (db.features[c, k:] == 0).all()
        # segments only enter classes their video is labelled with
        for video, segment in db.ids[c, :k].tolist():
            row = video * 7 + segment
            assert bool(labels[row, c])
    # log_q is reset to uniform over the filled slots
    expect = torch.where(filled, -torch.log(db.count.float())[:, None].expand(C, N_SLOTS),
                         torch.tensor(-math.inf))
    assert torch.allclose(db.log_q, expect)
    assert torch.equal(torch.isfinite(db.log_q), filled)


def test_update_detaches_inputs():
    feats, scores, labels, ids = make_data()
    feats.requires_grad_(True)
    db = single_pass(feats, scores, labels, ids)
    assert not db.features.requires_grad and db.features.grad_fn is None
    assert torch.equal(db.features[0, 0], feats.detach()[int(db.ids[0, 0, 0]) * 7 + int(db.ids[0, 0, 1])])


def test_unlabelled_class_stays_empty():
    feats, scores, labels, ids = make_data()
    labels[:, 2] = False
    db = single_pass(feats, scores, labels, ids)
    assert int(db.count[2]) == 0
    assert (db.log_q[2] == -math.inf).all() and (db.ids[2] == -1).all()
    assert (db.count[[0, 1, 3]] > 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streaming_is_chunk_order_independent(seed):
    feats, scores, labels, ids = make_data(seed=seed)
    ref = single_pass(feats, scores, labels, ids)
    g = torch.Generator().manual_seed(100 + seed)
    for _ in range(3):
        perm = torch.randperm(feats.shape[0], generator=g)
        cuts = sorted(torch.randint(0, feats.shape[0], (4,), generator=g).tolist())
        db = ExemplarDatabase(C, N_SLOTS, M)
        bounds = [0] + cuts + [feats.shape[0]]
        for a, b in zip(bounds[:-1], bounds[1:]):  # includes empty chunks
            p = perm[a:b]
            db.update(feats[p], scores[p], labels[p], ids[p])
        assert_same(db, ref)


def test_ties_broken_by_id():
    # All scores equal: the kept segments are the n smallest ids, whatever the order of arrival.
    N = 12
    ids = torch.stack([torch.arange(N) // 3, torch.arange(N) % 3], 1)
    feats = torch.randn(N, M)
    scores = torch.zeros(N, C)
    labels = torch.ones(N, C, dtype=torch.bool)
    db = ExemplarDatabase(C, N_SLOTS, M)
    rev = torch.arange(N - 1, -1, -1)
    db.update(feats[rev], scores[rev], labels[rev], ids[rev])
    for c in range(C):
        assert torch.equal(db.ids[c], ids[:N_SLOTS])


def test_merge_equals_single_pass():
    feats, scores, labels, ids = make_data(seed=3)
    ref = single_pass(feats, scores, labels, ids)
    half = feats.shape[0] // 2
    a = single_pass(feats[:half], scores[:half], labels[:half], ids[:half])
    b = single_pass(feats[half:], scores[half:], labels[half:], ids[half:])
    b.to(dtype=torch.float64)  # converted back on merge
    assert_same(a.merge(b), ref)
    assert_same(a.merge(a), ref)  # merging copies of the same segments keeps one of each


def test_duplicate_ids_are_kept_once():
    feats, scores, labels, ids = make_data(seed=4)
    ref = single_pass(feats, scores, labels, ids)
    db = single_pass(feats, scores, labels, ids).update(feats, scores, labels, ids)
    assert_same(db, ref)
    # A re-offered segment with a higher score replaces its old copy instead of duplicating it.
    c = 0
    video, segment = db.ids[c, N_SLOTS - 1].tolist()
    row = video * 7 + segment
    s2 = scores.clone()
    s2[row, c] = 10.0
    db.update(feats[row:row + 1], s2[row:row + 1], labels[row:row + 1], ids[row:row + 1])
    assert db.ids[c, 0].tolist() == [video, segment] and float(db.scores[c, 0]) == 10.0
    kept = [tuple(t) for t in db.ids[c, : int(db.count[c])].tolist()]
    assert len(set(kept)) == len(kept)


def test_state_dict_and_save_load_round_trip(tmp_path):
    feats, scores, labels, ids = make_data(seed=5)
    db = single_pass(feats, scores, labels, ids)
    q = torch.rand(C, N_SLOTS).log()
    q = torch.where(db.filled_mask(), q, torch.tensor(-math.inf))
    db.set_log_q(q - torch.logsumexp(q, -1, keepdim=True))

    other = ExemplarDatabase(C, N_SLOTS, M)
    state = db.state_dict()
    other.load_state_dict(state)
    assert_same(other, db)
    other.reset()  # the loaded copy does not alias the state dict
    assert torch.equal(state["ids"], db.ids)

    path = tmp_path / "db.pt"
    db.save(path)
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"features", "log_q", "scores", "ids", "count"}
    loaded = ExemplarDatabase.load(path)
    assert_same(loaded, db)
    assert loaded.dtype == torch.float32 and loaded.device.type == "cpu"


def test_load_state_dict_rejects_inconsistent_state():
    feats, scores, labels, ids = make_data(seed=6)
    db = single_pass(feats, scores, labels, ids)
    st = db.state_dict()
    st["scores"][0, :2] = st["scores"][0, :2].flip(0) + torch.tensor([0.0, 1.0])  # break the order
    with pytest.raises(ValueError, match="descending"):
        ExemplarDatabase(C, N_SLOTS, M).load_state_dict(st)
    st = db.state_dict()
    st["count"][1] = 0
    with pytest.raises(ValueError, match="filled slots"):
        ExemplarDatabase(C, N_SLOTS, M).load_state_dict(st)
    with pytest.raises(ValueError, match="features must have shape"):
        ExemplarDatabase(C, N_SLOTS, M + 1).load_state_dict(db.state_dict())
    with pytest.raises(ValueError, match="missing \\['count'\\]"):
        ExemplarDatabase(C, N_SLOTS, M).load_state_dict(
            {k: v for k, v in db.state_dict().items() if k != "count"})


def test_set_log_q_validation():
    feats, scores, labels, ids = make_data(seed=7)
    labels[:, 3] = False
    db = single_pass(feats, scores, labels, ids)
    good = db.log_q.clone()
    with pytest.raises(ValueError, match="finite exactly on the filled slots"):
        db.set_log_q(torch.zeros(C, N_SLOTS))
    with pytest.raises(ValueError, match="normalised"):
        db.set_log_q(good + 0.5 * db.filled_mask())
    with pytest.raises(ValueError, match=r"log_q must be \[C, n\]"):
        db.set_log_q(good[:, :2])
    db.set_log_q(good.double())
    assert db.log_q.dtype == torch.float32 and torch.equal(db.log_q, good)


def test_reset_to_and_repr():
    feats, scores, labels, ids = make_data()
    db = single_pass(feats, scores, labels, ids)
    assert "ExemplarDatabase(num_classes=4, size=5, dim=3" in repr(db)
    assert db.to(dtype=torch.float64) is db and db.features.dtype == torch.float64
    assert db.log_q.dtype == torch.float64 and db.ids.dtype == torch.int64
    db.reset()
    assert int(db.count.sum()) == 0 and not db.filled_mask().any()
    assert (db.log_q == -math.inf).all() and (db.ids == -1).all() and (db.features == 0).all()


@pytest.mark.parametrize("args, exc, match", [
    ((4, 0, 3), ValueError, "size must be > 0, got 0"),
    ((4, 5, 3.0), TypeError, "dim must be an int, got float"),
    ((-1, 5, 3), ValueError, "num_classes must be > 0, got -1"),
])
def test_constructor_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        ExemplarDatabase(*args)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        ExemplarDatabase(4, 5, 3, dtype=torch.int64)


def _bad(kind):
    feats, scores, labels, ids = make_data()
    if kind == "feat_dim":
        feats = feats[:, :2]
    elif kind == "feat_int":
        feats = feats.long()
    elif kind == "feat_nan":
        feats[5, 1] = math.nan
    elif kind == "feat_inf":
        feats[0, 2] = math.inf
    elif kind == "scores_shape":
        scores = scores[:, :2]
    elif kind == "scores_nan":
        scores[3, 1] = math.nan
    elif kind == "scores_inf":
        scores[0, 0] = -math.inf
    elif kind == "labels_dtype":
        labels = labels.float()
    elif kind == "labels_shape":
        labels = labels[:-1]
    elif kind == "ids_dtype":
        ids = ids.float()
    elif kind == "ids_shape":
        ids = ids[:, :1]
    elif kind == "ids_negative":
        ids[0, 0] = -1
    elif kind == "not_tensor":
        labels = labels.tolist()
    return feats, scores, labels, ids


@pytest.mark.parametrize("kind, exc, match", [
    ("feat_dim", ValueError, r"features must be \[N, m\] with m=3, got shape \[56, 2\]"),
    ("feat_int", TypeError, "features must be a floating-point tensor, got torch.int64"),
    ("feat_nan", ValueError, r"features must be finite .* got 1 NaN or infinite entries in 1 of 56 rows"),
    ("feat_inf", ValueError, r"features must be finite .* got 1 NaN or infinite entries"),
    ("scores_shape", ValueError, r"scores must be \[N, C\] = \[56, 4\], got shape \[56, 2\]"),
    ("scores_nan", ValueError, "scores contain NaN"),
    ("scores_inf", ValueError, "scores must be finite where labels is True"),
    ("labels_dtype", TypeError, "labels must be a bool tensor, got torch.float32"),
    ("labels_shape", ValueError, r"labels must be \[N, C\] = \[56, 4\], got shape \[55, 4\]"),
    ("ids_dtype", TypeError, "ids must be an integer tensor, got torch.float32"),
    ("ids_shape", ValueError, r"ids must be \[N, 2\]"),
    ("ids_negative", ValueError, "ids must be >= 0"),
    ("not_tensor", TypeError, "labels must be a torch.Tensor, got list"),
])
def test_update_errors(kind, exc, match):
    db = ExemplarDatabase(C, N_SLOTS, M)
    with pytest.raises(exc, match=match):
        db.update(*_bad(kind))
    assert int(db.count.sum()) == 0  # a rejected update leaves the database untouched


def test_update_rejects_features_that_overflow_the_database_dtype():
    feats, scores, labels, ids = make_data()
    feats[2, 0] = 1e6  # finite in float32, +inf in float16
    db = ExemplarDatabase(C, N_SLOTS, M, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"features must be finite \(after conversion to torch.float16\)"):
        db.update(feats, scores, labels, ids)
    assert int(db.count.sum()) == 0


def test_merge_errors():
    with pytest.raises(ValueError, match=r"\(num_classes, size, dim\) = \(4, 5, 3\), got \(4, 6, 3\)"):
        ExemplarDatabase(C, N_SLOTS, M).merge(ExemplarDatabase(C, N_SLOTS + 1, M))
    with pytest.raises(TypeError, match="other must be an ExemplarDatabase"):
        ExemplarDatabase(C, N_SLOTS, M).merge({})
