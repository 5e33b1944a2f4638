"""``cc.loss: tcam_prior``: the exemplar prior on the T-CAM, for models without attention
(``model.attention: none``, W-TALC's).

Per labelled class ``c`` of a video, the softmax over time of the segment logits of class ``c`` is trained
toward the tempered softmax of the standardised ``log z`` of class ``c``: each (video, class) pair is one
row of :class:`ccluster.AttentionPriorLoss`, and the rows are summed per batch (averaged over the videos
with ``cc.reduction: mean``).
"""
from __future__ import annotations

import torch

import ccluster
from .base import ExemplarObjective


class TcamPrior(ExemplarObjective):
    """The same prior on each labelled class's T-CAM column, for models without attention."""

    name = "tcam_prior"

    def stream_loss(self, alpha: float):
        """:class:`ccluster.AttentionPriorLoss` summed over rows (one per labelled video and class)."""
        # one row per labelled (video, class) pair; loss() reduces per video
        return ccluster.AttentionPriorLoss(alpha, metric=self.metric, temperature=self.temperature,
                                           standardize=True, log_attention=True, reduction="sum")

    def loss(self, x, out, labels, mask, stream, exemplars):
        """The prior on the T-CAM column of each labelled (video, class) pair, averaged over the videos with
        cc.reduction: mean."""
        video, cls = labels.nonzero(as_tuple=True)
        onehot = torch.nn.functional.one_hot(cls, labels.shape[1]).to(labels.dtype)
        loss = exemplars.criterion(x[video], out[f"seg_{stream}"][video, :, cls], onehot, mask[video],
                              exemplars.features, exemplars.log_q)
        return loss / labels.shape[0] if self.reduction == "mean" and labels.shape[0] else loss
