"""Fitting the representativeness matrix Q by the convex-clustering multiplicative update."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import reference
from .ops import METRICS, fit_step

_NEG_INF = float("-inf")


@dataclass
class FitResult:
    """Result of :func:`fit_representativeness`.

    Attributes:
        log_q: ``[C, n]`` fitted log representativeness (``-inf`` on empty slots; rows sum to 1 in q).
        gap: ``[C]`` final certificate ``max_j log eta_j - sum_j q_j log eta_j``; it bounds how far each
            class's objective is below its optimum. 0 for the classes in ``empty_classes``: their
            objective does not depend on Q (no weight, or no filled slot), so Q is already optimal and
            is left unchanged. NaN for a class whose objective or eta became non-finite during the fit
            (the fit stops that class, keeps its last finite Q and reports it not converged); inputs
            that would make it so are refused up front (see Raises), so for accepted input a NaN gap
            means an overflow inside the fit.
        n_iter: ``[C]`` passes over the data per class after the first evaluation (each pass evaluates
            one candidate Q; SQUAREM spends one to three per round). Never more than ``max_iter``.
        converged: ``[C]`` bool, ``gap < tol`` (true for the classes in ``empty_classes``; never true for a
            non-finite objective: a NaN gap is not below tol).
        objective: per iteration, the ``[C]`` objective ``sum_s w_s log z_s`` (non-decreasing; NaN once a
            class has stopped).
        empty_classes: classes left unchanged because they had no weight or no filled slot.
        cached: whether the kernel matrix was cached (see :func:`fit_representativeness`).
    """
    log_q: torch.Tensor
    gap: torch.Tensor
    n_iter: torch.Tensor
    converged: torch.Tensor
    objective: list = field(default_factory=list)
    empty_classes: list = field(default_factory=list)
    cached: bool = False


def _all_reduce_logsumexp(t: torch.Tensor, group) -> torch.Tensor:
    """log sum over ranks of exp(t), elementwise; -inf where every rank has -inf."""
    m = t.clone()
    dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    shift = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    s = (t - shift).exp()
    dist.all_reduce(s, group=group)
    return shift + s.log()


def _cached_kernels(x, db, weight, alpha, metric):
    """Per class, the rows with weight and their ``-alpha d`` against the class's exemplars."""
    out = []
    zeros = torch.zeros_like(db[:1, :, 0])
    for c in range(db.shape[0]):
        rows = (weight[:, c] > 0).nonzero().squeeze(1)
        k = reference.scores(x[rows], db[c:c + 1], zeros, alpha, metric)[:, 0]
        out.append((rows, k))
    return out


def _cached_step(kernels, log_q, weight, active):
    logz = torch.zeros(weight.shape, dtype=log_q.dtype, device=log_q.device)
    log_eta = torch.full_like(log_q, _NEG_INF)
    for c in active.nonzero().squeeze(1).tolist():
        rows, k = kernels[c]
        z = torch.logsumexp(k + log_q[c], dim=1)
        logz[rows, c] = z
        e = torch.logsumexp(k + (weight[rows, c].log() - z)[:, None], dim=0)
        log_eta[c] = torch.where(torch.isfinite(log_q[c]), e, e.new_full((), _NEG_INF))
    return logz, log_eta


def _check_finite_inputs(op, x, db, weight, filled, fittable, group):
    """ValueError naming x or db when a value the objective reads is NaN or inf (one device read per
    fit; with a process group every rank raises, naming the rank that holds the bad row)."""
    bad_rows = (weight > 0).any(1) & ~torch.isfinite(x).all(1)
    bad_slots = fittable[:, None] & ~torch.isfinite(db).all(2)  # empty slots too: the distances read them
    flags = torch.stack([bad_rows.any(), bad_slots.any()]).to(torch.int32)
    if group is not None:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    row_bad, slot_bad = (bool(v) for v in flags.tolist())
    if row_bad:
        where = (f"row {int(bad_rows.nonzero()[0, 0])}" if bool(bad_rows.any()) else "a row on another rank")
        raise ValueError(f"{op}: x must be finite on the rows that have a weight, got NaN or inf in {where}")
    if slot_bad:
        c, j = (int(v) for v in bad_slots.nonzero()[0])
        raise ValueError(f"{op}: db must be finite in the classes with weight, got NaN or inf in class {c}, "
                         f"slot {j}")


@torch.no_grad()
def fit_representativeness(x: torch.Tensor, db: torch.Tensor, weight: torch.Tensor, alpha: float, *,
                           metric: str = "sqeuclidean", tol: float = 1e-4, max_iter: int = 1000,
                           log_q: torch.Tensor | None = None, progress: bool = False,
                           cache: bool | None = None, cache_budget_bytes: int = 256 << 20,
                           accelerate: bool = False, group=None) -> FitResult:
    r"""Fit Q with the network fixed: maximise ``sum_s w_sc log sum_j q_cj exp(-alpha d(x_s, y_cj))``.

    The convex-clustering update (Lashkari & Golland), per class, all in the log domain:
    ``z_s = sum_j q_j t_sj``, ``eta_j = sum_s w_s t_sj / z_s``, ``q <- eta * q`` with
    ``t = exp(-alpha d)``. The objective is concave in q and never decreases. A class stops when
    ``gap = max_j log eta_j - sum_j q_j log eta_j < tol``: the gap bounds the distance of the objective
    to its optimum, so it is a certificate and is returned.

    Args:
        x: ``[N, m]`` segment features (e.g. all segments of the training videos); finite on every row
            that has a weight (rows of weight 0 are never read).
        db: ``[C, n, m]`` exemplar database, C >= 1; finite in every class that has a weight.
        weight: ``[N, C]`` >= 0: the weight of segment s in class c's clustering (p(s|x) for segments of
            videos labelled c, 0 elsewhere). Normalised here so each class's weights sum to 1 (a
            class whose plain sum overflows, e.g. weights of 1e308, is first scaled by its largest
            weight); only nonzero pairs are computed.
        alpha: bandwidth, > 0.
        metric: ``"sqeuclidean"`` or ``"euclidean"``.
        tol: stopping threshold on the gap.
        max_iter: most passes over the data per class after the first evaluation (``n_iter``).
        log_q: ``[C, n]`` start (``-inf`` = empty slot, kept empty); default uniform over all n slots.
        progress: show a tqdm bar with the largest remaining gap.
        cache: cache each class's ``[rows_c, n]`` kernel matrix so that an iteration costs two
            log-sum-exp passes instead of a distance GEMM. ``None`` (default) caches when the matrices
            fit in ``cache_budget_bytes``; otherwise every iteration is one fused kernel pass
            (:func:`ccluster.fit_step`) that never materialises them.

        accelerate: SQUAREM extrapolation of the update (two EM steps, a squared extrapolation along
            them, and a fall-back that keeps the objective monotone). Same certificate, usually far
            fewer passes when some q_j go to 0 (where plain EM is slow).

        group: a ``torch.distributed`` process group (or ``dist.group.WORLD``) when the segments are
            sharded across ranks: x and weight are this rank's shard; db, log_q and every other argument
            must be the same on all ranks. Per pass, the objective and eta are summed across ranks
            (eta as a log-sum-exp), so every rank applies the same update, stops at the same time and
            returns the same FitResult as one process holding all segments (to rounding).

    Returns:
        :class:`FitResult`. ``n_iter`` counts the passes over the data after the first evaluation.

    Raises:
        TypeError: an argument of the wrong type or dtype (as the ops: :mod:`ccluster.ops`): also a
            ``log_q`` that is not a Tensor, a ``tol`` or ``max_iter`` that is not a number.
        ValueError: a wrong shape, device or value (negative or non-finite weight, ``alpha <= 0``,
            NaN or +inf in ``log_q``, C = 0 classes, NaN or inf in a weighted row of ``x`` or in a class
            of ``db`` that has a weight): a non-finite objective is refused, never certified.
    """
    op = "fit_representativeness"
    for name, t in (("x", x), ("db", db), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be a [N, m] tensor, got {tuple(x.shape)}")
    if not (db.dim() == 3 and db.shape[2] == x.shape[1]):
        raise ValueError(f"{op}: db must be [C, n, m={x.shape[1]}], got {tuple(db.shape)}")
    if db.dtype != x.dtype:
        raise TypeError(f"{op}: db must have x's dtype {x.dtype}, got {db.dtype}")
    if db.device != x.device:
        raise ValueError(f"{op}: db must be on x's device {x.device}, got {db.device}")
    C, n, _ = db.shape
    if C == 0:
        raise ValueError(f"{op}: db must hold at least one class, got C=0 (shape {tuple(db.shape)})")
    if list(weight.shape) != [x.shape[0], C]:
        raise ValueError(f"{op}: weight must be [N, C] = {[x.shape[0], C]}, got {list(weight.shape)}")
    weight = weight.to(x.dtype)
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise ValueError(f"{op}: weight must be finite and >= 0")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise TypeError(f"{op}: alpha must be a finite number > 0, got {alpha!r} ({type(alpha).__name__})")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"{op}: alpha must be a finite number > 0, got {alpha}")
    if not isinstance(metric, str):
        raise TypeError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    if metric not in METRICS:
        raise ValueError(f"{op}: metric must be one of {METRICS}, got {metric!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"{op}: tol must be a number > 0, got {tol!r} ({type(tol).__name__})")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int):
        raise TypeError(f"{op}: max_iter must be an int >= 0, got {max_iter!r} ({type(max_iter).__name__})")
    if not (tol > 0 and max_iter >= 0):
        raise ValueError(f"{op}: need tol > 0 and max_iter >= 0, got tol={tol}, max_iter={max_iter}")
    if isinstance(cache_budget_bytes, bool) or not isinstance(cache_budget_bytes, int):
        raise TypeError(f"{op}: cache_budget_bytes must be an int, got {cache_budget_bytes!r}")
    if log_q is not None and not isinstance(log_q, torch.Tensor):
        raise TypeError(f"{op}: log_q must be a Tensor or None, got {type(log_q).__name__}")
    if log_q is not None and not log_q.is_floating_point():
        raise TypeError(f"{op}: log_q must be a floating-point tensor, got {log_q.dtype}")

    if log_q is None:
        log_q = torch.full((C, n), -math.log(n) if n else 0.0, dtype=x.dtype, device=x.device)
    else:
        if list(log_q.shape) != [C, n]:
            raise ValueError(f"{op}: log_q must be [C, n] = {[C, n]}, got {list(log_q.shape)}")
        if bool(torch.isnan(log_q).any()) or bool((log_q == math.inf).any()):
            raise ValueError(f"{op}: log_q must not hold NaN or +inf")
        log_q = log_q.to(device=x.device, dtype=x.dtype)
        log_q = log_q - torch.logsumexp(log_q, 1, keepdim=True).nan_to_num(neginf=0.0)
    filled = torch.isfinite(log_q)

    total = weight.sum(0)
    if group is not None:
        dist.all_reduce(total, group=group)
    overflow = ~torch.isfinite(total)  # finite weights whose sum does not fit (e.g. 1e308 each)
    if bool(overflow.any()):  # those classes: scaled by their largest weight first (only ratios matter)
        peak = weight.amax(0)
        if group is not None:
            dist.all_reduce(peak, op=dist.ReduceOp.MAX, group=group)
        weight = torch.where(overflow, weight / torch.where(peak > 0, peak, torch.ones_like(peak)), weight)
        total = weight.sum(0)
        if group is not None:
            dist.all_reduce(total, group=group)
    fittable = (total > 0) & filled.any(1)
    empty = (~fittable).nonzero().squeeze(1).tolist()
    weight = torch.where(fittable, weight / torch.where(total > 0, total, torch.ones_like(total)), 0.0)
    _check_finite_inputs(op, x, db, weight, filled, fittable, group)

    if cache is None:
        rows = int((weight > 0).sum())
        cache = rows * n * x.element_size() <= cache_budget_bytes
    kernels = _cached_kernels(x, db, weight, float(alpha), metric) if cache else None
    # the pairs with weight, on the host once per fit: fit_step lays out its label-sparse plan from
    # them without reading the device in every pass
    pairs = None if cache or x.device.type == "cpu" else (weight > 0).cpu()

    def evaluate(lq, act):
        """One pass at lq for the active classes: objective [C], log eta [C, n], gap [C]."""
        w = torch.where(act, weight, 0.0)
        if cache:
            logz, log_eta = _cached_step(kernels, lq, w, act)
        else:
            logz, log_eta = fit_step(x, db, lq, w, float(alpha), metric, pairs=pairs)
        obj = (w * logz).sum(0)
        if group is not None:  # every rank holds a shard of the segments: combine their sums
            dist.all_reduce(obj, group=group)
            log_eta = _all_reduce_logsumexp(log_eta, group)
        q = lq.exp()
        mean_log_eta = torch.where(q > 0, q * log_eta, 0.0).sum(1)
        max_log_eta = torch.where(filled, log_eta, _NEG_INF).amax(1) if n else torch.zeros(C, dtype=x.dtype,
                                                                                             device=x.device)
        # a certificate only for a finite objective and eta: otherwise NaN, never below tol
        finite = torch.isfinite(obj) & ~torch.isnan(log_eta).any(1) & ~torch.isnan(lq).any(1)
        return obj, log_eta, torch.where(finite, max_log_eta - mean_log_eta, math.nan)

    def em(lq, log_eta):
        new = lq + log_eta
        return new - torch.logsumexp(torch.where(filled, new, _NEG_INF), 1, keepdim=True)

    gap = torch.zeros(C, dtype=x.dtype, device=x.device)  # 0 stays for the empty classes (see FitResult)
    n_iter = torch.zeros(C, dtype=torch.long)
    active = fittable.clone()
    history = []
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_iter, desc="fit Q", unit="pass")

    def record(obj, g, act, lq_new, lq):
        """Accept lq_new for the active classes; returns (log_q, still active). A class whose gap is NaN
        (a non-finite objective) stops with its last finite Q, not converged."""
        nonlocal gap
        history.append(torch.where(act, obj, math.nan))
        gap = torch.where(act, g, gap)
        bad = torch.isnan(g)
        done = act & ((g < tol) | bad | (n_iter >= max_iter).to(g.device))
        return torch.where((act & ~bad)[:, None] & filled, lq_new, lq), act & ~done

    if active.any():
        obj, log_eta, g = evaluate(log_q, active)
        log_q, active = record(obj, g, active, log_q, log_q)
    while bool(active.any()):
        before = active.clone()
        if not accelerate:
            new = em(log_q, log_eta)
            n_iter += active.cpu().long()
            obj, log_eta, g = evaluate(new, active)
            log_q, active = record(obj, g, active, new, log_q)
        else:
            # SQUAREM (Varadhan & Roland 2008): two EM steps, a squared extrapolation along them, and
            # a safeguard that keeps the objective monotone (fall back to the second EM step).
            q0 = log_q
            q1 = em(q0, log_eta)
            n_iter += active.cpu().long()
            obj1, eta1, g1 = evaluate(q1, active)
            log_q, act1 = record(obj1, g1, active, q1, log_q)
            if bool(act1.any()):
                q2 = em(q1, eta1)
                # The extrapolation costs one pass and its fall-back another: a class with a single
                # pass left in its budget takes the plain EM step q2 instead, so n_iter <= max_iter.
                ext = act1 & (max_iter - n_iter >= 2).to(act1.device)
                obj_e, eta_e, g_e, qe = obj1, eta1, g1, q2
                bad = torch.zeros_like(act1)
                if bool(ext.any()):
                    p0, p1, p2 = (torch.where(filled, t.double().exp(), 0.0) for t in (q0, q1, q2))
                    r, v = p1 - p0, p2 - 2 * p1 + p0
                    step = -(r.norm(dim=1) / v.norm(dim=1).clamp_min(1e-300)).clamp_min(1.0)
                    pe = p0 - 2 * step[:, None] * r + step[:, None] ** 2 * v
                    # keep every filled slot strictly positive: a zero could never come back
                    pe = torch.where(filled, pe.clamp_min(1e-12 * p2.amax(1, keepdim=True)), 0.0)
                    qe = (pe / pe.sum(1, keepdim=True)).log().to(x.dtype)
                    qe = torch.where(filled, qe, _NEG_INF)
                    n_iter += ext.cpu().long()
                    obj_e, eta_e, g_e = evaluate(qe, ext)
                    bad = ext & ~(obj_e >= obj1)
                fall = bad | (act1 & ~ext)
                if bool(fall.any()):
                    n_iter += fall.cpu().long()
                    obj2, eta2, g2 = evaluate(q2, fall)
                    qe = torch.where(fall[:, None], q2, qe)
                    obj_e, g_e = torch.where(fall, obj2, obj_e), torch.where(fall, g2, g_e)
                    eta_e = torch.where(fall[:, None], eta2, eta_e)
                log_q, act1 = record(obj_e, g_e, act1, qe, log_q)
                log_eta = torch.where(act1[:, None], eta_e, eta1)
            active = act1
        if bar is not None:
            bar.update(int((n_iter[before.cpu()].max() if before.any() else 0)) - bar.n)
            if active.any():
                bar.set_postfix(max_gap=f"{float(gap[active].max()):.2e}", active=int(active.sum()))
    if bar is not None:
        bar.close()
    return FitResult(log_q=log_q, gap=gap, n_iter=n_iter, converged=gap < tol,
                     objective=history, empty_classes=empty, cached=bool(cache))
