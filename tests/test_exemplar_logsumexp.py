"""torch.ops.ccluster.exemplar_logsumexp (+ its backward op) against the float64 oracle."""
from __future__ import annotations

import math

import pytest
import torch

import ccluster
from ccluster import reference
from conftest import (COL_BLOCK, ROW_BLOCK, assert_close64, assert_low_precision, make_inputs,
                      random_like, random_mask)

pytestmark = pytest.mark.usefixtures("compiled_ops", "thread_policy")

lse = ccluster.exemplar_logsumexp
ALPHA = 0.7

# (N, C, n, m): sizes around the tiles (kRowBlock=128 rows, kColBlock=512 exemplars) and size-1 dims.
SMALL_SHAPES = [
    (5, 3, 7, 4),
    (1, 1, 1, 1),                  # everything size 1
    (6, 1, 9, 3),                  # C = 1
    (4, 3, 1, 5),                  # n = 1
    (7, 2, 6, 1),                  # m = 1
    (ROW_BLOCK + 1, 2, COL_BLOCK + 1, 3),   # one past each tile
    (9, 2, 2 * COL_BLOCK + 6, 2),           # n = 1030: three column tiles, the last partial
]
MEDIUM_SHAPE = (2 * ROW_BLOCK + 1, 2, 2 * COL_BLOCK + 6, 3)   # two tiles and one row / six exemplars more


def _grads(out, inputs, grad):
    return torch.autograd.grad(out, inputs, grad)


def _check_against_reference(x, db, log_q, metric, pairs=None, alpha=ALPHA, seed=3):
    x, db, log_q = (t.detach().requires_grad_() for t in (x, db, log_q))
    out = lse(x, db, log_q, alpha, metric, pairs)
    ref = reference.exemplar_logsumexp(x, db, log_q, alpha, metric, pairs)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], db.shape[0])
    assert_close64(out, ref, msg="value")
    grad = random_like(out, seed=seed)
    g_op = _grads(out, (x, db, log_q), grad)
    g_ref = _grads(ref, (x, db, log_q), grad)
    for name, a, b in zip(("x", "db", "log_q"), g_op, g_ref):
        assert_close64(a, b, msg=f"grad {name}")
    return out, g_op


# ---------------------------------------------------------------------------------------------------
# Values and gradients in float64


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("with_pairs", [False, True], ids=["dense", "pairs"])
def test_matches_reference_float64(shape, metric, with_pairs, device):
    N, C, n, m = shape
    x, db, log_q = make_inputs(N, C, n, m, device=device, seed=sum(shape))
    pairs = random_mask(N, C, 0.6, seed=N, device=device) if with_pairs else None
    _check_against_reference(x, db, log_q, metric, pairs)


@pytest.mark.parallel
def test_matches_reference_float64_medium(metric):
    N, C, n, m = MEDIUM_SHAPE
    x, db, log_q = make_inputs(N, C, n, m, seed=11)
    _check_against_reference(x, db, log_q, metric)


def test_gradients_only_for_inputs_that_require_them(metric, device):
    x, db, log_q = make_inputs(6, 2, 5, 3, seed=4, device=device)
    db.requires_grad_()
    out = lse(x, db, log_q, ALPHA, metric)
    (gdb,) = torch.autograd.grad(out.sum(), (db,))
    dbr = db.detach().requires_grad_()
    (gref,) = torch.autograd.grad(reference.exemplar_logsumexp(x, dbr, log_q, ALPHA, metric).sum(), (dbr,))
    assert_close64(gdb, gref)
    assert x.grad is None and log_q.grad is None


def test_empty_batch(metric, device):
    x, db, log_q = make_inputs(0, 3, 5, 2, device=device, requires_grad=True)
    out = lse(x, db, log_q, ALPHA, metric)
    assert out.shape == (0, 3)
    gx, gdb, glq = torch.autograd.grad(out.sum(), (x, db, log_q))
    assert gx.shape == (0, 2)
    assert torch.equal(gdb, torch.zeros_like(gdb)) and torch.equal(glq, torch.zeros_like(glq))
    pairs = torch.zeros(0, 3, dtype=torch.bool, device=device)
    assert lse(x, db, log_q, ALPHA, metric, pairs).shape == (0, 3)


def test_non_contiguous_inputs(metric, device):
    N, C, n, m = 10, 3, 8, 4
    # x: a transposed view; db: transposed in its last two dims; log_q: every other column
    x_base = torch.randn(m, N, dtype=torch.float64, device=device, requires_grad=True)
    db_base = torch.randn(C, m, n, dtype=torch.float64, device=device, requires_grad=True)
    lq_base = torch.randn(C, 2 * n, dtype=torch.float64, device=device, requires_grad=True)
    x, db, log_q = x_base.t(), db_base.transpose(1, 2), lq_base[:, ::2]
    assert not (x.is_contiguous() or db.is_contiguous() or log_q.is_contiguous())
    out = lse(x, db, log_q, ALPHA, metric)
    grad = random_like(out)
    g_op = torch.autograd.grad(out, (x_base, db_base, lq_base), grad)

    xc, dbc, lqc = (t.detach().contiguous().requires_grad_() for t in (x, db, log_q))
    ref = reference.exemplar_logsumexp(xc, dbc, lqc, ALPHA, metric)
    assert_close64(out, ref)
    gx, gdb, glq = torch.autograd.grad(ref, (xc, dbc, lqc), grad)
    assert_close64(g_op[0], gx.t())
    assert_close64(g_op[1], gdb.transpose(1, 2))
    assert_close64(g_op[2][:, ::2], glq)
    assert torch.equal(g_op[2][:, 1::2], torch.zeros(C, n, dtype=torch.float64, device=device))


def test_strided_rows_and_slots(device):
    x, db, log_q = make_inputs(20, 4, 30, 3, seed=5, device=device)
    xs, dbs, lqs = x[::3], db[::2, ::4], log_q[::2, ::4]
    assert_close64(lse(xs, dbs, lqs, ALPHA, "euclidean"),
                   reference.exemplar_logsumexp(xs, dbs, lqs, ALPHA, "euclidean"))


# ---------------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


@pytest.mark.parametrize("with_pairs", [False, True], ids=["dense", "pairs"])
def test_gradcheck(metric, with_pairs, device):
    x, db, log_q = make_inputs(4, 2, 3, 2, seed=6, requires_grad=True, device=device)
    pairs = torch.tensor([[True, False], [True, True], [False, True], [False, False]], device=device) \
        if with_pairs else None
    assert torch.autograd.gradcheck(lambda a, b, c: lse(a, b, c, ALPHA, metric, pairs), (x, db, log_q))


@pytest.mark.parametrize("with_pairs", [False, True], ids=["dense", "pairs"])
def test_opcheck_forward(metric, with_pairs, device):
    x, db, log_q = make_inputs(5, 2, 4, 3, seed=7, requires_grad=True, device=device)
    pairs = random_mask(5, 2, 0.5, seed=1, device=device) if with_pairs else None
    torch.library.opcheck(torch.ops.ccluster.exemplar_logsumexp, (x, db, log_q, ALPHA, metric, pairs))


@pytest.mark.parametrize("mask", [[True, True, True], [True, False, False], [False, True, True]],
                         ids=["all", "x", "db_lq"])
def test_opcheck_backward(metric, mask, device):
    x, db, log_q = make_inputs(5, 2, 4, 3, seed=8, device=device)
    pairs = random_mask(5, 2, 0.6, seed=3, device=device)
    logz = lse(x, db, log_q, ALPHA, metric, pairs)
    grad = random_like(logz)
    torch.library.opcheck(torch.ops.ccluster.exemplar_logsumexp_backward,
                          (grad, x, db, log_q, logz, ALPHA, metric, pairs, mask))
    gx, gdb, glq = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, logz, ALPHA, metric,
                                                                  pairs, mask)
    for want, g, like in zip(mask, (gx, gdb, glq), (x, db, log_q)):
        assert g.shape == (like.shape if want else (0,))


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile_fullgraph_forward_backward(backend):
    # Dynamo must capture the op in one graph (fullgraph); AOTAutograd traces the forward through the
    # fake kernel and the backward through the registered autograd formula and the backward op's fake
    # kernel. "inductor" (the default backend users get) adds its C++ codegen around our op: ~20 s cold.
    x, db, log_q = make_inputs(6, 2, 5, 3, seed=9, requires_grad=True)
    pairs = random_mask(6, 2, 0.7, seed=4)

    def f(x, db, log_q):
        return (lse(x, db, log_q, ALPHA, "sqeuclidean", pairs) * torch.arange(1.0, 3.0, dtype=x.dtype)).sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    val = compiled(x, db, log_q)
    grads = torch.autograd.grad(val, (x, db, log_q))
    ref_val = f(x, db, log_q)
    ref_grads = torch.autograd.grad(ref_val, (x, db, log_q))
    assert_close64(val, ref_val)
    for a, b in zip(grads, ref_grads):
        assert_close64(a, b)


# ---------------------------------------------------------------------------------------------------
# Low precision


def _low_precision_case(dtype, metric, shape, seed, grad=None, device="cpu"):
    x64, db64, lq64 = make_inputs(*shape, seed=seed, device=device)
    x, db, log_q = (t.to(dtype).requires_grad_() for t in (x64, db64, lq64))
    out = lse(x, db, log_q, ALPHA, metric)
    assert out.dtype == dtype
    grad = random_like(out, seed=seed) if grad is None else grad.to(dtype)
    g_fused = torch.autograd.grad(out, (x, db, log_q), grad)
    assert [g.dtype for g in g_fused] == [dtype] * 3
    # the oracle sees exactly the rounded inputs, in float64
    xo, dbo, lqo = (t.detach().double().requires_grad_() for t in (x, db, log_q))
    oracle = reference.exemplar_logsumexp(xo, dbo, lqo, ALPHA, metric)
    g_oracle = torch.autograd.grad(oracle, (xo, dbo, lqo), grad.double())
    # plain PyTorch in the same dtype
    xp, dbp, lqp = (t.detach().requires_grad_() for t in (x, db, log_q))
    plain = reference.exemplar_logsumexp(xp, dbp, lqp, ALPHA, metric)
    g_plain = torch.autograd.grad(plain, (xp, dbp, lqp), grad)
    assert_low_precision(out, plain, oracle.detach(), dtype, "value")
    for name, a, b, c in zip(("x", "db", "log_q"), g_fused, g_plain, g_oracle):
        assert_low_precision(a, b, c, dtype, f"grad {name}")
    return x, db, log_q, out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_low_precision_against_oracle(dtype, metric, device):
    _low_precision_case(dtype, metric, (ROW_BLOCK + 2, 1, COL_BLOCK + 8, 3), seed=12, device=device)


@pytest.mark.parametrize("backend", ["fused", "library"])
def test_float32_gradient_when_the_classes_cancel(metric, backend, device):
    # An upstream gradient that sums to 0 over each row's classes, as a softmax over the classes gives
    # (the class-contrastive loss): the classes' shares of grad_x, each of the size of the terms of
    # alpha (W Y - rowsum(W) x), cancel, so the rounding of every share shows undiluted. Float sums of
    # rowsum(W) (and, in the library path, of the forward's log-sum-exp) over a tile's columns made the
    # euclidean grad_x 3-4x plain PyTorch's error here; they are taken in double.
    shape = (ROW_BLOCK + 5, 3, COL_BLOCK + 10, 3)
    # On a GPU the library path's row sums are in double too (csrc/cuda/epilogue_kernels.cu).
    g = random_like(torch.empty(shape[0], shape[1], dtype=torch.float64, device=device), seed=4)
    grad = g - g.mean(1, keepdim=True)
    with ccluster.kernel_settings(backend=backend):
        _low_precision_case(torch.float32, metric, shape, seed=12, grad=grad, device=device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_inputs_are_computed_in_float32(dtype, metric, device):
    # the documented contract: float16/bfloat16 in, float32 inside, rounded once on the way out
    x, db, log_q, out = _low_precision_case(dtype, metric, (9, 2, 40, 3), seed=13, device=device)
    in32 = lse(x.detach().float(), db.detach().float(), log_q.detach().float(), ALPHA, metric)
    torch.testing.assert_close(out.float(), in32.to(dtype).float(), rtol=torch.finfo(dtype).eps,
                               atol=4 * torch.finfo(torch.float32).eps * float(in32.abs().max()))


# ---------------------------------------------------------------------------------------------------
# -inf slots, empty classes, zero distance, stability


def test_neg_inf_slots_and_empty_class(metric, device):
    N, C, n, m = 7, 4, COL_BLOCK + 5, 3
    x, db, log_q = make_inputs(N, C, n, m, seed=14, device=device)
    log_q[0, : n // 2] = -math.inf         # some slots, across the first tile
    log_q[2, COL_BLOCK:] = -math.inf       # a whole column tile empty
    log_q[1] = -math.inf                   # a whole class
    x, db, log_q = (t.requires_grad_() for t in (x, db, log_q))
    out = lse(x, db, log_q, ALPHA, metric)
    assert not out.isnan().any()
    assert torch.equal(out[:, 1], torch.full((N,), -math.inf, dtype=torch.float64, device=device))
    assert torch.isfinite(out[:, [0, 2, 3]]).all()

    # upstream gradient nonzero everywhere, also on the -inf outputs
    grad = random_like(out)
    gx, gdb, glq = torch.autograd.grad(out, (x, db, log_q), grad)
    for g in (gx, gdb, glq):
        assert torch.isfinite(g).all()
    empty = ~torch.isfinite(log_q.detach())
    assert torch.equal(glq[empty], torch.zeros(int(empty.sum()), dtype=torch.float64, device=device))
    assert torch.equal(gdb[empty], torch.zeros(int(empty.sum()), m, dtype=torch.float64, device=device))

    # the finite part against the oracle (the oracle itself gives NaN gradients on an all -inf class)
    keep = [0, 2, 3]
    xr, dbr, lqr = (t.detach().requires_grad_() for t in (x, db, log_q))
    ref = reference.exemplar_logsumexp(xr, dbr[keep], lqr[keep], ALPHA, metric)
    assert_close64(out[:, keep], ref)
    rx, rdb, rlq = torch.autograd.grad(ref, (xr, dbr, lqr), grad[:, keep])
    assert_close64(gx, rx)
    assert_close64(gdb[keep], rdb[keep])
    assert_close64(glq[keep], rlq[keep])


def test_euclidean_gradient_is_zero_at_zero_distance(device):
    # integer features: |x - y|^2 = |x|^2 + |y|^2 - 2 x.y is exactly 0, the case the contract is about
    x = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64, device=device, requires_grad=True)
    db = torch.tensor([[[1.0, -2.0, 3.0]]], dtype=torch.float64, device=device, requires_grad=True)
    log_q = torch.zeros(1, 1, dtype=torch.float64, device=device, requires_grad=True)
    out = lse(x, db, log_q, 2.5, "euclidean")
    assert out.item() == 0.0
    gx, gdb, glq = torch.autograd.grad(out.sum(), (x, db, log_q))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gdb, torch.zeros_like(gdb))
    assert glq.item() == 1.0

    # and among other exemplars: the coincident one adds nothing; the rest match the oracle
    x2 = torch.tensor([[1.0, 0.0], [2.0, -1.0]], dtype=torch.float64, device=device, requires_grad=True)
    db2 = torch.tensor([[[1.0, 0.0], [3.0, 1.0], [0.0, -2.0]]], dtype=torch.float64, device=device,
                       requires_grad=True)
    lq2 = torch.log(torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64, device=device))
    out2 = lse(x2, db2, lq2, 1.5, "euclidean")
    g_op = torch.autograd.grad(out2.sum(), (x2, db2))
    g_ref = torch.autograd.grad(reference.exemplar_logsumexp(x2, db2, lq2, 1.5, "euclidean").sum(), (x2, db2))
    for a, b in zip(g_op, g_ref):
        assert torch.isfinite(a).all()
        assert_close64(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_stable_when_alpha_d_is_huge(metric, dtype, device):
    # two exemplars, alpha*d ~ 1e4: exp underflows, the naive formula gives -inf
    if metric == "sqeuclidean":
        alpha, d = 1.0, torch.tensor([1.0e4, 1.0e4 + 3.0], dtype=torch.float64)
        db = torch.tensor([[[100.0, 0.0], [0.0, math.sqrt(1.0e4 + 3.0)]]], dtype=torch.float64)
    else:
        alpha, d = 100.0, torch.tensor([100.0, 100.03], dtype=torch.float64)
        db = torch.tensor([[[100.0, 0.0], [0.0, 100.03]]], dtype=torch.float64)
    q = torch.tensor([0.25, 0.75], dtype=torch.float64)
    x = torch.zeros(1, 2, dtype=torch.float64)
    naive = torch.log((q * torch.exp(-alpha * d)).sum())
    assert naive.item() == -math.inf   # the test is about a case the naive formula cannot do
    # exact: log(q0 e^{-a d0} + q1 e^{-a d1}) = log q0 - a d0 + log1p(q1/q0 e^{-a (d1 - d0)})
    a0, a1 = math.log(0.25) - alpha * float(d[0]), math.log(0.75) - alpha * float(d[1])
    exact = max(a0, a1) + math.log1p(math.exp(min(a0, a1) - max(a0, a1)))
    resp1 = 1.0 / (1.0 + math.exp(a0 - a1))   # d logz / d log_q[1]

    xs, dbs = x.to(device, dtype).requires_grad_(), db.to(device, dtype)
    lqs = q.log()[None].to(device, dtype).requires_grad_()
    out = lse(xs, dbs, lqs, alpha, metric)
    assert torch.isfinite(out).all()
    rtol = 1e-13 if dtype == torch.float64 else 4 * torch.finfo(torch.float32).eps
    assert out.item() == pytest.approx(exact, rel=rtol)
    gx, glq = torch.autograd.grad(out.sum(), (xs, lqs))
    assert torch.isfinite(gx).all()
    gtol = 1e-9 if dtype == torch.float64 else 1e-3   # float32: d1 - d0 is resolved to ~1e-3 at d ~ 1e4
    assert glq[0, 1].item() == pytest.approx(resp1, abs=gtol)
    assert glq[0, 0].item() == pytest.approx(1 - resp1, abs=gtol)


# ---------------------------------------------------------------------------------------------------
# NaN policy (docstring: NaN in x -> its row; NaN in log_q -> its class)


@pytest.mark.parametrize("slot", [3, COL_BLOCK + 40], ids=["first_tile", "second_tile"])
def test_nan_propagates_to_its_row_and_class_only(metric, slot, device):
    N, C, n, m = 6, 3, COL_BLOCK + 50, 3
    x, db, log_q = make_inputs(N, C, n, m, seed=15, device=device)
    clean = lse(x, db, log_q, ALPHA, metric)

    xn = x.clone()
    xn[2, 1] = math.nan
    out = lse(xn, db, log_q, ALPHA, metric)
    assert out[2].isnan().all()
    rows = [0, 1, 3, 4, 5]
    assert torch.isfinite(out[rows]).all()
    assert_close64(out[rows], clean[rows])

    lqn = log_q.clone()
    lqn[1, slot] = math.nan
    out = lse(x, db, lqn, ALPHA, metric)
    assert out[:, 1].isnan().all()
    assert torch.isfinite(out[:, [0, 2]]).all()
    assert_close64(out[:, [0, 2]], clean[:, [0, 2]])


def _lse_and_grads(x, db, log_q, metric, pairs, grad, fn=lse):
    args = [t.clone().requires_grad_() for t in (x, db, log_q)]
    out = fn(*args, ALPHA, metric, pairs)
    return (out.detach(), *torch.autograd.grad(out, args, grad))


# rows with no pair: the first of a row block, one inside it, one in the second block
UNPAIRED = [0, 7, ROW_BLOCK + 2]


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_rows_outside_the_pairs_get_exactly_zero_gradient(metric, bad, device):
    # README: with pairs, the other entries are 0 and get no gradient. A row with no pair is never read,
    # so NaN or inf there gives that row exactly 0 gradient and changes nothing else (0 * NaN = NaN was
    # the trap: grad_x = alpha (W Y - rowsum(W) x) with rowsum(W) = 0).
    N, C, n, m = ROW_BLOCK + 9, 3, COL_BLOCK + 7, 4      # two row blocks, two column tiles
    x, db, log_q = make_inputs(N, C, n, m, seed=21, device=device)
    pairs = random_mask(N, C, 0.5, seed=5, device=device)
    pairs[UNPAIRED] = False
    grad = random_like(torch.empty(N, C, dtype=torch.float64, device=device), seed=8)
    clean = _lse_and_grads(x, db, log_q, metric, pairs, grad)
    xb = x.clone()
    xb[0, 1] = bad
    xb[7] = bad
    xb[ROW_BLOCK + 2, 3] = bad
    got = _lse_and_grads(xb, db, log_q, metric, pairs, grad)
    assert torch.equal(got[1][UNPAIRED], torch.zeros(len(UNPAIRED), m, dtype=torch.float64, device=device))
    for name, a, b in zip(("value", "grad x", "grad db", "grad log_q"), got, clean):
        assert torch.equal(a, b), f"{name}: a row outside the pairs must change nothing"
    # the oracle agrees (it computes rows without a pair from zeros)
    ref = _lse_and_grads(xb, db, log_q, metric, pairs, grad, fn=reference.exemplar_logsumexp)
    for name, a, b in zip(("value", "grad x", "grad db", "grad log_q"), got, ref):
        assert torch.isfinite(b).all()
        assert_close64(a, b, msg=name)


def test_zero_gradient_pairs_are_left_out(metric, device):
    # pairs whose incoming gradient is 0 take no part in the backward: a row whose pairs all have a zero
    # gradient is not read either (NaN there reaches no gradient), in a row block with rows that do
    N, C, n, m = 40, 3, 30, 5
    x, db, log_q = make_inputs(N, C, n, m, seed=4, device=device)
    pairs = random_mask(N, C, 0.7, seed=6, device=device)
    pairs[5] = True
    grad = random_like(torch.empty(N, C, dtype=torch.float64, device=device), seed=2)
    grad[5] = 0.0
    clean = _lse_and_grads(x, db, log_q, metric, pairs, grad)
    xb = x.clone()
    xb[5, 2] = math.nan
    got = _lse_and_grads(xb, db, log_q, metric, pairs, grad)
    assert got[0][5].isnan().all(), "the forward still propagates NaN to its row"
    assert torch.equal(got[1][5], torch.zeros(m, dtype=torch.float64, device=device))
    for name, a, b in zip(("grad x", "grad db", "grad log_q"), got[1:], clean[1:]):
        assert torch.equal(a, b), name


def test_nan_in_a_paired_row_reaches_its_gradient(metric):
    # the documented propagation still holds with pairs: NaN in x reaches its row of the output and of
    # grad_x, and, through the responsibilities of that row, the columns of the class it is paired with
    # (the loss is NaN then); other rows and other classes are unaffected
    N, C, n, m = 30, 3, 20, 4
    x, db, log_q = make_inputs(N, C, n, m, seed=9)
    pairs = random_mask(N, C, 0.5, seed=3)
    pairs[4] = torch.tensor([False, True, False])
    pairs[:, 0] = False
    pairs[0, 0] = True                  # class 0 has one pair, not row 4
    grad = random_like(torch.empty(N, C, dtype=torch.float64), seed=5)
    clean = _lse_and_grads(x, db, log_q, metric, pairs, grad)
    xb = x.clone()
    xb[4, 2] = math.nan
    out, gx, gdb, glq = _lse_and_grads(xb, db, log_q, metric, pairs, grad)
    assert out[4, 1].isnan() and out[4, 0] == 0 and out[4, 2] == 0
    assert gx[4].isnan().all(), "NaN in x must reach its row of grad_x"
    rest = [s for s in range(N) if s != 4]
    assert torch.isfinite(gx[rest]).all()
    assert torch.equal(gx[rest], clean[1][rest])
    assert gdb[1].isnan().all() and glq[1].isnan().all()
    for c in (0, 2):
        assert torch.equal(gdb[c], clean[2][c]) and torch.equal(glq[c], clean[3][c])


# ---------------------------------------------------------------------------------------------------
# pairs


def test_pairs_zero_outside_and_dense_values_inside(metric, device):
    N, C, n, m = ROW_BLOCK + 3, 4, 20, 3
    x, db, log_q = make_inputs(N, C, n, m, seed=16, requires_grad=True, device=device)
    pairs = random_mask(N, C, 0.4, seed=5, device=device)
    pairs[1] = True           # a row with every class
    pairs[0] = False          # a row with no pair
    pairs[:, 3] = False       # a class with no pair
    out = lse(x, db, log_q, ALPHA, metric, pairs)
    dense = lse(x, db, log_q, ALPHA, metric)
    assert torch.equal(out[~pairs], torch.zeros(int((~pairs).sum()), dtype=torch.float64, device=device))
    assert_close64(out[pairs], dense[pairs])

    # an upstream gradient nonzero everywhere: entries outside pairs must not contribute
    grad = random_like(out)
    g_pairs = torch.autograd.grad(out, (x, db, log_q), grad)
    g_dense = torch.autograd.grad(dense, (x, db, log_q), grad * pairs)
    for a, b in zip(g_pairs, g_dense):
        assert_close64(a, b)
    assert torch.equal(g_pairs[0][0], torch.zeros(m, dtype=torch.float64, device=device))       # unpaired row
    assert torch.equal(g_pairs[1][3], torch.zeros(n, m, dtype=torch.float64, device=device))    # unpaired class
    assert torch.equal(g_pairs[2][3], torch.zeros(n, dtype=torch.float64, device=device))


# ---------------------------------------------------------------------------------------------------
# Bad input


def _args(device="cpu", **over):
    x, db, log_q = make_inputs(5, 2, 4, 3, seed=17, device=device)
    args = dict(x=x, db=db, log_q=log_q, alpha=ALPHA, metric="sqeuclidean", pairs=None)
    args.update(over)
    return args


BAD_INPUTS = [
    ("x_rank", dict(x=torch.zeros(5, dtype=torch.float64)), r"exemplar_logsumexp: x must be \[N, m\], got shape \[5\]"),
    ("x_rank3", dict(x=torch.zeros(1, 5, 3, dtype=torch.float64)), r"x must be \[N, m\], got shape \[1, 5, 3\]"),
    ("db_rank", dict(db=torch.zeros(8, 3, dtype=torch.float64)), r"db must be \[C, n, m\], got shape \[8, 3\]"),
    ("log_q_rank", dict(log_q=torch.zeros(8, dtype=torch.float64)), r"log_q must be \[C, n\], got shape \[8\]"),
    ("m_mismatch", dict(db=torch.zeros(2, 4, 6, dtype=torch.float64)), r"db feature size m=6 does not match x's m=3"),
    ("C_mismatch", dict(log_q=torch.zeros(3, 4, dtype=torch.float64)),
     r"log_q must be \[C, n\] = \[2, 4\] to match db, got \[3, 4\]"),
    ("n_mismatch", dict(log_q=torch.zeros(2, 5, dtype=torch.float64)),
     r"log_q must be \[C, n\] = \[2, 4\] to match db, got \[2, 5\]"),
    ("mixed_dtype", dict(db=torch.zeros(2, 4, 3, dtype=torch.float32)),
     r"x, db and log_q must have one dtype, got Double, Float, Double"),
    ("int_x", dict(x=torch.zeros(5, 3, dtype=torch.long)), r"x must be a floating-point tensor, got Long"),
    ("int_db", dict(db=torch.zeros(2, 4, 3, dtype=torch.int32)), r"db must be a floating-point tensor, got Int"),
    ("bool_log_q", dict(log_q=torch.zeros(2, 4, dtype=torch.bool)),
     r"log_q must be a floating-point tensor, got Bool"),
    ("alpha_zero", dict(alpha=0.0), r"alpha must be a finite number > 0, got 0"),
    ("alpha_negative", dict(alpha=-1.5), r"alpha must be a finite number > 0, got -1.5"),
    ("alpha_nan", dict(alpha=math.nan), r"alpha must be a finite number > 0, got nan"),
    ("alpha_inf", dict(alpha=math.inf), r"alpha must be a finite number > 0, got inf"),
    ("metric", dict(metric="cosine"), r"metric must be 'sqeuclidean' or 'euclidean', got 'cosine'"),
    ("pairs_shape", dict(pairs=torch.ones(5, 3, dtype=torch.bool)), r"pairs must be \[N, C\] = \[5, 2\], got \[5, 3\]"),
    ("pairs_rank", dict(pairs=torch.ones(5, dtype=torch.bool)), r"pairs must be \[N, C\] = \[5, 2\], got \[5\]"),
    ("pairs_dtype", dict(pairs=torch.ones(5, 2)), r"pairs must be a bool tensor, got Float"),
]


# One exception type per kind of mistake (ccluster/ops.py, csrc/common.h): a wrong dtype is a TypeError,
# a wrong shape, device or value a ValueError.
TYPE_ERRORS = {"mixed_dtype", "int_x", "int_db", "bool_log_q", "pairs_dtype"}


def _expected(case):
    return TypeError if case in TYPE_ERRORS else ValueError


@pytest.mark.parametrize("case,over,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_rejected_with_a_clear_message(case, over, match, device):
    over = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in over.items()}
    with pytest.raises(_expected(case), match=match):
        lse(**_args(device, **over))


@pytest.mark.parametrize("case,over,match", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_the_reference_fallback_raises_the_same_types(case, over, match, monkeypatch):
    # without the compiled library the Python checks answer: same type, same argument named
    from ccluster import ops
    monkeypatch.setattr(ops, "_LOAD_ERROR", RuntimeError("simulated"))
    head = match.split(", got")[0]
    with pytest.raises(_expected(case), match=head):
        lse(**_args(**over))


@pytest.mark.parametrize("over,exc,match", [
    (dict(x=[[1.0, 2.0, 3.0]]), TypeError, r"exemplar_logsumexp: x must be a Tensor, got list"),
    (dict(alpha="0.5"), TypeError, r"exemplar_logsumexp: alpha must be a finite number > 0, got '0.5' \(str\)"),
    (dict(metric=None), TypeError, r"exemplar_logsumexp: metric must be 'sqeuclidean' or 'euclidean', got None"),
    (dict(pairs=[[True, False]] * 5), TypeError, r"exemplar_logsumexp: pairs must be a Tensor or None, got list"),
], ids=["x_list", "alpha_str", "metric_none", "pairs_list"])
def test_python_objects_of_the_wrong_type_are_type_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        lse(**_args(**over))


def test_positive_log_q_is_accepted_as_unnormalised_weights():
    # exemplar_logsumexp is a log-sum-exp of log-weights: a constant added to log_q shifts the result
    args = _args()
    out = lse(**args)
    shifted = lse(**{**args, "log_q": args["log_q"] + 3.0})
    torch.testing.assert_close(shifted, out + 3.0, rtol=0, atol=1e-12)


FAKE_CASES = [c for c in BAD_INPUTS
              if c[0] in ("x_rank", "C_mismatch", "mixed_dtype", "alpha_nan", "metric", "pairs_dtype")]


@pytest.mark.parametrize("case,over,match", FAKE_CASES, ids=[c[0] for c in FAKE_CASES])
def test_bad_input_is_rejected_by_the_fake_kernel(case, over, match):
    # torch.compile sees the fake kernel: same argument named, same expectation (dtypes print as torch.*)
    from torch._subclasses.fake_tensor import FakeTensorMode
    args = _args(**over)
    head = match.split(", got")[0]
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises(_expected(case), match=head):
            torch.ops.ccluster.exemplar_logsumexp(*fake.values())


def test_wrong_device_is_rejected():
    if not torch.cuda.is_available():
        pytest.skip("CUDA is not available: cannot build a mixed-device call")
    x, db, log_q = make_inputs(5, 2, 4, 3)
    with pytest.raises(ValueError, match=r"must be on one device"):
        lse(x, db.cuda(), log_q, ALPHA)


def test_no_slots_gives_neg_inf(metric, device):
    # n = 0: log of an empty sum, -inf for every class, never NaN; the gradient is 0
    x, db, log_q = make_inputs(3, 2, 0, 2, seed=18, device=device)
    x.requires_grad_()
    out = lse(x, db, log_q, ALPHA, metric)
    assert torch.equal(out, torch.full((3, 2), -math.inf, dtype=torch.float64, device=device))
    (gx,) = torch.autograd.grad(out, (x,), torch.ones_like(out))
    assert torch.equal(gx, torch.zeros_like(gx))


def test_reference_handles_no_slots():
    x, db, log_q = make_inputs(3, 2, 0, 2, seed=18)
    assert torch.equal(reference.exemplar_logsumexp(x, db, log_q, ALPHA),
                       torch.full((3, 2), -math.inf, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# Double backward: not supported, and says so (never a gradient that silently ignores its input)


@pytest.mark.parametrize("wrt", ["x", "db", "log_q"])
def test_double_backward_raises_a_clear_error(metric, wrt, device):
    x, db, log_q = make_inputs(6, 2, 5, 3, seed=19, device=device, requires_grad=True)
    pairs = random_mask(6, 2, 0.7, seed=2, device=device)
    inputs = {"x": x, "db": db, "log_q": log_q}
    out = lse(x, db, log_q, ALPHA, metric, pairs)
    (g,) = torch.autograd.grad((out * out).sum(), inputs[wrt], create_graph=True)
    assert g.grad_fn is not None, "a gradient built with create_graph must depend on its inputs"
    with pytest.raises(RuntimeError, match="exemplar_logsumexp: double backward is not supported"):
        torch.autograd.grad(g.pow(2).sum(), (x, db, log_q))
    # the first-order gradient itself is the usual one
    (want,) = torch.autograd.grad((out * out).sum(), inputs[wrt])
    assert torch.equal(g.detach(), want)


def test_double_backward_of_the_reference_works(metric):
    # the documented way to a gradient penalty: the materialised reference is twice differentiable
    x, db, log_q = make_inputs(4, 2, 3, 2, seed=20, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda a, b, c: reference.exemplar_logsumexp(a, b, c, ALPHA, metric),
                                        (x, db, log_q))
