"""Models and losses of the two-stream attention network."""
from .losses import classification_loss, co_activity_loss, sparsity_loss, topk_pool
from .two_stream import Stream, TwoStreamAttention, masked_softmax

__all__ = ["TwoStreamAttention", "Stream", "masked_softmax", "classification_loss", "sparsity_loss",
           "topk_pool", "co_activity_loss"]
