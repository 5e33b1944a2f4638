r"""Exemplar losses that do not collapse the attention (an extension of ours, not in the poster).

The poster's loss ``L_cc = -sum_s p(s|x) log z_s`` with ``z_sc = sum_j q_cj exp(-alpha d(phi(s), y_cj))``
only *attracts*: it is smallest when the attention sits on the few segments nearest an exemplar and when
phi shrinks so that every distance is small. The losses here reuse the same machinery (database D,
representativeness Q, the fused :func:`ccluster.exemplar_logsumexp`) in forms without that minimum.

* :func:`class_contrastive_loss` / :class:`ClassContrastiveLoss`: a segment is classified by its
  exemplars, ``p(c|s) = z_sc^(1/tau) / sum_c' z_sc'^(1/tau)``, and trained with cross-entropy toward
  its video's labels. It pulls a segment toward its class's exemplars *and away from the other
  classes'*; shrinking phi makes every class equally likely and so raises the loss instead of lowering
  it. With an extra background class in D (exemplars from low-attention segments), the attended
  segments are trained toward their video's classes and the unattended ones toward background.
* :func:`attention_prior_loss` / :class:`AttentionPriorLoss`: instead of weighting a loss by the
  attention, train the attention toward a target distribution over the video's segments,
  ``target ∝ exp(log z / tau)`` (detached), by ``KL(target || p)``. Its minimum is ``p = target``,
  whose spread is set by ``tau``, so it cannot collapse to one segment.
* :func:`exemplar_cross_entropy`: the primitive under the contrastive forms, cross-entropy of the
  exemplar classifier against any non-negative ``[N, K]`` target weights.

Everything is built on :func:`ccluster.exemplar_logsumexp` (with ``pairs`` where only some
(segment, class) pairs are needed): nothing of size N x K x n is ever allocated, only ``[N, K]``
log-sums, and the values stay exact when ``alpha * d`` is far beyond the range of ``exp``. The float64
oracles are in :mod:`ccluster.reference`.
"""
from __future__ import annotations

import math

import torch

from .loss import PaddedExemplarLoss
from .ops import _check_common, exemplar_logsumexp

__all__ = [
    "exemplar_cross_entropy",
    "class_contrastive_loss",
    "attention_prior_target",
    "attention_prior_loss",
    "ClassContrastiveLoss",
    "AttentionPriorLoss",
]

AGGREGATES = ("max", "mean")
WEIGHTINGS = ("attention", "uniform")
_NEG_INF = -math.inf


# ---------------------------------------------------------------------------------------------------
# Argument checks (every message names the function, the argument, what was expected and what arrived)


def _check_number(fn: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{fn}: {name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_tensor(fn: str, name: str, t, shape: list, x: torch.Tensor, kind: str) -> None:
    """kind: 'float' (x's dtype), 'bool', or 'labels' (bool or floating, nonzero = labelled)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
    if list(t.shape) != shape:
        raise ValueError(f"{fn}: {name} must be {shape}, got {list(t.shape)}")
    if kind == "float" and t.dtype != x.dtype:
        raise TypeError(f"{fn}: {name} must have the features' dtype {x.dtype}, got {t.dtype}")
    if kind == "bool" and t.dtype != torch.bool:
        raise TypeError(f"{fn}: {name} must be a bool tensor, got {t.dtype}")
    if kind == "labels" and not (t.dtype == torch.bool or t.is_floating_point()):
        raise TypeError(f"{fn}: {name} must be a bool or floating tensor, got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{fn}: {name} must be on the features' device {x.device}, got {t.device}")


def _check_choice(fn: str, name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{fn}: {name} must be one of {choices}, got {value!r}")


def _check_padded(fn: str, features, attention, labels, mask, db, log_q, alpha, metric,
                  num_classes: int | None = None) -> tuple[int, int, int, int]:
    """Checks a padded batch; returns (B, T, m, C). ``num_classes`` is the labels' C when it differs
    from the database's (a background class)."""
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{fn}: features must be a Tensor, got {type(features).__name__}")
    if features.dim() != 3:
        raise ValueError(f"{fn}: features must be [B, T, m], got {list(features.shape)}")
    B, T, m = features.shape
    _check_common(fn, features.reshape(B * T, m), db, log_q, alpha, metric)
    C = db.shape[0] if num_classes is None else num_classes
    _check_tensor(fn, "mask", mask, [B, T], features, "bool")
    _check_tensor(fn, "labels", labels, [B, C], features, "labels")
    if attention is not None:
        _check_tensor(fn, "attention", attention, [B, T], features, "float")
    return B, T, m, C


def _empty_classes(log_q: torch.Tensor) -> torch.Tensor:
    """[K] bool: classes whose slots are all empty (log q = -inf). NaN slots do not count as empty, so
    NaN propagates instead of silently dropping a class."""
    return (log_q == _NEG_INF).all(1)


def _positive_or_one(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t, torch.ones_like(t))


# ---------------------------------------------------------------------------------------------------
# Class-contrastive forms


def _cross_entropy(x, target, db, log_q, alpha, metric, temperature, rows=None):
    """-sum target * log softmax(logz / tau) over the non-empty classes; rows: optional [N] bool of the
    rows to compute (the others must have zero target; their logz is never computed)."""
    N, K = x.shape[0], db.shape[0]
    pairs = None if rows is None else rows[:, None].expand(N, K)
    logz = exemplar_logsumexp(x, db, log_q, alpha, metric, pairs)            # [N, K]
    keep = ~_empty_classes(log_q)                                             # [K]
    logits = logz / temperature if temperature != 1.0 else logz
    # Empty classes are -inf, i.e. out of the normaliser. If every class is empty, use 0 everywhere
    # instead (the target is then ignored anyway): a row of all -inf would give NaN gradients.
    masked = torch.where(keep, logits, torch.full_like(logits, _NEG_INF))
    masked = torch.where(keep.any(), masked, torch.zeros_like(masked))
    log_p = masked - torch.logsumexp(masked, dim=1, keepdim=True)
    # The target of an empty class is ignored; use 0 there, not target * -inf (NaN gradient for target).
    log_p = torch.where(keep, log_p, torch.zeros_like(log_p))
    return -(target * log_p).sum()


def exemplar_cross_entropy(x: torch.Tensor, target: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor,
                           alpha: float, metric: str = "sqeuclidean", *,
                           temperature: float = 1.0) -> torch.Tensor:
    r"""Cross-entropy of the exemplar classifier against soft targets (our extension).

    ``L = - sum_s sum_c target[s, c] * log p(c | s)``, with
    ``p(c | s) = exp(log z[s, c] / tau) / sum_{c' non-empty} exp(log z[s, c'] / tau)`` and
    ``log z = exemplar_logsumexp(x, db, log_q, alpha, metric)`` over all K classes (one fused call,
    ``[N, K]`` output; no ``[N, K*n]`` matrix).

    At ``tau = 1`` and uniform class priors, ``p(c | s)`` is the posterior of a kernel-density classifier
    whose class densities are the Q-weighted exemplar mixtures (the kernel's normaliser is the same for
    every class, so it cancels). ``log z`` is in units of ``alpha * d``: two classes whose nearest
    exemplars differ by ``Δ`` in ``alpha * d`` differ by about ``Δ / tau`` in logit.

    Args:
        x: ``[N, m]`` segment features.
        target: ``[N, K]`` non-negative target weights, x's dtype; differentiable (the gradient is
            ``-log p``). A row's weights need not sum to one: the loss is linear in them.
        db: ``[K, n, m]`` exemplar database; log_q: ``[K, n]`` log representativeness (-inf = empty slot).
        alpha, metric: as in :func:`ccluster.exemplar_logsumexp`.
        temperature: ``tau``, a finite number > 0.

    Classes with no exemplar (all ``log_q = -inf``) are left out of the normaliser and their target is
    ignored (no NaN, no gradient). If every class is empty the loss is 0. Differentiable in x, target,
    db and log_q. NaN in x propagates to the loss.

    Returns:
        A scalar tensor of x's dtype (a sum over rows: no averaging).
    """
    fn = "exemplar_cross_entropy"
    _check_common(fn, x, db, log_q, alpha, metric)
    _check_tensor(fn, "target", target, [x.shape[0], db.shape[0]], x, "float")
    temperature = _check_number(fn, "temperature", temperature)
    return _cross_entropy(x, target, db, log_q, float(alpha), metric, temperature)


def _contrastive_target(weight, labels, background_weight):
    """[N, K]: weight / |L| on each labelled class, plus background_weight on the last class."""
    lab = labels if labels.dtype == torch.bool else labels != 0
    count = lab.sum(1, keepdim=True).to(weight.dtype)
    share = weight[:, None] / _positive_or_one(count)
    target = torch.where(lab, share, torch.zeros((), dtype=weight.dtype, device=weight.device))
    if background_weight is not None:
        target = torch.cat([target[:, :-1], (target[:, -1] + background_weight)[:, None]], dim=1)
    return target


def class_contrastive_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, db: torch.Tensor,
                           log_q: torch.Tensor, alpha: float, metric: str = "sqeuclidean", *,
                           temperature: float = 1.0,
                           background_weight: torch.Tensor | None = None) -> torch.Tensor:
    r"""Class-contrastive exemplar loss over segments (our extension; replaces the attraction-only L_cc).

    ``L = - sum_s w_s sum_{c in L_s} (1 / |L_s|) log p(c | s)  [ - sum_s v_s log p(bg | s) ]``

    with ``p(c | s) = softmax_c(log z[s, :] / tau)`` over the non-empty classes and
    ``log z = exemplar_logsumexp(x, db, log_q, alpha, metric)`` over **all** K classes of the database
    (one fused call; only ``[N, K]`` log-sums are stored). Each segment is pulled toward its video's
    classes' exemplars and pushed away from the other classes'. Unlike ``-log z``, the loss does not
    fall when phi contracts (all classes then become equally likely) and is bounded below by 0.

    Background (optional): give ``background_weight`` ``v`` and the database's **last** class
    (index K-1) is background, e.g. exemplars collected from the lowest-scored segments; ``v_s`` is the
    weight with which segment s is trained toward it. Background is always in the normaliser, so the
    foreground terms also push the attended segments away from background exemplars.
    :class:`ClassContrastiveLoss` builds ``w`` and ``v`` from the attention of each video.

    Args:
        x: ``[N, m]`` segment features (a batch flattened).
        weight: ``[N]`` segment weights ``w_s`` >= 0, x's dtype (e.g. attention normalised over each
            video's segments, or uniform ``1/T``); differentiable: detach it to keep the loss from
            moving the attention.
        labels: ``[N, K]`` bool (or floating, nonzero = labelled): the classes of each segment's video.
            With a background class, ``labels[:, K-1]`` is normally False.
        db, log_q, alpha, metric: as in :func:`ccluster.exemplar_logsumexp`, K classes.
        temperature: ``tau`` > 0 (see :func:`exemplar_cross_entropy`).
        background_weight: optional ``[N]`` weights ``v_s`` >= 0 toward class K-1; differentiable.

    ``|L_s|`` counts all labelled classes of the row. A labelled class with no exemplar (all
    ``log_q = -inf``) contributes nothing: its share ``w_s / |L_s|`` is dropped, not given to the other
    labels, and it is left out of the normaliser. A row with no label contributes only its background
    term. If every class is empty, the loss is 0 (no NaN).

    Returns:
        A scalar tensor of x's dtype: the sum over segments.
    """
    fn = "class_contrastive_loss"
    _check_common(fn, x, db, log_q, alpha, metric)
    N, K = x.shape[0], db.shape[0]
    _check_tensor(fn, "weight", weight, [N], x, "float")
    _check_tensor(fn, "labels", labels, [N, K], x, "labels")
    if background_weight is not None:
        _check_tensor(fn, "background_weight", background_weight, [N], x, "float")
        if K < 1:
            raise ValueError(f"{fn}: background_weight needs a background class in db, got K={K} classes")
    temperature = _check_number(fn, "temperature", temperature)
    target = _contrastive_target(weight, labels, background_weight)
    return _cross_entropy(x, target, db, log_q, float(alpha), metric, temperature)


def _video_weights(attention: torch.Tensor, mask: torch.Tensor):
    """Per video, over valid segments: (p = a / sum a, ã = a / max a, ok = sum a > 0)."""
    zero = torch.zeros((), dtype=attention.dtype, device=attention.device)
    a = torch.where(mask, attention, zero)
    total = a.sum(1, keepdim=True)
    peak = a.amax(1, keepdim=True) if a.shape[1] else total
    return a / _positive_or_one(total), a / _positive_or_one(peak), (total > 0).squeeze(1)


class ClassContrastiveLoss(PaddedExemplarLoss):
    r""":func:`class_contrastive_loss` for padded batches of videos (our extension).

    Per video b with labels ``L_b`` and non-negative attention ``a`` on its valid segments:

    * ``weighting="attention"``: ``w_s = a_s / sum_t a_t`` (normalised over the video's valid segments,
      as :class:`ccluster.ConvexClusteringLoss` does); ``"uniform"``: ``w_s = 1 / T_b``.
    * ``background=True``: the database holds ``C + 1`` classes and the last is background. With
      ``ã_s = a_s / max_t a_t`` (in [0, 1]) the background weights are
      ``v_s = background_scale * (1 - ã_s) / sum_t (1 - ã_t)``: each video spreads one unit of weight
      over its attended segments toward its classes and ``background_scale`` units over its unattended
      ones toward background. Both distributions are unchanged by rescaling a video's attention, so
      softmax and sigmoid attention can be passed as they are. Needs ``weighting="attention"``.

    ``L = sum_b [ - sum_s w_s sum_{c in L_b} log p(c|s) / |L_b|  - sum_s v_s log p(bg|s) ]``, divided by
    B for ``reduction="mean"``.

    A video whose valid attention is all 0 contributes nothing (no NaN). A video whose attention is equal
    on all its segments has no background term (``1 - ã = 0``). Gradients flow to the features, the
    attention (detach it to stop them), the database and log_q.

    Args:
        alpha: bandwidth (> 0); may be changed later through the ``alpha`` attribute.
        metric: ``"sqeuclidean"`` or ``"euclidean"``.
        temperature: ``tau`` > 0 of :func:`exemplar_cross_entropy`.
        weighting: ``"attention"`` or ``"uniform"``.
        background: whether the database's last class is background.
        background_scale: weight (> 0) of the background term per video.
        reduction: ``"sum"`` over videos, or ``"mean"``.

    Forward args:
        features ``[B, T, m]``; attention ``[B, T]`` non-negative (may be None for ``"uniform"``);
        labels ``[B, C]`` multi-hot (bool or float); mask ``[B, T]`` bool, True on valid segments;
        db ``[C, n, m]`` (``[C + 1, n, m]`` with background); log_q ``[C, n]`` (``[C + 1, n]``).
    Only the valid segments are computed (padding features are never read).
    """

    def __init__(self, alpha: float, metric: str = "sqeuclidean", temperature: float = 1.0,
                 weighting: str = "attention", background: bool = False, background_scale: float = 1.0,
                 reduction: str = "sum"):
        super().__init__(alpha, metric, reduction)
        name = "ClassContrastiveLoss"
        self.temperature = _check_number(name, "temperature", temperature)
        _check_choice(name, "weighting", weighting, WEIGHTINGS)
        if not isinstance(background, bool):
            raise TypeError(f"{name}: background must be a bool, got {type(background).__name__}")
        if background and weighting != "attention":
            raise ValueError(f"{name}: background=True needs weighting='attention', got {weighting!r}")
        self.weighting = weighting
        self.background = background
        self.background_scale = _check_number(name, "background_scale", background_scale)

    def extra_repr(self) -> str:
        bg = f", background_scale={self.background_scale:g}" if self.background else ""
        return (f"alpha={self.alpha:g}, metric={self.metric!r}, temperature={self.temperature:g}, "
                f"weighting={self.weighting!r}, background={self.background}{bg}, "
                f"reduction={self.reduction!r}")

    def forward(self, features: torch.Tensor, attention: torch.Tensor | None, labels: torch.Tensor,
                mask: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        fn = "ClassContrastiveLoss"
        if self.weighting == "attention" and attention is None:
            raise ValueError(f"{fn}: attention must be a [B, T] tensor for weighting='attention', got None")
        K = db.shape[0] if isinstance(db, torch.Tensor) and db.dim() == 3 else None
        if K is not None and self.background and K < 1:
            raise ValueError(f"{fn}: db must have C + 1 classes (the last is background), got {K}")
        C = None if K is None else (K - 1 if self.background else K)
        B, T, m, C = _check_padded(fn, features, attention if self.weighting == "attention" else None,
                                   labels, mask, db, log_q, self.alpha, self.metric, C)
        lab = labels if labels.dtype == torch.bool else labels != 0
        if self.weighting == "attention":
            w, rel, ok = _video_weights(attention, mask)
        else:
            count = mask.sum(1, keepdim=True).to(features.dtype)
            w = mask.to(features.dtype) / _positive_or_one(count)
        bg = None
        if self.background:
            zero = torch.zeros((), dtype=features.dtype, device=features.device)
            comp = torch.where(mask & ok[:, None], 1 - rel, zero)   # all-zero attention: no term
            total = comp.sum(1, keepdim=True)
            bg = (self.background_scale * comp / _positive_or_one(total)).reshape(B * T)
            lab = torch.cat([lab, torch.zeros(B, 1, dtype=torch.bool, device=lab.device)], dim=1)
        lab_rows = lab[:, None, :].expand(B, T, lab.shape[1]).reshape(B * T, lab.shape[1])
        target = _contrastive_target(w.reshape(B * T), lab_rows, bg)
        # Padding rows are outside the computed pairs: never read, exactly 0 gradient (NaN there included).
        loss = _cross_entropy(features.reshape(B * T, m), target, db, log_q, self.alpha, self.metric,
                              self.temperature, rows=mask.reshape(B * T))
        return self._reduce(loss, B)


# ---------------------------------------------------------------------------------------------------
# Attention prior


def _prior_log_target(features, labels, mask, db, log_q, alpha, metric, temperature, aggregate,
                      standardize):
    """(log target [B, T] (-inf off the support), has [B, T] bool: segments with a target). No grad."""
    B, T, m = features.shape
    C = db.shape[0]
    lab = labels if labels.dtype == torch.bool else labels != 0
    with torch.no_grad():
        use = mask[:, :, None] & lab[:, None, :] & ~_empty_classes(log_q)     # [B, T, C]
        logz = exemplar_logsumexp(features.detach().reshape(B * T, m), db.detach(), log_q.detach(),
                                  alpha, metric, use.reshape(B * T, C)).reshape(B, T, C)
        has = use.any(-1)                                                      # [B, T]
        if aggregate == "max":
            v = torch.where(use, logz, torch.full_like(logz, _NEG_INF)).amax(-1) if C else \
                torch.full((B, T), _NEG_INF, dtype=logz.dtype, device=logz.device)
        else:
            v = torch.where(use, logz, torch.zeros_like(logz)).sum(-1) / \
                use.sum(-1).clamp_min(1).to(logz.dtype)
        zero = torch.zeros_like(v)
        v = torch.where(has, v, zero)
        if standardize:
            cnt = has.sum(1, keepdim=True).clamp_min(1).to(v.dtype)
            mean = v.sum(1, keepdim=True) / cnt
            dev = torch.where(has, v - mean, zero)
            std = (dev.square().sum(1, keepdim=True) / cnt).sqrt()
            v = dev / _positive_or_one(std)          # std 0 (one segment, or all equal): uniform target
        score = torch.where(has, v / temperature, torch.full_like(v, _NEG_INF))
        score = torch.where(has.any(1, keepdim=True), score, zero)   # no target: avoid an all -inf row
        log_t = torch.log_softmax(score, dim=1)
        return torch.where(has, log_t, torch.full_like(log_t, _NEG_INF)), has


def _check_prior_args(fn, temperature, aggregate, standardize):
    temperature = _check_number(fn, "temperature", temperature)
    _check_choice(fn, "aggregate", aggregate, AGGREGATES)
    if not isinstance(standardize, bool):
        raise TypeError(f"{fn}: standardize must be a bool, got {type(standardize).__name__}")
    return temperature


def attention_prior_target(features: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                           db: torch.Tensor, log_q: torch.Tensor, alpha: float, metric: str = "sqeuclidean",
                           *, temperature: float = 1.0, aggregate: str = "max",
                           standardize: bool = False) -> torch.Tensor:
    r"""The target attention of :func:`attention_prior_loss` (our extension), detached.

    Per video b, over its valid segments t:
    ``v_t = max_{c in L_b} log z[t, c]`` (``aggregate="max"``) or the mean over ``L_b`` (``"mean"``),
    with ``log z`` from :func:`ccluster.exemplar_logsumexp` with ``pairs`` (only the (valid segment,
    labelled class) pairs are computed); then ``target_t = softmax_t(v_t / tau)``.

    What ``tau`` means: ``log z`` is in units of ``alpha * d`` (``log z ≈ log q - alpha d`` to the
    nearest exemplars), so a segment whose ``v`` is ``Δ`` higher gets ``exp(Δ / tau)`` times the target;
    at ``tau = 1`` the target is proportional to the class's exemplar mixture ``z`` itself. The target's
    spread is that of ``v`` over the video's segments divided by ``tau``: with ``alpha * d`` spread over
    tens of units, ``tau = 1`` puts almost all the target on a few segments, so take ``tau`` of the order
    of the spread. ``standardize=True`` makes this automatic: ``v`` is standardised per video (zero mean,
    unit standard deviation over its valid segments) before dividing by ``tau``, so ``tau`` is in units of
    that spread and the target no longer depends on alpha or the scale of phi. For roughly Gaussian ``v``
    the target's effective number of segments (``1 / sum target^2``) is then about
    ``T exp(-1 / tau^2)``: 37 % of the video at ``tau = 1``, 78 % at ``tau = 2``, 2 % at ``tau = 0.5``.

    Args:
        features: ``[B, T, m]``; labels: ``[B, C]`` multi-hot (bool or float); mask: ``[B, T]`` bool;
        db: ``[C, n, m]``; log_q: ``[C, n]``; alpha, metric: as in :func:`ccluster.exemplar_logsumexp`.
        temperature: ``tau`` > 0. aggregate: ``"max"`` or ``"mean"`` over the video's labelled classes.
        standardize: standardise ``v`` per video first.

    Labelled classes with no exemplar are ignored; a video with none left (or no valid segment) gets an
    all-zero row. Padding entries are 0. Exact and finite when ``alpha * d`` is huge (1e4 and beyond),
    where normalising ``exp(-alpha d)`` directly gives 0/0. NaN in a video's features makes its row NaN.

    Returns:
        ``[B, T]`` tensor of the features' dtype, each row summing to 1 or 0. Not differentiable.
    """
    fn = "attention_prior_target"
    _check_padded(fn, features, None, labels, mask, db, log_q, alpha, metric)
    temperature = _check_prior_args(fn, temperature, aggregate, standardize)
    log_t, _ = _prior_log_target(features, labels, mask, db, log_q, float(alpha), metric, temperature,
                                 aggregate, standardize)
    return log_t.exp()


def attention_prior_loss(features: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
                         mask: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor, alpha: float,
                         metric: str = "sqeuclidean", *, temperature: float = 1.0, aggregate: str = "max",
                         standardize: bool = False, log_attention: bool = False,
                         reduction: str = "sum") -> torch.Tensor:
    r"""Attention prior from the exemplars: ``sum_b KL(target_b || p_b)`` (our extension).

    Trains the attention toward :func:`attention_prior_target` (detached) instead of weighting a loss by
    it. ``p_b`` is the model's attention distribution over the valid segments of video b:

    * ``log_attention=False``: ``attention`` holds weights ``a >= 0`` (softmax or sigmoid outputs) and
      ``p = a / sum_valid a``, as :class:`ccluster.ConvexClusteringLoss` normalises. A segment with
      ``a = 0`` where the target is positive makes that video's KL ``+inf`` (it is not clipped).
    * ``log_attention=True``: ``attention`` holds ``log a`` (e.g. logits of a softmax attention, or
      ``logsigmoid`` of an STPN attention's logits) and ``p = softmax_valid(log a)``, computed in the
      log domain: exact and never 0 for finite inputs. Prefer it when the log is at hand.

    ``KL = sum_t target_t (log target_t - log p_t)`` (terms with ``target_t = 0`` are 0). The minimum,
    0, is at ``p = target``, whose spread is set by ``tau`` (see :func:`attention_prior_target`), so the
    loss cannot pull the attention onto one segment unless ``tau`` is tiny. It is in nats whatever
    alpha and the feature scale are. The gradient goes to the attention only (the target is detached):
    the features, database and Q get none.

    Args:
        features, labels, mask, db, log_q, alpha, metric, temperature, aggregate, standardize: as in
            :func:`attention_prior_target`.
        attention: ``[B, T]``, the features' dtype; differentiable.
        log_attention: whether ``attention`` is in the log domain.
        reduction: ``"sum"`` over videos or ``"mean"`` (divided by B).

    A video contributes nothing (and gets no gradient, no NaN) when it has no target (no valid segment,
    or no labelled class with exemplars) or when its attention is all 0 (``-inf`` in log domain).

    Returns:
        A scalar tensor of the features' dtype.
    """
    fn = "attention_prior_loss"
    B, T, m, C = _check_padded(fn, features, attention, labels, mask, db, log_q, alpha, metric)
    temperature = _check_prior_args(fn, temperature, aggregate, standardize)
    if not isinstance(log_attention, bool):
        raise TypeError(f"{fn}: log_attention must be a bool, got {type(log_attention).__name__}")
    _check_choice(fn, "reduction", reduction, ("sum", "mean"))
    log_t, has = _prior_log_target(features, labels, mask, db, log_q, float(alpha), metric, temperature,
                                   aggregate, standardize)
    return _prior_kl(attention, mask, log_t, has, log_attention, reduction, B)


def _prior_kl(attention, mask, log_t, has, log_attention, reduction, B):
    zero = torch.zeros((), dtype=attention.dtype, device=attention.device)
    t = log_t.exp()
    # the support of the target (as represented: exp may underflow), in videos with a target
    on = has & (t > 0)
    if log_attention:
        la = torch.where(mask, attention, torch.full_like(attention, _NEG_INF))
        alive = (la > _NEG_INF).any(1, keepdim=True)
        la = torch.where(alive, la, torch.zeros_like(la))             # no all -inf row into logsumexp
        log_p = la - torch.logsumexp(la, dim=1, keepdim=True)
        ok = alive.squeeze(1)
    else:
        a = torch.where(mask, attention, zero)
        total = a.sum(1, keepdim=True)
        ok = (total > 0).squeeze(1)
        on = on & ok[:, None]
        # log a only where it is used: log 0 elsewhere would give 0 * inf = NaN gradients
        log_p = torch.log(torch.where(on, a, torch.ones_like(a))) - torch.log(_positive_or_one(total))
    terms = torch.where(on, t * (torch.where(on, log_t, torch.zeros_like(log_t)) - log_p), zero)
    kl = terms.sum(1)
    loss = torch.where(ok & has.any(1), kl, zero).sum()
    return loss / B if reduction == "mean" and B > 0 else loss


class AttentionPriorLoss(PaddedExemplarLoss):
    r""":func:`attention_prior_loss` as an ``nn.Module`` for padded batches (our extension).

    Args:
        alpha: bandwidth (> 0); may be changed later through the ``alpha`` attribute.
        metric: ``"sqeuclidean"`` or ``"euclidean"``.
        temperature: ``tau`` > 0 (see :func:`attention_prior_target` for its units).
        aggregate: ``"max"`` or ``"mean"`` over the video's labelled classes.
        standardize: standardise ``max/mean log z`` per video before ``/ tau``.
        log_attention: the attention passed to forward is ``log a`` instead of ``a``.
        reduction: ``"sum"`` over videos, or ``"mean"``.

    Forward args: features ``[B, T, m]``, attention ``[B, T]``, labels ``[B, C]``, mask ``[B, T]`` bool,
    db ``[C, n, m]``, log_q ``[C, n]``. Returns the scalar loss; the gradient goes to the attention only.
    """

    def __init__(self, alpha: float, metric: str = "sqeuclidean", temperature: float = 1.0,
                 aggregate: str = "max", standardize: bool = False, log_attention: bool = False,
                 reduction: str = "sum"):
        super().__init__(alpha, metric, reduction)
        name = "AttentionPriorLoss"
        self.temperature = _check_prior_args(name, temperature, aggregate, standardize)
        if not isinstance(log_attention, bool):
            raise TypeError(f"{name}: log_attention must be a bool, got {type(log_attention).__name__}")
        self.aggregate = aggregate
        self.standardize = standardize
        self.log_attention = log_attention

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha:g}, metric={self.metric!r}, temperature={self.temperature:g}, "
                f"aggregate={self.aggregate!r}, standardize={self.standardize}, "
                f"log_attention={self.log_attention}, reduction={self.reduction!r}")

    def forward(self, features: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        fn = "AttentionPriorLoss"
        B = _check_padded(fn, features, attention, labels, mask, db, log_q, self.alpha, self.metric)[0]
        log_t, has = _prior_log_target(features, labels, mask, db, log_q, self.alpha, self.metric,
                                       self.temperature, self.aggregate, self.standardize)
        return _prior_kl(attention, mask, log_t, has, self.log_attention, self.reduction, B)
