"""``cc.loss: contrastive``: segments classified by their exemplars, trained with cross-entropy toward
their video's labels (:class:`ccluster.ClassContrastiveLoss`, our extension).

With ``cc.background: true`` the database holds one more class: the least-attended segments of the
labelled videos (ranked by minus the fused attention); the unattended segments are then trained toward it.
"""
from __future__ import annotations

import torch

import ccluster
from .base import ExemplarObjective


class Contrastive(ExemplarObjective):
    """Segments classified by their exemplars, cross-entropy toward the video's labels (optionally with a
    background class, cc.background)."""

    name = "contrastive"
    supports_background = True

    def __init__(self, cc: dict):
        super().__init__(cc)
        self.background = cc["background"]

    def candidates(self, out, labels):
        """The video's classes and the T-CAM, plus the background column (minus the fused attention)."""
        labels, score = super().candidates(out, labels)
        if self.background:  # every labelled video offers its least-attended segments
            labels = torch.cat([labels, labels.any()[None]])
            score = torch.cat([score, -out["attention"][0, :, None]], 1)
        return labels, score

    def collection_weights(self, attention, labels):
        """p(s|x) on the labelled classes; the background column weighs the unattended segments."""
        w = super().collection_weights(attention, labels)
        if self.background:  # as ccluster.ClassContrastiveLoss weighs its background term
            comp = 1 - attention / attention.max().clamp_min(1e-12)
            w[:, -1] = comp / comp.sum() if comp.sum() > 0 else 0.0
        return w

    def stream_loss(self, alpha: float):
        """:class:`ccluster.ClassContrastiveLoss` at the stream's bandwidth."""
        return ccluster.ClassContrastiveLoss(alpha, metric=self.metric, temperature=self.temperature,
                                             background=self.background, reduction=self.reduction)

    def loss(self, x, out, labels, mask, stream, exemplars):
        """The contrastive loss weighted by the stream's attention (held fixed with cc.detach_attention)."""
        return exemplars.criterion(x, self.attention(out, stream), labels, mask, exemplars.features, exemplars.log_q)
