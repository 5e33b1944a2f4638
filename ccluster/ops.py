"""Typed Python front-ends of the compiled ``torch.ops.ccluster`` operators.

The C++/CUDA kernels are registered by ``ccluster._C`` (schemas in ``csrc/ccluster.cpp``). This module
adds their fake (meta) kernels for ``torch.compile`` and their autograd formulas, whose backward calls a
backward *op* that recomputes distance tiles from the saved log-sum-exp.

If ``ccluster._C`` cannot be loaded, a warning names the cause once and every function falls back to the
pure-PyTorch reference (:mod:`ccluster.reference`), which gives the same values but materialises the
[N, C*n] score matrix. :func:`has_compiled_ops` says which path is active.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import reference

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.ccluster.*)
    _LOAD_ERROR: Exception | None = None
except Exception as exc:  # ImportError, undefined symbol after a torch upgrade, ...
    _LOAD_ERROR = exc
    warnings.warn(
        f"ccluster: compiled ops could not be loaded ({type(exc).__name__}: {exc}); falling back to the "
        "pure-PyTorch reference, which materialises the [N, C*n] matrix. Rebuild with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning, stacklevel=2)

METRICS = reference.METRICS


def has_compiled_ops() -> bool:
    """True when the fused C++/CUDA kernels are loaded; False when the reference fallback is in use."""
    return _LOAD_ERROR is None


# ---------------------------------------------------------------------------------------------------
# Argument checks: shared by the fake kernels, the wrappers and the fallback path; same messages as
# csrc/common.h. One exception type per kind of mistake, in Python and in C++ alike:
#   TypeError  - an argument of the wrong type or dtype (not a Tensor, an integer tensor, mixed dtypes,
#                a mask that is not bool, a metric that is not a string);
#   ValueError - the right type with a wrong shape, device or value (alpha <= 0, an unknown metric,
#                negative attention, log_q > 0 in the loss, a negative or non-finite fit weight).


def _check_type(cond, msg):
    torch._check_type(bool(cond), lambda: msg)


def _check_value(cond, msg):
    torch._check_value(bool(cond), lambda: msg)


def _check_args(op, x, db, log_q, alpha, metric, **tensors):
    """What Python must check before calling an op: that the tensors are tensors and the scalars have
    their types (the schema would otherwise answer with a RuntimeError of its own)."""
    for name, t in (("x", x), ("db", db), ("log_q", log_q), *tensors.items()):
        _check_type(isinstance(t, torch.Tensor), f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    _check_type(isinstance(alpha, (int, float)) and not isinstance(alpha, bool),
                f"{op}: alpha must be a finite number > 0, got {alpha!r} ({type(alpha).__name__})")
    _check_type(isinstance(metric, str), f"{op}: metric must be 'sqeuclidean' or 'euclidean', got {metric!r}")


def _check_common(op, x, db, log_q, alpha, metric):
    _check_args(op, x, db, log_q, alpha, metric)
    for name, t in (("x", x), ("db", db), ("log_q", log_q)):
        _check_type(t.is_floating_point(), f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    _check_value(x.dim() == 2, f"{op}: x must be [N, m], got shape {list(x.shape)}")
    _check_value(db.dim() == 3, f"{op}: db must be [C, n, m], got shape {list(db.shape)}")
    _check_value(log_q.dim() == 2, f"{op}: log_q must be [C, n], got shape {list(log_q.shape)}")
    _check_value(db.shape[2] == x.shape[1],
                 f"{op}: db feature size m={db.shape[2]} does not match x's m={x.shape[1]}")
    _check_value(tuple(log_q.shape) == tuple(db.shape[:2]),
                 f"{op}: log_q must be [C, n] = {list(db.shape[:2])} to match db, got {list(log_q.shape)}")
    _check_type(db.dtype == x.dtype and log_q.dtype == x.dtype,
                f"{op}: x, db and log_q must have one dtype, got {x.dtype}, {db.dtype}, {log_q.dtype}")
    _check_value(db.device == x.device and log_q.device == x.device,
                 f"{op}: x, db and log_q must be on one device, got {x.device}, {db.device}, {log_q.device}")
    _check_value(math.isfinite(alpha) and alpha > 0, f"{op}: alpha must be a finite number > 0, got {alpha}")
    _check_value(metric in METRICS, f"{op}: metric must be 'sqeuclidean' or 'euclidean', got {metric!r}")


def _check_pairs(op, name, pairs, x, db, dtype=torch.bool, host_ok=False):
    """An [N, C] mask (or weight of x's dtype); host_ok: a mask may also be on the CPU (a host layout)."""
    shape = [x.shape[0], db.shape[0]]
    _check_type(isinstance(pairs, torch.Tensor), f"{op}: {name} must be a Tensor, got {type(pairs).__name__}")
    _check_value(list(pairs.shape) == shape, f"{op}: {name} must be [N, C] = {shape}, got {list(pairs.shape)}")
    if dtype == torch.bool:
        _check_type(pairs.dtype == torch.bool, f"{op}: {name} must be a bool tensor, got {pairs.dtype}")
    else:
        _check_type(pairs.dtype == x.dtype, f"{op}: {name} must have x's dtype {x.dtype}, got {pairs.dtype}")
    on_host = host_ok and pairs.device.type == "cpu"
    _check_value(pairs.device == x.device or on_host,
                 f"{op}: {name} must be on x's device {x.device}{' (or on the CPU)' if host_ok else ''}, "
                 f"got {pairs.device}")


# Checks of values read the data. With the compiled library the ops check (csrc/ops/dispatch.h): eagerly
# on the CPU, where reading is free; on an accelerator they leave a device flag that turns the results
# into NaN instead of synchronising the device (ccluster.kernel_settings(check_values=...) changes this).
# Without the compiled library, Python checks eagerly (the fallback is the slow path anyway), but never
# while torch.compile traces (fake tensors hold no values) nor while a CUDA graph is captured.


def _fallback_reads_values(t: torch.Tensor) -> bool:
    if has_compiled_ops():
        return False  # the op checks
    if torch.compiler.is_compiling() or t.device.type == "meta" or type(t).__name__ == "FakeTensor":
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _check_attention(op, weight, pairs):
    """The loss's weights: >= 0 on the pairs (NaN propagates to the loss, as NaN in x does)."""
    bad = pairs & (weight < 0)
    if bool(bad.any()):
        _check_value(False, f"{op}: attention must be >= 0 on the pairs (it weights -log z), got "
                            f"{float(weight[bad].min()):g}")


def _check_log_probabilities(op, log_q):
    """The loss's log_q: <= 0 (-inf marks an empty slot; NaN propagates)."""
    bad = log_q > 0
    if bool(bad.any()):
        _check_value(False, f"{op}: log_q must be log-probabilities (<= 0, -inf for an empty slot), got "
                            f"{float(log_q[bad].max()):g} (pass log q, not q)")


def _check_fit_weight(op, weight):
    bad = ~(torch.isfinite(weight) & (weight >= 0))
    if bool(bad.any()):
        _check_value(False, f"{op}: weight must be finite and >= 0, got {float(weight[bad][0]):g}")


# ---------------------------------------------------------------------------------------------------
# exemplar_logsumexp


def exemplar_logsumexp(x: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor, alpha: float,
                       metric: str = "sqeuclidean", pairs: torch.Tensor | None = None) -> torch.Tensor:
    r"""Log-sum-exp of representativeness-weighted kernel values against an exemplar database.

    ``out[s, c] = log sum_j exp(log_q[c, j] - alpha * d(x[s], db[c, j]))``

    computed tile by tile with an online (running-max) log-sum-exp: nothing of size N x C x n is
    allocated, and the result is exact and finite wherever the true value is, even when ``alpha * d`` is
    far beyond the range of ``exp`` (say 1e4, where ``log(sum(exp(...)))`` gives -inf).

    Args:
        x: ``[N, m]`` segment features.
        db: ``[C, n, m]`` exemplar database (C classes, n slots, m dims).
        log_q: ``[C, n]`` log representativeness. ``-inf`` marks an empty slot. A class whose slots are
            all ``-inf`` gives ``-inf`` (never NaN). Here any real log-weights are accepted (rows need
            not be normalised; a positive entry shifts the result); the loss requires log-probabilities.
        alpha: bandwidth, a finite number > 0.
        metric: ``"sqeuclidean"`` (``|a-b|^2``) or ``"euclidean"`` (``|a-b|``, the d of the paper; its
            gradient at zero distance is taken as 0).
        pairs: optional ``[N, C]`` bool mask. Only these (segment, class) pairs are computed; every
            other entry of the output is 0 and receives no gradient. A row of x with no pair is never
            read: its gradient is exactly 0 and it reaches no other gradient, whatever it holds (NaN,
            inf), so padding needs no cleaning. On x's device, or on the CPU when x is on a GPU: the
            label-sparse plan is then laid out on the host without a device synchronisation.

    Returns:
        ``[N, C]`` tensor of x's dtype. float16/bfloat16 inputs are computed in float32.

    Differentiable with respect to x, db and log_q (each computed only when required). Double backward
    is not supported: the gradient of a gradient raises a RuntimeError that says so (use
    :func:`ccluster.reference.exemplar_logsumexp`, which materialises the scores, for a gradient penalty).
    NaN in x or log_q propagates: the rows (x) or classes (log_q) it touches come out NaN.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: a wrong shape, device or value (e.g. ``alpha <= 0``, an unknown metric).
    """
    if pairs is not None:
        _check_type(isinstance(pairs, torch.Tensor),
                    f"exemplar_logsumexp: pairs must be a Tensor or None, got {type(pairs).__name__}")
    if not has_compiled_ops():
        _check_common("exemplar_logsumexp", x, db, log_q, alpha, metric)
        if pairs is not None:
            _check_pairs("exemplar_logsumexp", "pairs", pairs, x, db, host_ok=True)
        low = x.dtype in (torch.float16, torch.bfloat16)
        args = (x.float(), db.float(), log_q.float()) if low else (x, db, log_q)
        out = reference.exemplar_logsumexp(*args, float(alpha), metric, None if pairs is None else pairs.to(x.device))
        return out.to(x.dtype)
    _check_args("exemplar_logsumexp", x, db, log_q, alpha, metric)
    # the op returns float32 for float16/bfloat16 (autograd saves that logz for the backward)
    return torch.ops.ccluster.exemplar_logsumexp(x, db, log_q, float(alpha), metric, pairs).to(x.dtype)


def convex_clustering_loss(x: torch.Tensor, attention: torch.Tensor, pairs: torch.Tensor,
                           db: torch.Tensor, log_q: torch.Tensor, alpha: float,
                           metric: str = "sqeuclidean") -> torch.Tensor:
    r"""The convex clustering loss over (segment, class) pairs, fused and label-sparse.

    ``L = - sum_{(s, c) in pairs} attention[s(, c)] * logz[s, c]`` with ``logz`` as in
    :func:`exemplar_logsumexp`.

    Work is proportional to the number of pairs, not N x C: rows are grouped by class inside the
    kernel. The gradient with respect to x is accumulated in the same pass as the loss (the loss is
    linear in logz with weights known at forward time), so forward + backward costs two GEMMs over the
    pairs and stores only an [N, m] buffer. Gradients for db and log_q, when required, recompute tiles.

    Args:
        x: ``[N, m]`` segment features (a batch flattened).
        attention: ``[N]`` or ``[N, C]`` weights p(s|x), >= 0 on the pairs; differentiable. NaN
            propagates (the loss and that segment's gradient come out NaN), as NaN in x does.
        pairs: ``[N, C]`` bool: which pairs enter the loss (normally the classes of the segment's
            video). Pairs whose class has no filled slot (all ``log_q = -inf``) are left out. On x's
            device, or on the CPU when x is on a GPU (the labels as the data loader has them): the
            label-sparse plan is then laid out on the host without a device synchronisation.
        db, alpha, metric: as in :func:`exemplar_logsumexp`.
        log_q: ``[C, n]`` log-probabilities: every entry <= 0, ``-inf`` for an empty slot. Rows need
            not sum to 1 (a class with empty slots), but q > 1 cannot be a probability and is refused:
            it is almost always q passed where log q was meant.

    Returns:
        A scalar tensor of x's dtype.

    Differentiable with respect to x, attention, db and log_q; double backward raises a RuntimeError
    that says it is not supported.

    Raises:
        TypeError: an argument of the wrong type or dtype.
        ValueError: a wrong shape, device or value: negative attention on a pair, ``log_q > 0``,
            ``alpha <= 0``, an unknown metric. The checks of values (attention, log_q) read the data, so
            they raise on the CPU only; on a GPU the loss (and dL/dx) come out NaN instead, without a
            device synchronisation (``ccluster.kernel_settings(check_values="eager")`` raises there too,
            at the cost of one synchronisation per call).
    """
    op = "convex_clustering_loss"
    _check_args(op, x, db, log_q, alpha, metric, attention=attention, pairs=pairs)
    _check_value(attention.dim() in (1, 2) and x.dim() >= 1 and db.dim() >= 1
                 and attention.shape[0] == x.shape[0]
                 and (attention.dim() == 1 or attention.shape[1] == db.shape[0]),
                 f"{op}: attention must be [N] or [N, C] with N={x.shape[0] if x.dim() else '?'}, "
                 f"C={db.shape[0] if db.dim() else '?'}, got {list(attention.shape)}")
    weight = attention[:, None].expand(x.shape[0], db.shape[0]) if attention.dim() == 1 else attention
    if not has_compiled_ops():
        _check_common(op, x, db, log_q, alpha, metric)
        if isinstance(pairs, torch.Tensor) and pairs.device.type == "cpu":
            pairs = pairs.to(x.device)
        _check_pairs(op, "pairs", pairs, x, db)
        _check_pairs(op, "attention", weight, x, db, dtype=x.dtype)
        if _fallback_reads_values(weight):
            _check_attention(op, weight, pairs)
            _check_log_probabilities(op, log_q)
        low = x.dtype in (torch.float16, torch.bfloat16)
        args = (x.float(), weight.float(), pairs, db.float(), log_q.float()) if low else \
            (x, weight, pairs, db, log_q)
        return reference.convex_clustering_loss(*args, float(alpha), metric).to(x.dtype)
    # dL/dx is accumulated in the forward pass only when a backward can ask for it
    grad_x = x.requires_grad and torch.is_grad_enabled()
    loss, _, _ = torch.ops.ccluster.cc_loss(x, weight.contiguous(), pairs, db, log_q, float(alpha), metric, grad_x)
    return loss


def fit_step(x: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor, weight: torch.Tensor,
             alpha: float, metric: str = "sqeuclidean",
             pairs: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""One fused pass of the convex-clustering update (network fixed, no autograd).

    Returns ``(logz, log_eta)``: ``logz [N, C]`` as in :func:`exemplar_logsumexp` on the pairs with
    ``weight > 0`` (0 elsewhere), and
    ``log_eta[c, j] = log sum_s weight[s, c] * exp(-alpha d(x_s, db[c, j]) - logz[s, c])``, computed in
    the log domain from the same distance tiles (``-inf`` on empty slots, ``log_q = -inf``). The
    multiplicative update is then ``log_q += log_eta``. ``weight`` is ``[N, C]``, finite and >= 0,
    x's dtype (ValueError on the CPU otherwise: a NaN weight would drop its pair without a trace; on a
    GPU the results come out NaN instead, see :func:`convex_clustering_loss`). ``pairs``: optional
    ``[N, C]`` bool CPU mask that contains ``weight > 0``; with it, on a GPU, the label-sparse plan needs
    no device synchronisation. Not differentiable (a RuntimeError says so). Errors as in
    :func:`exemplar_logsumexp`.
    """
    _check_args("fit_step", x, db, log_q, alpha, metric, weight=weight)
    if pairs is not None:
        _check_type(isinstance(pairs, torch.Tensor), f"fit_step: pairs must be a Tensor or None, got "
                                                     f"{type(pairs).__name__}")
    if not has_compiled_ops():
        _check_common("fit_step", x, db, log_q, alpha, metric)
        _check_pairs("fit_step", "weight", weight, x, db, dtype=x.dtype)
        if _fallback_reads_values(weight):
            _check_fit_weight("fit_step", weight)
        return reference.fit_step(x, db, log_q, weight, float(alpha), metric)
    return torch.ops.ccluster.fit_step(x, db, log_q, weight, float(alpha), metric, pairs)


# ---------------------------------------------------------------------------------------------------
# Registration: fake kernels and autograd (only when the compiled library is present).

def _acc_dtype(dtype):
    # logz is kept in the accumulation type: float32 for float16/bfloat16/float32, float64 for float64
    return torch.float64 if dtype == torch.float64 else torch.float32


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on the gradients an op's backward returns, attached to the tensors they depend on; its
    own backward raises. Used only when the backward builds a graph (create_graph=True): the gradient then
    has a grad_fn, and differentiating it says that double backward is not supported instead of giving a
    second derivative that silently does not depend on the inputs."""

    @staticmethod
    def forward(ctx, op, count, *tensors):
        ctx.op = op
        return tuple(t.view_as(t) for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(f"{ctx.op}: double backward is not supported (its backward is a fused op without "
                           "a derivative); for a gradient of a gradient (e.g. a gradient penalty) use the "
                           "materialised ccluster.reference implementation")


def _no_double_backward(op, grads, depends_on):
    """grads (None entries kept) as they are, or, when the backward is building a graph, wrapped so that
    differentiating them raises (see _NoDoubleBackward)."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    present = [g for g in grads if g is not None]
    inputs = [t for t in depends_on if isinstance(t, torch.Tensor) and t.requires_grad]
    if not present or not inputs:
        return grads
    wrapped = iter(_NoDoubleBackward.apply(op, len(present), *present, *inputs))
    return tuple(None if g is None else next(wrapped) for g in grads)


if has_compiled_ops():

    @torch.library.register_fake("ccluster::exemplar_logsumexp")
    def _(x, db, log_q, alpha, metric, pairs):
        _check_common("exemplar_logsumexp", x, db, log_q, alpha, metric)
        if pairs is not None:
            _check_pairs("exemplar_logsumexp", "pairs", pairs, x, db, host_ok=True)
        return x.new_empty((x.shape[0], db.shape[0]), dtype=_acc_dtype(x.dtype))

    @torch.library.register_fake("ccluster::exemplar_logsumexp_backward")
    def _(grad, x, db, log_q, logz, alpha, metric, pairs, output_mask):
        return (x.new_empty(x.shape if output_mask[0] else (0,)),
                db.new_empty(db.shape if output_mask[1] else (0,)),
                log_q.new_empty(log_q.shape if output_mask[2] else (0,)))

    @torch.library.register_fake("ccluster::cc_loss")
    def _(x, weight, pairs, db, log_q, alpha, metric, grad_x):
        _check_common("convex_clustering_loss", x, db, log_q, alpha, metric)
        _check_pairs("convex_clustering_loss", "pairs", pairs, x, db, host_ok=True)
        _check_pairs("convex_clustering_loss", "attention", weight, x, db, dtype=x.dtype)
        return (x.new_empty(()), x.new_empty((x.shape[0], db.shape[0]), dtype=_acc_dtype(x.dtype)),
                x.new_empty(x.shape if grad_x else (0,)))

    @torch.library.register_fake("ccluster::fit_step")
    def _(x, db, log_q, weight, alpha, metric, pairs=None):
        _check_common("fit_step", x, db, log_q, alpha, metric)
        _check_pairs("fit_step", "weight", weight, x, db, dtype=x.dtype)
        if pairs is not None:
            _check_pairs("fit_step", "pairs", pairs, x, db, host_ok=True)
        return x.new_empty((x.shape[0], db.shape[0])), log_q.new_empty(log_q.shape)

    def _lse_setup(ctx, inputs, output):
        x, db, log_q, alpha, metric, pairs = inputs
        ctx.save_for_backward(x, db, log_q, output, pairs)
        ctx.alpha, ctx.metric = alpha, metric

    def _lse_backward(ctx, grad):
        x, db, log_q, out, pairs = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        gx, gdb, glq = torch.ops.ccluster.exemplar_logsumexp_backward(
            grad, x, db, log_q, out, ctx.alpha, ctx.metric, pairs, mask)
        grads = _no_double_backward("exemplar_logsumexp",
                                    (gx if mask[0] else None, gdb if mask[1] else None, glq if mask[2] else None),
                                    (x, db, log_q, grad))
        return (*grads, None, None, None)

    torch.library.register_autograd("ccluster::exemplar_logsumexp", _lse_backward,
                                    setup_context=_lse_setup)

    def _loss_setup(ctx, inputs, output):
        x, weight, pairs, db, log_q, alpha, metric, grad_x = inputs
        _, logz, dx = output
        ctx.save_for_backward(x, weight, pairs, db, log_q, logz)
        # dL/dx from the forward pass, kept outside the saved tensors (detached: no reference cycle) because
        # the first backward scales it in place and hands it out as the gradient, so that fwd+bwd holds one
        # [N, m] tensor, not two. A second backward through a retained graph recomputes it.
        ctx.dx = dx.detach()
        ctx.alpha, ctx.metric = alpha, metric
        # logz and dx get no incoming gradient: do not materialise an [N, m] tensor of zeros for dx
        ctx.set_materialize_grads(False)

    def _loss_grad_x(ctx, g_loss, x, weight, pairs, db, log_q):
        dx, ctx.dx = ctx.dx, None  # drop ctx's reference, so that autograd can take dx as x.grad
        if dx is not None:
            torch._check(dx.numel() == x.numel(),
                         lambda: "convex_clustering_loss: x requires grad but the forward was run "
                                 "without grad_x=True")
        if type(x) is not torch.Tensor or torch.compiler.is_compiling() or torch.is_grad_enabled():
            ctx.dx = dx  # traced (fake or functional tensors), or building a graph: out of place
            return g_loss * dx
        if dx is None:  # handed out by an earlier backward through a retained graph: recompute
            _, _, dx = torch.ops.ccluster.cc_loss(x, weight, pairs, db, log_q, ctx.alpha, ctx.metric, True)
        return dx.mul_(g_loss)

    def _loss_backward(ctx, g_loss, g_logz, g_dx):
        # logz and dx are auxiliary outputs for this backward; only the loss is differentiated.
        x, weight, pairs, db, log_q, logz = ctx.saved_tensors
        need_x, need_w, _, need_db, need_lq = ctx.needs_input_grad[:5]
        gx = gw = gdb = glq = None
        if g_loss is None:  # the loss itself received no gradient
            return gx, gw, None, gdb, glq, None, None, None
        if need_x:
            gx = _loss_grad_x(ctx, g_loss, x, weight, pairs, db, log_q)
        if need_w:
            gw = (-g_loss * logz).to(weight.dtype)  # logz is 0 outside the pairs (float32 for 16-bit x)
        if need_db or need_lq:
            # dL/dlogz = -weight on the pairs (the backward op reads the pairs' entries only)
            g = -g_loss * weight
            _, gdb, glq = torch.ops.ccluster.exemplar_logsumexp_backward(
                g, x, db, log_q, logz, ctx.alpha, ctx.metric, pairs, [False, need_db, need_lq])
            gdb = gdb if need_db else None
            glq = glq if need_lq else None
        gx, gw, gdb, glq = _no_double_backward("convex_clustering_loss", (gx, gw, gdb, glq),
                                               (x, weight, db, log_q, g_loss))
        return gx, gw, None, gdb, glq, None, None, None

    torch.library.register_autograd("ccluster::cc_loss", _loss_backward, setup_context=_loss_setup)

    def _fit_setup(ctx, inputs, output):
        pass

    def _fit_backward(ctx, g_logz, g_log_eta):
        raise RuntimeError("fit_step: not differentiable (one pass of the representativeness fit, with the "
                           "network fixed); call it on detached tensors or under torch.no_grad()")

    torch.library.register_autograd("ccluster::fit_step", _fit_backward, setup_context=_fit_setup)
