"""``cc.loss: prior``: the attention trained toward a target over the video's segments, the tempered
softmax of the standardised ``log z`` of the video's classes (:class:`ccluster.AttentionPriorLoss`, our
extension; the default).

It trains the attention by design (``cc.detach_attention`` does not apply) and takes it in the log
domain, exact where a sigmoid saturates. It standardises ``log z`` per video, so a Q fit stopped early
moves it little: its ``cc.guard_fit_gap: auto`` is 0.1 nats.
"""
from __future__ import annotations

import ccluster
from ..config.errors import ConfigError
from .base import ExemplarObjective


class Prior(ExemplarObjective):
    """The attention trained toward a tempered softmax of the standardised log z of the video's classes."""

    name = "prior"
    auto_fit_gap = 0.1

    @classmethod
    def check(cls, cfg):
        """As the base, and the prior needs an attention branch to train (with an exemplar loss at all)."""
        super().check(cfg)
        if cfg["model"]["attention"] == "none" and cfg["cc"]["weight"] > 0 and cfg["cc"]["rounds"] > 0:
            raise ConfigError("config key 'cc.loss': 'prior' trains the attention, and model.attention is "
                              "'none'; use 'tcam_prior' (it trains the T-CAM)")

    def stream_loss(self, alpha: float):
        """:class:`ccluster.AttentionPriorLoss` on standardised log z and log-attention, at the stream's bandwidth."""
        return ccluster.AttentionPriorLoss(alpha, metric=self.metric, temperature=self.temperature,
                                           standardize=True, log_attention=True, reduction=self.reduction)

    def loss(self, x, out, labels, mask, stream, exemplars):
        """KL from the exemplar target to the stream's attention (as log-weights)."""
        # the attention as log-weights: exact where a sigmoid saturates
        return exemplars.criterion(x, out[f"logatt_{stream}"], labels, mask, exemplars.features, exemplars.log_q)
