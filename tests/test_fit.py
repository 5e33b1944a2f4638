"""ccluster.fit_step (torch.ops.ccluster.fit_step) and ccluster.fit_representativeness."""
from __future__ import annotations

import math

import pytest
import torch

import ccluster
from ccluster import reference
from conftest import COL_BLOCK, ROW_BLOCK, assert_close64, assert_low_precision, make_inputs

pytestmark = pytest.mark.usefixtures("compiled_ops", "thread_policy")

fit = ccluster.fit_representativeness


def _weights(N, C, p, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(N, C, generator=g, dtype=torch.float64)
    return torch.where(torch.rand(N, C, generator=g) < p, w, torch.zeros((), dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# fit_step


def _step_problem(N, C, n, m, seed, device="cpu"):
    x, db, log_q = make_inputs(N, C, n, m, seed=seed)
    w = _weights(N, C, 0.4, seed)
    if C >= 4:
        log_q[0, ::3] = -math.inf        # some empty slots
        log_q[1] = -math.inf             # an empty class that has weight
        w[:, 2] = 0.0                    # a class without weight
    return tuple(t.to(device) for t in (x, db, log_q, w))


@pytest.mark.parametrize("shape", [(37, 4, 9, 3), (ROW_BLOCK + 3, 4, COL_BLOCK + 1, 2),
                                   (2 * ROW_BLOCK + 44, 2, 2 * COL_BLOCK + 6, 3)],
                         ids=["small", "tiles", "medium"])
@pytest.mark.parallel
def test_fit_step_matches_reference(metric, shape):
    # n = 513 / 1030: fewer rows per tile (the whole class row of n exemplars is one tile)
    x, db, log_q, w = _step_problem(*shape, seed=sum(shape))
    logz, log_eta = ccluster.fit_step(x, db, log_q, w, 0.8, metric)
    ref_logz, ref_eta = reference.fit_step(x, db, log_q, w, 0.8, metric)
    assert logz.shape == w.shape and log_eta.shape == log_q.shape
    assert_close64(logz, ref_logz, msg="logz")
    assert_close64(log_eta, ref_eta, msg="log_eta")
    assert torch.equal(logz[w == 0], torch.zeros(int((w == 0).sum()), dtype=torch.float64))
    assert torch.equal(torch.isinf(log_eta), ~torch.isfinite(log_q) | (w.sum(0) == 0)[:, None])


@pytest.mark.parametrize("shape", [(37, 4, 9, 3), (5, 1, 1, 1)], ids=["small", "ones"])
def test_fit_step_matches_reference_on_every_device(metric, shape, device):
    x, db, log_q, w = _step_problem(*shape, seed=sum(shape) + 2, device=device)
    logz, log_eta = ccluster.fit_step(x, db, log_q, w, 0.8, metric)
    ref_logz, ref_eta = reference.fit_step(x, db, log_q, w, 0.8, metric)
    assert_close64(logz, ref_logz, msg="logz")
    assert_close64(log_eta, ref_eta, msg="log_eta")
    # a host mask of the pairs (what fit_representativeness passes on a GPU) gives the same
    pairs = (w > 0).cpu() | (torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.2)
    with ccluster.kernel_settings(backend="library", plan="packed"):
        for a, b in zip(ccluster.fit_step(x, db, log_q, w, 0.8, metric, pairs=pairs), (ref_logz, ref_eta)):
            assert_close64(a, b)


def test_fit_step_non_contiguous_weight_and_features(metric, device):
    x, db, log_q, w = _step_problem(20, 4, 6, 3, seed=3, device=device)
    xt = x.t().contiguous().t()
    wt = w.t().contiguous().t()
    assert not (xt.is_contiguous() or wt.is_contiguous())
    got = ccluster.fit_step(xt, db, log_q, wt, 0.8, metric)
    want = reference.fit_step(x, db, log_q, w, 0.8, metric)
    for a, b in zip(got, want):
        assert_close64(a, b)


def test_fit_step_float32_against_oracle(metric, device):
    x, db, log_q, w = _step_problem(ROW_BLOCK + 3, 4, 40, 3, seed=4, device=device)
    f32 = [t.float() for t in (x, db, log_q, w)]
    fused = ccluster.fit_step(*f32, 0.8, metric)
    plain = reference.fit_step(*f32, 0.8, metric)
    oracle = reference.fit_step(*[t.double() for t in f32], 0.8, metric)
    for a, b, c, name in zip(fused, plain, oracle, ("logz", "log_eta")):
        assert a.dtype == torch.float32
        assert_low_precision(a, b, c, torch.float32, name)


def test_fit_step_opcheck(metric, device):
    x, db, log_q, w = _step_problem(9, 4, 5, 2, seed=5, device=device)
    torch.library.opcheck(torch.ops.ccluster.fit_step, (x, db, log_q, w, 0.8, metric))
    torch.library.opcheck(torch.ops.ccluster.fit_step, (x, db, log_q, w, 0.8, metric, (w > 0).cpu()))


@pytest.mark.parametrize("over,match", [
    (dict(w=torch.ones(6, 3, dtype=torch.float32)), r"fit_step: weight must have x's dtype Double, got Float"),
    (dict(w=torch.ones(6, 2, dtype=torch.float64)), r"fit_step: weight must be \[N, C\] = \[6, 3\], got \[6, 2\]"),
    (dict(alpha=0.0), r"fit_step: alpha must be a finite number > 0, got 0"),
    (dict(metric="manhattan"), r"fit_step: metric must be 'sqeuclidean' or 'euclidean', got 'manhattan'"),
    (dict(log_q=torch.zeros(3, 5, dtype=torch.float64)),
     r"log_q must be \[C, n\] = \[3, 4\] to match db, got \[3, 5\]"),
    (dict(w=-torch.ones(6, 3, dtype=torch.float64)), r"fit_step: weight must be finite and >= 0, got -1"),
    (dict(w=torch.full((6, 3), math.nan, dtype=torch.float64)), r"fit_step: weight must be finite and >= 0, got nan"),
], ids=["weight_dtype", "weight_shape", "alpha", "metric", "log_q_shape", "weight_negative", "weight_nan"])
def test_fit_step_bad_input(over, match, device):
    x, db, log_q = make_inputs(6, 3, 4, 2, seed=6)
    args = dict(x=x, db=db, log_q=log_q, w=torch.ones(6, 3, dtype=torch.float64), alpha=0.8, metric="sqeuclidean")
    args.update(over)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    # on a GPU the check of the weights is deferred by default (NaN results, no synchronisation)
    with ccluster.kernel_settings(check_values="eager"), \
            pytest.raises(TypeError if "dtype" in match else ValueError, match=match):
        ccluster.fit_step(*args.values())


# ---------------------------------------------------------------------------------------------------
# fit_representativeness: an independent transcription of the objective and of eta


def _log_kernel(x, db, alpha, metric):
    d2 = ((x[:, None, None, :] - db[None]) ** 2).sum(-1)        # [N, C, n], no GEMM expansion
    return -alpha * (d2 if metric == "sqeuclidean" else d2.sqrt())


def _normalised(w):
    tot = w.sum(0)
    return w / torch.where(tot > 0, tot, torch.ones_like(tot))


def objective(x, db, w, log_q, alpha, metric):
    """[C]: sum_s w_sc log sum_j q_cj exp(-alpha d(x_s, y_cj)), weights normalised per class."""
    wn = _normalised(w)
    logz = torch.logsumexp(log_q[None] + _log_kernel(x, db, alpha, metric), -1)      # [N, C]
    return torch.where(wn > 0, wn * logz, torch.zeros_like(logz)).sum(0)


def log_eta(x, db, w, log_q, alpha, metric):
    """[C, n]: log eta_cj = log sum_s w_sc exp(-alpha d_scj) / z_sc, the gradient of the objective."""
    wn = _normalised(w)
    k = _log_kernel(x, db, alpha, metric)
    logz = torch.logsumexp(log_q[None] + k, -1)
    lw = torch.where(wn > 0, wn.log() - logz, torch.full_like(logz, -math.inf))
    return torch.logsumexp(lw[:, :, None] + k, 0)


ALPHA = 1.0


@pytest.fixture(scope="module")
def problem():
    """Three classes, 5 exemplars each, sparse weights; class 2 starts with an empty slot."""
    x, db, _ = make_inputs(48, 3, 5, 2, seed=21)
    w = _weights(48, 3, 0.5, seed=22)
    log_q = torch.zeros(3, 5, dtype=torch.float64)
    log_q[2, 1] = -math.inf
    return x, db, w, log_q


@pytest.fixture(scope="module")
def long_runs(problem):
    """Per metric, a long, tight run: its result and its objective (the best value we know)."""
    x, db, w, log_q = problem
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for metric in reference.METRICS:
            r = fit(x, db, w, ALPHA, metric=metric, tol=LONG_TOL, max_iter=20000, log_q=log_q)
            out[metric] = (r, objective(x, db, w, r.log_q, ALPHA, metric))
    finally:
        torch.set_num_threads(threads)
    return out


LONG_TOL = 1e-11


def _stack(history):
    return torch.stack(history)   # [iterations, C], NaN once a class has stopped


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "fused"])
def test_objective_never_decreases_and_is_reported_exactly(problem, metric, cache):
    x, db, w, log_q = problem
    r = fit(x, db, w, ALPHA, metric=metric, tol=1e-9, max_iter=150, log_q=log_q, cache=cache)
    assert r.cached is cache
    h = _stack(r.objective)
    for c in range(3):
        hc = h[:, c][~torch.isnan(h[:, c])]
        assert len(hc) == int(r.n_iter[c]) + 1        # one entry per iterate, the final one included
        diffs = hc[1:] - hc[:-1]
        assert bool((diffs >= -1e-12 * (1 + hc.abs().max())).all()), f"class {c}: objective decreased"
        assert float(hc[-1] - hc[0]) > 1e-3              # and the fit did improve it
    start = log_q - torch.logsumexp(log_q, 1, keepdim=True)
    assert_close64(h[0], objective(x, db, w, start, ALPHA, metric), msg="first objective")
    last = torch.stack([h[int(r.n_iter[c]), c] for c in range(3)])
    assert_close64(last, objective(x, db, w, r.log_q, ALPHA, metric), msg="final objective")


@pytest.mark.parametrize("iters", [0, 1, 7, 60])
def test_q_stays_on_the_simplex(problem, iters):
    x, db, w, log_q = problem
    r = fit(x, db, w, ALPHA, tol=1e-14, max_iter=iters, log_q=log_q)
    q = r.log_q.exp()
    assert not r.log_q.isnan().any()
    assert bool((q >= 0).all())
    assert_close64(q.sum(1), torch.ones(3, dtype=torch.float64), rtol=1e-12)
    assert torch.equal(r.n_iter, torch.full((3,), iters, dtype=torch.long))
    assert r.log_q[2, 1].item() == -math.inf and torch.isfinite(r.log_q[:2]).all()


def test_kkt_conditions_at_convergence(problem, long_runs, metric):
    x, db, w, log_q = problem
    r, _ = long_runs[metric]
    tol = LONG_TOL
    assert bool(r.converged.all()) and bool((r.gap < tol).all()) and bool((r.gap >= 0).all())
    le = log_eta(x, db, w, r.log_q, ALPHA, metric)
    filled = torch.isfinite(r.log_q)
    q = r.log_q.exp()
    eta = le.exp()
    # eta_j = d objective / d q_j; at the optimum on the simplex: eta_j <= 1 everywhere, = 1 on the support.
    # max_j log eta_j <= gap < tol bounds the first; sum_j q_j eta_j = 1 then bounds the second by tol/q_j.
    assert float(eta[filled].max()) <= 1 + 2 * tol
    support = q > 1e-3
    assert support.sum() >= 3
    assert float((eta[support] - 1).abs().max()) <= 2 * tol / 1e-3
    # the reported gap is max log eta - sum q log eta at the returned q
    gap = torch.where(filled, le, -math.inf).amax(1) - torch.where(q > 0, q * le, 0.0).sum(1)
    torch.testing.assert_close(r.gap, gap, rtol=0, atol=1e-12)


@pytest.mark.parametrize("iters", [3, 25, 150])
def test_gap_is_a_certificate(problem, long_runs, metric, iters):
    x, db, w, log_q = problem
    r = fit(x, db, w, ALPHA, metric=metric, tol=1e-14, max_iter=iters, log_q=log_q)
    f = objective(x, db, w, r.log_q, ALPHA, metric)
    long, best = long_runs[metric]
    # f <= f* <= best + long.gap: the long run is within its own certificate of the optimum
    assert bool((f <= best + long.gap + 1e-12).all())
    assert bool((r.gap > 0).all())
    assert bool((best - f <= r.gap + 1e-12).all()), f"suboptimality {best - f} exceeds gap {r.gap}"


def test_cached_and_fused_paths_agree(problem, metric, device):
    x, db, w, log_q = (t.to(device) for t in problem)
    a = fit(x, db, w, ALPHA, metric=metric, tol=1e-6, max_iter=1000, log_q=log_q, cache=True)
    b = fit(x, db, w, ALPHA, metric=metric, tol=1e-6, max_iter=1000, log_q=log_q, cache=False)
    assert a.cached and not b.cached
    assert torch.equal(a.n_iter, b.n_iter) and torch.equal(a.converged, b.converged)
    assert_close64(a.log_q.exp(), b.log_q.exp(), rtol=1e-9)
    torch.testing.assert_close(a.gap, b.gap, rtol=0, atol=1e-12)
    assert_close64(_stack(a.objective), _stack(b.objective))
    # cache=None decides by the budget
    assert fit(x, db, w, ALPHA, max_iter=1, cache_budget_bytes=0).cached is False
    assert fit(x, db, w, ALPHA, max_iter=1).cached is True


@pytest.mark.parametrize("cache", [True, False], ids=["cached", "fused"])
def test_huge_alpha_d(metric, cache):
    # alpha * d between ~1e3 and ~1e4: every exp(-alpha d) underflows to 0 in float64. Segments near
    # the origin, exemplars around a point at distance 3.
    g = torch.Generator().manual_seed(31)
    x = 0.3 * torch.randn(30, 2, generator=g, dtype=torch.float64)
    db = torch.tensor([3.0, 0.0], dtype=torch.float64) + 0.3 * torch.randn(2, 6, 2, generator=g, dtype=torch.float64)
    w = _weights(30, 2, 0.7, seed=32)
    alpha = 1e3
    k = _log_kernel(x, db, alpha, metric)
    assert float(k.max()) < -745 and float(k.min()) > -2e4 and (k.exp() == 0).all()
    r = fit(x, db, w, alpha, metric=metric, tol=1e-9, max_iter=300, cache=cache)
    assert torch.isfinite(r.log_q).all()        # every slot stays filled, even when q_j underflows to 0
    assert_close64(r.log_q.exp().sum(1), torch.ones(2, dtype=torch.float64), rtol=1e-12)
    assert torch.isfinite(r.gap).all() and bool((r.gap >= 0).all()) and bool(r.converged.all())
    le = log_eta(x, db, w, r.log_q, alpha, metric)    # finite, computed in the log domain
    assert torch.isfinite(le).all() and bool((le.amax(1) <= r.gap + 1e-12).all())
    h = _stack(r.objective)
    assert torch.isfinite(h[0]).all()
    for c in range(2):
        hc = h[:, c][~torch.isnan(h[:, c])]
        assert bool((hc[1:] - hc[:-1] >= -1e-12 * hc.abs().max()).all())
    assert_close64(h[-1][~torch.isnan(h[-1])], objective(x, db, w, r.log_q, alpha, metric)[~torch.isnan(h[-1])])


def test_empty_classes_reported_and_left_unchanged(metric):
    x, db, _ = make_inputs(20, 4, 5, 2, seed=41)
    w = _weights(20, 4, 0.6, seed=42)
    w[:, 1] = 0.0                                  # no weight
    log_q = torch.randn(4, 5, dtype=torch.float64).log_softmax(1)
    log_q[3] = -math.inf                           # no filled slot
    r = fit(x, db, w, ALPHA, metric=metric, tol=1e-5, max_iter=3000, log_q=log_q)
    assert sorted(r.empty_classes) == [1, 3]
    assert_close64(r.log_q[1], log_q[1], rtol=1e-14)
    assert torch.equal(r.log_q[3], log_q[3])
    # nothing to fit there: the objective does not depend on Q, so the certificate is 0 (never NaN)
    assert torch.equal(r.gap[[1, 3]], torch.zeros(2, dtype=torch.float64))
    assert torch.equal(r.n_iter[[1, 3]], torch.zeros(2, dtype=torch.long))
    assert bool(r.converged[[1, 3]].all()) and torch.isfinite(r.gap).all()
    assert float(r.gap.max()) == float(r.gap[[0, 2]].max())
    assert all(bool(h[[1, 3]].isnan().all()) for h in r.objective)
    assert bool(r.converged[[0, 2]].all()) and bool((r.n_iter[[0, 2]] > 0).all())
    assert not torch.allclose(r.log_q[0], log_q[0])   # the others did move


def test_neg_inf_start_slots_stay_empty(metric):
    x, db, _ = make_inputs(25, 2, 6, 2, seed=51)
    w = _weights(25, 2, 0.8, seed=52)
    log_q = torch.zeros(2, 6, dtype=torch.float64)
    log_q[0, [0, 4]] = -math.inf
    log_q[1, 5] = -math.inf
    empty = ~torch.isfinite(log_q)
    for cache in (True, False):
        r = fit(x, db, w, ALPHA, metric=metric, tol=1e-6, max_iter=200, log_q=log_q, cache=cache)
        assert torch.equal(~torch.isfinite(r.log_q), empty)
        assert (r.log_q[empty] == -math.inf).all()
        assert_close64(r.log_q.exp().sum(1), torch.ones(2, dtype=torch.float64), rtol=1e-12)


def test_unnormalised_start_is_normalised(problem):
    x, db, w, _ = problem
    r = fit(x, db, w, ALPHA, max_iter=0, log_q=torch.full((3, 5), 2.0, dtype=torch.float64))
    assert_close64(r.log_q, torch.full((3, 5), -math.log(5), dtype=torch.float64))
    assert torch.equal(r.n_iter, torch.zeros(3, dtype=torch.long)) and torch.isfinite(r.gap).all()


def _bad_fit_cases():
    x, db, _ = make_inputs(6, 3, 4, 2, seed=61)
    w = torch.ones(6, 3, dtype=torch.float64)
    ok = dict(x=x, db=db, weight=w, alpha=1.0)
    return [
        ("x_rank", dict(ok, x=x[0]), r"fit_representativeness: x must be a \[N, m\] tensor"),
        ("x_type", dict(ok, x=[[1.0]]), r"fit_representativeness: x must be a Tensor, got list"),
        ("db_m", dict(ok, db=db[..., :1]), r"db must be \[C, n, m=2\], got \(3, 4, 1\)"),
        ("weight_shape", dict(ok, weight=w[:, :2]), r"weight must be \[N, C\] = \[6, 3\], got \[6, 2\]"),
        ("weight_negative", dict(ok, weight=-w), r"weight must be finite and >= 0"),
        ("weight_nan", dict(ok, weight=w * math.nan), r"weight must be finite and >= 0"),
        ("alpha_zero", dict(ok, alpha=0.0), r"alpha must be a finite number > 0, got 0"),
        ("alpha_nan", dict(ok, alpha=math.nan), r"alpha must be a finite number > 0, got nan"),
        ("alpha_inf", dict(ok, alpha=math.inf), r"alpha must be a finite number > 0, got inf"),
        ("metric", dict(ok, metric="cosine"), r"metric must be one of .*got 'cosine'"),
        ("tol", dict(ok, tol=0.0), r"need tol > 0 and max_iter >= 0, got tol=0.0, max_iter=1000"),
        ("max_iter", dict(ok, max_iter=-1), r"need tol > 0 and max_iter >= 0, got tol=0.0001, max_iter=-1"),
        ("log_q_shape", dict(ok, log_q=torch.zeros(3, 5, dtype=torch.float64)),
         r"log_q must be \[C, n\] = \[3, 4\], got \[3, 5\]"),
        ("log_q_nan", dict(ok, log_q=torch.full((3, 4), math.nan, dtype=torch.float64)),
         r"log_q must not hold NaN or \+inf"),
        ("log_q_posinf", dict(ok, log_q=torch.full((3, 4), math.inf, dtype=torch.float64)),
         r"log_q must not hold NaN or \+inf"),
        ("x_int", dict(ok, x=x.long()), r"x must be a floating-point tensor, got torch.int64"),
        ("db_dtype", dict(ok, db=db.float()), r"db must have x's dtype torch.float64, got torch.float32"),
        ("alpha_str", dict(ok, alpha="1"), r"alpha must be a finite number > 0, got '1' \(str\)"),
        ("metric_none", dict(ok, metric=None), r"metric must be one of .*got None"),
        ("no_class", dict(ok, db=db[:0], weight=w[:, :0]), r"fit_representativeness: db must hold at least one "
                                                          r"class, got C=0"),
        ("log_q_list", dict(ok, log_q=[[0.0] * 4] * 3), r"fit_representativeness: log_q must be a Tensor or None, "
                                                      r"got list"),
        ("log_q_int", dict(ok, log_q=torch.zeros(3, 4, dtype=torch.long)),
         r"fit_representativeness: log_q must be a floating-point tensor, got torch.int64"),
        ("tol_str", dict(ok, tol="1e-4"), r"fit_representativeness: tol must be a number > 0, got '1e-4' \(str\)"),
        ("max_iter_float", dict(ok, max_iter=10.5), r"fit_representativeness: max_iter must be an int >= 0, "
                                                  r"got 10.5 \(float\)"),
        ("x_nan_weighted_row", dict(ok, x=torch.where(torch.arange(6)[:, None] == 2, math.nan, x)),
         r"fit_representativeness: x must be finite on the rows that have a weight, got NaN or inf in row 2"),
        ("db_inf_filled_slot", dict(ok, db=torch.where((torch.arange(3) == 1)[:, None, None]
                                                        & (torch.arange(4) == 3)[None, :, None], math.inf, db)),
         r"fit_representativeness: db must be finite in the classes with weight, got NaN or inf in class 1, "
         r"slot 3"),
    ]


# one exception type per kind of mistake, as the ops: TypeError for a type or dtype, ValueError otherwise
FIT_TYPE_ERRORS = {"x_type", "x_int", "db_dtype", "alpha_str", "metric_none", "log_q_list", "log_q_int", "tol_str",
                   "max_iter_float"}


@pytest.mark.parametrize("case", range(len(_bad_fit_cases())), ids=[c[0] for c in _bad_fit_cases()])
def test_fit_bad_input(case):
    name, kw, match = _bad_fit_cases()[case]
    args = {k: kw.pop(k) for k in ("x", "db", "weight", "alpha")}
    with pytest.raises(TypeError if name in FIT_TYPE_ERRORS else ValueError, match=match):
        fit(*args.values(), **kw)


@pytest.mark.parametrize("cache", [False, True], ids=["fused", "cached"])
def test_non_finite_values_that_are_never_read_are_accepted(cache):
    # NaN in a row without weight, and inf in a class without weight, are never read: the fit is the same
    # as with finite values there
    x, db, _ = make_inputs(8, 3, 4, 2, seed=63)
    w = _weights(8, 3, 0.6, seed=64)
    w[5] = 0.0
    w[:, 2] = 0.0
    log_q = torch.zeros(3, 4, dtype=torch.float64)
    log_q[0, 1] = -math.inf
    clean = fit(x, db, w, ALPHA, log_q=log_q, cache=cache, max_iter=20)
    xb, dbb = x.clone(), db.clone()
    xb[5] = math.nan
    dbb[2] = math.inf
    dirty = fit(xb, dbb, w, ALPHA, log_q=log_q, cache=cache, max_iter=20)
    assert torch.equal(dirty.log_q, clean.log_q) and torch.equal(dirty.gap, clean.gap)


@pytest.mark.parametrize("cache", [False, True], ids=["fused", "cached"])
def test_weights_whose_sum_overflows_are_normalised(cache):
    # weights of 1e308 sum to inf in float64; only their ratios matter, so the fit equals that of the
    # same weights scaled down, and it converges with a finite certificate
    x, db, _ = make_inputs(12, 2, 5, 2, seed=65)
    w = _weights(12, 2, 0.7, seed=66)
    big = fit(x, db, w * 1e308 / float(w.max()), ALPHA, cache=cache, tol=1e-8, max_iter=3000)
    small = fit(x, db, w / float(w.max()), ALPHA, cache=cache, tol=1e-8, max_iter=3000)
    assert torch.isfinite(big.gap).all() and bool(big.converged.all())
    assert_close64(big.log_q, small.log_q, rtol=1e-9)


def test_a_non_finite_objective_is_never_certified(problem, monkeypatch):
    # should an overflow inside the fit make a class's objective non-finite, that class stops with a NaN
    # gap, not converged, and keeps its last finite Q; the others are unaffected
    from ccluster import fit as fit_module
    x, db, w, log_q = problem
    real = fit_module.fit_step
    calls = {"n": 0}

    def overflowing(*args, **kw):
        logz, log_eta = real(*args, **kw)
        calls["n"] += 1
        if calls["n"] >= 3:  # from the third pass on, class 1 overflows
            logz, log_eta = logz.clone(), log_eta.clone()
            logz[:, 1] = math.nan
            log_eta[1] = math.nan
        return logz, log_eta

    monkeypatch.setattr(fit_module, "fit_step", overflowing)
    r = fit(x, db, w, ALPHA, log_q=log_q, cache=False, tol=1e-12, max_iter=30)
    assert torch.isnan(r.gap[1]) and not bool(r.converged[1])
    assert torch.isfinite(r.log_q[1][torch.isfinite(log_q[1])]).all()
    assert_close64(r.log_q[1].exp().sum(), torch.tensor(1.0, dtype=torch.float64), rtol=1e-12)
    assert torch.isfinite(r.gap[[0, 2]]).all()
    monkeypatch.setattr(fit_module, "fit_step", real)
    clean = fit(x, db, w, ALPHA, log_q=log_q, cache=False, tol=1e-12, max_iter=30)
    assert torch.equal(r.log_q[[0, 2]], clean.log_q[[0, 2]])


@pytest.mark.parametrize("cache", [False, True], ids=["fused", "cached"])
def test_fit_rejects_db_of_another_dtype_with_a_clear_message(cache):
    x, db, _ = make_inputs(6, 2, 4, 2, seed=71)
    w = torch.ones(6, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"fit_representativeness: db must have x's dtype"):
        fit(x, db.float(), w, ALPHA, cache=cache, max_iter=3)


def test_fit_step_without_slots_matches_exemplar_logsumexp():
    x, db, log_q = make_inputs(4, 2, 0, 3, seed=72)
    w = torch.ones(4, 2, dtype=torch.float64)
    logz, log_eta = ccluster.fit_step(x, db, log_q, w, ALPHA)
    assert log_eta.shape == (2, 0)
    assert torch.equal(logz, ccluster.exemplar_logsumexp(x, db, log_q, ALPHA))


@pytest.mark.parametrize("cache", [False, True], ids=["fused", "cached"])
def test_accelerated_fit_reaches_the_same_certificate_in_fewer_passes(cache):
    torch.manual_seed(5)
    C, n, m = 3, 40, 6
    centres = torch.randn(C, 4, m, dtype=torch.float64) * 3
    x = centres[torch.randint(C, (600,)), torch.randint(4, (600,))] + torch.randn(600, m, dtype=torch.float64)
    db = x[torch.randperm(600)[:C * n]].reshape(C, n, m)
    w = torch.rand(600, C, dtype=torch.float64) * (torch.rand(600, C) < 0.4)
    plain = fit(x, db, w, 0.5, tol=1e-6, max_iter=5000, cache=cache)
    fast = fit(x, db, w, 0.5, tol=1e-6, max_iter=5000, cache=cache, accelerate=True)
    assert bool(plain.converged.all()) and bool(fast.converged.all())
    assert int(fast.n_iter.sum()) < int(plain.n_iter.sum())
    hist = torch.stack(fast.objective)
    steps = hist.diff(dim=0)
    assert bool((steps[~steps.isnan()] >= -1e-12).all()), "accelerated objective decreased"
    last = lambda h: torch.stack([h[~h[:, c].isnan(), c][-1] for c in range(C)])  # noqa: E731
    # both objectives are within tol of the optimum, hence of each other
    assert torch.allclose(last(hist), last(torch.stack(plain.objective)), atol=2e-6, rtol=0)
    assert torch.allclose(fast.log_q.exp().sum(1), torch.ones(C, dtype=torch.float64))


@pytest.mark.parametrize("max_iter", [1, 2, 3, 7, 50])
def test_accelerated_fit_never_exceeds_max_iter(problem, max_iter):
    # SQUAREM spends one to three passes per round; the budget is a hard bound on n_iter all the same
    x, db, w, log_q = problem
    r = fit(x, db, w, ALPHA, tol=1e-14, max_iter=max_iter, log_q=log_q, accelerate=True)
    assert int(r.n_iter.max()) == max_iter
    q = r.log_q.exp()
    assert_close64(q.sum(1), torch.ones(3, dtype=torch.float64), rtol=1e-12)


def test_fit_step_is_not_differentiable_and_says_so():
    x, db, log_q, w = _step_problem(9, 4, 5, 2, seed=5)
    x.requires_grad_()
    logz, _ = ccluster.fit_step(x, db, log_q, w, 0.8)
    with pytest.raises(RuntimeError, match="fit_step: not differentiable"):
        torch.autograd.grad(logz.sum(), x)
