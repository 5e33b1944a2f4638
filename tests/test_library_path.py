"""The library-GEMM path (csrc/library) run on CPU against the float64 oracle (ccluster.reference).

On CUDA this path is the default; on CPU it runs when ``ccluster.kernel_settings(backend="library")``
says so. Everything here but the CUDA epilogue kernels is the same code on both devices: the chunking
of rows and slots into the workspace, the class groups, the gathers of label-sparse pairs, the
log-sum-exp merge across slot chunks, the two-pass fallbacks, centring and the 16-bit GEMM operands.
Tiny workspaces force many chunks; each test checks that the work was really split.
"""
from __future__ import annotations

import itertools
import math
import subprocess
import sys

import pytest
import torch

import ccluster
from ccluster import reference
from conftest import (NEG_INF, assert_close64, assert_low_precision, make_inputs, random_like,
                      random_mask)

pytestmark = pytest.mark.usefixtures("compiled_ops", "thread_policy")

ALPHA = 0.7
# (N, C, n, m): odd sizes, size-1 dimensions
SHAPES = [(37, 4, 23, 9), (1, 1, 1, 1), (6, 1, 9, 3), (4, 3, 1, 5), (7, 2, 6, 1), (50, 3, 70, 4)]
# workspace sizes: everything in one piece; class groups of a few rows; slot chunks (two-pass paths)
WORKSPACES = {"large": 1 << 30, "groups": 6000, "slots": 300}


def _pieces() -> int:
    from ccluster import _C
    return _C._get_setting("pieces")


def library(**kw):
    return ccluster.kernel_settings(backend="library", **kw)


def _nonempty(log_q):
    return torch.isfinite(log_q).any(-1).nonzero().squeeze(1)


def _on(device, *tensors):
    return tuple(t.to(device) for t in tensors)


def _with_empty(x, db, log_q):
    """An empty slot in every class and, with 3+ classes, one class without any."""
    log_q = log_q.clone()
    if log_q.shape[1] > 1:
        log_q[:, -1] = NEG_INF
    if log_q.shape[0] >= 3:
        log_q[1] = NEG_INF
    return x, db, log_q


# ---------------------------------------------------------------------------------------------------
# Settings


def test_settings_roundtrip_and_context_restores():
    before = ccluster.get_kernel_settings()
    assert before["backend"] == "auto" and before["workspace_bytes"] == 256 << 20
    with ccluster.kernel_settings(backend="library", workspace_bytes=4096, centring="on", plan="packed",
                                  check_values="deferred") as s:
        assert s == {"backend": "library", "workspace_bytes": 4096, "centring": "on", "plan": "packed",
                     "check_values": "deferred"}
    assert ccluster.get_kernel_settings() == before
    with ccluster.kernel_settings(gather=False) as s:  # the earlier name of plan
        assert s["plan"] == "dense"
    with ccluster.kernel_settings(gather=True) as s:
        assert s["plan"] == "auto"
    assert ccluster.get_kernel_settings() == before


@pytest.mark.parametrize("kw, match", [
    ({"backend": "cuda"}, r"set_kernel_settings: backend must be one of \('auto', 'library', 'fused'\), got 'cuda'"),
    ({"centring": True}, "set_kernel_settings: centring must be one of"),
    ({"workspace_bytes": 0}, "set_kernel_settings: workspace_bytes must be an int > 0, got 0"),
    ({"workspace_bytes": 1.5}, "set_kernel_settings: workspace_bytes must be an int > 0"),
    ({"gather": 1}, "set_kernel_settings: gather must be a bool, got 1"),
    ({"plan": "sparse"}, r"set_kernel_settings: plan must be one of \('auto', 'dense', 'packed'\), got 'sparse'"),
    ({"check_values": False}, r"set_kernel_settings: check_values must be one of \('auto', 'eager', 'deferred'\)"),
    ({"plan": "dense", "gather": True}, "set_kernel_settings: give plan or its earlier name gather, not both"),
])
def test_settings_errors(kw, match):
    before = ccluster.get_kernel_settings()
    with pytest.raises(ValueError, match=match):
        ccluster.set_kernel_settings(**kw)
    assert ccluster.get_kernel_settings() == before


def test_settings_from_environment():
    code = ("import ccluster; s = ccluster.get_kernel_settings(); "
            "print(s['backend'], s['workspace_bytes'], s['plan'], s['check_values'])")
    env = {"CCLUSTER_BACKEND": "library", "CCLUSTER_WORKSPACE_BYTES": "12345", "CCLUSTER_PLAN": "packed",
           "CCLUSTER_CHECK_VALUES": "eager", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["library", "12345", "packed", "eager"]


def test_auto_backend_on_cpu_is_the_fused_kernels():
    x, db, log_q = make_inputs(9, 2, 5, 3)
    start = _pieces()
    ccluster.exemplar_logsumexp(x, db, log_q, ALPHA)
    assert _pieces() == start, "auto on CPU must run the fused CPU kernels"
    with library():
        ccluster.exemplar_logsumexp(x, db, log_q, ALPHA)
    assert _pieces() > start


# ---------------------------------------------------------------------------------------------------
# exemplar_logsumexp: values and gradients in float64


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("ws", list(WORKSPACES), ids=str)
@pytest.mark.parametrize("mode", ["dense", "pairs", "pairs_masked"])
def test_lse_forward_backward_float64(shape, metric, ws, mode, device):
    N, C, n, m = shape
    x, db, log_q = _on(device, *_with_empty(*make_inputs(N, C, n, m, seed=sum(shape))))
    pairs = random_mask(N, C, 0.6, seed=N, device=device) if mode != "dense" else None
    keep = _nonempty(log_q)
    args = [t.clone().requires_grad_() for t in (x, db, log_q)]
    w = random_like(torch.empty(N, C, dtype=torch.float64, device=device), seed=3)
    start = _pieces()
    with library(workspace_bytes=WORKSPACES[ws], plan="dense" if mode == "pairs_masked" else "packed"):
        out = ccluster.exemplar_logsumexp(*args, ALPHA, metric, pairs)
        (torch.where(torch.isfinite(out), out, torch.zeros_like(out)) * w).sum().backward()
    pieces = _pieces() - start
    if ws == "slots" and n >= 23:
        assert pieces >= 4, f"a 300-byte workspace must split the work, got {pieces} pieces"
    ref_args = [t.clone().requires_grad_() for t in (x, db[keep], log_q[keep])]
    ref = reference.exemplar_logsumexp(*ref_args, ALPHA, metric, None if pairs is None else pairs[:, keep])
    (ref * w[:, keep]).sum().backward()
    assert out.dtype == torch.float64
    assert_close64(out[:, keep], ref, msg="value")
    empty = [c for c in range(C) if c not in keep.tolist()]
    if empty:
        want = torch.full((N, len(empty)), NEG_INF, dtype=out.dtype, device=device)
        if pairs is not None:
            want = torch.where(pairs[:, empty], want, torch.zeros_like(want))
        assert torch.equal(out[:, empty], want), "an empty class must give -inf (0 outside the pairs), never NaN"
        assert (args[1].grad[empty] == 0).all() and (args[2].grad[empty] == 0).all()
    if pairs is not None:
        assert (out[~pairs] == 0).all(), "entries outside the pairs must be exactly 0"
    for name, a, b in (("x", args[0].grad, ref_args[0].grad), ("db", args[1].grad[keep], ref_args[1].grad),
                       ("log_q", args[2].grad[keep], ref_args[2].grad)):
        assert_close64(a, b, msg=f"grad {name}")


@pytest.mark.parametrize("mask", [[True, False, False], [False, True, False], [False, False, True]],
                         ids=["x", "db", "lq"])
def test_backward_output_mask_matches_fused_cpu(metric, mask):
    x, db, log_q = make_inputs(41, 3, 19, 5, seed=2)
    pairs = random_mask(41, 3, 0.5, seed=4)
    logz = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, ALPHA, metric, pairs)
    grad = random_like(logz)
    fused = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, logz, ALPHA, metric, pairs, mask)
    with library(workspace_bytes=2000):
        lib = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, logz, ALPHA, metric, pairs, mask)
    for want, a, b in zip(mask, lib, fused):
        assert a.shape == b.shape
        if want:
            assert_close64(a, b)


def test_euclidean_gradient_at_zero_distance_is_zero():
    x, db, log_q = make_inputs(3, 2, 4, 3, seed=5)
    db[0, 1] = x[0]  # d = 0 between x_0 and one exemplar
    xs = x.clone().requires_grad_()
    with library(workspace_bytes=400):
        out = ccluster.exemplar_logsumexp(xs, db, log_q, ALPHA, "euclidean")
        out.sum().backward()
    ref_x = x.clone().requires_grad_()
    reference.exemplar_logsumexp(ref_x, db, log_q, ALPHA, "euclidean").sum().backward()
    assert torch.isfinite(xs.grad).all()
    assert_close64(xs.grad, ref_x.grad)


# ---------------------------------------------------------------------------------------------------
# convex_clustering_loss and fit_step in float64


def _loss_problem(N, C, n, m, seed):
    x, db, log_q = _with_empty(*make_inputs(N, C, n, m, seed=seed))
    pairs = random_mask(N, C, 0.5, seed=seed + 1)
    if N >= 2 and C >= 3:
        pairs[0] = True   # a row in every class (several classes add into one row of dL/dx)
        pairs[1] = False  # a row in none
    return x, db, log_q, pairs


@pytest.mark.parametrize("shape", [(37, 4, 23, 9), (1, 1, 1, 1), (50, 3, 70, 4)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("ws", list(WORKSPACES), ids=str)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask"])
@pytest.mark.parametrize("attention_dim", [1, 2])
def test_cc_loss_float64(shape, metric, ws, gather, attention_dim, device):
    N, C, n, m = shape
    x, db, log_q, pairs = _on(device, *_loss_problem(N, C, n, m, seed=sum(shape)))
    g = torch.Generator().manual_seed(3)
    att = torch.rand((N,) if attention_dim == 1 else (N, C), generator=g, dtype=torch.float64).to(device)
    keep = _nonempty(log_q)
    args = [t.clone().requires_grad_() for t in (x, att, db, log_q)]
    with library(workspace_bytes=WORKSPACES[ws], plan="packed" if gather else "dense"):
        loss = ccluster.convex_clustering_loss(args[0], args[1], pairs, args[2], args[3], ALPHA, metric)
        loss.backward()
    ratt = att if attention_dim == 1 else att[:, keep]
    rargs = [t.clone().requires_grad_() for t in (x, ratt, db[keep], log_q[keep])]
    rloss = reference.convex_clustering_loss(rargs[0], rargs[1], pairs[:, keep], rargs[2], rargs[3], ALPHA, metric)
    rloss.backward()
    assert_close64(loss, rloss, msg="loss")
    assert_close64(args[0].grad, rargs[0].grad, msg="grad x")
    ga = args[1].grad if attention_dim == 1 else args[1].grad[:, keep]
    assert_close64(ga, rargs[1].grad, msg="grad attention")
    assert_close64(args[2].grad[keep], rargs[2].grad, msg="grad db")
    assert_close64(args[3].grad[keep], rargs[3].grad, msg="grad log_q")


def test_cc_loss_op_matches_fused_cpu_kernel(metric):
    x, db, log_q, pairs = _loss_problem(60, 5, 33, 7, seed=8)
    w = torch.rand(60, 5, dtype=torch.float64)
    fused = torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, ALPHA, metric, True)
    for ws in WORKSPACES.values():
        with library(workspace_bytes=ws):
            lib = torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, ALPHA, metric, True)
        for name, a, b in zip(("loss", "logz", "dx"), lib, fused):
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert_close64(a, b, msg=name)


@pytest.mark.parametrize("shape", [(37, 4, 23, 9), (1, 1, 1, 1), (50, 3, 70, 4), (9, 2, 1, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("ws", list(WORKSPACES), ids=str)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask"])
def test_fit_step_float64(shape, metric, ws, gather, device):
    N, C, n, m = shape
    x, db, log_q = _on(device, *_with_empty(*make_inputs(N, C, n, m, seed=sum(shape) + 1)))
    g = torch.Generator().manual_seed(4)
    weight = (torch.rand(N, C, generator=g, dtype=torch.float64) * (torch.rand(N, C, generator=g) < 0.6)).to(device)
    with library(workspace_bytes=WORKSPACES[ws], plan="packed" if gather else "dense"):
        logz, log_eta = ccluster.fit_step(x, db, log_q, weight, ALPHA, metric)
    rz, re = reference.fit_step(x, db, log_q, weight, ALPHA, metric)
    assert_close64(logz, rz, msg="logz")
    assert_close64(log_eta, re, msg="log_eta")
    assert torch.isneginf(log_eta[torch.isneginf(log_q)]).all()
    assert not torch.isnan(log_eta).any() and not torch.isnan(logz).any()


def test_fit_representativeness_library_matches_fused():
    x, db, log_q = make_inputs(80, 3, 12, 4, seed=6)
    weight = torch.rand(80, 3, dtype=torch.float64) * random_mask(80, 3, 0.7, seed=2)
    fused = ccluster.fit_representativeness(x, db, weight, ALPHA, tol=1e-8, cache=False, accelerate=False)
    with library(workspace_bytes=900):
        lib = ccluster.fit_representativeness(x, db, weight, ALPHA, tol=1e-8, cache=False, accelerate=False)
    assert torch.equal(fused.n_iter, lib.n_iter)
    assert_close64(lib.log_q, fused.log_q, rtol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Edge cases: empty dimensions, NaN, alpha * d ~ 1e4, non-contiguous inputs


@pytest.mark.parametrize("shape", [(0, 3, 4, 5), (4, 0, 4, 5), (4, 3, 0, 5), (4, 3, 5, 0), (0, 0, 0, 0)],
                         ids=lambda s: "x".join(map(str, s)))
def test_empty_dimensions_match_fused(shape, device):
    N, C, n, m = shape
    x, db, log_q = make_inputs(N, C, n, m, device=device)
    pairs = random_mask(N, C, 0.5, seed=1, device=device)
    w = torch.rand(N, C, dtype=torch.float64, device=device) * pairs
    grad = torch.ones(N, C, dtype=torch.float64, device=device)
    calls = [
        lambda: (torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", None),),
        lambda: (torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean", pairs),),
        lambda: torch.ops.ccluster.exemplar_logsumexp_backward(
            grad, x, db, log_q, torch.zeros(N, C, dtype=torch.float64, device=device), 1.0, "sqeuclidean", None,
            [True] * 3),
        lambda: torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 1.0, "sqeuclidean", True),
        lambda: torch.ops.ccluster.fit_step(x, db, log_q, w, 1.0, "sqeuclidean"),
    ]
    for call in calls:
        with ccluster.kernel_settings(backend="fused" if device.type == "cpu" else "library"):
            fused = call()  # on a GPU: the library path with its default workspace
        with library(workspace_bytes=300):
            lib = call()
        for a, b in zip(lib, fused):
            assert a.shape == b.shape and a.dtype == b.dtype
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # m = 0: values of a few ulps


def test_nan_propagates_to_its_row_and_class_only():
    x, db, log_q = make_inputs(20, 3, 9, 4, seed=3)
    x[3, 0] = math.nan
    log_q[2, 4] = math.nan
    with library(workspace_bytes=500):
        out = ccluster.exemplar_logsumexp(x, db, log_q, ALPHA)
        z, _ = ccluster.fit_step(x, db, log_q, torch.ones(20, 3, dtype=x.dtype), ALPHA)
    for o in (out, z):
        assert torch.isnan(o[3]).all(), "NaN in x must reach its row"
        assert torch.isnan(o[:, 2]).all(), "NaN in log_q must reach its class"
        rest = torch.ones_like(o, dtype=torch.bool)
        rest[3] = False
        rest[:, 2] = False
        assert not torch.isnan(o[rest]).any(), "NaN must not spread to other rows or classes"


UNPAIRED = [1, 6, 20]   # rows with no pair


def _lse_grads_library(x, db, log_q, metric, pairs, grad, **kw):
    args = [t.clone().requires_grad_() for t in (x, db, log_q)]
    with library(**kw):
        out = ccluster.exemplar_logsumexp(*args, ALPHA, metric, pairs)
        return (out.detach(), *torch.autograd.grad(out, args, grad))


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("ws", ["large", "slots"], ids=str)
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask"])
@pytest.mark.parametrize("centring", ["off", "on"])
def test_rows_outside_the_pairs_get_exactly_zero_gradient(metric, bad, ws, gather, centring, device):
    # README: with pairs, the other entries are 0 and get no gradient. NaN or inf in a row with no pair
    # gives that row exactly 0 gradient and reaches neither grad_db nor grad_log_q: the row term
    # rowsum(W) x is applied only where rowsum(W) != 0 (0 * NaN = NaN), and without gathering ("mask")
    # such rows enter the W^T X GEMM as zeros.
    N, C, n, m = 37, 3, 23, 5
    x, db, log_q = make_inputs(N, C, n, m, seed=12, device=device)
    pairs = random_mask(N, C, 0.5, seed=2, device=device)
    pairs[UNPAIRED] = False
    grad = random_like(torch.empty(N, C, dtype=torch.float64, device=device), seed=7)
    kw = dict(workspace_bytes=WORKSPACES[ws], plan="packed" if gather else "dense", centring=centring)
    clean = _lse_grads_library(x, db, log_q, metric, pairs, grad, **kw)
    xb = x.clone()
    xb[1, 0] = bad
    xb[6] = bad
    xb[20, 4] = -bad
    got = _lse_grads_library(xb, db, log_q, metric, pairs, grad, **kw)
    assert torch.equal(got[1][UNPAIRED], torch.zeros(len(UNPAIRED), m, dtype=torch.float64, device=device))
    for name, a, b in zip(("value", "grad x", "grad db", "grad log_q"), got, clean):
        assert torch.isfinite(a).all(), f"{name}: NaN or inf from a row outside the pairs"
        assert_close64(a, b, rtol=1e-13, msg=name)
    # and the fused kernels give the same
    args = [t.clone().requires_grad_() for t in (xb, db, log_q)]
    with ccluster.kernel_settings(backend="fused"):
        out = ccluster.exemplar_logsumexp(*args, ALPHA, metric, pairs)
    for name, a, b in zip(("grad x", "grad db", "grad log_q"), got[1:], torch.autograd.grad(out, args, grad)):
        assert_close64(a, b, msg=name)


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask"])
def test_nan_in_a_paired_row_reaches_its_gradient(metric, gather):
    # NaN in x still reaches its row of grad_x, and the columns of the class it is paired with. Without
    # gathering, one W^T X GEMM serves a group of classes, so that row (with a gradient: the loss is NaN
    # then) also reaches grad_db of the other classes of its group; grad_log_q stays per class.
    N, C, n, m = 30, 3, 20, 4
    x, db, log_q = make_inputs(N, C, n, m, seed=9)
    pairs = random_mask(N, C, 0.5, seed=3)
    pairs[4] = torch.tensor([False, True, False])
    grad = random_like(torch.empty(N, C, dtype=torch.float64), seed=5)
    kw = dict(workspace_bytes=WORKSPACES["slots"], plan="packed" if gather else "dense")
    clean = _lse_grads_library(x, db, log_q, metric, pairs, grad, **kw)
    xb = x.clone()
    xb[4, 2] = math.nan
    out, gx, gdb, glq = _lse_grads_library(xb, db, log_q, metric, pairs, grad, **kw)
    assert out[4, 1].isnan() and out[4, 0] == 0 and out[4, 2] == 0
    assert gx[4].isnan().all()
    rest = [s for s in range(N) if s != 4]
    assert_close64(gx[rest], clean[1][rest], rtol=1e-13)
    assert gdb[1].isnan().all() and glq[1].isnan().all()
    for c in (0, 2):
        if gather:
            assert_close64(gdb[c], clean[2][c], rtol=1e-13)
        assert_close64(glq[c], clean[3][c], rtol=1e-13)


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "mask"])
def test_cc_loss_rows_outside_the_pairs_get_exactly_zero_gradient(metric, gather):
    x, db, log_q = make_inputs(37, 3, 23, 5, seed=13)
    pairs = random_mask(37, 3, 0.5, seed=4)
    pairs[UNPAIRED] = False
    att = torch.rand(37, dtype=torch.float64)
    xb = x.clone()
    xb[1, 0] = math.nan
    xb[6] = math.inf
    grads = []
    for xv in (x, xb):
        args = [t.clone().requires_grad_() for t in (xv, db, log_q)]
        with library(workspace_bytes=WORKSPACES["slots"], plan="packed" if gather else "dense"):
            loss = ccluster.convex_clustering_loss(args[0], att, pairs, args[1], args[2], ALPHA, metric)
            grads.append((loss.detach(), *torch.autograd.grad(loss, args)))
    assert torch.equal(grads[1][1][UNPAIRED], torch.zeros(len(UNPAIRED), 5, dtype=torch.float64))
    for name, a, b in zip(("loss", "grad x", "grad db", "grad log_q"), grads[1], grads[0]):
        assert torch.isfinite(a).all(), name
        assert_close64(a, b, rtol=1e-13, msg=name)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_alpha_d_is_exact(metric, dtype, device):
    # alpha * d ~ 1e4: log(sum(q exp(-alpha d))) underflows to -inf (and NaN gradients) in float32 and
    # float64; the op is finite and exact.
    x, db, log_q = make_inputs(40, 2, 30, 8, seed=7, spread=10.0, device=device)
    d = ((x[:, None, None, :] - db[None]) ** 2).sum(-1)
    alpha = 1e4 / float(d.mean() if metric == "sqeuclidean" else d.sqrt().mean())
    xd, dbd, lqd = (t.to(dtype) for t in (x, db, log_q))
    xg = xd.clone().requires_grad_()
    with library(workspace_bytes=3000):
        out = ccluster.exemplar_logsumexp(xg, dbd, lqd, alpha, metric)
        out.sum().backward()
    assert torch.isfinite(out).all() and out.abs().max() > 1e3
    assert torch.isfinite(xg.grad).all()
    xo = xd.double().requires_grad_()
    ref = reference.exemplar_logsumexp(xo, dbd.double(), lqd.double(), alpha, metric)
    ref.sum().backward()
    if dtype == torch.float64:
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=0.0)
        assert_close64(xg.grad, xo.grad, rtol=1e-9)
    else:  # |x|^2 + |y|^2 - 2 x.y at alpha |x|^2 ~ 1e4 costs float32 a few ulps of 1e4: plain PyTorch's too
        plain = reference.exemplar_logsumexp(xd, dbd, lqd, alpha, metric)
        assert_low_precision(out.detach(), plain.detach(), ref.detach(), dtype, "value")
        torch.testing.assert_close(out.double(), ref, rtol=4e-6, atol=0.0)


def test_noncontiguous_inputs(device):
    x, db, log_q = make_inputs(30, 3, 11, 6, seed=9, device=device)
    pairs = random_mask(30, 3, 0.5, seed=9, device=device)
    w = torch.rand(30, 3, dtype=torch.float64, device=device) * pairs
    xt = x.t().contiguous().t()
    dbs = torch.stack([db, db], dim=-1)[..., 0]
    lqt = log_q.t().contiguous().t()
    pt = pairs.t().contiguous().t()
    wt = w.t().contiguous().t()
    assert not any(t.is_contiguous() for t in (xt, dbs, lqt, pt, wt))
    for ws in WORKSPACES.values():
        with library(workspace_bytes=ws):
            assert_close64(ccluster.exemplar_logsumexp(xt, dbs, lqt, ALPHA, "sqeuclidean", pt),
                           reference.exemplar_logsumexp(x, db, log_q, ALPHA, "sqeuclidean", pairs))
            for a, b in zip(ccluster.fit_step(xt, dbs, lqt, wt, ALPHA), reference.fit_step(x, db, log_q, w, ALPHA)):
                assert_close64(a, b)
            assert_close64(ccluster.convex_clustering_loss(xt, wt, pt, dbs, lqt, ALPHA),
                           reference.convex_clustering_loss(x, w, pairs, db, log_q, ALPHA))


@pytest.mark.parametrize("plan", ["dense", "packed"])
def test_deterministic_bitwise(plan, device):
    x, db, log_q, pairs = _on(device, *_loss_problem(70, 4, 40, 6, seed=1))
    w = torch.rand(70, 4, dtype=torch.float32, device=device)
    args = [t.float() for t in (x, db, log_q)]

    def run():
        with library(workspace_bytes=2000, plan=plan):
            logz = torch.ops.ccluster.exemplar_logsumexp(*args, ALPHA, "euclidean", pairs)
            back = torch.ops.ccluster.exemplar_logsumexp_backward(torch.ones_like(logz), *args, logz, ALPHA,
                                                                  "euclidean", pairs, [True] * 3)
            loss = torch.ops.ccluster.cc_loss(args[0], w, pairs, args[1], args[2], ALPHA, "sqeuclidean", True)
            fit = torch.ops.ccluster.fit_step(*args, w, ALPHA, "sqeuclidean")
        return (logz, *back, *loss, *fit)

    for a, b in zip(run(), run()):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------
# Low precision: at most ~2x plain PyTorch's error in the same dtype (conftest.assert_low_precision)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("centring", ["off", "on"])
@pytest.mark.parametrize("ws", ["large", "slots"])
def test_low_precision_rule(dtype, metric, centring, ws, device):
    # features offset from the origin: centring has something to remove
    x64, db64, lq64 = make_inputs(45, 3, 26, 16, seed=11, device=device)
    x64, db64 = x64 + 3.0, db64 + 3.0
    x, db, log_q = (t.to(dtype) for t in (x64, db64, lq64))
    alpha = 0.05
    grad = random_like(torch.empty(45, 3, dtype=torch.float64, device=device), seed=2)
    xs = [t.clone().requires_grad_() for t in (x, db, log_q)]
    with library(workspace_bytes=WORKSPACES[ws], centring=centring):
        out = ccluster.exemplar_logsumexp(*xs, alpha, metric)
        logz = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, alpha, metric, None)
        torch.autograd.backward(out, grad.to(dtype))
    assert out.dtype == dtype
    assert logz.dtype == torch.float32, "logz must stay in float32 for every input dtype"
    xo = [t.detach().double().requires_grad_() for t in (x, db, log_q)]
    oracle = reference.exemplar_logsumexp(*xo, alpha, metric)
    torch.autograd.backward(oracle, grad)
    xp = [t.detach().clone().requires_grad_() for t in (x, db, log_q)]
    plain = reference.exemplar_logsumexp(*xp, alpha, metric)
    torch.autograd.backward(plain, grad.to(dtype))
    assert_low_precision(logz, plain.detach(), oracle.detach(), dtype, "logz (float32)")
    for name, a, b, c in zip(("x", "db", "log_q"), xs, xp, xo):
        assert a.grad.dtype == dtype
        assert_low_precision(a.grad, b.grad, c.grad, dtype, f"grad {name}")
    # the fused loss and the fit in the same precision
    pairs = random_mask(45, 3, 0.5, seed=5, device=device)
    att = torch.rand(45, dtype=torch.float64, device=device)
    with library(workspace_bytes=WORKSPACES[ws], centring=centring):
        l_lib = ccluster.convex_clustering_loss(x, att.to(dtype), pairs, db, log_q, alpha, metric)
        f_lib = ccluster.fit_step(x, db, log_q, (att[:, None] * pairs).to(dtype), alpha, metric)
    l_or = reference.convex_clustering_loss(*(t.double() for t in (x, att.to(dtype))), pairs, db.double(),
                                            log_q.double(), alpha, metric)
    l_pl = reference.convex_clustering_loss(x, att.to(dtype), pairs, db, log_q, alpha, metric)
    assert_low_precision(l_lib.reshape(1), l_pl.reshape(1), l_or.reshape(1), dtype, "loss")
    w = (att[:, None] * pairs).to(dtype)
    f_or = reference.fit_step(x.double(), db.double(), log_q.double(), w.double(), alpha, metric)
    f_pl = reference.fit_step(x, db, log_q, w, alpha, metric)
    for name, a, b, c in zip(("logz", "log_eta"), f_lib, f_pl, f_or):
        assert_low_precision(a, b, c, dtype, f"fit {name}")


def test_centring_does_not_change_float64_results():
    x, db, log_q = make_inputs(33, 3, 17, 5, seed=12)
    x, db = x + 5.0, db + 5.0
    outs = []
    for centring in ("off", "on"):
        with library(workspace_bytes=2500, centring=centring):
            outs.append(ccluster.exemplar_logsumexp(x, db, log_q, ALPHA, "euclidean"))
    assert_close64(outs[1], outs[0])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_inputs_are_not_modified(dtype):
    x, db, log_q, pairs = _loss_problem(30, 3, 12, 5, seed=17)
    x, db, log_q = (t.to(dtype) for t in (x, db, log_q))
    w = torch.rand(30, 3, dtype=dtype) * pairs
    copies = [t.clone() for t in (x, db, log_q, w, pairs)]
    for centring, ws in itertools.product(("on", "off"), (1 << 30, 500)):
        with library(centring=centring, workspace_bytes=ws):
            xs, dbs, lqs = (t.requires_grad_() for t in (x, db, log_q))
            ccluster.exemplar_logsumexp(xs, dbs, lqs, ALPHA, "sqeuclidean", pairs).sum().backward()
            ccluster.convex_clustering_loss(xs, w, pairs, dbs, lqs, ALPHA).backward()
            ccluster.fit_step(x.detach(), db.detach(), log_q.detach(), w, ALPHA)
        x, db, log_q = (t.detach() for t in (xs, dbs, lqs))
        for a, b in zip((x, db, log_q, w, pairs), copies):
            assert torch.equal(a, b), "an op modified its input"


def test_bfloat16_backward_uses_float32_logz():
    # the gradient is exp(s - logz): a logz rounded to bfloat16 (error ~ |logz| 2^-9) would put it off by
    # several percent at |logz| ~ 20; the saved float32 logz keeps it at float32 accuracy of p
    x64, db64, lq64 = make_inputs(16, 2, 12, 8, seed=13)
    x, db, log_q = (t.to(torch.bfloat16) for t in (x64, db64, lq64))
    alpha = 4.0  # |logz| of a few tens
    xs = x.clone().requires_grad_()
    with library():
        out = ccluster.exemplar_logsumexp(xs, db, log_q, alpha)
        out.float().sum().backward()
    xo = x.double().requires_grad_()
    ref = reference.exemplar_logsumexp(xo, db.double(), log_q.double(), alpha)
    ref.sum().backward()
    assert ref.abs().max() > 10
    rel = ((xs.grad.double() - xo.grad).abs().max() / xo.grad.abs().max()).item()
    assert rel < 2 ** -7, f"relative gradient error {rel:.3g}: bfloat16 output rounding only, not logz rounding"


# ---------------------------------------------------------------------------------------------------
# opcheck and torch.compile on the library path


@pytest.mark.parametrize("case", ["lse", "lse_backward", "cc_loss", "fit_step"])
def test_opcheck_library_path(case, device):
    x, db, log_q = make_inputs(9, 3, 7, 4, seed=14, device=device)
    pairs = random_mask(9, 3, 0.6, seed=2, device=device)
    w = torch.rand(9, 3, dtype=torch.float64, device=device)
    xr = x.clone().requires_grad_()
    with library(workspace_bytes=700):
        logz = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, ALPHA, "sqeuclidean", pairs)
        cases = {
            "lse": (torch.ops.ccluster.exemplar_logsumexp.default, (xr, db, log_q, ALPHA, "euclidean", pairs)),
            "lse_backward": (torch.ops.ccluster.exemplar_logsumexp_backward.default,
                             (random_like(logz), x, db, log_q, logz, ALPHA, "sqeuclidean", pairs, [True] * 3)),
            "cc_loss": (torch.ops.ccluster.cc_loss.default, (xr, w, pairs, db, log_q, ALPHA, "sqeuclidean", True)),
            "fit_step": (torch.ops.ccluster.fit_step.default, (x, db, log_q, w * pairs, ALPHA, "euclidean")),
        }
        op, args = cases[case]
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph_library_path():
    x, db, log_q = make_inputs(12, 3, 8, 4, seed=15, requires_grad=True)
    pairs = random_mask(12, 3, 0.6, seed=3)
    att = torch.rand(12, dtype=torch.float64, requires_grad=True)

    def f(x, att, db, log_q):
        return ccluster.convex_clustering_loss(x, att, pairs, db, log_q, ALPHA) + \
            ccluster.exemplar_logsumexp(x, db, log_q, ALPHA, "sqeuclidean", pairs).sum()

    with library(workspace_bytes=800):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        val = compiled(x, att, db, log_q)
        grads = torch.autograd.grad(val, (x, att, db, log_q))
    ref = f(x, att, db, log_q)
    ref_grads = torch.autograd.grad(ref, (x, att, db, log_q))
    assert_close64(val, ref)
    for a, b in zip(grads, ref_grads):
        assert_close64(a, b)


def test_library_and_fused_agree_float32():
    x, db, log_q = (t.float() for t in make_inputs(130, 4, 70, 33, seed=16))
    pairs = random_mask(130, 4, 0.4, seed=6)
    for metric, p in itertools.product(("sqeuclidean", "euclidean"), (None, pairs)):
        fused = ccluster.exemplar_logsumexp(x, db, log_q, ALPHA, metric, p)
        with library(workspace_bytes=20000):
            lib = ccluster.exemplar_logsumexp(x, db, log_q, ALPHA, metric, p)
        torch.testing.assert_close(lib, fused, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The device path needs no host synchronisation: the Python wrappers, the modules and the backward
# formulas, run as they run on a GPU (checks of values deferred), under a dispatch mode that fails on
# every operation that reads device data on the host


class _FailOnHostRead(torch.utils._python_dispatch.TorchDispatchMode):
    """Fails on nonzero, item / _local_scalar_dense (Python bool(), float(), .item() of a tensor) and on
    copies to the CPU: each of these synchronises a GPU with the host."""

    aten = torch.ops.aten
    FORBIDDEN = {aten.nonzero.default, aten._local_scalar_dense.default, aten.item.default,
                 aten.nonzero_static.default, aten.masked_select.default}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append(str(func))
        if func in self.FORBIDDEN:
            raise AssertionError(f"host synchronisation on the device path: {func}")
        if func is self.aten._to_copy.default and kwargs.get("device") == torch.device("cpu"):
            raise AssertionError(f"copy to the CPU on the device path: {func} {kwargs}")
        if func is self.aten.copy_.default and args[0].device.type == "cpu" and args[1].device.type != "cpu":
            raise AssertionError(f"copy to the CPU on the device path: {func}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("plan", ["auto", "dense", "packed"])
def test_device_path_makes_no_host_synchronisation(plan):
    from ccluster import _C
    N, C, n, m = 30, 4, 11, 5
    x, db, log_q = make_inputs(N, C, n, m, seed=31)
    x = x.float().requires_grad_()
    db, log_q = db.float().requires_grad_(), log_q.float().requires_grad_()
    pairs = random_mask(N, C, 0.4, seed=3)
    att = torch.rand(N, requires_grad=True)
    B, T = 5, 6
    labels = random_mask(B, C, 0.4, seed=4)
    mask = random_mask(B, T, 0.8, seed=5)
    weight = torch.rand(N, C) * pairs
    syncs = _C._get_setting("host_syncs")
    with library(plan=plan, check_values="deferred"), _FailOnHostRead() as mode:
        out = ccluster.exemplar_logsumexp(x, db, log_q, ALPHA, "euclidean", pairs)
        out.sum().backward()
        loss = ccluster.convex_clustering_loss(x, att, pairs, db, log_q, ALPHA)
        loss.backward()
        mod = ccluster.ConvexClusteringLoss(ALPHA)
        mod(x.reshape(B, T, m), att.reshape(B, T), labels, mask, db, log_q).backward()
        ccluster.fit_step(x.detach(), db.detach(), log_q.detach(), weight, ALPHA, pairs=pairs)
        with torch.no_grad():
            ccluster.convex_clustering_loss(x, att, pairs, db, log_q, ALPHA)
    assert any("ccluster.cc_loss" in op for op in mode.ops), "the mode must have seen the ops"
    assert _C._get_setting("host_syncs") == syncs, "the compiled ops read device data on the host"
    assert torch.isfinite(x.grad).all() and torch.isfinite(db.grad).all()


def test_deferred_checks_of_values_give_nan_instead_of_reading():
    x, db, log_q = make_inputs(12, 3, 5, 4, seed=32)
    pairs = torch.ones(12, 3, dtype=torch.bool)
    att = torch.rand(12, dtype=torch.float64)
    bad_att = att.clone()
    bad_att[4] = -0.5
    for backend in ("fused", "library"):
        with ccluster.kernel_settings(backend=backend, check_values="deferred"):
            xs = x.clone().requires_grad_()
            loss = ccluster.convex_clustering_loss(xs, bad_att, pairs, db, log_q, ALPHA)
            loss.backward()
            assert loss.isnan() and xs.grad.isnan().all(), backend
            assert ccluster.convex_clustering_loss(x, att, pairs, db, log_q.exp(), ALPHA).isnan(), backend
            w = torch.rand(12, 3, dtype=torch.float64)
            w[2, 1] = -1.0
            logz, log_eta = ccluster.fit_step(x, db, log_q, w, ALPHA)
            assert logz.isnan().all() and log_eta.isnan().all(), backend
            good = ccluster.convex_clustering_loss(x, att, pairs, db, log_q, ALPHA)
        with ccluster.kernel_settings(backend=backend):  # the default on the CPU: eager, the same value
            assert torch.equal(good, ccluster.convex_clustering_loss(x, att, pairs, db, log_q, ALPHA))
            with pytest.raises(ValueError, match="convex_clustering_loss: attention must be >= 0 on the pairs"):
                ccluster.convex_clustering_loss(x, bad_att, pairs, db, log_q, ALPHA)
            with pytest.raises(ValueError, match="fit_step: weight must be finite and >= 0, got -1"):
                ccluster.fit_step(x, db, log_q, w, ALPHA)


# ---------------------------------------------------------------------------------------------------
# The plans and the cost model


def test_plans_agree_and_the_cost_model_is_reported():
    x, db, log_q, pairs = _loss_problem(60, 5, 23, 7, seed=33)
    att = torch.rand(60, dtype=torch.float64)
    got = {}
    for plan in ("dense", "packed"):
        args = [t.clone().requires_grad_() for t in (x, att, db, log_q)]
        with library(plan=plan, workspace_bytes=5000):
            loss = ccluster.convex_clustering_loss(args[0], args[1], pairs, args[2], args[3], ALPHA)
            got[plan] = (loss, *torch.autograd.grad(loss, args))
            assert ccluster.settings.kernel_statistics()["last_plan"] == plan
    for a, b in zip(got["dense"], got["packed"]):
        assert_close64(a, b)
    est = ccluster.settings.estimate_plans(60, 5, 23, 7, device="cpu", dtype="float64", pairs=pairs)
    assert est["plan"] in ("dense", "packed") and est["reason"] == "cost model"
    for key in ("gflop", "gbyte", "pieces", "launches", "syncs", "seconds"):
        assert est["dense"][key] >= 0 and est["packed"][key] >= 0
    assert est["packed"]["gflop"] < est["dense"]["gflop"], "the packed plan computes only the pairs"


def test_cost_model_on_a_gpu_never_synchronises_in_auto():
    # training sizes of THUMOS14: N = 7500 segments, C = 20, n = 256, m = 1024, one label per video
    N, C, n, m, T = 7500, 20, 256, 1024, 750
    labels = torch.zeros(N // T, C, dtype=torch.bool)
    labels[torch.arange(N // T), torch.arange(N // T) * 2 % C] = True
    pairs = labels.repeat_interleave(T, 0)
    for dtype, tf32 in (("float32", False), ("float32", True), ("bfloat16", False)):
        on_host = ccluster.settings.estimate_plans(N, C, n, m, dtype=dtype, tf32=tf32, pairs=pairs)
        assert on_host["packed"]["syncs"] == 0 and on_host["dense"]["syncs"] == 0
        assert on_host["packed"]["gflop"] < on_host["dense"]["gflop"] / 10
        # the mask on the device: counts unknown, the packed plan would need a synchronisation
        on_device = ccluster.settings.estimate_plans(N, C, n, m, dtype=dtype, tf32=tf32, mask_on_device=True)
        assert on_device["plan"] == "dense" and on_device["packed"]["syncs"] == 1
        assert "synchronisation" in on_device["reason"]
    # forced, the packed plan is taken and its synchronisation is in the estimate
    forced = ccluster.settings.estimate_plans(N, C, n, m, mask_on_device=True, plan="packed")
    assert forced["plan"] == "packed" and forced["packed"]["syncs"] == 1
    assert ccluster.settings.estimate_plans(N, C, n, m)["plan"] == "dense", "no pairs: both plans are the same"
