"""The CUDA implementations against the CPU kernels and the float64 reference (ccluster.reference).

Two implementations run on CUDA (ccluster.kernel_settings): the library-GEMM path (default: cuBLAS GEMMs
and the epilogue kernels of csrc/cuda/epilogue_kernels.cu) and the hand-written fused kernels
(backend="fused"). Most tests run both (the `backend` fixture). Every test needs a GPU and the compiled
CUDA kernels; without them the whole module is skipped with the reason. Shapes are small and odd on
purpose: they cross the 64-row / 64-exemplar tiles, the K-slices of the feature loop (8, 16, 64 on the
tensor-core path) and the 64-feature slices of the gradient loops; tiny workspaces cut the library path's
work into many chunks.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import ccluster
import ccluster.ops as ops
from ccluster import reference


def _cuda_kernels_registered() -> bool:
    if not ops.has_compiled_ops():
        return False
    try:
        return all(torch._C._dispatch_has_kernel_for_dispatch_key(f"ccluster::{name}", "CUDA")
                   for name in ("exemplar_logsumexp", "exemplar_logsumexp_backward", "cc_loss", "fit_step"))
    except Exception:  # noqa: BLE001 - private API; assume registered and let the tests say otherwise
        return True


_SKIP_REASON = None
if not torch.cuda.is_available():
    _SKIP_REASON = "CUDA is not available (torch.cuda.is_available() is False): CUDA kernel tests need a GPU"
elif not _cuda_kernels_registered():
    _SKIP_REASON = ("ccluster was built without its CUDA kernels (csrc/cuda); rebuild with a CUDA toolkit, "
                    "e.g. FORCE_CUDA=1 pip install --no-build-isolation -e .")

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")]

METRICS = ("sqeuclidean", "euclidean")
# (N, C, n, m): single elements, odd sizes around the tiles, several row blocks and exemplar chunks
SHAPES = [(1, 1, 1, 1), (5, 3, 7, 4), (67, 4, 70, 33), (130, 3, 129, 65), (64, 2, 64, 64)]
DEV = "cuda"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


BACKENDS = ("library", "fused")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test with each CUDA implementation."""
    with ccluster.kernel_settings(backend=request.param):
        yield request.param


def make_inputs(N, C, n, m, dtype=torch.float64, device=DEV, seed=0, empty_slots=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, m, generator=g, dtype=torch.float64) * scale / math.sqrt(max(m, 1))
    db = torch.randn(C, n, m, generator=g, dtype=torch.float64) * scale / math.sqrt(max(m, 1))
    log_q = torch.log_softmax(torch.randn(C, n, generator=g, dtype=torch.float64), dim=-1)
    if empty_slots and n > 1:
        log_q[:, -1] = -math.inf  # an empty slot in every class
    if empty_slots and C >= 3:
        log_q[1] = -math.inf  # a class without any exemplar
    to = dict(dtype=dtype, device=device)
    return x.to(**to), db.to(**to), log_q.to(**to)


def make_pairs(N, C, seed=1, device=DEV, multi=True):
    g = torch.Generator().manual_seed(seed)
    pairs = torch.rand(N, C, generator=g) < 0.5
    if multi and C >= 3 and N >= 2:
        pairs[0] = True  # a row in every class (3+ classes: order-dependent atomics in cc_loss dx)
        pairs[1] = False  # a row in none
    return pairs.to(device)


def _on_cpu(fn, *args):
    """The CPU op with its default implementation (the fused CPU kernels), whatever the CUDA backend."""
    with ccluster.kernel_settings(backend="auto"):
        return fn(*args)


def nonempty_classes(log_q):
    return torch.isfinite(log_q).any(-1).nonzero().squeeze(1)


def assert_close(a, b, atol, rtol=0.0, msg=""):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=atol, rtol=rtol, equal_nan=True, msg=msg or None)


# ---------------------------------------------------------------------------------------------------
# exemplar_logsumexp forward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_pairs", [False, True])
def test_lse_forward_float64_vs_reference_and_cpu(shape, metric, with_pairs, backend):
    N, C, n, m = shape
    x, db, log_q = make_inputs(N, C, n, m)
    pairs = make_pairs(N, C) if with_pairs else None
    out = ops.exemplar_logsumexp(x, db, log_q, 1.3, metric, pairs)
    assert out.device.type == DEV and out.dtype == torch.float64 and out.shape == (N, C)
    ref = reference.exemplar_logsumexp(x, db, log_q, 1.3, metric, pairs)
    assert_close(out, ref, atol=1e-9, rtol=1e-9)
    cpu = _on_cpu(torch.ops.ccluster.exemplar_logsumexp, x.cpu(), db.cpu(), log_q.cpu(), 1.3, metric,
                                                None if pairs is None else pairs.cpu())
    assert_close(out, cpu, atol=1e-9, rtol=1e-9)
    if pairs is not None:
        assert (out[~pairs] == 0).all(), "entries outside the pairs must be exactly 0"


@pytest.mark.parametrize("metric", METRICS)
def test_lse_forward_float32_vs_cpu(metric, backend):
    x, db, log_q = make_inputs(130, 3, 129, 65, dtype=torch.float32)
    out = ops.exemplar_logsumexp(x, db, log_q, 2.0, metric)
    cpu = _on_cpu(ops.exemplar_logsumexp, x.cpu(), db.cpu(), log_q.cpu(), 2.0, metric)
    assert_close(out, cpu, atol=2e-5, rtol=2e-5)


def test_lse_empty_class_is_neg_inf_and_no_nan(backend):
    x, db, log_q = make_inputs(10, 3, 5, 4)
    out = ops.exemplar_logsumexp(x, db, log_q, 1.0)
    assert torch.isneginf(out[:, 1]).all()
    assert torch.isfinite(out[:, [0, 2]]).all()


@pytest.mark.parametrize("metric", METRICS)
def test_lse_large_alpha_d_is_finite(metric, backend):
    # alpha * d ~ 1e4: a naive log(sum(q exp(-alpha d))) underflows to -inf (and NaN gradients)
    x, db, log_q = make_inputs(70, 2, 66, 40, scale=30.0, empty_slots=False)
    alpha = 1e4 / float(((x[:, None, None, :] - db[None]) ** 2).sum(-1).mean())
    if metric == "euclidean":
        alpha = alpha * 30.0
    for dtype, tol in ((torch.float64, 1e-7), (torch.float32, 2e-3)):
        xd, dbd, lqd = x.to(dtype), db.to(dtype), log_q.to(dtype)
        out = ops.exemplar_logsumexp(xd, dbd, lqd, alpha, metric)
        assert torch.isfinite(out).all()
        assert out.abs().max() > 1e3
        ref = reference.exemplar_logsumexp(xd.double(), dbd.double(), lqd.double(), alpha, metric)
        assert_close(out.double(), ref, atol=0.0, rtol=tol)
        xg = xd.clone().requires_grad_()
        ops.exemplar_logsumexp(xg, dbd, lqd, alpha, metric).sum().backward()
        assert torch.isfinite(xg.grad).all()


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (4, 0, 4, 5), (4, 3, 0, 5), (4, 3, 5, 0), (0, 0, 0, 0)])
def test_lse_empty_inputs(shape, backend):
    N, C, n, m = shape
    x, db, log_q = make_inputs(N, C, n, m, empty_slots=False)
    out = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", None)
    cpu = _on_cpu(torch.ops.ccluster.exemplar_logsumexp, x.cpu(), db.cpu(), log_q.cpu(), 1.0, "sqeuclidean", None)
    assert out.shape == cpu.shape and out.dtype == cpu.dtype
    assert_close(out, cpu, atol=0.0)
    grad = torch.ones(N, C, dtype=x.dtype, device=DEV)
    gx, gdb, glq = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, out, 1.0, "sqeuclidean",
                                                                  None, [True, True, True])
    assert gx.shape == x.shape and gdb.shape == db.shape and glq.shape == log_q.shape


def test_lse_noncontiguous_inputs(backend):
    x, db, log_q = make_inputs(40, 3, 30, 20)
    xt = x.t().contiguous().t()  # same values, transposed strides
    dbs = torch.stack([db, db], dim=-1)[..., 0]
    assert not xt.is_contiguous() and not dbs.is_contiguous()
    out = ops.exemplar_logsumexp(xt, dbs, log_q, 1.0)
    assert_close(out, reference.exemplar_logsumexp(x, db, log_q, 1.0), atol=1e-9, rtol=1e-9)


def test_lse_nan_propagates(backend):
    x, db, log_q = make_inputs(10, 2, 9, 4, empty_slots=False)
    x[3, 0] = math.nan
    out = ops.exemplar_logsumexp(x, db, log_q, 1.0)
    assert torch.isnan(out[3]).all() and not torch.isnan(out[[0, 1, 2, 4]]).any()


# ---------------------------------------------------------------------------------------------------
# exemplar_logsumexp backward


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_pairs", [False, True])
def test_lse_backward_float64_vs_reference(shape, metric, with_pairs, backend):
    N, C, n, m = shape
    x, db, log_q = make_inputs(N, C, n, m)
    pairs = make_pairs(N, C) if with_pairs else None
    g = torch.Generator().manual_seed(5)
    w = torch.randn(N, C, generator=g, dtype=torch.float64).to(DEV)
    xs = [t.clone().requires_grad_() for t in (x, db, log_q)]
    out = ops.exemplar_logsumexp(*xs, 0.7, metric, pairs)
    (torch.where(torch.isfinite(out), out, torch.zeros_like(out)) * w).sum().backward()
    # The reference's autograd gives NaN through a class whose slots are all -inf (the op gives 0 there):
    # differentiate it on the other classes only.
    keep = nonempty_classes(log_q)
    rs = [t.clone().requires_grad_() for t in (x, db[keep], log_q[keep])]
    rout = reference.exemplar_logsumexp(*rs, 0.7, metric, None if pairs is None else pairs[:, keep])
    (rout * w[:, keep]).sum().backward()
    assert_close(xs[0].grad, rs[0].grad, atol=1e-9, rtol=1e-7, msg="grad x")
    assert_close(xs[1].grad[keep], rs[1].grad, atol=1e-9, rtol=1e-7, msg="grad db")
    assert_close(xs[2].grad[keep], rs[2].grad, atol=1e-9, rtol=1e-7, msg="grad log_q")
    empty = torch.ones(C, dtype=torch.bool, device=DEV)
    empty[keep] = False
    assert (xs[1].grad[empty] == 0).all() and (xs[2].grad[empty] == 0).all()


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True],
                                  [True, True, True]])
def test_lse_backward_output_mask_matches_cpu(mask, backend):
    x, db, log_q = make_inputs(67, 4, 70, 33)
    pairs = make_pairs(67, 4)
    out = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.1, "euclidean", pairs)
    grad = torch.randn(67, 4, dtype=x.dtype, device=DEV)
    res = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, out, 1.1, "euclidean", pairs, mask)
    cpu = _on_cpu(torch.ops.ccluster.exemplar_logsumexp_backward, grad.cpu(), x.cpu(), db.cpu(), log_q.cpu(), out.cpu(),
                                                         1.1, "euclidean", pairs.cpu(), mask)
    for want, a, b in zip(mask, res, cpu):
        assert a.shape == b.shape
        if want:
            assert_close(a, b, atol=1e-9, rtol=1e-7)


@pytest.mark.parametrize("metric", METRICS)
def test_gradcheck_tiny(metric, backend):
    x, db, log_q = make_inputs(5, 3, 7, 4)
    log_q = log_q.clone()
    log_q[1] = torch.log_softmax(torch.randn(7, dtype=torch.float64), 0).to(DEV)  # gradcheck needs finite
    pairs = make_pairs(5, 3)
    inputs = tuple(t.clone().requires_grad_() for t in (x, db, log_q))
    assert torch.autograd.gradcheck(lambda a, b, c: ops.exemplar_logsumexp(a, b, c, 0.9, metric, pairs), inputs)


# ---------------------------------------------------------------------------------------------------
# cc_loss


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("attention_dim", [1, 2])
def test_cc_loss_float64_vs_reference(shape, metric, attention_dim, backend):
    N, C, n, m = shape
    x, db, log_q = make_inputs(N, C, n, m)
    pairs = make_pairs(N, C)
    g = torch.Generator().manual_seed(3)
    att = torch.rand((N,) if attention_dim == 1 else (N, C), generator=g, dtype=torch.float64).to(DEV)
    xs = [t.clone().requires_grad_() for t in (x, att, db, log_q)]
    loss = ops.convex_clustering_loss(xs[0], xs[1], pairs, xs[2], xs[3], 0.8, metric)
    loss.backward()
    # reference on the classes with a filled slot (empty classes are left out of the loss anyway, but
    # the reference's autograd gives NaN through them)
    keep = nonempty_classes(log_q)
    ratt = att if attention_dim == 1 else att[:, keep]
    rs = [t.clone().requires_grad_() for t in (x, ratt, db[keep], log_q[keep])]
    rloss = reference.convex_clustering_loss(rs[0], rs[1], pairs[:, keep], rs[2], rs[3], 0.8, metric)
    rloss.backward()
    assert_close(loss.detach(), rloss.detach(), atol=1e-9, rtol=1e-9)
    assert_close(xs[0].grad, rs[0].grad, atol=1e-9, rtol=1e-7, msg="grad x")
    assert_close(xs[1].grad if attention_dim == 1 else xs[1].grad[:, keep], rs[1].grad, atol=1e-9, rtol=1e-7,
                 msg="grad attention")
    assert_close(xs[2].grad[keep], rs[2].grad, atol=1e-9, rtol=1e-7, msg="grad db")
    assert_close(xs[3].grad[keep], rs[3].grad, atol=1e-9, rtol=1e-7, msg="grad log_q")


@pytest.mark.parametrize("metric", METRICS)
def test_cc_loss_op_outputs_match_cpu(metric, backend):
    x, db, log_q = make_inputs(130, 5, 129, 65, dtype=torch.float32)
    pairs = make_pairs(130, 5)
    w = torch.rand(130, 5, device=DEV)
    res = torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 1.5, metric, True)
    cpu = _on_cpu(torch.ops.ccluster.cc_loss, x.cpu(), w.cpu(), pairs.cpu(), db.cpu(), log_q.cpu(), 1.5, metric, True)
    for name, a, b in zip(("loss", "logz", "dx"), res, cpu):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    loss, logz, dx = torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 1.5, metric, False)
    assert dx.numel() == 0
    assert_close(loss, res[0], atol=0.0)  # same kernel, same order: bitwise
    assert_close(logz, res[1], atol=0.0)


def test_cc_loss_empty_pairs_and_empty_inputs(backend):
    x, db, log_q = make_inputs(10, 3, 5, 4)
    none = torch.zeros(10, 3, dtype=torch.bool, device=DEV)
    loss, logz, dx = torch.ops.ccluster.cc_loss(x, torch.ones(10, 3, dtype=x.dtype, device=DEV), none, db,
                                                log_q, 1.0, "sqeuclidean", True)
    assert loss.item() == 0 and (logz == 0).all() and (dx == 0).all()
    x0, db0, lq0 = make_inputs(0, 3, 5, 4)
    loss, logz, dx = torch.ops.ccluster.cc_loss(x0, torch.ones(0, 3, dtype=x.dtype, device=DEV),
                                                torch.zeros(0, 3, dtype=torch.bool, device=DEV), db0, lq0, 1.0,
                                                "sqeuclidean", True)
    assert loss.item() == 0 and logz.shape == (0, 3) and dx.shape == (0, 4)


# ---------------------------------------------------------------------------------------------------
# fit_step


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
def test_fit_step_float64_vs_reference_and_cpu(shape, metric, backend):
    N, C, n, m = shape
    x, db, log_q = make_inputs(N, C, n, m)
    g = torch.Generator().manual_seed(4)
    weight = (torch.rand(N, C, generator=g, dtype=torch.float64) * (torch.rand(N, C, generator=g) < 0.6)).to(DEV)
    logz, log_eta = ops.fit_step(x, db, log_q, weight, 1.2, metric)
    rz, re = reference.fit_step(x, db, log_q, weight, 1.2, metric)
    assert_close(logz, rz, atol=1e-9, rtol=1e-9, msg="logz")
    assert_close(log_eta, re, atol=1e-9, rtol=1e-9, msg="log_eta")
    cz, ce = _on_cpu(torch.ops.ccluster.fit_step, x.cpu(), db.cpu(), log_q.cpu(), weight.cpu(), 1.2, metric)
    assert_close(logz, cz, atol=1e-9, rtol=1e-9)
    assert_close(log_eta, ce, atol=1e-9, rtol=1e-9)
    assert torch.isneginf(log_eta[torch.isneginf(log_q)]).all()


def test_fit_step_zero_slots_matches_cpu(backend):
    # n = 0: logz = -inf on the weighted pairs, 0 elsewhere; log_eta is [C, 0]
    x, db, log_q = make_inputs(6, 2, 0, 3, empty_slots=False)
    w = torch.rand(6, 2, dtype=x.dtype, device=DEV) * (torch.rand(6, 2, device=DEV) < 0.5)
    got = torch.ops.ccluster.fit_step(x, db, log_q, w, 1.0, "sqeuclidean")
    want = _on_cpu(torch.ops.ccluster.fit_step, x.cpu(), db.cpu(), log_q.cpu(), w.cpu(), 1.0, "sqeuclidean")
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert_close(a, b, atol=0.0)


def test_fit_step_deterministic_and_float32(backend):
    x, db, log_q = make_inputs(200, 3, 129, 40, dtype=torch.float32)
    weight = torch.rand(200, 3, device=DEV)
    a = torch.ops.ccluster.fit_step(x, db, log_q, weight, 1.0, "sqeuclidean")
    b = torch.ops.ccluster.fit_step(x, db, log_q, weight, 1.0, "sqeuclidean")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = _on_cpu(torch.ops.ccluster.fit_step, x.cpu(), db.cpu(), log_q.cpu(), weight.cpu(), 1.0, "sqeuclidean")
    assert_close(a[0], c[0], atol=2e-5, rtol=2e-5)
    assert_close(a[1], c[1], atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------------------------------------------
# Low precision: error against the float64 oracle at most ~2x plain PyTorch's in the same dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", METRICS)
def test_low_precision_rule(dtype, metric, backend):
    N, C, n, m = 256, 4, 200, 128
    x, db, log_q = make_inputs(N, C, n, m, dtype=dtype, empty_slots=False, scale=2.0)
    x64, db64, lq64 = x.double(), db.double(), log_q.double()  # the same (rounded) inputs, exact math
    pairs = make_pairs(N, C)
    alpha = 1.0
    floor = 1e-3

    def err(a, b):
        return (a.double() - b).abs().max().item()

    oracle = reference.exemplar_logsumexp(x64, db64, lq64, alpha, metric)
    fused = ops.exemplar_logsumexp(x, db, log_q, alpha, metric)
    plain = reference.exemplar_logsumexp(x, db, log_q, alpha, metric)
    assert fused.dtype == dtype
    assert err(fused, oracle) <= 2 * err(plain, oracle) + floor, (err(fused, oracle), err(plain, oracle))

    # gradients of the forward
    w = torch.randn(N, C, device=DEV, dtype=torch.float64)

    def grads(fn, args, cast):
        xs = [t.clone().requires_grad_() for t in args]
        (fn(*xs, alpha, metric).to(torch.float64) * w).sum().backward()
        return [t.grad for t in xs]

    g_or = grads(reference.exemplar_logsumexp, (x64, db64, lq64), None)
    g_fu = grads(ops.exemplar_logsumexp, (x, db, log_q), None)
    g_pl = grads(reference.exemplar_logsumexp, (x, db, log_q), None)
    for name, a, b, o in zip(("x", "db", "log_q"), g_fu, g_pl, g_or):
        scale = o.abs().max().item()
        assert err(a, o) <= 2 * err(b, o) + floor * max(scale, 1.0), (name, err(a, o), err(b, o))

    # the fused loss
    att = torch.rand(N, device=DEV, dtype=dtype)
    l_or = reference.convex_clustering_loss(x64, att.double(), pairs, db64, lq64, alpha, metric)
    l_fu = ops.convex_clustering_loss(x, att, pairs, db, log_q, alpha, metric)
    l_pl = reference.convex_clustering_loss(x, att, pairs, db, log_q, alpha, metric)
    rel = max(abs(l_or.item()), 1.0)
    assert err(l_fu, l_or) <= 2 * err(l_pl, l_or) + floor * rel

    # fit_step: the fused op against the oracle; plain PyTorch in low precision as the yardstick
    weight = torch.rand(N, C, device=DEV, dtype=dtype)
    oz, oe = reference.fit_step(x64, db64, lq64, weight.double(), alpha, metric)
    fz, fe = ops.fit_step(x, db, log_q, weight, alpha, metric)
    pz, pe = reference.fit_step(x, db, log_q, weight, alpha, metric)
    assert err(fz, oz) <= 2 * err(pz, oz) + floor
    assert err(fe, oe) <= 2 * err(pe, oe) + floor


# ---------------------------------------------------------------------------------------------------
# Errors: the same messages as the CPU ops


def test_error_messages(backend):
    x, db, log_q = make_inputs(4, 2, 3, 5)
    with pytest.raises(RuntimeError, match="exemplar_logsumexp: alpha must be a finite number > 0"):
        torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, -1.0, "sqeuclidean", None)
    with pytest.raises(RuntimeError, match="metric must be 'sqeuclidean' or 'euclidean'"):
        torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "cosine", None)
    with pytest.raises(RuntimeError, match="must be on one device"):
        torch.ops.ccluster.exemplar_logsumexp(x, db.cpu(), log_q, 1.0, "sqeuclidean", None)
    with pytest.raises(RuntimeError, match=r"pairs must be \[N, C\]"):
        torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean",
                                              torch.ones(3, 2, dtype=torch.bool, device=DEV))
    with pytest.raises(RuntimeError, match="convex_clustering_loss: attention must have x's dtype"):
        torch.ops.ccluster.cc_loss(x, torch.ones(4, 2, device=DEV), torch.ones(4, 2, dtype=torch.bool, device=DEV),
                                   db, log_q, 1.0, "sqeuclidean", False)
    with pytest.raises(RuntimeError, match="fit_step: weight must be"):
        torch.ops.ccluster.fit_step(x, db, log_q, torch.ones(4, 3, dtype=x.dtype, device=DEV), 1.0, "sqeuclidean")


# ---------------------------------------------------------------------------------------------------
# opcheck, streams, CUDA graphs


OPCHECK_CASES = ["lse_pairs", "lse_euclid", "lse_backward", "cc_loss", "cc_loss_grad_x", "fit_step"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck_cuda(case, backend):
    x, db, log_q = make_inputs(20, 3, 10, 6)
    pairs = make_pairs(20, 3)
    w = torch.rand(20, 3, dtype=x.dtype, device=DEV)
    xr = x.clone().requires_grad_()
    out = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", pairs)
    cases = {
        "lse_pairs": (torch.ops.ccluster.exemplar_logsumexp.default, (xr, db, log_q, 1.0, "sqeuclidean", pairs)),
        "lse_euclid": (torch.ops.ccluster.exemplar_logsumexp.default, (xr, db, log_q, 1.0, "euclidean", None)),
        "lse_backward": (torch.ops.ccluster.exemplar_logsumexp_backward.default,
                         (torch.ones_like(out), x, db, log_q, out, 1.0, "sqeuclidean", pairs, [True, True, True])),
        "cc_loss": (torch.ops.ccluster.cc_loss.default, (x, w, pairs, db, log_q, 1.0, "sqeuclidean", False)),
        "cc_loss_grad_x": (torch.ops.ccluster.cc_loss.default, (xr, w, pairs, db, log_q, 1.0, "sqeuclidean", True)),
        "fit_step": (torch.ops.ccluster.fit_step.default, (x, db, log_q, w, 1.0, "euclidean")),
    }
    op, args = cases[case]
    torch.library.opcheck(op, args)


def test_side_stream_matches_default_stream(backend):
    x, db, log_q = make_inputs(130, 3, 129, 65, dtype=torch.float32)
    pairs = make_pairs(130, 3)
    w = torch.rand(130, 3, device=DEV)
    want = (ops.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", pairs),
            torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 1.0, "sqeuclidean", False)[1],
            ops.fit_step(x, db, log_q, w, 1.0)[1])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = (ops.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", pairs),
               torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 1.0, "sqeuclidean", False)[1],
               ops.fit_step(x, db, log_q, w, 1.0)[1])
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph_cuda(backend):
    x, db, log_q = make_inputs(40, 3, 20, 8, dtype=torch.float32)
    pairs = make_pairs(40, 3)
    att = torch.rand(40, device=DEV)

    def f(x, att, db, log_q):
        return ops.convex_clustering_loss(x, att, pairs, db, log_q, 1.0) + \
            ops.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", pairs).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert_close(compiled(x, att, db, log_q), f(x, att, db, log_q), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------
# More units than the grid, the library path's chunk boundaries, tensor cores at odd m, float32 backward
# against the CPU, TF32 and centring, CUDA graphs in every dtype, deterministic mode, bounded memory


def _grad_all(fn, args, grad):
    xs = [t.detach().clone().requires_grad_() for t in args]
    out = fn(*xs)
    torch.autograd.backward(out, grad.to(out.dtype))
    return out.detach(), [t.grad for t in xs]


def test_more_units_than_the_grid(backend):
    # N = 4096, C = 20: 64 x 20 = 1280 (row block, class) units of the fused forward, more than the grid
    # keeps resident, so blocks take several units (top-of-unit barriers, state re-initialisation, scratch
    # reuse); the backward's 11 x 20 (class, chunk) units loop over 64 row blocks each.
    N, C, n, m = 4096, 20, 700, 40
    x, db, log_q = make_inputs(N, C, n, m, dtype=torch.float32)
    pairs = make_pairs(N, C)
    grad = torch.randn(N, C, device=DEV)
    for p in (None, pairs):
        fn = lambda a, b, c: ops.exemplar_logsumexp(a, b, c, 2.0, "sqeuclidean", p)  # noqa: E731
        out, g = _grad_all(fn, (x, db, log_q), grad)
        with ccluster.kernel_settings(backend="auto"):
            out_c, g_c = _grad_all(fn, (x.cpu(), db.cpu(), log_q.cpu()), grad.cpu())
        assert_close(out, out_c, atol=1e-4, rtol=1e-5)
        for name, a, b in zip(("x", "db", "log_q"), g, g_c):
            scale = float(b.abs().max())
            assert_close(a, b, atol=1e-4 * max(scale, 1.0), rtol=1e-4, msg=f"grad {name}")
    w = torch.rand(N, C, device=DEV)
    res = torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 2.0, "sqeuclidean", True)
    cpu = _on_cpu(torch.ops.ccluster.cc_loss, x.cpu(), w.cpu(), pairs.cpu(), db.cpu(), log_q.cpu(), 2.0,
                  "sqeuclidean", True)
    for name, a, b in zip(("loss", "logz", "dx"), res, cpu):
        assert_close(a, b, atol=1e-4 * max(float(b.abs().max()), 1.0), rtol=1e-4, msg=name)


@pytest.mark.parametrize("ws", [1 << 30, 6000, 300], ids=["one_piece", "class_groups", "slot_chunks"])
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask"])
@pytest.mark.parametrize("metric", METRICS)
def test_library_chunk_boundaries_float64(ws, gather, metric):
    N, C, n, m = 70, 4, 70, 33
    x, db, log_q = make_inputs(N, C, n, m)
    pairs = make_pairs(N, C)
    keep = nonempty_classes(log_q)
    g = torch.randn(N, C, dtype=torch.float64, device=DEV)
    with ccluster.kernel_settings(backend="library", workspace_bytes=ws, gather=gather):
        for p in (None, pairs):
            xs = [t.clone().requires_grad_() for t in (x, db, log_q)]
            out = ops.exemplar_logsumexp(*xs, 0.9, metric, p)
            (torch.where(torch.isfinite(out), out, torch.zeros_like(out)) * g).sum().backward()
            rs = [t.clone().requires_grad_() for t in (x, db[keep], log_q[keep])]
            ref = reference.exemplar_logsumexp(*rs, 0.9, metric, None if p is None else p[:, keep])
            (ref * g[:, keep]).sum().backward()
            assert_close(out[:, keep], ref, atol=1e-10, rtol=1e-10)
            for a, b in ((xs[0].grad, rs[0].grad), (xs[1].grad[keep], rs[1].grad), (xs[2].grad[keep], rs[2].grad)):
                assert_close(a, b, atol=1e-9, rtol=1e-8)
        att = torch.rand(N, dtype=torch.float64, device=DEV)
        xs = [t.clone().requires_grad_() for t in (x, att, db, log_q)]
        loss = ops.convex_clustering_loss(xs[0], xs[1], pairs, xs[2], xs[3], 0.9, metric)
        loss.backward()
        weight = att[:, None] * pairs
        z, eta = ops.fit_step(x, db, log_q, weight, 0.9, metric)
    rs = [t.clone().requires_grad_() for t in (x, att, db[keep], log_q[keep])]
    rloss = reference.convex_clustering_loss(rs[0], rs[1], pairs[:, keep], rs[2], rs[3], 0.9, metric)
    rloss.backward()
    assert_close(loss.detach(), rloss.detach(), atol=1e-9, rtol=1e-10)
    assert_close(xs[0].grad, rs[0].grad, atol=1e-9, rtol=1e-8)
    assert_close(xs[2].grad[keep], rs[2].grad, atol=1e-9, rtol=1e-8)
    rz, reta = reference.fit_step(x, db, log_q, weight, 0.9, metric)
    assert_close(z, rz, atol=1e-10, rtol=1e-10)
    assert_close(eta, reta, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [77, 130])  # not a multiple of 8 (scalar loads); 2 x 64 + 2 (partial K slice)
def test_tensor_core_odd_m_neg_inf_and_nan(dtype, m, backend):
    from conftest import assert_low_precision
    N, C, n = 150, 3, 90
    x, db, log_q = make_inputs(N, C, n, m, dtype=dtype, empty_slots=True, scale=2.0)
    alpha = 0.5
    out = ops.exemplar_logsumexp(x, db, log_q, alpha)
    oracle = reference.exemplar_logsumexp(x.double(), db.double(), log_q.double(), alpha)
    plain = reference.exemplar_logsumexp(x, db, log_q, alpha)
    assert torch.isneginf(out[:, 1]).all(), "a class without exemplars gives -inf"
    assert_low_precision(out.cpu(), plain.cpu(), oracle.cpu(), dtype, "value")
    grad = torch.randn(N, C, device=DEV, dtype=torch.float64)
    keep = nonempty_classes(log_q)
    _, g = _grad_all(lambda a, b, c: ops.exemplar_logsumexp(a, b, c, alpha)[:, keep], (x, db, log_q), grad[:, keep])
    _, g_o = _grad_all(lambda a, b, c: reference.exemplar_logsumexp(a, b[keep], c[keep], alpha),
                       (x.double(), db.double(), log_q.double()), grad[:, keep])
    _, g_p = _grad_all(lambda a, b, c: reference.exemplar_logsumexp(a, b[keep], c[keep], alpha),
                       (x, db, log_q), grad[:, keep])
    assert_low_precision(g[0].cpu(), g_p[0].cpu(), g_o[0].cpu(), dtype, "grad x")
    xn = x.clone()
    xn[5, 3] = math.nan
    outn = ops.exemplar_logsumexp(xn, db, log_q, alpha)
    assert torch.isnan(outn[5, [0, 2]]).all()
    others = torch.ones(N, dtype=torch.bool, device=DEV)
    others[5] = False
    assert torch.equal(outn[others], out[others]), "NaN in one row must not change the others"


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_pairs", [False, True])
def test_float32_backward_matches_cpu(metric, with_pairs, backend):
    x, db, log_q = make_inputs(130, 5, 129, 65, dtype=torch.float32)
    pairs = make_pairs(130, 5) if with_pairs else None
    logz = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.5, metric, pairs)
    grad = torch.randn(130, 5, device=DEV)
    res = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, logz, 1.5, metric, pairs, [True] * 3)
    cpu = _on_cpu(torch.ops.ccluster.exemplar_logsumexp_backward, grad.cpu(), x.cpu(), db.cpu(), log_q.cpu(),
                  logz.cpu(), 1.5, metric, None if pairs is None else pairs.cpu(), [True] * 3)
    for name, a, b in zip(("x", "db", "log_q"), res, cpu):
        assert a.dtype == torch.float32
        assert_close(a, b, atol=2e-5 * max(float(b.abs().max()), 1.0), rtol=1e-4, msg=f"grad {name}")


@pytest.mark.parametrize("tf32", [False, True], ids=["fp32", "tf32"])
@pytest.mark.parametrize("centring", ["auto", "on", "off"])
def test_tf32_and_centring_rule(tf32, centring):
    from conftest import assert_low_precision
    N, C, n, m = 300, 3, 200, 256
    x, db, log_q = make_inputs(N, C, n, m, dtype=torch.float32, empty_slots=False, scale=2.0)
    x, db = x + 1.0, db + 1.0  # an offset for centring to remove
    alpha = 2.0
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with ccluster.kernel_settings(backend="library", centring=centring):
            out = ops.exemplar_logsumexp(x, db, log_q, alpha)
            grad = torch.randn(N, C, device=DEV, dtype=torch.float64)
            _, g = _grad_all(lambda a, b, c: ops.exemplar_logsumexp(a, b, c, alpha), (x, db, log_q), grad)
        plain = reference.exemplar_logsumexp(x, db, log_q, alpha)
        _, g_p = _grad_all(lambda a, b, c: reference.exemplar_logsumexp(a, b, c, alpha), (x, db, log_q), grad)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    oracle = reference.exemplar_logsumexp(x.double(), db.double(), log_q.double(), alpha)
    _, g_o = _grad_all(lambda a, b, c: reference.exemplar_logsumexp(a, b, c, alpha),
                       (x.double(), db.double(), log_q.double()), grad)
    assert_low_precision(out.cpu(), plain.cpu(), oracle.cpu(), torch.float32, f"value tf32={tf32}")
    for name, a, b, c in zip(("x", "db", "log_q"), g, g_p, g_o):
        assert_low_precision(a.cpu(), b.cpu(), c.cpu(), torch.float32, f"grad {name} tf32={tf32}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype, backend):
    x, db, log_q = make_inputs(130, 3, 129, 65, dtype=dtype)
    pairs = make_pairs(130, 3)
    w = torch.rand(130, 3, device=DEV, dtype=dtype)
    grad = torch.randn(130, 3, device=DEV, dtype=dtype)

    def step():
        out = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "euclidean", pairs)
        gx, gdb, glq = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, out, 1.0, "euclidean",
                                                                      pairs, [True, True, True])
        loss, logz, dx = torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 1.0, "sqeuclidean", True)
        z, eta = torch.ops.ccluster.fit_step(x, db, log_q, w, 1.0, "sqeuclidean")
        return out, gx, gdb, glq, loss, logz, dx, z, eta

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture, as the CUDA graphs docs ask
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step()
    with torch.no_grad():
        x.add_(0.01)  # new inputs in place; the replay must see them
    eager = step()
    graph.replay()
    torch.cuda.synchronize()
    tol = 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(static, eager):
        assert_close(a.float(), b.float(), atol=tol * max(float(b.abs().max()), 1.0), rtol=tol)


def test_deterministic_mode():
    x, db, log_q = make_inputs(130, 4, 129, 65, dtype=torch.float32)
    pairs = make_pairs(130, 4)  # row 0 is in every class: order-dependent atomics in the fused kernels
    w = torch.rand(130, 4, device=DEV)
    grad = torch.randn(130, 4, device=DEV)
    torch.use_deterministic_algorithms(True)
    try:
        with ccluster.kernel_settings(backend="fused"):
            out = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", pairs)
            with pytest.raises(RuntimeError, match=r"ccluster::exemplar_logsumexp_backward \(fused CUDA kernel"):
                torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, out, 1.0, "sqeuclidean", pairs,
                                                               [True, False, False])
            with pytest.raises(RuntimeError, match=r"ccluster::cc_loss \(fused CUDA kernel"):
                torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 1.0, "sqeuclidean", True)
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (":4096:8", ":16:8"):
            pytest.skip("the library path's cuBLAS GEMMs need CUBLAS_WORKSPACE_CONFIG=:4096:8 in deterministic "
                        "mode (benchmarks/gpu_check.sh sets it)")

        def run():
            with ccluster.kernel_settings(backend="library", workspace_bytes=20000):
                out = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", pairs)
                back = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, out, 1.0, "sqeuclidean",
                                                                      pairs, [True, True, True])
                loss = torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 1.0, "sqeuclidean", True)
                fit = torch.ops.ccluster.fit_step(x, db, log_q, w, 1.0, "sqeuclidean")
            return (out, *back, *loss, *fit)

        for a, b in zip(run(), run()):
            assert torch.equal(a, b), "the library path must give the same bits run after run"
    finally:
        torch.use_deterministic_algorithms(False)


def test_library_memory_is_bounded_by_the_workspace():
    N, C, n, m = 4096, 20, 700, 40
    x, db, log_q = make_inputs(N, C, n, m, dtype=torch.float32)
    ws = 1 << 20
    with ccluster.kernel_settings(backend="library", workspace_bytes=ws):
        ops.exemplar_logsumexp(x, db, log_q, 1.0)  # warm-up (cuBLAS handles and workspaces)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = ops.exemplar_logsumexp(x, db, log_q, 1.0)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    allowed = ws + 4 * (N * C) * 4 + 4 * (C * n + C * m) * 4 + (2 << 20)
    assert peak <= allowed, f"peak extra {peak} bytes > workspace + O(N C) = {allowed}"
    assert peak < N * C * n * 4 / 8, "never an N x C x n buffer"
    assert out.shape == (N, C)
