"""torch.ops.ccluster.cc_loss via ccluster.convex_clustering_loss, and the ConvexClusteringLoss module."""
from __future__ import annotations

import math

import pytest
import torch

import ccluster
from ccluster import reference
from conftest import COL_BLOCK, ROW_BLOCK, assert_close64, assert_low_precision, make_inputs

pytestmark = pytest.mark.usefixtures("compiled_ops", "thread_policy")

ALPHA = 0.6
cc_loss = ccluster.convex_clustering_loss


def _pairs(pattern, N, C, seed):
    g = torch.Generator().manual_seed(seed)
    if pattern == "dense":
        p = torch.ones(N, C, dtype=torch.bool)
    elif pattern == "sparse":
        p = torch.rand(N, C, generator=g) < 0.25
    elif pattern == "one_label":     # every row exactly one class: the direct-write path only
        p = torch.zeros(N, C, dtype=torch.bool)
        p[torch.arange(N), torch.randint(0, C, (N,), generator=g)] = True
    elif pattern == "multi_label":   # 2+ labels per row: later rounds add to dL/dx
        p = torch.rand(N, C, generator=g) < 0.6
        p[torch.arange(N), torch.randint(0, C, (N,), generator=g)] = True
    else:
        raise ValueError(pattern)
    if pattern != "dense":
        p[: max(1, N // 10)] = False   # rows with no pair
    return p


def _problem(N, C, n, m, pattern, attention_2d, seed, empty_class=True, device="cpu"):
    x, db, log_q = make_inputs(N, C, n, m, seed=seed, device=device)
    if empty_class:
        log_q[1] = -math.inf                  # an empty class (left out of the loss)
        log_q[0, 1::3] = -math.inf            # some empty slots
    g = torch.Generator().manual_seed(seed + 1)
    att = torch.rand((N, C) if attention_2d else (N,), generator=g, dtype=torch.float64).to(device)
    return x, att, _pairs(pattern, N, C, seed + 2).to(device), db, log_q


def _loss_and_grads(fn, x, att, pairs, db, log_q, metric, **kw):
    x, att, db, log_q = (t.detach().requires_grad_() for t in (x, att, db, log_q))
    loss = fn(x, att, pairs, db, log_q, ALPHA, metric, **kw)
    return (loss, *torch.autograd.grad(loss, (x, att, db, log_q)))


def _check_against_reference(x, att, pairs, db, log_q, metric):
    got = _loss_and_grads(cc_loss, x, att, pairs, db, log_q, metric)
    # the oracle without the empty classes: they are left out of the loss, and the oracle's own
    # gradients there are NaN (logsumexp over all -inf)
    keep = torch.isfinite(log_q).any(1)
    a_keep = att[:, keep] if att.dim() == 2 else att
    want = _loss_and_grads(reference.convex_clustering_loss, x, a_keep, pairs[:, keep], db[keep], log_q[keep],
                           metric)
    assert got[0].shape == () and got[0].dtype == x.dtype
    assert_close64(got[0], want[0], msg="loss")
    assert_close64(got[1], want[1], msg="grad x")
    if att.dim() == 2:
        assert_close64(got[2][:, keep], want[2], msg="grad attention")
        assert torch.equal(got[2][:, ~keep].abs(), torch.zeros_like(got[2][:, ~keep]))
    else:
        assert_close64(got[2], want[2], msg="grad attention")
    assert_close64(got[3][keep], want[3], msg="grad db")
    assert_close64(got[4][keep], want[4], msg="grad log_q")
    assert torch.equal(got[3][~keep], torch.zeros_like(got[3][~keep]))
    assert torch.equal(got[4][~keep], torch.zeros_like(got[4][~keep]))
    return got


@pytest.mark.parametrize("attention_2d", [False, True], ids=["att_N", "att_NC"])
@pytest.mark.parametrize("pattern", ["dense", "sparse", "one_label", "multi_label"])
def test_matches_reference_float64(metric, pattern, attention_2d, device):
    _check_against_reference(*_problem(23, 4, 9, 3, pattern, attention_2d, seed=1, device=device), metric)


@pytest.mark.parametrize("plan", ["dense", "packed"])
def test_library_plans_match_reference_float64(metric, plan, device):
    # both layouts of the library path (the GPU default; on the CPU with backend="library")
    with ccluster.kernel_settings(backend="library", plan=plan, workspace_bytes=3000):
        _check_against_reference(*_problem(37, 4, 19, 5, "multi_label", True, seed=17, device=device), metric)


@pytest.mark.parallel
def test_matches_reference_float64_medium(metric):
    # N = 300 rows (3 row blocks per class), n = 600 exemplars (2 column tiles), 2+ labels per row
    _check_against_reference(*_problem(300, 3, COL_BLOCK + 88, 4, "multi_label", True, seed=2), metric)


def test_video_runs_mix_row_views_and_gathered_blocks(metric):
    # Labels come per video, so a class's rows are runs of consecutive segments. A row block lying in
    # one run is read in place; one straddling two runs is gathered. Both must agree with the oracle.
    N, C = 2 * ROW_BLOCK + 100, 2
    x, att, _, db, log_q = _problem(N, C, 9, 3, "dense", False, seed=12, empty_class=False)
    pairs = torch.zeros(N, C, dtype=torch.bool)
    pairs[: ROW_BLOCK + 40, 0] = True           # block 0 in place, block 1 straddles the gap
    pairs[ROW_BLOCK + 50:, 0] = True
    pairs[ROW_BLOCK - 7: ROW_BLOCK + 60, 1] = True  # one short run: in place
    _check_against_reference(x, att, pairs, db, log_q, metric)


def test_all_pairs_of_empty_classes_give_zero(metric, device):
    x, att, pairs, db, log_q = _problem(6, 3, 4, 2, "dense", False, seed=3, empty_class=False, device=device)
    log_q[:] = -math.inf
    loss, gx, gatt, gdb, glq = _loss_and_grads(cc_loss, x, att, pairs, db, log_q, metric)
    assert loss.item() == 0.0
    for g in (gx, gatt, gdb, glq):
        assert torch.equal(g.abs(), torch.zeros_like(g))


def test_no_pairs_and_empty_batch(metric, device):
    x, att, pairs, db, log_q = _problem(6, 3, 4, 2, "dense", True, seed=4, device=device)
    loss, gx, *_ = _loss_and_grads(cc_loss, x, att, torch.zeros_like(pairs), db, log_q, metric)
    assert loss.item() == 0.0 and torch.equal(gx, torch.zeros_like(gx))
    loss, gx, *_ = _loss_and_grads(cc_loss, x[:0], att[:0], pairs[:0], db, log_q, metric)
    assert loss.item() == 0.0 and gx.shape == (0, 2)


def test_multi_label_rows_sum_over_their_classes(metric, device):
    # a row with k labels gets its dL/dx from k classes, in k rounds: the first writes the row, the others
    # add to it. The gradient must be the sum of the single-class losses' gradients.
    N, C = ROW_BLOCK + 20, 4
    x, att, pairs, db, log_q = _problem(N, C, 11, 3, "multi_label", True, seed=5, empty_class=False,
                                        device=device)
    assert int(pairs.sum(1).max()) >= 3
    total = _loss_and_grads(cc_loss, x, att, pairs, db, log_q, metric)
    parts = [_loss_and_grads(cc_loss, x, att, pairs & (torch.arange(C, device=device) == c), db, log_q, metric)
             for c in range(C)]
    for k, name in enumerate(("loss", "x", "attention", "db", "log_q")):
        assert_close64(total[k], sum(p[k] for p in parts), msg=name)


@pytest.mark.parallel
def test_deterministic_bitwise(metric):
    args = _problem(300, 3, COL_BLOCK + 88, 4, "multi_label", False, seed=6)
    first = _loss_and_grads(cc_loss, *args, metric)
    second = _loss_and_grads(cc_loss, *args, metric)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # The work split (units of row blocks) does not depend on the thread count, so one thread gives the
    # same loss and x, attention and log_q gradients. The db gradient's GEMMs run inside or outside a
    # parallel region depending on the thread count, where MKL may take a kernel that rounds otherwise:
    # equal to a few ulps only (results are bitwise reproducible at a fixed thread count).
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _loss_and_grads(cc_loss, *args, metric)
    finally:
        torch.set_num_threads(threads)
    for name, a, b in zip(("loss", "x", "attention", "db", "log_q"), first, single):
        if name == "db":
            torch.testing.assert_close(a, b, rtol=0, atol=1e-13 * float(b.abs().max()))
        else:
            assert torch.equal(a, b), name


def test_backward_twice_with_retain_graph(metric, device):
    x, att, pairs, db, log_q = _problem(40, 3, 7, 3, "multi_label", True, seed=7, device=device)
    x, att, db, log_q = (t.requires_grad_() for t in (x, att, db, log_q))
    loss = cc_loss(x, att, pairs, db, log_q, ALPHA, metric)
    first = torch.autograd.grad(loss, (x, att, db, log_q), retain_graph=True)
    second = torch.autograd.grad(loss, (x, att, db, log_q), retain_graph=True)
    third = torch.autograd.grad(loss * 3.0, (x, att, db, log_q))
    names = ("x", "attention", "db", "log_q")
    for a, b, c, name in zip(first, second, third, names):
        assert_close64(b, a, msg=f"second backward, grad {name}")
        assert_close64(c, 3.0 * a, msg=f"third backward (upstream 3), grad {name}")
    for a, b, name in zip(first, second, names):   # deterministic: bitwise the same
        assert torch.equal(a, b), f"grad {name} differs between two backward calls"


def test_backward_into_grad_then_mutated_then_again(metric):
    # The first backward hands the forward's dL/dx buffer out as x.grad. Changing x.grad in place (as an
    # optimiser's zero_grad or clipping does) must not change what a later backward through the same
    # retained graph returns.
    x, att, pairs, db, log_q = _problem(40, 3, 7, 3, "multi_label", False, seed=13)
    want = _loss_and_grads(cc_loss, x, att, pairs, db, log_q, metric)[1]
    x.requires_grad_()
    loss = cc_loss(x, att, pairs, db, log_q, ALPHA, metric)
    (0.5 * loss).backward(retain_graph=True)
    assert_close64(x.grad, 0.5 * want, msg="first backward, upstream 0.5")
    x.grad.fill_(1.0)
    (2.0 * loss).backward()
    assert_close64(x.grad, 1.0 + 2.0 * want, msg="second backward accumulates onto the mutated grad")


def test_gradients_only_for_inputs_that_require_them(metric):
    x, att, pairs, db, log_q = _problem(30, 3, 6, 2, "sparse", False, seed=8)
    db.requires_grad_()
    loss = cc_loss(x, att, pairs, db, log_q, ALPHA, metric)
    (gdb,) = torch.autograd.grad(loss, (db,))
    _, _, _, want, _ = _loss_and_grads(cc_loss, x, att, pairs, db, log_q, metric)
    assert_close64(gdb, want)
    # no graph at all: a plain number
    with torch.no_grad():
        assert_close64(cc_loss(x, att, pairs, db.detach(), log_q, ALPHA, metric), loss.detach())


def test_float32_against_oracle(metric):
    x, att, pairs, db, log_q = _problem(ROW_BLOCK + 5, 3, COL_BLOCK + 10, 3, "multi_label", True, seed=9,
                                        empty_class=False)
    f32 = [t.float() for t in (x, att, pairs, db, log_q)]
    f32[2] = pairs
    fused = _loss_and_grads(cc_loss, *f32, metric)
    plain = _loss_and_grads(reference.convex_clustering_loss, *f32, metric)
    oracle = _loss_and_grads(reference.convex_clustering_loss, *[t.double() if t.is_floating_point() else t
                                                                 for t in f32], metric)
    for name, a, b, c in zip(("loss", "x", "attention", "db", "log_q"), fused, plain, oracle):
        assert a.dtype == torch.float32
        assert_low_precision(a.detach(), b.detach(), c.detach(), torch.float32, name)


@pytest.mark.parametrize("grad_x", [True, False])
def test_opcheck(metric, grad_x, device):
    x, att, pairs, db, log_q = _problem(7, 3, 5, 2, "multi_label", True, seed=10, device=device)
    log_q[1] = 0.0   # opcheck's gradient comparisons need every class filled
    x.requires_grad_(grad_x)
    att.requires_grad_()
    db.requires_grad_()
    torch.library.opcheck(torch.ops.ccluster.cc_loss, (x, att, pairs, db, log_q, ALPHA, metric, grad_x))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_forward_backward(metric, backend):
    # Traced, the backward scales dL/dx out of place (the eager path does it in place); both must agree.
    x, att, pairs, db, log_q = _problem(9, 3, 5, 3, "multi_label", False, seed=14)
    args = [t.detach().requires_grad_() for t in (x, att, db, log_q)]

    def f(x, att, db, log_q):
        return 0.7 * cc_loss(x, att, pairs, db, log_q, ALPHA, metric)

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    val = compiled(*args)
    grads = torch.autograd.grad(val, args)
    ref_val = f(*args)
    ref_grads = torch.autograd.grad(ref_val, args)
    assert_close64(val, ref_val)
    for a, b in zip(grads, ref_grads):
        assert_close64(a, b)


@pytest.mark.parametrize("attention_2d", [False, True], ids=["att_N", "att_NC"])
def test_gradcheck(metric, attention_2d, device):
    x, att, pairs, db, log_q = _problem(5, 3, 3, 2, "multi_label", attention_2d, seed=11, device=device)
    inputs = [t.requires_grad_() for t in (x, att, db, log_q)]
    assert torch.autograd.gradcheck(lambda a, w, b, c: cc_loss(a, w, pairs, b, c, ALPHA, metric), inputs)


BAD = [
    ("attention_shape", dict(att=torch.ones(4, dtype=torch.float64)),
     ValueError, r"convex_clustering_loss: attention must be \[N\] or \[N, C\] with N=5, C=2, got \[4\]"),
    ("attention_cols", dict(att=torch.ones(5, 3, dtype=torch.float64)),
     ValueError, r"attention must be \[N\] or \[N, C\] with N=5, C=2, got \[5, 3\]"),
    ("attention_dtype", dict(att=torch.ones(5, dtype=torch.float32)),
     TypeError, r"attention must have x's dtype Double, got Float"),
    ("pairs_dtype", dict(pairs=torch.ones(5, 2, dtype=torch.float64)),
     TypeError, r"pairs must be a bool tensor, got Double"),
    ("pairs_shape", dict(pairs=torch.ones(5, 3, dtype=torch.bool)),
     ValueError, r"pairs must be \[N, C\] = \[5, 2\], got \[5, 3\]"),
    ("x_rank", dict(x=torch.ones(5, 3, 1, dtype=torch.float64)),
     ValueError, r"convex_clustering_loss: x must be \[N, m\], got shape \[5, 3, 1\]"),
    ("mixed_dtype", dict(log_q=torch.zeros(2, 4)),
     TypeError, r"x, db and log_q must have one dtype, got Double, Double, Float"),
    ("alpha", dict(alpha=-2.0), ValueError, r"alpha must be a finite number > 0, got -2"),
    ("metric", dict(metric="l1"), ValueError, r"metric must be 'sqeuclidean' or 'euclidean', got 'l1'"),
    ("attention_negative", dict(att=torch.tensor([0.2, -0.5, 0.1, 0.3, 0.4], dtype=torch.float64)),
     ValueError, r"convex_clustering_loss: attention must be >= 0 on the pairs \(it weights -log z\), got -0.5"),
    ("log_q_positive", dict(log_q=torch.full((2, 4), 0.25, dtype=torch.float64)),
     ValueError, r"convex_clustering_loss: log_q must be log-probabilities \(<= 0, -inf for an empty slot\), "
                 r"got 0.25 \(pass log q, not q\)"),
    ("attention_list", dict(att=[0.2] * 5), TypeError, r"convex_clustering_loss: attention must be a Tensor, got list"),
    ("alpha_str", dict(alpha="1"), TypeError, r"convex_clustering_loss: alpha must be a finite number > 0, got '1'"),
]


@pytest.mark.parametrize("case,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, over, exc, match, device):
    x, db, log_q = make_inputs(5, 2, 4, 3, seed=12, device=device)
    args = dict(x=x, att=torch.ones(5, dtype=torch.float64), pairs=torch.ones(5, 2, dtype=torch.bool), db=db,
                log_q=log_q, alpha=ALPHA, metric="sqeuclidean")
    args.update(over)
    args = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    if case in ("attention_negative", "log_q_positive") and device.type != "cpu":
        # on a GPU the checks of values are deferred by default (a NaN loss, no synchronisation): ask
        # for the eager ones
        with ccluster.kernel_settings(check_values="eager"), pytest.raises(exc, match=match):
            cc_loss(*args.values())
        return
    # Python objects and attention's shape are checked in Python, the rest by the C++ op: one exception
    # type per kind of mistake either way (TypeError: type or dtype; ValueError: shape, device, value)
    with pytest.raises(exc, match=match):
        cc_loss(*args.values())


@pytest.mark.parametrize("case,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_without_compiled_ops(case, over, exc, match, monkeypatch):
    # the reference fallback checks in Python: the same exception types and arguments named
    from ccluster import ops
    monkeypatch.setattr(ops, "_LOAD_ERROR", RuntimeError("simulated"))
    x, db, log_q = make_inputs(5, 2, 4, 3, seed=12)
    args = dict(x=x, att=torch.ones(5, dtype=torch.float64), pairs=torch.ones(5, 2, dtype=torch.bool), db=db,
                log_q=log_q, alpha=ALPHA, metric="sqeuclidean")
    args.update(over)
    head = match.split(", got")[0].replace("Double", "torch.float64")  # Python prints dtypes as torch.*
    with pytest.raises(exc, match=head):
        cc_loss(*args.values())


def test_negative_attention_outside_the_pairs_is_ignored():
    # only the pairs enter the loss: what attention holds elsewhere is not read
    x, db, log_q = make_inputs(5, 2, 4, 3, seed=12)
    pairs = torch.zeros(5, 2, dtype=torch.bool)
    pairs[:3, 0] = True
    att = torch.tensor([0.2, 0.5, 0.3, -1.0, -2.0], dtype=torch.float64)
    loss = cc_loss(x, att, pairs, db, log_q, ALPHA)
    expected = -(att[:3] * ccluster.exemplar_logsumexp(x, db, log_q, ALPHA)[:3, 0]).sum()
    assert_close64(loss, expected)


def test_nan_attention_propagates_to_the_loss_and_that_row(device):
    # the README's NaN policy: NaN in an input propagates to what it touches, nothing else
    x, db, log_q = make_inputs(5, 2, 4, 3, seed=12, device=device)
    x.requires_grad_()
    att = torch.full((5,), 0.2, dtype=torch.float64, device=device)
    att[1] = math.nan
    loss = cc_loss(x, att, torch.ones(5, 2, dtype=torch.bool, device=device), db, log_q, ALPHA)
    assert loss.isnan()
    (gx,) = torch.autograd.grad(loss, x)
    assert gx[1].isnan().all() and torch.isfinite(gx[[0, 2, 3, 4]]).all()


def test_empty_slots_and_nonpositive_log_q_are_accepted():
    x, db, log_q = make_inputs(5, 2, 4, 3, seed=12)
    log_q = log_q.clone()
    log_q[0, :2] = -math.inf   # empty slots
    log_q[1] = 0.0             # q = 1 in every slot: unnormalised, but each q <= 1
    loss = cc_loss(x, torch.ones(5, dtype=torch.float64), torch.ones(5, 2, dtype=torch.bool), db, log_q, ALPHA)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------
# ConvexClusteringLoss (the module)


def _batch(B=3, T=7, m=3, C=4, n=5, seed=20):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, T, m, generator=g, dtype=torch.float64)
    att = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.1
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[2, 2:] = False
    labels = torch.zeros(B, C)
    labels[0, [0, 2]] = 1.0      # two labels
    labels[1, 3] = 1.0
    labels[2, [1, 2, 3]] = 1.0   # three labels
    x, db, log_q = make_inputs(1, C, n, m, seed=seed + 1)
    log_q[2, 0] = -math.inf
    return feats, att, labels, mask, db, log_q


def _hand_loss(feats, att, labels, mask, db, log_q, alpha, metric):
    """Direct transcription of the formula, one video, segment and class at a time."""
    total = feats.new_zeros(())
    for b in range(feats.shape[0]):
        valid = mask[b].nonzero().squeeze(1).tolist()
        z = sum(att[b, s] for s in valid)
        if not valid or float(z.detach()) == 0.0:
            continue
        for s in valid:
            p = att[b, s] / z
            for c in labels[b].nonzero().squeeze(1).tolist():
                if not torch.isfinite(log_q[c]).any():
                    continue
                d2 = ((feats[b, s] - db[c]) ** 2).sum(-1)
                d = d2 if metric == "sqeuclidean" else d2.sqrt()
                total = total - p * torch.logsumexp(log_q[c] - alpha * d, 0)
    return total


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_module_matches_hand_computation(metric, reduction):
    feats, att, labels, mask, db, log_q = _batch()
    ins = [t.requires_grad_() for t in (feats, att, db, log_q)]
    mod = ccluster.ConvexClusteringLoss(ALPHA, metric, reduction)
    loss = mod(feats, att, labels, mask, db, log_q)
    want = _hand_loss(feats, att, labels, mask, db, log_q, ALPHA, metric)
    if reduction == "mean":
        want = want / feats.shape[0]
    assert_close64(loss, want)
    for a, b, name in zip(torch.autograd.grad(loss, ins), torch.autograd.grad(want, ins),
                          ("features", "attention", "db", "log_q")):
        assert_close64(a, b, msg=name)


def test_module_attention_scale_per_video_does_not_matter(metric):
    feats, att, labels, mask, db, log_q = _batch()
    mod = ccluster.ConvexClusteringLoss(ALPHA, metric)
    scaled = att * torch.tensor([[3.0], [0.25], [10.0]], dtype=torch.float64)
    assert_close64(mod(feats, scaled, labels, mask, db, log_q), mod(feats, att, labels, mask, db, log_q))


def test_module_ignores_padding_values(metric):
    feats, att, labels, mask, db, log_q = _batch()
    mod = ccluster.ConvexClusteringLoss(ALPHA, metric)
    base = mod(feats, att, labels, mask, db, log_q)
    f2, a2 = feats.clone(), att.clone()
    f2[~mask] = 1e3 * torch.randn(int((~mask).sum()), feats.shape[2], dtype=torch.float64)
    f2[2, 5, 0] = math.nan          # NaN features in padding are never read
    a2[~mask] = 7.5
    f2.requires_grad_(), a2.requires_grad_()
    loss = mod(f2, a2, labels, mask, db, log_q)
    assert_close64(loss, base)
    gf, ga = torch.autograd.grad(loss, (f2, a2))
    assert torch.equal(gf[~mask], torch.zeros_like(gf[~mask]))
    assert torch.equal(ga[~mask], torch.zeros_like(ga[~mask]))
    assert torch.isfinite(gf).all() and torch.isfinite(ga).all()


@pytest.mark.parametrize("pad", [math.nan, math.inf], ids=["nan", "inf"])
def test_module_ignores_non_finite_padding_attention(pad):
    feats, att, labels, mask, db, log_q = _batch()
    mod = ccluster.ConvexClusteringLoss(ALPHA, "sqeuclidean")
    a2 = att.clone()
    a2[1, 5] = pad                   # padding of video 1 (e.g. a masked softmax output)
    assert_close64(mod(feats, a2, labels, mask, db, log_q), mod(feats, att, labels, mask, db, log_q))


def test_module_zero_attention_video_contributes_nothing(metric):
    feats, att, labels, mask, db, log_q = _batch()
    mod = ccluster.ConvexClusteringLoss(ALPHA, metric)
    a0 = att.clone()
    a0[1] = 0.0
    a0.requires_grad_()
    keep = torch.tensor([True, False, True])
    loss = mod(feats, a0, labels, mask, db, log_q)
    want = mod(feats[keep], att[keep], labels[keep], mask[keep], db, log_q)
    assert_close64(loss, want)
    (ga,) = torch.autograd.grad(loss, (a0,))
    assert torch.isfinite(ga).all()


def test_module_bool_and_float_labels_agree_and_empty_batch():
    feats, att, labels, mask, db, log_q = _batch()
    mod = ccluster.ConvexClusteringLoss(ALPHA, reduction="mean")
    assert_close64(mod(feats, att, labels, mask, db, log_q), mod(feats, att, labels.bool(), mask, db, log_q))
    out = mod(feats[:0], att[:0], labels[:0], mask[:0], db, log_q)
    assert out.item() == 0.0


def test_module_alpha_can_be_changed():
    feats, att, labels, mask, db, log_q = _batch()
    mod = ccluster.ConvexClusteringLoss(ALPHA)
    mod.alpha = 2.0
    assert_close64(mod(feats, att, labels, mask, db, log_q),
                   _hand_loss(feats, att, labels, mask, db, log_q, 2.0, "sqeuclidean"))
    assert "alpha=2" in repr(mod)


MODULE_BAD_CTOR = [
    ("alpha_zero", dict(alpha=0.0), r"alpha must be a finite number > 0, got 0"),
    ("alpha_negative", dict(alpha=-1.0), r"alpha must be a finite number > 0, got -1"),
    ("alpha_nan", dict(alpha=math.nan), r"alpha must be a finite number > 0, got nan"),
    ("alpha_inf", dict(alpha=math.inf), r"alpha must be a finite number > 0, got inf"),
    ("metric", dict(alpha=1.0, metric="cosine"), r"metric must be one of .*'sqeuclidean'.*got 'cosine'"),
    ("reduction", dict(alpha=1.0, reduction="none"), r"reduction must be 'sum' or 'mean', got 'none'"),
]


@pytest.mark.parametrize("case,kw,match", MODULE_BAD_CTOR, ids=[c[0] for c in MODULE_BAD_CTOR])
def test_module_bad_construction(case, kw, match):
    with pytest.raises(ValueError, match=r"ConvexClusteringLoss: " + match):
        ccluster.ConvexClusteringLoss(**kw)


def test_module_bad_alpha_assignment_keeps_old_value():
    mod = ccluster.ConvexClusteringLoss(1.5)
    with pytest.raises(ValueError, match=r"alpha must be a finite number > 0, got -3"):
        mod.alpha = -3
    assert mod.alpha == 1.5


def _bad_forward_cases():
    feats, att, labels, mask, db, log_q = _batch()
    return [
        ("features_rank", (feats[0], att, labels, mask, db, log_q), ValueError,
         r"features must be \[B, T, m\], got \[7, 3\]"),
        ("attention_shape", (feats, att[:, :5], labels, mask, db, log_q), ValueError,
         r"attention must be \[3, 7\], got \[3, 5\]"),
        ("mask_shape", (feats, att, labels, mask[:2], db, log_q), ValueError, r"mask must be \[3, 7\], got \[2, 7\]"),
        ("labels_shape", (feats, att, labels[:, :3], mask, db, log_q), ValueError,
         r"labels must be \[3, 4\], got \[3, 3\]"),
        ("mask_dtype", (feats, att, labels, mask.double(), db, log_q), TypeError,
         r"mask must be a bool tensor, got torch.float64"),
        ("db_m", (feats, att, labels, mask, db[..., :2], log_q), ValueError,
         r"db feature size m=2 does not match x's m=3"),
        ("attention_negative", (feats, att - 0.5, labels, mask, db, log_q), ValueError,
         r"ConvexClusteringLoss: attention must be >= 0 on valid segments, got -0.\d+"),
        ("log_q_is_q", (feats, att, labels, mask, db, log_q.exp()), ValueError,
         r"log_q must be log-probabilities .*\(pass log q, not q\)"),
        ("features_list", (feats.tolist(), att, labels, mask, db, log_q), TypeError,
         r"ConvexClusteringLoss: features must be a Tensor, got list"),
    ]


def test_module_negative_attention_on_padding_is_ignored():
    feats, att, labels, mask, db, log_q = _batch()
    mask = mask.clone()
    mask[0, 5:] = False
    padded = att.clone()
    padded[0, 5:] = -7.0     # padding: never read
    mod = ccluster.ConvexClusteringLoss(ALPHA)
    assert_close64(mod(feats, padded, labels, mask, db, log_q), mod(feats, att, labels, mask, db, log_q))


@pytest.mark.parametrize("case", range(9), ids=[c[0] for c in _bad_forward_cases()])
def test_module_bad_forward(case):
    _, args, exc, match = _bad_forward_cases()[case]
    with pytest.raises(exc, match=match):
        ccluster.ConvexClusteringLoss(ALPHA)(*args)


# ---------------------------------------------------------------------------------------------------
# Double backward: not supported, and says so


@pytest.mark.parametrize("wrt", ["x", "attention", "db"])
def test_double_backward_raises_a_clear_error(metric, wrt):
    x, att, pairs, db, log_q = _problem(9, 3, 5, 3, "multi_label", False, seed=15)
    x, att, db, log_q = (t.requires_grad_() for t in (x, att, db, log_q))
    loss = cc_loss(x, att, pairs, db, log_q, ALPHA, metric)
    target = {"x": x, "attention": att, "db": db}[wrt]
    (g,) = torch.autograd.grad(loss, target, create_graph=True)
    assert g.grad_fn is not None, "a gradient built with create_graph must depend on its inputs"
    with pytest.raises(RuntimeError, match="convex_clustering_loss: double backward is not supported"):
        torch.autograd.grad(g.pow(2).sum(), (x, att, db, log_q))
    (want,) = torch.autograd.grad(cc_loss(x, att, pairs, db, log_q, ALPHA, metric), target)
    assert_close64(g.detach(), want)


def test_module_double_backward_raises_a_clear_error():
    feats, att, labels, mask, db, log_q = _batch()
    feats.requires_grad_()
    loss = ccluster.ConvexClusteringLoss(ALPHA)(feats, att, labels, mask, db, log_q)
    (g,) = torch.autograd.grad(loss, feats, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        g.norm().backward()


def test_no_grad_computes_no_gradient_of_x():
    # under torch.no_grad the op is asked for the loss only (grad_x=False), even when x requires grad
    x, att, pairs, db, log_q = _problem(30, 3, 6, 2, "sparse", False, seed=16)
    x.requires_grad_()
    seen = []

    class Spy(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if "ccluster.cc_loss" in str(func):
                seen.append(args[-1])
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Spy():
        loss = cc_loss(x, att, pairs, db, log_q, ALPHA)
    assert seen == [False]
    assert_close64(loss, cc_loss(x.detach(), att, pairs, db, log_q, ALPHA))
