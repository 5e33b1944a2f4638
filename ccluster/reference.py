"""Pure-PyTorch reference implementations: the test oracle and the benchmark baseline.

Everything here materialises the [N, C*n] score matrix and relies on autograd. It is the best plain
PyTorch formulation we know: one ``addmm`` folds log q - alpha*|y|^2 into the GEMM epilogue, so the
distance matrix is never built separately (faster than ``torch.cdist`` by 1.5-2x on CPU). Works in any
floating dtype, float64 included.
"""
from __future__ import annotations

import torch

METRICS = ("sqeuclidean", "euclidean")


def _safe_sqrt(d2: torch.Tensor) -> torch.Tensor:
    # sqrt with gradient 0 (not inf*0 = NaN) where the distance is 0.
    pos = d2 > 0
    return torch.where(pos, d2.clamp_min(torch.finfo(d2.dtype).tiny).sqrt(), torch.zeros_like(d2))


def scores(x: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor, alpha: float,
           metric: str = "sqeuclidean") -> torch.Tensor:
    """Materialised scores ``S[s, c, j] = log_q[c, j] - alpha * d(x[s], db[c, j])``, shape [N, C, n]."""
    C, n, m = db.shape
    y = db.reshape(C * n, m)
    lq = log_q.reshape(C * n)
    xx = (x * x).sum(-1, keepdim=True)
    yy = (y * y).sum(-1)
    if metric == "sqeuclidean":
        # log q - alpha (|x|^2 + |y|^2 - 2 x.y), clamped so that d >= 0 (S <= log q).
        s = torch.addmm(lq - alpha * yy, x, y.t(), alpha=2 * alpha) - alpha * xx
        s = torch.minimum(s, lq)
    elif metric == "euclidean":
        d2 = torch.addmm(yy + xx, x, y.t(), alpha=-2.0)
        s = lq - alpha * _safe_sqrt(d2)
    else:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return s.view(x.shape[0], C, n)


def exemplar_logsumexp(x: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor, alpha: float,
                       metric: str = "sqeuclidean", pairs: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for :func:`ccluster.exemplar_logsumexp` (same semantics, materialised)."""
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    if pairs is not None:
        # Rows without a pair are computed from zeros: their entries are masked anyway, and their real
        # values (NaN, inf) would otherwise reach the gradients as 0 * NaN.
        x = torch.where(pairs.any(1, keepdim=True), x, zero)
    out = torch.logsumexp(scores(x, db, log_q, alpha, metric), dim=-1)
    if pairs is not None:
        out = torch.where(pairs, out, zero.to(out.dtype))
    return out


def _loss_pairs(pairs: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    # Classes without any exemplar (all log q = -inf) are left out of the loss.
    return pairs & torch.isfinite(log_q).any(-1)


def convex_clustering_loss(x: torch.Tensor, attention: torch.Tensor, pairs: torch.Tensor,
                           db: torch.Tensor, log_q: torch.Tensor, alpha: float,
                           metric: str = "sqeuclidean") -> torch.Tensor:
    """Reference for :func:`ccluster.convex_clustering_loss`: dense over all classes, then masked."""
    pairs = _loss_pairs(pairs, log_q)
    w = attention[:, None].expand_as(pairs) if attention.dim() == 1 else attention
    logz = exemplar_logsumexp(x, db, log_q, alpha, metric, pairs)
    return -(torch.where(pairs, w, torch.zeros((), dtype=w.dtype, device=w.device)) * logz).sum()


def convex_clustering_loss_by_class(x: torch.Tensor, attention: torch.Tensor, pairs: torch.Tensor,
                                    db: torch.Tensor, log_q: torch.Tensor, alpha: float,
                                    metric: str = "sqeuclidean") -> torch.Tensor:
    """Label-aware pure-PyTorch loss: for each class, gather only the rows paired with it.

    Work is proportional to the number of pairs, like the fused op; memory is one [rows_c, n] matrix per
    class. This is the strongest plain-PyTorch competitor for the label-sparse loss.
    """
    pairs = _loss_pairs(pairs, log_q)
    total = x.new_zeros(())
    for c in range(db.shape[0]):
        rows = pairs[:, c].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        w = attention[rows] if attention.dim() == 1 else attention[rows, c]
        s = scores(x[rows], db[c:c + 1], log_q[c:c + 1], alpha, metric)[:, 0]
        total = total - (w * torch.logsumexp(s, dim=-1)).sum()
    return total


def fit_step(x: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor, weight: torch.Tensor,
             alpha: float, metric: str = "sqeuclidean") -> tuple[torch.Tensor, torch.Tensor]:
    """One convex-clustering pass, materialised: ``(logz [N, C], log_eta [C, n])``.

    ``log_eta[c, j] = log sum_s weight[s, c] exp(-alpha d(x_s, y_cj) - logz[s, c])``, over the rows with
    ``weight[s, c] > 0``; ``logz`` is 0 outside those rows and ``log_eta`` is -inf on empty slots
    (``log_q = -inf``).
    """
    pairs = weight > 0
    s = scores(x, db, log_q, alpha, metric)                       # [N, C, n]
    logz = torch.logsumexp(s, dim=-1)                             # [N, C]
    ok = pairs & torch.isfinite(logz)
    lw = torch.where(ok, weight.log() - logz, torch.full_like(logz, -torch.inf))
    neg_ad = s - log_q  # -alpha d, exact where log_q is finite
    t = torch.where(torch.isfinite(log_q), neg_ad, torch.full_like(neg_ad, -torch.inf))
    log_eta = torch.logsumexp(t + lw[:, :, None], dim=0)          # [C, n]
    return torch.where(pairs, logz, torch.zeros_like(logz)), log_eta


# ---------------------------------------------------------------------------------------------------
# Exemplar losses of ccluster.exemplar_losses (our extension), materialised


def exemplar_cross_entropy(x: torch.Tensor, target: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor,
                           alpha: float, metric: str = "sqeuclidean", temperature: float = 1.0) -> torch.Tensor:
    """Reference for :func:`ccluster.exemplar_cross_entropy`: dense [N, K*n] scores, empty classes
    (all log q = -inf) removed from the database and the target before the log-softmax."""
    keep = ~(log_q == -torch.inf).all(1)
    if not bool(keep.any()):
        return (target * 0).sum() + 0 * x.sum()
    logz = exemplar_logsumexp(x, db[keep], log_q[keep], alpha, metric)
    log_p = torch.log_softmax(logz / temperature, dim=1)
    return -(target[:, keep] * log_p).sum()


def class_contrastive_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, db: torch.Tensor,
                           log_q: torch.Tensor, alpha: float, metric: str = "sqeuclidean",
                           temperature: float = 1.0, background_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for :func:`ccluster.class_contrastive_loss`: the target ``w_s / |L_s|`` on each labelled
    class (|L_s| counting every label of the row), ``+ v_s`` on the last class, then
    :func:`exemplar_cross_entropy`."""
    lab = labels != 0
    count = lab.sum(1).clamp_min(1).to(weight.dtype)
    target = lab.to(weight.dtype) * (weight / count)[:, None]
    if background_weight is not None:
        onehot = torch.zeros(db.shape[0], dtype=weight.dtype, device=weight.device)
        onehot[-1] = 1.0
        target = target + background_weight[:, None] * onehot
    return exemplar_cross_entropy(x, target, db, log_q, alpha, metric, temperature)


def attention_prior_target(features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, db: torch.Tensor,
                           log_q: torch.Tensor, alpha: float, metric: str = "sqeuclidean",
                           temperature: float = 1.0, aggregate: str = "max",
                           standardize: bool = False) -> torch.Tensor:
    """Reference for :func:`ccluster.attention_prior_target`, one video at a time: dense log z of the
    video's valid segments against its labelled non-empty classes, max/mean over them, optional
    standardisation (population std; std 0 gives a uniform target), softmax of v / tau."""
    B, T, _ = features.shape
    out = torch.zeros(B, T, dtype=features.dtype, device=features.device)
    nonempty = ~(log_q == -torch.inf).all(1)
    for b in range(B):
        rows = mask[b].nonzero().squeeze(1)
        cls = ((labels[b] != 0) & nonempty).nonzero().squeeze(1)
        if rows.numel() == 0 or cls.numel() == 0:
            continue
        logz = exemplar_logsumexp(features[b, rows].detach(), db[cls].detach(), log_q[cls].detach(), alpha,
                                  metric)
        v = logz.max(1).values if aggregate == "max" else logz.mean(1)
        if standardize:
            std = v.std(unbiased=False)
            v = (v - v.mean()) / std if float(std) > 0 else torch.zeros_like(v)
        out[b, rows] = torch.softmax(v / temperature, dim=0)
    return out


def attention_prior_loss(features: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor, alpha: float,
                         metric: str = "sqeuclidean", temperature: float = 1.0, aggregate: str = "max",
                         standardize: bool = False, log_attention: bool = False,
                         reduction: str = "sum") -> torch.Tensor:
    """Reference for :func:`ccluster.attention_prior_loss`, one video at a time:
    ``sum_b sum_t target_t (log target_t - log p_t)`` over the target's support, with
    ``p = a / sum a`` (or ``softmax(log a)``); videos without a target or with zero attention skipped."""
    target = attention_prior_target(features, labels, mask, db, log_q, alpha, metric, temperature,
                                    aggregate, standardize)
    total = attention.new_zeros(())
    for b in range(features.shape[0]):
        rows = mask[b].nonzero().squeeze(1)
        t = target[b, rows]
        if rows.numel() == 0 or float(t.sum()) == 0.0:
            continue
        a = attention[b, rows]
        if log_attention:
            if not bool((a > -torch.inf).any()):
                continue
            log_p = torch.log_softmax(a, dim=0)
        else:
            if float(a.sum().detach()) == 0.0:
                continue
            log_p = torch.log(a) - torch.log(a.sum())
        on = t > 0
        total = total + (t[on] * (t[on].log() - log_p[on])).sum()
    return total / features.shape[0] if reduction == "mean" and features.shape[0] > 0 else total
