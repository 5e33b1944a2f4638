"""ccluster.exemplar_losses: class-contrastive, background and attention-prior losses (our extension),
against the float64 oracles in ccluster.reference and against hand computations."""
from __future__ import annotations

import math

import pytest
import torch

import ccluster
from ccluster import reference
from conftest import COL_BLOCK, ROW_BLOCK, assert_close64, assert_low_precision, make_inputs

pytestmark = pytest.mark.usefixtures("compiled_ops", "thread_policy")

ALPHA = 0.6
F64 = torch.float64


def _labels(N, K, seed, *, p=0.35, empty_rows=True):
    g = torch.Generator().manual_seed(seed)
    lab = torch.rand(N, K, generator=g) < p
    lab[torch.arange(N), torch.randint(0, K, (N,), generator=g)] = True
    if empty_rows:
        lab[0] = False                       # a row with no label
    return lab


def _contrastive_problem(N, K, n, m, seed, *, empty_class=True, background=False):
    x, db, log_q = make_inputs(N, K, n, m, seed=seed)
    if empty_class:
        log_q[1] = -math.inf                 # a whole class empty (and labelled on some rows)
        log_q[0, 1::3] = -math.inf           # some empty slots
    g = torch.Generator().manual_seed(seed + 1)
    w = torch.rand(N, generator=g, dtype=F64)
    labels = _labels(N, K, seed + 2)
    bg = None
    if background:
        labels[:, -1] = False
        bg = torch.rand(N, generator=g, dtype=F64)
    return x, w, labels, db, log_q, bg


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)


def _contrastive_and_grads(fn, x, w, labels, db, log_q, metric, bg=None, temperature=1.0):
    ins = [t.detach().clone().requires_grad_() for t in (x, w, db, log_q)]
    bgr = None if bg is None else bg.detach().clone().requires_grad_()
    if fn is reference.class_contrastive_loss:
        loss = fn(ins[0], ins[1], labels, ins[2], ins[3], ALPHA, metric, temperature, bgr)
    else:
        loss = fn(ins[0], ins[1], labels, ins[2], ins[3], ALPHA, metric, temperature=temperature,
                  background_weight=bgr)
    return (loss, *_grads(loss, ins + ([bgr] if bgr is not None else [])))


# ---------------------------------------------------------------------------------------------------
# exemplar_cross_entropy / class_contrastive_loss against the oracle


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_cross_entropy_matches_reference_float64(metric, temperature):
    x, db, log_q = make_inputs(19, 5, 7, 3, seed=1)
    log_q[2] = -math.inf
    log_q[4, ::2] = -math.inf
    g = torch.Generator().manual_seed(2)
    target = torch.rand(19, 5, generator=g, dtype=F64)
    ins = [t.clone().requires_grad_() for t in (x, target, db, log_q)]
    got = ccluster.exemplar_cross_entropy(*ins[:2], *ins[2:], ALPHA, metric, temperature=temperature)
    gg = _grads(got, ins)
    ref_ins = [t.clone().requires_grad_() for t in (x, target, db, log_q)]
    want = reference.exemplar_cross_entropy(*ref_ins, ALPHA, metric, temperature)
    wg = _grads(want, ref_ins)
    assert got.shape == () and got.dtype == F64
    assert_close64(got, want, msg="loss")
    for a, b, name in zip(gg, wg, ("x", "target", "db", "log_q")):
        assert torch.isfinite(a).all(), name
        assert_close64(a, b, msg=f"grad {name}")
    # the empty class: no gradient anywhere, its target ignored
    assert torch.equal(gg[1][:, 2], torch.zeros(19, dtype=F64))
    assert torch.equal(gg[2][2], torch.zeros_like(gg[2][2])) and torch.equal(gg[3][2], torch.zeros(7, dtype=F64))


@pytest.mark.parametrize("background", [False, True], ids=["no_bg", "bg"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_contrastive_matches_reference_float64(metric, background, temperature):
    args = _contrastive_problem(23, 5, 9, 3, seed=3, background=background)
    got = _contrastive_and_grads(ccluster.class_contrastive_loss, *args[:5], metric, args[5], temperature)
    want = _contrastive_and_grads(reference.class_contrastive_loss, *args[:5], metric, args[5], temperature)
    names = ("loss", "x", "weight", "db", "log_q", "background_weight")
    for a, b, name in zip(got, want, names):
        assert torch.isfinite(a).all(), name
        assert_close64(a, b, msg=name)


@pytest.mark.parallel
def test_contrastive_matches_reference_float64_medium(metric):
    # 2 row blocks and 2 column tiles per class: the kernel's tiling, with a background class
    args = _contrastive_problem(ROW_BLOCK + 40, 3, COL_BLOCK + 30, 4, seed=4, background=True)
    got = _contrastive_and_grads(ccluster.class_contrastive_loss, *args[:5], metric, args[5])
    want = _contrastive_and_grads(reference.class_contrastive_loss, *args[:5], metric, args[5])
    for a, b, name in zip(got, want, ("loss", "x", "weight", "db", "log_q", "bg")):
        assert_close64(a, b, msg=name)


def test_contrastive_is_the_formula_by_hand(metric):
    # -sum_s w_s sum_{c in L_s} (1/|L_s|) [log z_sc - log sum_c' z_sc'], one segment and class at a time
    x, w, labels, db, log_q, _ = _contrastive_problem(9, 4, 6, 3, seed=5, empty_class=False)
    tau = 0.7
    got = ccluster.class_contrastive_loss(x, w, labels, db, log_q, ALPHA, metric, temperature=tau)
    want = 0.0
    for s in range(9):
        d2 = ((x[s] - db) ** 2).sum(-1)                     # [K, n]
        d = d2 if metric == "sqeuclidean" else d2.sqrt()
        logz = torch.logsumexp(log_q - ALPHA * d, dim=1) / tau
        L = labels[s].nonzero().squeeze(1).tolist()
        for c in L:
            want -= float(w[s]) / len(L) * float(logz[c] - torch.logsumexp(logz, 0))
    assert got.item() == pytest.approx(want, rel=1e-12)


def test_labelled_empty_class_contributes_nothing(metric):
    # row 0 labelled {empty class 1, class 2}: its share of class 1 is dropped, not moved to class 2
    x, db, log_q = make_inputs(3, 4, 5, 2, seed=6)
    log_q[1] = -math.inf
    w = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    labels = torch.tensor([[False, True, True, False], [True, False, False, False],
                           [False, True, False, False]])
    got = ccluster.class_contrastive_loss(x, w, labels, db, log_q, ALPHA, metric)
    keep = [0, 2, 3]
    target = torch.tensor([[0.0, 0.25, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    want = ccluster.exemplar_cross_entropy(x, target, db[keep], log_q[keep], ALPHA, metric)
    assert_close64(got, want)


def test_all_classes_empty_gives_zero_without_nan(metric):
    x, w, labels, db, log_q, bg = _contrastive_problem(6, 3, 4, 2, seed=7, background=True)
    log_q[:] = -math.inf
    loss, *grads = _contrastive_and_grads(ccluster.class_contrastive_loss, x, w, labels, db, log_q, metric, bg)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.equal(g.abs(), torch.zeros_like(g))


def test_zero_rows_and_size_one_dims(metric):
    x, w, labels, db, log_q, bg = _contrastive_problem(6, 3, 4, 2, seed=8, empty_class=False, background=True)
    loss, gx, gw, *_ = _contrastive_and_grads(ccluster.class_contrastive_loss, x[:0], w[:0], labels[:0], db,
                                              log_q, metric, bg[:0])
    assert loss.item() == 0.0 and gx.shape == (0, 2) and gw.shape == (0,)
    # one class: p(c|s) = 1, the loss and every gradient are 0
    x1, db1, lq1 = make_inputs(5, 1, 1, 1, seed=9)
    lab1 = torch.ones(5, 1, dtype=torch.bool)
    loss, *grads = _contrastive_and_grads(ccluster.class_contrastive_loss, x1, w[:5], lab1, db1, lq1, metric)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.equal(g.abs(), torch.zeros_like(g))
    # n = 1, m = 1, N = 1 against the oracle
    x2, db2, lq2 = make_inputs(1, 3, 1, 1, seed=10)
    lab2 = torch.tensor([[False, True, False]])
    got = _contrastive_and_grads(ccluster.class_contrastive_loss, x2, w[:1], lab2, db2, lq2, metric, bg[:1])
    want = _contrastive_and_grads(reference.class_contrastive_loss, x2, w[:1], lab2, db2, lq2, metric, bg[:1])
    for a, b in zip(got, want):
        assert_close64(a, b)


def test_non_contiguous_inputs(metric):
    x, w, labels, db, log_q, bg = _contrastive_problem(17, 4, 6, 3, seed=11, background=True)
    xt = x.t().contiguous().t()                                   # column-major
    dbs = torch.stack([db, db], 2).flatten(1, 2)[:, ::2]          # strided slots
    lqs = torch.stack([log_q, log_q], -1)[..., 0]
    ws = torch.stack([w, w], 1)[:, 1]
    lab = labels.t().contiguous().t()
    assert not (xt.is_contiguous() or dbs.is_contiguous() or lqs.is_contiguous() or ws.is_contiguous()
                or lab.is_contiguous())
    got = _contrastive_and_grads(ccluster.class_contrastive_loss, xt, ws, lab, dbs, lqs, metric, bg)
    want = _contrastive_and_grads(reference.class_contrastive_loss, x, w, labels, db, log_q, metric, bg)
    for a, b in zip(got, want):
        assert_close64(a, b)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_contrastive_exact_when_alpha_d_is_huge(metric, dtype):
    # a segment ~1e4 (in alpha*d) from both classes: z underflows to 0 and the naive z_c / sum z is 0/0
    if metric == "sqeuclidean":
        alpha, d = 1.0, (1.0e4, 1.0e4 + 3.0)
    else:
        alpha, d = 100.0, (100.0, 100.03)
    x = torch.zeros(1, 2, dtype=F64)
    db = torch.tensor([[[math.sqrt(d[0]) if metric == "sqeuclidean" else d[0], 0.0]],
                       [[0.0, math.sqrt(d[1]) if metric == "sqeuclidean" else d[1]]]], dtype=F64)
    log_q = torch.zeros(2, 1, dtype=F64)
    labels = torch.tensor([[False, True]])
    w = torch.ones(1, dtype=F64)
    z = torch.exp(-alpha * torch.tensor(d, dtype=F64))
    naive = -torch.log(z[1] / z.sum())
    assert not torch.isfinite(naive)          # the case the naive formula cannot do
    a0, a1 = -alpha * d[0], -alpha * d[1]
    exact = -(a1 - (max(a0, a1) + math.log1p(math.exp(-abs(a0 - a1)))))   # -log p(1|s), ~ alpha*(d1-d0)
    xs = x.to(dtype).requires_grad_()
    loss = ccluster.class_contrastive_loss(xs, w.to(dtype), labels, db.to(dtype), log_q.to(dtype), alpha, metric)
    assert torch.isfinite(loss)
    # float32: d1 - d0 = 3 (or 0.03) is resolved to about eps * d ~ 1e-3 at d ~ 1e4
    tol = 1e-9 if dtype == F64 else 4e-3
    assert loss.item() == pytest.approx(exact, abs=tol * max(1.0, exact))
    (gx,) = torch.autograd.grad(loss, (xs,))
    assert torch.isfinite(gx).all()


def test_contrastive_float32_against_oracle(metric):
    x, w, labels, db, log_q, bg = _contrastive_problem(ROW_BLOCK + 5, 3, COL_BLOCK + 10, 3, seed=12,
                                                       empty_class=False, background=True)
    f32 = [t.float() for t in (x, w, db, log_q, bg)]
    fused = _contrastive_and_grads(ccluster.class_contrastive_loss, f32[0], f32[1], labels, f32[2], f32[3],
                                   metric, f32[4])
    plain = _contrastive_and_grads(reference.class_contrastive_loss, f32[0], f32[1], labels, f32[2], f32[3],
                                   metric, f32[4])
    oracle = _contrastive_and_grads(reference.class_contrastive_loss, *[t.double() for t in f32[:2]], labels,
                                    *[t.double() for t in f32[2:4]], metric, f32[4].double())
    for name, a, b, c in zip(("loss", "x", "weight", "db", "log_q", "bg"), fused, plain, oracle):
        assert a.dtype == torch.float32
        assert_low_precision(a.detach(), b.detach(), c.detach(), torch.float32, name)


@pytest.mark.parametrize("background", [False, True], ids=["no_bg", "bg"])
def test_contrastive_gradcheck(metric, background):
    x, w, labels, db, log_q, bg = _contrastive_problem(5, 3, 3, 2, seed=13, empty_class=False,
                                                       background=background)
    inputs = [t.requires_grad_() for t in (x, w, db, log_q) + ((bg,) if background else ())]

    def f(x, w, db, lq, *b):
        return ccluster.class_contrastive_loss(x, w, labels, db, lq, ALPHA, metric, temperature=0.8,
                                               background_weight=b[0] if b else None)
    assert torch.autograd.gradcheck(f, inputs)


def test_float_labels_equal_bool_labels():
    x, w, labels, db, log_q, _ = _contrastive_problem(11, 4, 5, 3, seed=14)
    a = ccluster.class_contrastive_loss(x, w, labels, db, log_q, ALPHA)
    b = ccluster.class_contrastive_loss(x, w, labels.to(F64) * 3.0, db, log_q, ALPHA)
    assert_close64(a, b)


def test_contrastive_torch_compile_fullgraph():
    x, w, labels, db, log_q, bg = _contrastive_problem(9, 3, 5, 3, seed=15, background=True)
    args = [t.detach().requires_grad_() for t in (x, w, db, log_q)]

    def f(x, w, db, lq):
        return ccluster.class_contrastive_loss(x, w, labels, db, lq, ALPHA, temperature=0.5,
                                               background_weight=bg)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    val = compiled(*args)
    ref = f(*args)
    assert_close64(val, ref)
    for a, b in zip(torch.autograd.grad(val, args), torch.autograd.grad(ref, args)):
        assert_close64(a, b)


def _fn_bad_cases():
    x, db, log_q = make_inputs(5, 3, 4, 2, seed=16)
    w = torch.ones(5, dtype=F64)
    lab = torch.ones(5, 3, dtype=torch.bool)
    base = dict(x=x, weight=w, labels=lab, db=db, log_q=log_q, alpha=ALPHA)
    fn = "class_contrastive_loss"
    return [
        ("weight_shape", dict(weight=torch.ones(4, dtype=F64)), ValueError, rf"{fn}: weight must be \[5\], got \[4\]"),
        ("weight_dtype", dict(weight=torch.ones(5)), TypeError,
         rf"{fn}: weight must have the features' dtype torch.float64, got torch.float32"),
        ("labels_shape", dict(labels=torch.ones(5, 2, dtype=torch.bool)), ValueError,
         rf"{fn}: labels must be \[5, 3\], got \[5, 2\]"),
        ("labels_dtype", dict(labels=torch.ones(5, 3, dtype=torch.int64)), TypeError,
         rf"{fn}: labels must be a bool or floating tensor, got torch.int64"),
        ("bg_shape", dict(background_weight=torch.ones(5, 1, dtype=F64)), ValueError,
         rf"{fn}: background_weight must be \[5\], got \[5, 1\]"),
        ("temperature", dict(temperature=0.0), ValueError, rf"{fn}: temperature must be a finite number > 0, got 0.0"),
        ("temperature_nan", dict(temperature=math.nan), ValueError, rf"{fn}: temperature must be .* got nan"),
        ("x_rank", dict(x=x[None]), ValueError, rf"{fn}: x must be \[N, m\], got shape \[1, 5, 2\]"),
        ("db_m", dict(db=db[..., :1]), ValueError, rf"{fn}: db feature size m=1 does not match x's m=2"),
        ("alpha", dict(alpha=-1.0), ValueError, rf"{fn}: alpha must be a finite number > 0, got -1"),
        ("metric", dict(metric="l1"), ValueError, rf"{fn}: metric must be 'sqeuclidean' or 'euclidean', got 'l1'"),
        ("weight_type", dict(weight=[1.0] * 5), TypeError, rf"{fn}: weight must be a Tensor, got list"),
    ], base


@pytest.mark.parametrize("case", range(12), ids=[c[0] for c in _fn_bad_cases()[0]])
def test_contrastive_bad_input(case):
    cases, base = _fn_bad_cases()
    _, over, exc, match = cases[case]
    kw = dict(base, **over)
    with pytest.raises(exc, match=match):
        ccluster.class_contrastive_loss(**kw)


def test_cross_entropy_bad_target():
    x, db, log_q = make_inputs(5, 3, 4, 2, seed=17)
    with pytest.raises(ValueError, match=r"exemplar_cross_entropy: target must be \[5, 3\], got \[5\]"):
        ccluster.exemplar_cross_entropy(x, torch.ones(5, dtype=F64), db, log_q, ALPHA)
    with pytest.raises(ValueError, match=r"exemplar_cross_entropy: temperature must be a finite number > 0, got -1"):
        ccluster.exemplar_cross_entropy(x, torch.ones(5, 3, dtype=F64), db, log_q, ALPHA, temperature=-1)


# ---------------------------------------------------------------------------------------------------
# ClassContrastiveLoss (padded batches)


def _batch(B=3, T=7, m=3, C=4, n=5, seed=20, background=False):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, m, generator=g, dtype=F64)
    att = torch.rand(B, T, generator=g, dtype=F64) + 0.1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    labels = torch.zeros(B, C)
    labels[0, [0, 2]] = 1.0
    labels[1, 3] = 1.0
    labels[2, [1, 2, 3]] = 1.0
    _, db, log_q = make_inputs(1, C + background, n, m, seed=seed + 1)
    log_q[2, 0] = -math.inf
    return feats, att, labels, mask, db, log_q


def _hand_module(feats, att, labels, mask, db, log_q, metric, tau, weighting, background, scale):
    """Per video: weights by hand, then the oracle on the video's valid rows."""
    total = feats.new_zeros(())
    K = db.shape[0]
    for b in range(feats.shape[0]):
        rows = mask[b].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        a = att[b, rows]
        if weighting == "uniform":
            w = torch.full((rows.numel(),), 1.0 / rows.numel(), dtype=F64)
        elif float(a.sum().detach()) == 0.0:
            continue
        else:
            w = a / a.sum()
        lab = torch.zeros(rows.numel(), K, dtype=torch.bool)
        lab[:, : labels.shape[1]] = labels[b] != 0
        bg = None
        if background:
            comp = 1 - a / a.max()
            bg = scale * comp / comp.sum() if float(comp.sum().detach()) > 0 else torch.zeros_like(comp)
        total = total + reference.class_contrastive_loss(feats[b, rows], w, lab, db, log_q, ALPHA, metric, tau,
                                                         bg)
    return total


MODULE_CONFIGS = [
    dict(weighting="attention", background=False),
    dict(weighting="uniform", background=False),
    dict(weighting="attention", background=True, background_scale=0.5),
]


@pytest.mark.parametrize("cfg", MODULE_CONFIGS, ids=["attention", "uniform", "background"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_module_matches_hand_computation(metric, cfg, reduction):
    feats, att, labels, mask, db, log_q = _batch(background=cfg["background"])
    ins = [t.requires_grad_() for t in (feats, att, db, log_q)]
    mod = ccluster.ClassContrastiveLoss(ALPHA, metric, temperature=0.8, reduction=reduction, **cfg)
    loss = mod(feats, att, labels, mask, db, log_q)
    want = _hand_module(feats, att, labels, mask, db, log_q, metric, 0.8, cfg["weighting"], cfg["background"],
                        cfg.get("background_scale", 1.0))
    if reduction == "mean":
        want = want / feats.shape[0]
    assert_close64(loss, want, msg="loss")
    got_g = _grads(loss, ins)
    want_g = _grads(want, ins)
    for a, b, name in zip(got_g, want_g, ("features", "attention", "db", "log_q")):
        assert torch.isfinite(a).all(), name
        assert_close64(a, b, msg=name)
    if cfg["weighting"] == "uniform":
        assert torch.equal(got_g[1], torch.zeros_like(got_g[1]))


@pytest.mark.parametrize("background", [False, True], ids=["no_bg", "bg"])
def test_module_attention_scale_per_video_does_not_matter(metric, background):
    feats, att, labels, mask, db, log_q = _batch(background=background)
    mod = ccluster.ClassContrastiveLoss(ALPHA, metric, background=background)
    scaled = att * torch.tensor([[3.0], [0.25], [10.0]], dtype=F64)
    assert_close64(mod(feats, scaled, labels, mask, db, log_q), mod(feats, att, labels, mask, db, log_q))


@pytest.mark.parametrize("background", [False, True], ids=["no_bg", "bg"])
def test_module_ignores_padding(metric, background):
    feats, att, labels, mask, db, log_q = _batch(background=background)
    mod = ccluster.ClassContrastiveLoss(ALPHA, metric, background=background)
    base = mod(feats, att, labels, mask, db, log_q)
    f2, a2 = feats.clone(), att.clone()
    f2[~mask] = 1e3 * torch.randn(int((~mask).sum()), feats.shape[2], dtype=F64)
    f2[2, 5, 0] = math.nan          # padding features are never read
    a2[~mask] = 7.5
    a2[1, 6] = math.nan
    f2.requires_grad_(), a2.requires_grad_()
    loss = mod(f2, a2, labels, mask, db, log_q)
    assert_close64(loss, base)
    gf, ga = _grads(loss, [f2, a2])
    assert torch.equal(gf[~mask], torch.zeros_like(gf[~mask]))
    assert torch.equal(ga[~mask], torch.zeros_like(ga[~mask]))
    assert torch.isfinite(gf).all() and torch.isfinite(ga).all()


@pytest.mark.parametrize("background", [False, True], ids=["no_bg", "bg"])
def test_module_zero_attention_video_contributes_nothing(metric, background):
    feats, att, labels, mask, db, log_q = _batch(background=background)
    mod = ccluster.ClassContrastiveLoss(ALPHA, metric, background=background)
    a0 = att.clone()
    a0[1] = 0.0
    a0.requires_grad_()
    keep = torch.tensor([True, False, True])
    loss = mod(feats, a0, labels, mask, db, log_q)
    assert_close64(loss, mod(feats[keep], att[keep], labels[keep], mask[keep], db, log_q))
    (ga,) = _grads(loss, [a0])
    assert torch.isfinite(ga).all()


def test_module_equal_attention_video_has_no_background_term(metric):
    feats, att, labels, mask, db, log_q = _batch(background=True)
    flat = att.clone()
    flat[0] = 0.4                     # every segment of video 0 attended equally: 1 - a/max a = 0
    with_bg = ccluster.ClassContrastiveLoss(ALPHA, metric, background=True, background_scale=2.0)
    a = with_bg(feats[:1], flat[:1], labels[:1], mask[:1], db, log_q)
    b = ccluster.ClassContrastiveLoss(ALPHA, metric)(feats[:1], flat[:1],
                                                     torch.cat([labels[:1], torch.zeros(1, 1)], 1), mask[:1],
                                                     db, log_q)
    assert_close64(a, b)


def test_module_empty_batch_and_empty_video():
    feats, att, labels, mask, db, log_q = _batch(background=True)
    mod = ccluster.ClassContrastiveLoss(ALPHA, background=True, reduction="mean")
    assert mod(feats[:0], att[:0], labels[:0], mask[:0], db, log_q).item() == 0.0
    m0 = mask.clone()
    m0[1] = False                     # a video with no valid segment
    keep = torch.tensor([True, False, True])
    assert_close64(mod(feats, att, labels, m0, db, log_q) * 3 / 2,
                   mod(feats[keep], att[keep], labels[keep], mask[keep], db, log_q))
    assert mod(feats[:, :0], att[:, :0], labels, mask[:, :0], db, log_q).item() == 0.0


def test_module_alpha_can_be_changed_and_repr():
    feats, att, labels, mask, db, log_q = _batch()
    mod = ccluster.ClassContrastiveLoss(ALPHA)
    mod.alpha = 2.0
    want = ccluster.ClassContrastiveLoss(2.0)(feats, att, labels, mask, db, log_q)
    assert_close64(mod(feats, att, labels, mask, db, log_q), want)
    assert "alpha=2" in repr(mod) and "weighting='attention'" in repr(mod)


MODULE_BAD_CTOR = [
    ("alpha", dict(alpha=0.0), ValueError, r"ClassContrastiveLoss: alpha must be a finite number > 0, got 0.0"),
    ("metric", dict(alpha=1.0, metric="cosine"), ValueError,
     r"ClassContrastiveLoss: metric must be one of \('sqeuclidean', 'euclidean'\), got 'cosine'"),
    ("reduction", dict(alpha=1.0, reduction="none"), ValueError,
     r"ClassContrastiveLoss: reduction must be 'sum' or 'mean', got 'none'"),
    ("temperature", dict(alpha=1.0, temperature=math.inf), ValueError,
     r"ClassContrastiveLoss: temperature must be a finite number > 0, got inf"),
    ("weighting", dict(alpha=1.0, weighting="max"), ValueError,
     r"ClassContrastiveLoss: weighting must be one of \('attention', 'uniform'\), got 'max'"),
    ("bg_uniform", dict(alpha=1.0, weighting="uniform", background=True), ValueError,
     r"ClassContrastiveLoss: background=True needs weighting='attention', got 'uniform'"),
    ("bg_type", dict(alpha=1.0, background=1), TypeError, r"ClassContrastiveLoss: background must be a bool, got int"),
    ("bg_scale", dict(alpha=1.0, background=True, background_scale=-1.0), ValueError,
     r"ClassContrastiveLoss: background_scale must be a finite number > 0, got -1.0"),
]


@pytest.mark.parametrize("case,kw,exc,match", MODULE_BAD_CTOR, ids=[c[0] for c in MODULE_BAD_CTOR])
def test_module_bad_construction(case, kw, exc, match):
    with pytest.raises(exc, match=match):
        ccluster.ClassContrastiveLoss(**kw)


def _module_bad_forward():
    feats, att, labels, mask, db, log_q = _batch()
    _, _, _, _, dbb, lqb = _batch(background=True)
    n = "ClassContrastiveLoss"
    return [
        ("features_rank", False, (feats[0], att, labels, mask, db, log_q), ValueError,
         rf"{n}: features must be \[B, T, m\], got \[7, 3\]"),
        ("attention_none", False, (feats, None, labels, mask, db, log_q), ValueError,
         rf"{n}: attention must be a \[B, T\] tensor for weighting='attention', got None"),
        ("attention_shape", False, (feats, att[:, :5], labels, mask, db, log_q), ValueError,
         rf"{n}: attention must be \[3, 7\], got \[3, 5\]"),
        ("mask_dtype", False, (feats, att, labels, mask.double(), db, log_q), TypeError,
         rf"{n}: mask must be a bool tensor, got torch.float64"),
        ("labels_vs_db", False, (feats, att, labels, mask, dbb, lqb), ValueError,
         rf"{n}: labels must be \[3, 5\], got \[3, 4\]"),
        ("bg_db_without_bg", True, (feats, att, labels, mask, db, log_q), ValueError,
         rf"{n}: labels must be \[3, 3\], got \[3, 4\]"),
        ("db_m", False, (feats, att, labels, mask, db[..., :2], log_q), ValueError,
         rf"{n}: db feature size m=2 does not match x's m=3"),
    ]


@pytest.mark.parametrize("case", range(7), ids=[c[0] for c in _module_bad_forward()])
def test_module_bad_forward(case):
    _, background, args, exc, match = _module_bad_forward()[case]
    with pytest.raises(exc, match=match):
        ccluster.ClassContrastiveLoss(ALPHA, background=background)(*args)


# ---------------------------------------------------------------------------------------------------
# Background database: C + 1 classes in ExemplarDatabase


def test_database_with_a_background_class_feeds_the_background_loss():
    B, T, m, C, n = 4, 12, 3, 3, 5
    g = torch.Generator().manual_seed(30)
    feats = torch.randn(B, T, m, generator=g, dtype=F64)
    att = torch.rand(B, T, generator=g, dtype=F64)
    labels = torch.zeros(B, C, dtype=torch.bool)
    labels[torch.arange(B), torch.tensor([0, 1, 2, 0])] = True
    mask = torch.ones(B, T, dtype=torch.bool)
    # foreground candidates score by attention; background candidates by -attention (lowest first)
    lab_rows = torch.cat([labels, torch.ones(B, 1, dtype=torch.bool)], 1).repeat_interleave(T, 0)
    scores = torch.cat([att.reshape(-1, 1).expand(B * T, C), -att.reshape(-1, 1)], 1)
    ids = torch.stack([torch.arange(B).repeat_interleave(T), torch.arange(T).repeat(B)], 1)
    database = ccluster.ExemplarDatabase(C + 1, n, m, dtype=F64).update(feats.reshape(-1, m), scores,
                                                                       lab_rows, ids)
    assert database.features.shape == (C + 1, n, m) and database.log_q.shape == (C + 1, n)
    assert int(database.count[C]) == n
    lowest = att.reshape(-1).argsort()[:n]                                  # the n least-attended segments
    assert torch.equal(database.features[C], feats.reshape(-1, m)[lowest])
    # Q fit over C + 1 classes: background weighted by the complement of the attention
    weight = torch.cat([labels.repeat_interleave(T, 0).to(F64) * att.reshape(-1, 1),
                        (1 - att).reshape(-1, 1)], 1)
    fit = ccluster.fit_representativeness(feats.reshape(-1, m), database.features, weight, ALPHA, tol=1e-8)
    database.set_log_q(fit.log_q)
    assert float(fit.gap.max()) < 1e-8
    mod = ccluster.ClassContrastiveLoss(ALPHA, background=True)
    fr = feats.clone().requires_grad_()
    loss = mod(fr, att, labels.float(), mask, database.features, database.log_q)
    want = _hand_module(feats, att, labels, mask, database.features, database.log_q, "sqeuclidean", 1.0,
                        "attention", True, 1.0)
    assert_close64(loss, want)
    (gf,) = _grads(loss, [fr])
    assert torch.isfinite(gf).all() and gf.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------
# Attention prior


def _prior_batch(B=3, T=9, m=3, C=4, n=6, seed=40):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, m, generator=g, dtype=F64) * 1.5
    att = torch.rand(B, T, generator=g, dtype=F64) + 0.05
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    mask[2, 3:] = False
    labels = torch.zeros(B, C, dtype=torch.bool)
    labels[0, [0, 2]] = True
    labels[1, 3] = True
    labels[2, [1, 3]] = True
    _, db, log_q = make_inputs(1, C, n, m, seed=seed + 1)
    log_q[1, ::2] = -math.inf
    return feats, att, labels, mask, db, log_q


PRIOR_CONFIGS = [
    dict(temperature=1.0, aggregate="max", standardize=False),
    dict(temperature=0.4, aggregate="mean", standardize=False),
    dict(temperature=1.5, aggregate="max", standardize=True),
    dict(temperature=0.7, aggregate="mean", standardize=True),
]
PRIOR_IDS = ["max", "mean_t0.4", "max_std", "mean_std"]


@pytest.mark.parametrize("cfg", PRIOR_CONFIGS, ids=PRIOR_IDS)
def test_prior_target_matches_reference(metric, cfg):
    feats, _, labels, mask, db, log_q = _prior_batch()
    got = ccluster.attention_prior_target(feats, labels, mask, db, log_q, ALPHA, metric, **cfg)
    want = reference.attention_prior_target(feats, labels, mask, db, log_q, ALPHA, metric, **cfg)
    assert_close64(got, want)
    assert torch.equal(got[~mask], torch.zeros_like(got[~mask]))
    assert_close64(got.sum(1), torch.ones(3, dtype=F64))


@pytest.mark.parametrize("log_attention", [False, True], ids=["linear", "log"])
@pytest.mark.parametrize("cfg", PRIOR_CONFIGS, ids=PRIOR_IDS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_prior_loss_matches_reference(metric, cfg, log_attention, reduction):
    feats, att, labels, mask, db, log_q = _prior_batch()
    a = att.log() if log_attention else att
    ins = [t.clone().requires_grad_() for t in (feats, a, db, log_q)]
    got = ccluster.attention_prior_loss(ins[0], ins[1], labels, mask, ins[2], ins[3], ALPHA, metric,
                                        log_attention=log_attention, reduction=reduction, **cfg)
    ref_in = a.clone().requires_grad_()
    want = reference.attention_prior_loss(feats, ref_in, labels, mask, db, log_q, ALPHA, metric,
                                          log_attention=log_attention, reduction=reduction, **cfg)
    assert_close64(got, want)
    assert got.item() > 0
    gf, ga, gdb, glq = _grads(got, ins)
    (wa,) = _grads(want, [ref_in])
    assert_close64(ga, wa, msg="grad attention")
    # the target is detached: nothing reaches the features, the database or Q
    for g in (gf, gdb, glq):
        assert torch.equal(g, torch.zeros_like(g))
    # the module is the same function
    mod = ccluster.AttentionPriorLoss(ALPHA, metric, log_attention=log_attention, reduction=reduction, **cfg)
    assert_close64(mod(feats, a, labels, mask, db, log_q), got)


def test_prior_minimum_is_the_target_and_does_not_collapse():
    # KL(target || p) is 0 with zero gradient at p = target, and the target with standardize=True,
    # tau=1 keeps about exp(-1) of the segments (effective number 1 / sum t^2) for Gaussian scores
    B, T, m, C, n = 4, 400, 16, 3, 32
    g = torch.Generator().manual_seed(41)
    feats = torch.randn(B, T, m, generator=g, dtype=F64)
    _, db, log_q = make_inputs(1, C, n, m, seed=42)
    labels = torch.zeros(B, C, dtype=torch.bool)
    labels[torch.arange(B), torch.tensor([0, 1, 2, 1])] = True
    mask = torch.ones(B, T, dtype=torch.bool)
    target = ccluster.attention_prior_target(feats, labels, mask, db, log_q, 1.0 / m, standardize=True)
    ess = 1.0 / target.square().sum(1)
    assert (ess > 0.2 * T).all(), ess        # about exp(-1) = 0.37 of T for Gaussian-like scores
    target_sharp = ccluster.attention_prior_target(feats, labels, mask, db, log_q, 1.0 / m, standardize=True,
                                                   temperature=0.5)
    assert (1.0 / target_sharp.square().sum(1) < ess).all()
    la = target.log().requires_grad_()
    loss = ccluster.attention_prior_loss(feats, la, labels, mask, db, log_q, 1.0 / m, standardize=True,
                                         log_attention=True)
    assert abs(loss.item()) < 1e-12
    (ga,) = _grads(loss, [la])
    assert float(ga.abs().max()) < 1e-12
    # minimising it over attention logits from a one-hot start ends at the target, not on one segment
    logits = torch.full((B, T), -20.0, dtype=F64)
    logits[:, 0] = 0.0
    logits.requires_grad_()
    opt = torch.optim.LBFGS([logits], max_iter=300, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ccluster.attention_prior_loss(feats, logits, labels, mask, db, log_q, 1.0 / m,
                                             standardize=True, log_attention=True)
        loss.backward()
        return loss
    opt.step(closure)
    p = logits.detach().softmax(1)
    assert float((p - target).abs().sum(1).max()) < 1e-4
    assert (1.0 / p.square().sum(1) > 0.2 * T).all()


def test_prior_is_label_sparse_and_ignores_empty_classes(metric):
    # only (valid segment, labelled class) pairs are computed: NaN exemplars of a class no video is
    # labelled with, and NaN features on padding, change nothing
    feats, att, labels, mask, db, log_q = _prior_batch()
    base = ccluster.attention_prior_loss(feats, att, labels, mask, db, log_q, ALPHA, metric)
    labels2 = labels.clone()
    labels2[:, 0] = False
    labels2[0, 2] = True
    base2 = ccluster.attention_prior_loss(feats, att, labels2, mask, db, log_q, ALPHA, metric)
    db2, f2 = db.clone(), feats.clone()
    db2[0] = math.nan
    f2[~mask] = math.nan
    assert_close64(ccluster.attention_prior_loss(f2, att, labels2, mask, db2, log_q, ALPHA, metric), base2)
    # an empty labelled class is ignored; a video left with none gets no target and contributes nothing
    lq = log_q.clone()
    lq[3] = -math.inf
    t = ccluster.attention_prior_target(feats, labels, mask, db, lq, ALPHA, metric)
    assert torch.equal(t[1], torch.zeros(9, dtype=F64))                  # video 1: only class 3
    want = reference.attention_prior_target(feats, labels, mask, db, lq, ALPHA, metric)
    assert_close64(t, want)
    a = att.clone().requires_grad_()
    loss = ccluster.attention_prior_loss(feats, a, labels, mask, db, lq, ALPHA, metric)
    (ga,) = _grads(loss, [a])
    assert torch.equal(ga[1], torch.zeros(9, dtype=F64)) and torch.isfinite(ga).all()
    assert base.item() > 0


@pytest.mark.parametrize("log_attention", [False, True], ids=["linear", "log"])
def test_prior_zero_attention_video_contributes_nothing(log_attention):
    feats, att, labels, mask, db, log_q = _prior_batch()
    a = att.log() if log_attention else att.clone()
    a[1] = -math.inf if log_attention else 0.0
    a[2, 5] = math.nan                                     # padding
    a.requires_grad_()
    loss = ccluster.attention_prior_loss(feats, a, labels, mask, db, log_q, ALPHA, log_attention=log_attention)
    keep = torch.tensor([True, False, True])
    ak = (att.log() if log_attention else att)[keep]
    want = ccluster.attention_prior_loss(feats[keep], ak, labels[keep], mask[keep], db, log_q, ALPHA,
                                         log_attention=log_attention)
    assert_close64(loss, want)
    (ga,) = _grads(loss, [a])
    assert torch.isfinite(ga).all()
    assert torch.equal(ga[1], torch.zeros(9, dtype=F64)) and torch.equal(ga[~mask], torch.zeros_like(ga[~mask]))


def test_prior_zero_attention_where_target_is_positive_is_inf_not_nan():
    feats, att, labels, mask, db, log_q = _prior_batch()
    a = att.clone()
    a[0, 3] = 0.0
    a.requires_grad_()
    loss = ccluster.attention_prior_loss(feats, a, labels, mask, db, log_q, ALPHA)
    assert loss.item() == math.inf
    (ga,) = _grads(loss, [a])
    assert not ga.isnan().any()
    # in the log domain the same attention (log 0 = -inf on one segment) is exact too: +inf, and
    # any finite log attention gives a finite loss
    la = a.detach().log()
    assert ccluster.attention_prior_loss(feats, la, labels, mask, db, log_q, ALPHA, log_attention=True).item() \
        == math.inf
    la[0, 3] = -700.0
    assert math.isfinite(ccluster.attention_prior_loss(feats, la, labels, mask, db, log_q, ALPHA,
                                                       log_attention=True).item())


def test_prior_empty_and_size_one_shapes(metric):
    feats, att, labels, mask, db, log_q = _prior_batch()
    assert ccluster.attention_prior_loss(feats[:0], att[:0], labels[:0], mask[:0], db, log_q, ALPHA,
                                         metric).item() == 0.0
    assert ccluster.attention_prior_target(feats[:0], labels[:0], mask[:0], db, log_q, ALPHA).shape == (0, 9)
    assert ccluster.attention_prior_loss(feats[:, :0], att[:, :0], labels, mask[:, :0], db, log_q,
                                         ALPHA).item() == 0.0
    # one segment per video: target 1, p 1, KL 0
    a = att[:, :1].clone().requires_grad_()
    loss = ccluster.attention_prior_loss(feats[:, :1], a, labels, mask[:, :1], db, log_q, ALPHA, metric,
                                         standardize=True)
    assert loss.item() == 0.0
    # one class, one slot, m = 1
    f1 = feats[..., :1].contiguous()
    _, db1, lq1 = make_inputs(1, 1, 1, 1, seed=43)
    lab1 = torch.ones(3, 1, dtype=torch.bool)
    got = ccluster.attention_prior_loss(f1, att, lab1, mask, db1, lq1, ALPHA, metric)
    want = reference.attention_prior_loss(f1, att, lab1, mask, db1, lq1, ALPHA, metric)
    assert_close64(got, want)


def test_prior_non_contiguous_inputs(metric):
    feats, att, labels, mask, db, log_q = _prior_batch()
    ft = feats.transpose(0, 1).contiguous().transpose(0, 1)
    at = att.t().contiguous().t()
    dbs = torch.stack([db, db], 2).flatten(1, 2)[:, ::2]
    mt = mask.t().contiguous().t()
    assert not (ft.is_contiguous() or at.is_contiguous() or dbs.is_contiguous() or mt.is_contiguous())
    got = ccluster.attention_prior_loss(ft, at, labels, mt, dbs, log_q, ALPHA, metric, temperature=0.5)
    want = reference.attention_prior_loss(feats, att, labels, mask, db, log_q, ALPHA, metric, temperature=0.5)
    assert_close64(got, want)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
def test_prior_exact_when_alpha_d_is_huge(dtype):
    # segments at alpha*d ~ 1e4 from the one exemplar: exp(-alpha d) is 0 for all, and the naive
    # normalisation exp(-alpha d) / sum exp(-alpha d) is 0/0; the target is softmax(-alpha d / tau)
    d = torch.tensor([1.0e4, 1.0e4 + 1.0, 1.0e4 + 2.0, 1.0e4 + 4.0], dtype=F64)
    feats = torch.zeros(1, 4, 2, dtype=F64)
    feats[0, :, 0] = d.sqrt()
    db = torch.zeros(1, 1, 2, dtype=F64)
    log_q = torch.zeros(1, 1, dtype=F64)
    labels = torch.ones(1, 1, dtype=torch.bool)
    mask = torch.ones(1, 4, dtype=torch.bool)
    naive = torch.exp(-d) / torch.exp(-d).sum()
    assert naive.isnan().all()
    exact = torch.softmax(-d / 2.0, 0)
    t = ccluster.attention_prior_target(feats.to(dtype), labels, mask, db.to(dtype), log_q.to(dtype), 1.0,
                                        temperature=2.0)
    tol = 1e-9 if dtype == F64 else 2e-3      # float32 resolves d ~ 1e4 to about 1e-3
    torch.testing.assert_close(t[0].double(), exact, rtol=0, atol=tol)
    att = torch.full((1, 4), 0.25, dtype=dtype, requires_grad=True)
    loss = ccluster.attention_prior_loss(feats.to(dtype), att, labels, mask, db.to(dtype), log_q.to(dtype), 1.0,
                                         temperature=2.0)
    want = float((exact * (exact.log() - math.log(0.25))).sum())
    assert loss.item() == pytest.approx(want, abs=10 * tol)
    (ga,) = _grads(loss, [att])
    assert torch.isfinite(ga).all()


def test_prior_float32_against_oracle(metric):
    feats, att, labels, mask, db, log_q = _prior_batch(T=ROW_BLOCK + 3, n=COL_BLOCK + 4)
    f32 = [t.float() for t in (feats, att, db, log_q)]

    def run(fn, f, a, d, q):
        a = a.clone().requires_grad_()
        loss = fn(f, a, labels, mask, d, q, ALPHA, metric, temperature=0.5)
        return loss, _grads(loss, [a])[0]
    fused = run(ccluster.attention_prior_loss, *f32)
    plain = run(reference.attention_prior_loss, *f32)
    oracle = run(reference.attention_prior_loss, *[t.double() for t in f32])
    for name, a, b, c in zip(("loss", "attention"), fused, plain, oracle):
        assert a.dtype == torch.float32
        assert_low_precision(a.detach(), b.detach(), c.detach(), torch.float32, name)


@pytest.mark.parametrize("log_attention", [False, True], ids=["linear", "log"])
def test_prior_gradcheck(log_attention):
    feats, att, labels, mask, db, log_q = _prior_batch(T=4, n=3, m=2)
    a = (att.log() if log_attention else att).clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda a: ccluster.attention_prior_loss(feats, a, labels, mask, db, log_q, ALPHA,
                                                temperature=0.7, log_attention=log_attention), [a])


def _prior_bad_cases():
    feats, att, labels, mask, db, log_q = _prior_batch()
    base = dict(features=feats, attention=att, labels=labels, mask=mask, db=db, log_q=log_q, alpha=ALPHA)
    fn = "attention_prior_loss"
    return [
        ("features_rank", dict(features=feats[0]), ValueError, rf"{fn}: features must be \[B, T, m\], got \[9, 3\]"),
        ("attention_shape", dict(attention=att[:, :4]), ValueError, rf"{fn}: attention must be \[3, 9\], got \[3, 4\]"),
        ("attention_dtype", dict(attention=att.float()), TypeError,
         rf"{fn}: attention must have the features' dtype torch.float64, got torch.float32"),
        ("labels_shape", dict(labels=labels[:, :3]), ValueError, rf"{fn}: labels must be \[3, 4\], got \[3, 3\]"),
        ("mask_dtype", dict(mask=mask.float()), TypeError, rf"{fn}: mask must be a bool tensor, got torch.float32"),
        ("aggregate", dict(aggregate="sum"), ValueError, rf"{fn}: aggregate must be one of \('max', 'mean'\), got 'sum'"),
        ("temperature", dict(temperature=-0.5), ValueError, rf"{fn}: temperature must be a finite number > 0, got -0.5"),
        ("standardize", dict(standardize=1), TypeError, rf"{fn}: standardize must be a bool, got int"),
        ("log_attention", dict(log_attention="yes"), TypeError, rf"{fn}: log_attention must be a bool, got str"),
        ("reduction", dict(reduction="none"), ValueError, rf"{fn}: reduction must be one of \('sum', 'mean'\), got 'none'"),
        ("db_dtype", dict(db=db.float()), TypeError, rf"{fn}: x, db and log_q must have one dtype"),
        ("alpha", dict(alpha=math.inf), ValueError, rf"{fn}: alpha must be a finite number > 0, got inf"),
    ], base


@pytest.mark.parametrize("case", range(12), ids=[c[0] for c in _prior_bad_cases()[0]])
def test_prior_bad_input(case):
    cases, base = _prior_bad_cases()
    _, over, exc, match = cases[case]
    with pytest.raises(exc, match=match):
        ccluster.attention_prior_loss(**dict(base, **over))


def test_prior_target_and_module_bad_input():
    feats, att, labels, mask, db, log_q = _prior_batch()
    with pytest.raises(ValueError, match=r"attention_prior_target: mask must be \[3, 9\], got \[3, 8\]"):
        ccluster.attention_prior_target(feats, labels, mask[:, :8], db, log_q, ALPHA)
    with pytest.raises(ValueError, match=r"AttentionPriorLoss: aggregate must be one of \('max', 'mean'\), got 'min'"):
        ccluster.AttentionPriorLoss(ALPHA, aggregate="min")
    with pytest.raises(ValueError, match=r"AttentionPriorLoss: alpha must be a finite number > 0, got -1"):
        ccluster.AttentionPriorLoss(-1)
    with pytest.raises(TypeError, match=r"AttentionPriorLoss: log_attention must be a bool, got int"):
        ccluster.AttentionPriorLoss(ALPHA, log_attention=0)
    mod = ccluster.AttentionPriorLoss(ALPHA)
    with pytest.raises(ValueError, match=r"AttentionPriorLoss: attention must be \[3, 9\], got \[9\]"):
        mod(feats, att[0], labels, mask, db, log_q)
    assert "aggregate='max'" in repr(mod)


# ---------------------------------------------------------------------------------------------------
# Double backward: the losses built on exemplar_logsumexp say it is not supported; the attention prior,
# whose target is detached and whose KL is plain PyTorch, is twice differentiable in the attention


@pytest.mark.parametrize("background", [False, True], ids=["plain", "background"])
def test_contrastive_double_backward_raises_a_clear_error(background):
    x, w, labels, db, log_q, bg = _contrastive_problem(7, 4, 5, 3, seed=41, background=background)
    x.requires_grad_()
    loss = ccluster.class_contrastive_loss(x, w, labels, db, log_q, ALPHA, background_weight=bg)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    assert g.grad_fn is not None
    with pytest.raises(RuntimeError, match="exemplar_logsumexp: double backward is not supported"):
        torch.autograd.grad(g.pow(2).sum(), x)
    target = torch.rand(7, 4, dtype=F64)
    loss = ccluster.exemplar_cross_entropy(x, target, db, log_q, ALPHA)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.sum().backward()


def test_contrastive_module_double_backward_raises_a_clear_error():
    feats, att, labels, mask, db, log_q = _prior_batch()
    feats = feats.clone().requires_grad_()
    loss = ccluster.ClassContrastiveLoss(ALPHA)(feats, att, labels, mask, db, log_q)
    (g,) = torch.autograd.grad(loss, feats, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(g.sum(), feats)


@pytest.mark.parametrize("log_attention", [False, True], ids=["linear", "log"])
def test_prior_gradgradcheck(log_attention):
    feats, att, labels, mask, db, log_q = _prior_batch(T=4, n=3, m=2)
    a = (att.log() if log_attention else att).clone().requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda a: ccluster.attention_prior_loss(feats, a, labels, mask, db, log_q, ALPHA,
                                                temperature=0.7, log_attention=log_attention), [a])
