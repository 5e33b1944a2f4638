"""Test-time selection of the representative segments of one video.

For each class (or each class asked for), the segments of the video are ranked by their convex
clustering loss against that class's exemplars, and the ``k`` with the least loss are kept.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch

from .database import ExemplarDatabase
from .ops import exemplar_logsumexp

__all__ = ["Selection", "select_representative"]


class Selection(NamedTuple):
    """Result of :func:`select_representative`.

    Attributes:
        indices: sorted LongTensor of the distinct segment indices picked for any class.
        per_class: ``[C', k']`` LongTensor; row ``i`` holds the picks for class ``classes[i]`` in
            increasing loss order (ties: lower segment index first). ``k' = min(k, T)``. A class without
            any exemplar gets a row of ``-1`` (nothing picked).
        classes: ``[C']`` LongTensor of the class ids of the rows of ``per_class``.
        loss: ``[C', k']`` L_cc of each pick (``+inf`` where ``per_class`` is ``-1``).
    """

    indices: torch.Tensor
    per_class: torch.Tensor
    classes: torch.Tensor
    loss: torch.Tensor


def _class_index(classes, C: int, device: torch.device) -> torch.Tensor:
    where = "select_representative"
    if classes is None:
        return torch.arange(C, device=device)
    if isinstance(classes, torch.Tensor):
        t = classes
    else:
        try:
            t = torch.as_tensor(list(classes))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{where}: classes must be a list or 1-D tensor of class indices, "
                            f"got {type(classes).__name__}") from exc
        if t.numel() == 0:
            t = t.long()
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise TypeError(f"{where}: classes must hold integer class indices, got dtype {t.dtype}"
                        + (" (for a bool mask pass mask.nonzero().squeeze(1))" if t.dtype == torch.bool
                           else ""))
    if t.dim() != 1:
        raise ValueError(f"{where}: classes must be 1-D, got shape {list(t.shape)}")
    t = t.to(device=device, dtype=torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= C):
        raise ValueError(f"{where}: classes must be in [0, C) = [0, {C}), got {t.tolist()}")
    if t.unique().numel() != t.numel():
        raise ValueError(f"{where}: classes must not repeat, got {t.tolist()}")
    return t


@torch.no_grad()
def select_representative(x: torch.Tensor, attention: torch.Tensor,
                          db: Union[torch.Tensor, ExemplarDatabase], log_q: Optional[torch.Tensor],
                          alpha: float, k: int, metric: str = "sqeuclidean",
                          classes: Optional[Union[Sequence[int], torch.Tensor]] = None) -> Selection:
    r"""Per class, the ``k`` segments of one video with the least convex clustering loss.

    For segment ``s`` and class ``c`` the loss is, literally as in the method,

    ``L_cc(s, c) = -p(s|x) * log z_sc``,  ``log z_sc = log sum_j q_cj exp(-alpha d(x_s, y_cj))``

    with ``log z`` from :func:`ccluster.exemplar_logsumexp` (only the requested classes are computed,
    through its ``pairs`` mask). Per class the ``k`` segments with the least ``L_cc`` are picked; ties go
    to the lower segment index.

    Note on the sign: since Q is normalised, ``log z_sc <= max_j log q_cj <= 0``, so ``L_cc >= 0``, and
    it is small both for segments close to well-represented exemplars *and* for segments with low
    attention: a segment with ``p(s|x) = 0`` has ``L_cc = 0`` and is picked first whatever its features.
    This function implements the formula as stated. To rank by closeness to the exemplars alone
    (``-log z_sc``), pass a uniform attention, e.g. ``torch.full((T,), 1 / T)``.

    Args:
        x: ``[T, m]`` segment features of ONE video.
        attention: ``[T]`` attention ``p(s|x)`` normalised over the video (finite, >= 0; not
            renormalised here).
        db: ``[C, n, m]`` exemplar features, or an :class:`~ccluster.ExemplarDatabase` (then ``log_q``
            may be None to use the database's own).
        log_q: ``[C, n]`` log representativeness, ``-inf`` on empty slots.
        alpha: bandwidth (> 0).
        k: number of segments to pick per class (int >= 1); ``min(k, T)`` are picked.
        metric: ``"sqeuclidean"`` or ``"euclidean"``.
        classes: optional list / 1-D integer tensor of distinct class indices (e.g. the classes
            predicted present), in the order wanted for the rows of ``per_class``; default all classes.

    Returns:
        A :class:`Selection`. A class whose slots are all empty (no exemplar) picks nothing: its row of
        ``per_class`` is all ``-1`` and it contributes nothing to ``indices``. ``T = 0`` gives empty
        results. Everything is on ``x``'s device.
    """
    where = "select_representative"
    if isinstance(db, ExemplarDatabase):
        if log_q is None:
            log_q = db.log_q
        db = db.features
    for name, t in (("x", x), ("attention", attention), ("db", db), ("log_q", log_q)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{where}: x must be [T, m] (one video), got shape {list(x.shape)}")
    if db.dim() != 3:
        raise ValueError(f"{where}: db must be [C, n, m], got shape {list(db.shape)}")
    if x.shape[1] != db.shape[2]:
        raise ValueError(f"{where}: x's feature size m={x.shape[1]} does not match db's m={db.shape[2]}")
    if list(log_q.shape) != list(db.shape[:2]):
        raise ValueError(f"{where}: log_q must be [C, n] = {list(db.shape[:2])}, got {list(log_q.shape)}")
    T, C = x.shape[0], db.shape[0]
    if not attention.is_floating_point():
        raise TypeError(f"{where}: attention must be a floating-point tensor, got {attention.dtype}")
    if list(attention.shape) != [T]:
        raise ValueError(f"{where}: attention must be [T] = [{T}], got shape {list(attention.shape)}")
    if not torch.isfinite(attention).all() or (attention < 0).any():
        raise ValueError(f"{where}: attention must be finite and >= 0")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{where}: k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"{where}: k must be >= 1, got {k}")

    dev = x.device
    cls = _class_index(classes, C, dev)
    kk = min(k, T)
    if T == 0 or cls.numel() == 0:
        per_class = torch.full((cls.numel(), kk), -1, dtype=torch.int64, device=dev)
        loss = torch.full((cls.numel(), kk), torch.inf, dtype=x.dtype, device=dev)
        return Selection(torch.empty(0, dtype=torch.int64, device=dev), per_class, cls, loss)

    pairs = torch.zeros(T, C, dtype=torch.bool, device=dev)
    pairs[:, cls] = True
    logz = exemplar_logsumexp(x, db, log_q, alpha, metric, pairs)[:, cls]      # [T, C']
    # + 0.0 turns -0.0 (zero attention) into 0.0 so that equal losses tie exactly.
    l_cc = (-attention.to(logz.dtype)[:, None] * logz + 0.0).t()             # [C', T]
    empty = ~torch.isfinite(log_q.to(dev)[cls]).any(-1)                        # [C']
    l_cc = torch.where(empty[:, None], torch.full_like(l_cc, torch.inf), l_cc)
    order = torch.sort(l_cc, dim=1, stable=True).indices[:, :kk]
    loss = torch.gather(l_cc, 1, order)
    per_class = torch.where(empty[:, None], torch.full_like(order, -1), order)
    indices = torch.unique(per_class[per_class >= 0])  # sorted
    return Selection(indices, per_class, cls, loss)
