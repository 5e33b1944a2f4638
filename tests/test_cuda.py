"""What only a GPU has: the fused CUDA kernels against the library path, tensor cores, TF32 and centring,
streams, CUDA graphs (an op and a whole training step), deterministic mode, the workspace bound, and the
count of host synchronisations on the hot path.

The op tests themselves (values and gradients against the float64 oracle, gradcheck, opcheck, odd,
empty and non-contiguous shapes, extreme alpha * d, NaN, bad input) take conftest's `device` fixture and
run on CUDA there, with the default implementation (the library path). Every test here needs a GPU and
the compiled CUDA kernels; without them the module is skipped with conftest's reason.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

import ccluster
import ccluster.ops as ops
from ccluster import reference
from conftest import CUDA_SKIP_REASON, assert_low_precision

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(CUDA_SKIP_REASON is not None, reason=CUDA_SKIP_REASON or "")]

METRICS = ("sqeuclidean", "euclidean")
# (N, C, n, m): single elements, odd sizes around the fused kernels' 64-row / 64-exemplar tiles
SHAPES = [(1, 1, 1, 1), (5, 3, 7, 4), (67, 4, 70, 33), (130, 3, 129, 65)]
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
        pairs[0] = True  # a row in every class (3+ classes: order-dependent atomics in the fused cc_loss dx)
        pairs[1] = False  # a row in none
    return pairs.to(device)


def _on_cpu(fn, *args):
    """The CPU op with its default implementation (the fused CPU kernels), whatever the CUDA backend."""
    with ccluster.kernel_settings(backend="auto"):
        return fn(*args)


def assert_close(a, b, atol, rtol=0.0, msg=""):
    torch.testing.assert_close(a.cpu(), b.cpu(), atol=atol, rtol=rtol, equal_nan=True, msg=msg or None)


def _all_ops(x, db, log_q, pairs, w, metric, alpha=0.9):
    """Every op once: forward, backward, loss with dL/dx, fit step (pairs None: every pair)."""
    out = torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, alpha, metric, pairs)
    grad = torch.ones_like(out)
    back = torch.ops.ccluster.exemplar_logsumexp_backward(grad, x, db, log_q, out, alpha, metric, pairs,
                                                          [True, True, True])
    every = torch.ones(x.shape[0], db.shape[0], dtype=torch.bool, device=x.device)
    p = every if pairs is None else pairs.to(x.device)
    loss = torch.ops.ccluster.cc_loss(x, w, p if pairs is None else pairs, db, log_q, alpha, metric, True)
    fit = torch.ops.ccluster.fit_step(x, db, log_q, w * p, alpha, metric)
    return (out, *back, *loss, *fit)


# ---------------------------------------------------------------------------------------------------
# The fused CUDA kernels (backend "fused") against the library path (the default) and the oracle


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("with_pairs", [False, True])
def test_fused_kernels_match_the_library_path_float64(shape, metric, with_pairs):
    N, C, n, m = shape
    x, db, log_q = make_inputs(N, C, n, m)
    pairs = make_pairs(N, C) if with_pairs else torch.ones(N, C, dtype=torch.bool, device=DEV)
    w = torch.rand(N, C, dtype=torch.float64, device=DEV)
    with ccluster.kernel_settings(backend="fused"):
        fused = _all_ops(x, db, log_q, pairs if with_pairs else None, w, metric)
    with ccluster.kernel_settings(backend="library"):
        lib = _all_ops(x, db, log_q, pairs if with_pairs else None, w, metric)
    names = ("logz", "grad x", "grad db", "grad log_q", "loss", "loss logz", "dL/dx", "fit logz", "log eta")
    for name, a, b in zip(names, fused, lib):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)
    ref = reference.exemplar_logsumexp(x, db, log_q, 0.9, metric, pairs if with_pairs else None)
    assert_close(fused[0], ref, atol=1e-9, rtol=1e-9, msg="logz vs the oracle")


def test_error_messages_name_the_argument(backend):
    x, db, log_q = make_inputs(4, 2, 3, 5)
    with pytest.raises(ValueError, match="exemplar_logsumexp: alpha must be a finite number > 0"):
        torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, -1.0, "sqeuclidean", None)
    with pytest.raises(ValueError, match="metric must be 'sqeuclidean' or 'euclidean'"):
        torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "cosine", None)
    with pytest.raises(ValueError, match="must be on one device"):
        torch.ops.ccluster.exemplar_logsumexp(x, db.cpu(), log_q, 1.0, "sqeuclidean", None)
    with pytest.raises(ValueError, match=r"pairs must be \[N, C\]"):
        torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, 1.0, "sqeuclidean",
                                              torch.ones(3, 2, dtype=torch.bool, device=DEV))
    with pytest.raises(TypeError, match="convex_clustering_loss: attention must have x's dtype"):
        torch.ops.ccluster.cc_loss(x, torch.ones(4, 2, device=DEV), torch.ones(4, 2, dtype=torch.bool, device=DEV),
                                   db, log_q, 1.0, "sqeuclidean", False)
    with pytest.raises(ValueError, match="fit_step: weight must be"):
        torch.ops.ccluster.fit_step(x, db, log_q, torch.ones(4, 3, dtype=x.dtype, device=DEV), 1.0, "sqeuclidean")
    # the checks of values: deferred by default on a GPU (NaN, no synchronisation), eager on request
    bad = torch.full((4, 2), -1.0, dtype=x.dtype, device=DEV)
    every = torch.ones(4, 2, dtype=torch.bool, device=DEV)
    assert torch.ops.ccluster.cc_loss(x, bad, every, db, log_q, 1.0, "sqeuclidean", False)[0].isnan()
    with ccluster.kernel_settings(check_values="eager"):
        with pytest.raises(ValueError, match="convex_clustering_loss: attention must be >= 0 on the pairs"):
            torch.ops.ccluster.cc_loss(x, bad, every, db, log_q, 1.0, "sqeuclidean", False)


def test_more_units_than_the_grid(backend):
    # N = 4096, C = 20: 64 x 20 = 1280 (row block, class) units of the fused forward, more than the grid
    # keeps resident; the library path's packed plan (host pairs) and dense plan (device pairs) alike
    N, C, n, m = 4096, 20, 700, 40
    x, db, log_q = make_inputs(N, C, n, m, dtype=torch.float32)
    pairs = make_pairs(N, C)
    grad = torch.randn(N, C, device=DEV)
    for p in (None, pairs, pairs.cpu()):
        def fn(a, b, c):
            return ops.exemplar_logsumexp(a, b, c, 2.0, "sqeuclidean", p)
        xs = [t.clone().requires_grad_() for t in (x, db, log_q)]
        out = fn(*xs)
        g = torch.autograd.grad(out, xs, grad)
        cs = [t.cpu().requires_grad_() for t in (x, db, log_q)]
        with ccluster.kernel_settings(backend="auto"):
            out_c = ops.exemplar_logsumexp(*cs, 2.0, "sqeuclidean", None if p is None else p.cpu())
            g_c = torch.autograd.grad(out_c, cs, grad.cpu())
        assert_close(out, out_c, atol=1e-4, rtol=1e-5)
        for name, a, b in zip(("x", "db", "log_q"), g, g_c):
            assert_close(a, b, atol=1e-4 * max(float(b.abs().max()), 1.0), rtol=1e-4, msg=f"grad {name}")
    w = torch.rand(N, C, device=DEV)
    res = torch.ops.ccluster.cc_loss(x, w, pairs, db, log_q, 2.0, "sqeuclidean", True)
    cpu = _on_cpu(torch.ops.ccluster.cc_loss, x.cpu(), w.cpu(), pairs.cpu(), db.cpu(), log_q.cpu(), 2.0,
                  "sqeuclidean", True)
    for name, a, b in zip(("loss", "logz", "dx"), res, cpu):
        assert_close(a, b, atol=1e-4 * max(float(b.abs().max()), 1.0), rtol=1e-4, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [77, 130])  # not a multiple of 8 (scalar loads); 2 x 64 + 2 (partial K slice)
def test_tensor_cores_at_odd_m_with_neg_inf_and_nan(dtype, m, backend):
    N, C, n = 150, 3, 90
    x, db, log_q = make_inputs(N, C, n, m, dtype=dtype, empty_slots=True, scale=2.0)
    alpha = 0.5
    out = ops.exemplar_logsumexp(x, db, log_q, alpha)
    oracle = reference.exemplar_logsumexp(x.double(), db.double(), log_q.double(), alpha)
    plain = reference.exemplar_logsumexp(x, db, log_q, alpha)
    assert torch.isneginf(out[:, 1]).all(), "a class without exemplars gives -inf"
    assert_low_precision(out.cpu(), plain.cpu(), oracle.cpu(), dtype, "value")
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
    N, C, n, m = 300, 3, 200, 256
    x, db, log_q = make_inputs(N, C, n, m, dtype=torch.float32, empty_slots=False, scale=2.0)
    x, db = x + 1.0, db + 1.0  # an offset for centring to remove
    alpha = 2.0
    grad = torch.randn(N, C, device=DEV, dtype=torch.float64)

    def grads(fn, args):
        xs = [t.detach().clone().requires_grad_() for t in args]
        out = fn(*xs, alpha)
        torch.autograd.backward(out, grad.to(out.dtype))
        return out.detach(), [t.grad for t in xs]

    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        with ccluster.kernel_settings(backend="library", centring=centring):
            out, g = grads(ops.exemplar_logsumexp, (x, db, log_q))
        plain, g_p = grads(reference.exemplar_logsumexp, (x, db, log_q))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    oracle, g_o = grads(reference.exemplar_logsumexp, (x.double(), db.double(), log_q.double()))
    if tf32 and centring == "off":
        return  # uncentred TF32: the documented hazard (error alpha eps |x| |y|); no promise
    assert_low_precision(out.cpu(), plain.cpu(), oracle.cpu(), torch.float32, f"value tf32={tf32}")
    for name, a, b, c in zip(("x", "db", "log_q"), g, g_p, g_o):
        assert_low_precision(a.cpu(), b.cpu(), c.cpu(), torch.float32, f"grad {name} tf32={tf32}")


def test_host_pairs_give_the_device_pairs_results():
    # pairs on the CPU (the loader's labels) lay the packed plan out on the host; the results equal those
    # of the same pairs on the GPU (the dense plan), and of the packed plan forced with device pairs
    N, C, n, m = 300, 6, 70, 33
    x, db, log_q = make_inputs(N, C, n, m)
    pairs = make_pairs(N, C)
    att = torch.rand(N, dtype=torch.float64, device=DEV)
    results = {}
    cases = (("device", pairs, "auto", "dense", 0), ("host", pairs.cpu(), "packed", "packed", 0),
             ("forced", pairs, "packed", "packed", 1))
    for name, p, plan, runs, syncs in cases:
        xs = [t.clone().requires_grad_() for t in (x, att, db, log_q)]
        before = ccluster.settings.kernel_statistics()["host_syncs"]
        with ccluster.kernel_settings(plan=plan):
            loss = ops.convex_clustering_loss(xs[0], xs[1], p, xs[2], xs[3], 0.8)
            assert ccluster.settings.kernel_statistics()["last_plan"] == runs, name
            assert ccluster.settings.kernel_statistics()["host_syncs"] - before == syncs, name
            results[name] = (loss, *torch.autograd.grad(loss, xs))
    for other in ("host", "forced"):
        for a, b in zip(results[other], results["device"]):
            assert_close(a, b, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------------------------------------------
# No host synchronisation on the hot path; CUDA graphs of the ops and of a whole training step


PRECISIONS = [("float32", torch.float32, False), ("tf32", torch.float32, True), ("bfloat16", torch.bfloat16, False)]


@pytest.mark.parametrize("prec", PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_hot_path_makes_no_synchronisation(prec):
    _, dtype, tf32 = prec
    B, T, C, n, m = 4, 50, 6, 40, 32
    x, db, log_q = make_inputs(B * T, C, n, m, dtype=dtype, empty_slots=False)
    labels = torch.zeros(B, C, dtype=torch.bool)
    labels[torch.arange(B), torch.arange(B) % C] = True
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 30:] = False
    pairs = (mask[:, :, None] & labels[:, None, :]).reshape(B * T, C)
    att = torch.rand(B, T, device=DEV, dtype=dtype)
    mod = ccluster.ConvexClusteringLoss(1.0)
    feats = x.reshape(B, T, m).clone().requires_grad_()
    labels_d, mask_d, pairs_d = labels.to(DEV), mask.to(DEV), pairs.to(DEV)
    fit_w = att.reshape(-1, 1).expand(-1, C).contiguous() * pairs_d
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32

    def step():
        for lab, msk in ((labels, mask), (labels_d, mask_d)):  # the loader's CPU labels, then GPU ones
            mod(feats, att, lab, msk, db, log_q).backward()
        xs = x.clone().requires_grad_()
        ops.exemplar_logsumexp(xs, db, log_q, 1.0, "euclidean", pairs_d).sum().backward()
        ops.fit_step(x, db, log_q, fit_w, 1.0, pairs=pairs)

    try:
        step()  # warm-up: cuBLAS handles, the caching allocators
        torch.cuda.synchronize()
        syncs = ccluster.settings.kernel_statistics()["host_syncs"]
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    assert ccluster.settings.kernel_statistics()["host_syncs"] == syncs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cuda_graph_capture_and_replay(dtype, backend):
    x, db, log_q = make_inputs(130, 3, 129, 65, dtype=dtype)
    pairs = make_pairs(130, 3)
    w = torch.rand(130, 3, device=DEV, dtype=dtype)

    def step():
        return _all_ops(x, db, log_q, pairs, w, "euclidean", alpha=1.0)

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


def test_cuda_graph_of_a_training_step():
    # a linear embedding, the convex clustering loss (device labels and mask), backward and an SGD step,
    # captured once and replayed: the parameters move exactly as in eager steps
    torch.manual_seed(1)
    B, T, C, n, m, d = 4, 32, 5, 24, 16, 12
    feats = torch.randn(B, T, m, device=DEV)
    att = torch.rand(B, T, device=DEV)
    labels = torch.zeros(B, C, dtype=torch.bool, device=DEV)
    labels[torch.arange(B), torch.arange(B) % C] = True
    mask = torch.ones(B, T, dtype=torch.bool, device=DEV)
    _, db, log_q = make_inputs(1, C, n, d, dtype=torch.float32, empty_slots=False)

    def build():
        torch.manual_seed(2)
        net = torch.nn.Linear(m, d).to(DEV)
        return net, torch.optim.SGD(net.parameters(), lr=0.1)

    loss_fn = ccluster.ConvexClusteringLoss(0.5)

    def train_step(net, opt):
        opt.zero_grad(set_to_none=False)
        loss = loss_fn(net(feats), att, labels, mask, db, log_q)
        loss.backward()
        opt.step()
        return loss

    net_e, opt_e = build()
    net_g, opt_g = build()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up, eager steps on both copies
            train_step(net_e, opt_e)
            train_step(net_g, opt_g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = train_step(net_g, opt_g)
    for _ in range(4):
        graph.replay()
        eager_loss = train_step(net_e, opt_e)
        torch.cuda.synchronize()
        assert_close(static_loss, eager_loss, atol=1e-5, rtol=1e-5)
    for a, b in zip(net_g.parameters(), net_e.parameters()):
        assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-5)


def test_side_stream_matches_default_stream(backend):
    x, db, log_q = make_inputs(130, 3, 129, 65, dtype=torch.float32)
    pairs = make_pairs(130, 3)
    w = torch.rand(130, 3, device=DEV)
    want = _all_ops(x, db, log_q, pairs, w, "sqeuclidean")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        got = _all_ops(x, db, log_q, pairs, w, "sqeuclidean")
    torch.cuda.current_stream().wait_stream(s)
    for a, b in zip(got, want):
        if backend == "fused":  # atomics in the fused backward and loss: equal to rounding
            assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
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

        def run(p, plan):
            with ccluster.kernel_settings(backend="library", workspace_bytes=20000, plan=plan):
                return _all_ops(x, db, log_q, p, w, "sqeuclidean", alpha=1.0)

        for p, plan in ((pairs, "dense"), (pairs.cpu(), "packed")):
            for a, b in zip(run(p, plan), run(p, plan)):
                assert torch.equal(a, b), f"the library path ({plan}) must give the same bits run after run"
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
