"""The convex clustering loss as an ``nn.Module`` for padded batches of videos."""
from __future__ import annotations

import math

import torch
from torch import nn

from .ops import METRICS, convex_clustering_loss
from .settings import value_checks_eager


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """t on device: itself, or (CPU to GPU) one asynchronous copy from pinned memory, without a
    synchronisation."""
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class PaddedExemplarLoss(nn.Module):
    """Base of the exemplar losses for padded batches ``[B, T, m]``: the bandwidth ``alpha`` (settable
    between calls, e.g. after a database collection), the ``metric`` and the ``reduction`` over videos."""

    def __init__(self, alpha: float, metric: str = "sqeuclidean", reduction: str = "sum"):
        super().__init__()
        name = type(self).__name__
        if not isinstance(metric, str) or not isinstance(reduction, str):
            raise TypeError(f"{name}: metric and reduction must be strings, got {metric!r}, {reduction!r}")
        if metric not in METRICS:
            raise ValueError(f"{name}: metric must be one of {METRICS}, got {metric!r}")
        if reduction not in ("sum", "mean"):
            raise ValueError(f"{name}: reduction must be 'sum' or 'mean', got {reduction!r}")
        self.alpha = alpha
        self.metric = metric
        self.reduction = reduction

    @property
    def alpha(self) -> float:
        """The bandwidth (> 0)."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        name = type(self).__name__
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name}: alpha must be a finite number > 0, got {value!r} ({type(value).__name__})")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name}: alpha must be a finite number > 0, got {value}")
        self._alpha = float(value)

    def _reduce(self, loss: torch.Tensor, B: int) -> torch.Tensor:
        """``loss`` summed over B videos, divided by B for ``reduction="mean"``."""
        return loss / B if self.reduction == "mean" and B > 0 else loss


class ConvexClusteringLoss(PaddedExemplarLoss):
    r"""Convex clustering loss ``L_cc`` of a batch of videos against an exemplar database.

    ``L_cc = - sum_b sum_{s valid in b} sum_{c in labels_b} p(s|b) log sum_j q_cj exp(-alpha d(x_s, y_cj))``

    where ``p(s|b)`` is the attention **normalised here** over each video's valid segments
    (``p = a / sum_valid a``; the method's p(s|x) is a distribution over the segments of x), so raw
    non-negative attention (softmax or sigmoid outputs) can be passed as is. Pairs are (valid segment) x
    (classes the video is labelled with); only those are computed, by the fused label-sparse kernel.

    Args:
        alpha: bandwidth (> 0). May be changed later through the ``alpha`` attribute.
        metric: ``"sqeuclidean"`` or ``"euclidean"``.
        reduction: ``"sum"`` over videos, or ``"mean"`` (divided by the number of videos B).

    Forward args:
        features: ``[B, T, m]`` segment features.
        attention: ``[B, T]`` attention, >= 0 on valid segments (differentiable). NaN propagates to
            the loss.
        labels: ``[B, C]`` multi-hot video labels (bool or float; nonzero = labelled).
        mask: ``[B, T]`` bool, True on valid (non-padding) segments.
        db: ``[C, n, m]`` exemplar database; log_q: ``[C, n]`` log representativeness, log-probabilities
            (<= 0, ``-inf`` for an empty slot).

    On a GPU, ``labels`` and ``mask`` may stay on the CPU (as the data loader gives them): the pairs are
    then formed on the host and the label-sparse plan needs no device synchronisation.

    A video whose valid attention sums to 0 contributes nothing (no NaN).

    Errors, as in :func:`ccluster.convex_clustering_loss`: TypeError for a wrong type or dtype
    (``mask`` not bool), ValueError for a wrong shape or value (negative attention on a valid segment,
    ``log_q > 0``, ``alpha <= 0``; on a GPU the checks of values give a NaN loss instead of reading the
    data, see ``ccluster.kernel_settings(check_values=...)``). Double backward raises a RuntimeError.
    """

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, metric={self.metric!r}, reduction={self.reduction!r}"

    def forward(self, features: torch.Tensor, attention: torch.Tensor, labels: torch.Tensor,
                mask: torch.Tensor, db: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        for name, t in (("features", features), ("attention", attention), ("labels", labels),
                        ("mask", mask), ("db", db), ("log_q", log_q)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"ConvexClusteringLoss: {name} must be a Tensor, got {type(t).__name__}")
        if features.dim() != 3:
            raise ValueError(f"ConvexClusteringLoss: features must be [B, T, m], got {list(features.shape)}")
        B, T, m = features.shape
        C = db.shape[0] if db.dim() == 3 else -1
        for name, t, shape in (("attention", attention, [B, T]), ("mask", mask, [B, T]),
                               ("labels", labels, [B, C])):
            if list(t.shape) != shape:
                raise ValueError(f"ConvexClusteringLoss: {name} must be {shape}, got {list(t.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"ConvexClusteringLoss: mask must be a bool tensor, got {mask.dtype}")
        # the pairs on the labels' device: the host when the loader's CPU labels come with GPU features
        pairs = mask.to(labels.device)[:, :, None] & (labels != 0)[:, None, :]
        mask = _on_device(mask, attention.device)
        if value_checks_eager(attention):
            bad = mask & (attention < 0)
            if bool(bad.any()):
                raise ValueError(f"ConvexClusteringLoss: attention must be >= 0 on valid segments, got "
                                 f"{float(attention[bad].min()):g}")
        a = torch.where(mask, attention, torch.zeros((), dtype=attention.dtype, device=attention.device))
        total = a.sum(1, keepdim=True)
        p = a / torch.where(total > 0, total, torch.ones_like(total))
        loss = convex_clustering_loss(features.reshape(B * T, m), p.reshape(B * T),
                                      pairs.reshape(B * T, C), db, log_q, self.alpha, self.metric)
        return self._reduce(loss, B)
