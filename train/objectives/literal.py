"""``cc.loss: literal``: the poster's convex clustering loss
``L_cc = -sum_s p(s|x) log sum_j q_cj exp(-alpha d(phi(s), y_cj))`` (:class:`ccluster.ConvexClusteringLoss`).

It only attracts, so it collapses the attention (trained through it) or phi (docs/exemplar-losses.md).
Its size follows ``alpha * d``; with ``cc.scale: relative`` each stream's loss is divided by its mean per
training video at collection, so that ``cc.weight`` means the same on every dataset.
"""
from __future__ import annotations

import ccluster
from .base import ExemplarObjective


class Literal(ExemplarObjective):
    """The poster's L_cc, weighted by the attention (held fixed with cc.detach_attention); cc.scale sets its unit."""

    name = "literal"

    def __init__(self, cc: dict):
        super().__init__(cc)
        self.relative = cc["scale"] == "relative"

    def stream_loss(self, alpha: float):
        """:class:`ccluster.ConvexClusteringLoss` at the stream's bandwidth."""
        return ccluster.ConvexClusteringLoss(alpha, metric=self.metric, reduction=self.reduction)

    def loss(self, x, out, labels, mask, stream, exemplars):
        """L_cc weighted by the stream's attention, divided by its value at collection with cc.scale: relative."""
        loss = exemplars.criterion(x, self.attention(out, stream), labels, mask, exemplars.features, exemplars.log_q)
        if self.relative:  # in units of the loss at collection
            loss = loss / max(exemplars.loss_scale, 1e-12)
        return loss
