"""The two-stream attention model: per stream an embedding phi, a segment classifier and an attention.

Shapes: features ``[B, T, D]`` with ``D = rgb_dim + flow_dim`` (RGB first, as the "standard" I3D feature
layout), ``mask [B, T]`` bool (True on valid segments). Streams: ``("rgb", "flow")``, each on its half of
the features, or (``joint=True``, W-TALC's model) one stream ``"joint"`` on the whole feature vector. Per
stream:

* ``phi``: Linear -> ReLU -> Dropout, ``[B, T, D_s] -> [B, T, e]``
* classifier: Linear, ``[B, T, e] -> [B, T, C]`` segment logits
* attention: Linear (or a small MLP) ``[B, T, e] -> [B, T]`` raw score, turned into weights by

  - ``"untrimmednet"``: softmax over the video's valid segments (weights sum to 1 per video);
  - ``"stpn"``: a sigmoid per segment in [0, 1] (trained with the L1 sparsity loss);
  - ``"none"``: no attention branch (W-TALC's T-CAM-only model): every valid segment has weight 1.

Video logits per stream are the attention-weighted mean of segment logits,
``v = sum_t a_t s_t / sum_t a_t`` (for the softmax attention the denominator is 1); without attention,
W-TALC's k-max pooling: per class the mean of the ``ceil(T / topk_ratio)`` largest segment logits.

The fused segment score of the method, used to rank segments for the exemplar database and as the T-CAM,
is ``s_i = (p_rgb,i * a_rgb,i + p_flow,i * a_flow,i) / 2`` where ``p`` are the segment class
probabilities (softmax over classes, or sigmoid for the BCE loss) and ``a`` the attention put on a common
scale: the sigmoid as is, the softmax multiplied by the number of valid segments T (so that its mean is 1
whatever the video length, and scores of short and long videos can be ranked together); without attention
the weight is 1. With one stream the sum has one term (no division by 2).
"""
from __future__ import annotations

import torch
from torch import nn

from .losses import topk_pool

ATTENTIONS = ("untrimmednet", "stpn", "none")


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax over ``dim`` restricted to ``mask``; rows without a valid entry give zeros (no NaN)."""
    neg = torch.finfo(logits.dtype).min
    z = logits.masked_fill(~mask, neg)
    out = torch.softmax(z, dim=dim) * mask
    return out


class Stream(nn.Module):
    """One stream (RGB or flow): embedding phi, segment classifier and attention."""

    def __init__(self, in_dim: int, embed_dim: int, num_classes: int, dropout: float = 0.5,
                 attention_hidden: int = 0, attention: bool = True):
        super().__init__()
        self.phi = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = nn.Linear(embed_dim, num_classes)
        if not attention:
            self.attention = None
        elif attention_hidden > 0:
            self.attention = nn.Sequential(nn.Linear(embed_dim, attention_hidden), nn.ReLU(),
                                           nn.Linear(attention_hidden, 1))
        else:
            self.attention = nn.Linear(embed_dim, 1)

    def forward(self, x: torch.Tensor):
        """``(emb, segment logits, raw attention)`` of ``x [B, T, D_s]``."""
        emb = self.phi(x)
        return (emb, *self.heads(emb))

    def heads(self, emb: torch.Tensor):
        """Classifier and raw attention on given embeddings (test-time re-scoring of a selection); the
        raw attention is 0 everywhere without an attention branch."""
        seg = self.classifier(emb)  # before the attention: the order of autograd's accumulation into emb
        raw = self.attention(emb).squeeze(-1) if self.attention is not None else emb.new_zeros(emb.shape[:-1])
        return seg, raw


class TwoStreamAttention(nn.Module):
    """RGB and flow streams (or one joint stream) over I3D features, with UntrimmedNet, STPN or no
    attention.

    Args:
        feature_dim: D, the width of the concatenated features.
        rgb_dim: how many leading feature columns are RGB (the rest is flow).
        num_classes: C.
        embed_dim: width e of phi, per stream.
        dropout: dropout after phi.
        attention: ``"untrimmednet"``, ``"stpn"`` or ``"none"``.
        attention_hidden: 0 for a linear attention, else the width of its hidden layer.
        probabilities: ``"softmax"`` or ``"bce"``: how segment logits become class probabilities in the
            fused score (matches the classification loss).
        joint: one stream ``"joint"`` on all ``feature_dim`` columns instead of RGB and flow streams.
        topk_ratio: without attention, video logits pool the ``ceil(T / topk_ratio)`` largest segment
            logits per class.
        init: ``"torch"`` (PyTorch's default for Linear) or ``"xavier"`` (Xavier-uniform weights, zero
            biases, as W-TALC initialises its model).
    """

    def __init__(self, feature_dim: int, rgb_dim: int, num_classes: int, embed_dim: int = 512,
                 dropout: float = 0.5, attention: str = "untrimmednet", attention_hidden: int = 0,
                 probabilities: str = "softmax", joint: bool = False, topk_ratio: int = 8,
                 init: str = "torch"):
        super().__init__()
        if not 0 < rgb_dim < feature_dim:
            raise ValueError(f"TwoStreamAttention: rgb_dim must be in (0, feature_dim={feature_dim}), "
                             f"got {rgb_dim}")
        if attention not in ATTENTIONS:
            raise ValueError(f"TwoStreamAttention: attention must be one of {ATTENTIONS}, got {attention!r}")
        if init not in ("torch", "xavier"):
            raise ValueError(f"TwoStreamAttention: init must be 'torch' or 'xavier', got {init!r}")
        self.feature_dim, self.rgb_dim, self.num_classes = feature_dim, rgb_dim, num_classes
        self.embed_dim, self.attention_kind, self.probabilities = embed_dim, attention, probabilities
        self.topk_ratio = topk_ratio
        self.streams = ("joint",) if joint else ("rgb", "flow")
        widths = (feature_dim,) if joint else (rgb_dim, feature_dim - rgb_dim)
        for name, width in zip(self.streams, widths):
            setattr(self, name, Stream(width, embed_dim, num_classes, dropout, attention_hidden,
                                       attention=attention != "none"))
        if init == "xavier":
            for module in self.modules():
                if isinstance(module, nn.Linear):
                    nn.init.xavier_uniform_(module.weight)
                    nn.init.zeros_(module.bias)

    def split(self, features: torch.Tensor):
        """The features of each stream, in :attr:`streams` order."""
        if self.streams == ("joint",):
            return (features,)
        return features[..., :self.rgb_dim], features[..., self.rgb_dim:]

    def attention_weights(self, raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw attention ``[B, T]`` -> weights: softmax over valid segments, or sigmoid (0 on padding);
        without attention, 1 on valid segments."""
        if self.attention_kind == "untrimmednet":
            return masked_softmax(raw, mask, dim=-1)
        if self.attention_kind == "none":
            return mask.to(raw.dtype)
        return torch.sigmoid(raw) * mask

    def log_attention_weights(self, raw: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``log`` of :meth:`attention_weights`, computed stably (no ``log 0`` where a sigmoid
        saturates); padding gets a large negative value, never NaN."""
        if self.attention_kind == "untrimmednet":
            return torch.log_softmax(raw.masked_fill(~mask, torch.finfo(raw.dtype).min), dim=-1)
        if self.attention_kind == "none":
            return torch.zeros_like(raw).masked_fill(~mask, torch.finfo(raw.dtype).min)
        return torch.nn.functional.logsigmoid(raw)

    def class_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Class probabilities of logits: softmax over classes, or a sigmoid per class for the BCE loss."""
        return torch.softmax(logits, -1) if self.probabilities == "softmax" else torch.sigmoid(logits)

    def pool(self, seg_logits: torch.Tensor, att: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Video logits ``[B, C]`` from segment logits ``[B, T, C]``: the attention-weighted mean, or
        without attention the k-max pooling over the valid segments (``mask``, default all)."""
        if self.attention_kind == "none":
            valid = mask if mask is not None else torch.ones(seg_logits.shape[:2], dtype=torch.bool,
                                                             device=seg_logits.device)
            return topk_pool(seg_logits, valid, self.topk_ratio)
        total = att.sum(-1, keepdim=True).clamp_min(1e-8)
        return (att[..., None] * seg_logits).sum(-2) / total

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict:
        """Returns a dict with, per stream ``s`` of :attr:`streams`: ``emb_s [B,T,e]``,
        ``seg_s [B,T,C]`` (segment logits), ``att_s [B,T]`` (attention weights), ``video_s [B,C]``
        (video logits); plus ``video [B,C]`` fused video probabilities, ``tcam [B,T,C]`` the fused
        segment score, ``attention [B,T]`` the mean of the streams' attentions on the common scale and
        ``logits [B,T,C]`` the mean of the streams' segment logits (W-TALC's T-CAM)."""
        out = {}
        n = len(self.streams)
        length = mask.sum(-1, keepdim=True).clamp_min(1).to(features.dtype)
        tcam, att_common, video, logits = 0, 0, 0, 0
        for name, x in zip(self.streams, self.split(features)):
            emb, seg, raw = getattr(self, name)(x)
            att = self.attention_weights(raw, mask)
            out[f"emb_{name}"], out[f"seg_{name}"], out[f"att_{name}"] = emb, seg, att
            out[f"raw_{name}"] = raw
            out[f"logatt_{name}"] = self.log_attention_weights(raw, mask)
            out[f"video_{name}"] = self.pool(seg, att, mask)
            common = att * length if self.attention_kind == "untrimmednet" else att
            tcam = tcam + self.class_probabilities(seg) * common[..., None] / n
            att_common = att_common + common / n
            video = video + self.class_probabilities(out[f"video_{name}"])
            logits = logits + seg / n
        out["video"] = video / n
        out["tcam"] = tcam * mask[..., None]
        out["attention"] = att_common
        out["logits"] = logits
        return out

    def rescore(self, stream: str, emb: torch.Tensor) -> torch.Tensor:
        """Video logits ``[C]`` of one stream from a subset of its embeddings ``[K, e]`` (test-time
        selection: the classifier and attention run again on the selected segments only)."""
        seg, raw = getattr(self, stream).heads(emb)
        valid = torch.ones_like(raw, dtype=torch.bool)[None]
        att = self.attention_weights(raw[None], valid)[0]
        return self.pool(seg[None], att[None], valid)[0]
