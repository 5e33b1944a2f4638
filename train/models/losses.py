"""Weakly supervised losses: video classification (multi-label), STPN sparsity, W-TALC's top-k MIL and
co-activity similarity. The convex clustering loss itself is :class:`ccluster.ConvexClusteringLoss`.

Multi-label classification, two choices (``loss.classification``):

* ``"softmax"`` (default, UntrimmedNet / W-TALC): cross-entropy between the softmax over classes of the
  video logits and the label distribution ``y / sum(y)``; a video with two labels puts half its target
  mass on each.
* ``"bce"`` (STPN): a sigmoid and binary cross-entropy per class, averaged over classes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def classification_loss(video_logits: torch.Tensor, labels: torch.Tensor, kind: str = "softmax"):
    """Mean over videos of the multi-label loss of ``[B, C]`` logits against ``[B, C]`` multi-hot labels.
    Videos without any label contribute nothing to the "softmax" loss."""
    labels = labels.to(video_logits.dtype)
    if kind == "softmax":
        count = labels.sum(-1, keepdim=True)
        target = labels / count.clamp_min(1)
        return -(target * F.log_softmax(video_logits, -1)).sum(-1).mean()
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(video_logits, labels)
    raise ValueError(f"classification_loss: kind must be 'softmax' or 'bce', got {kind!r}")


def sparsity_loss(attention: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """STPN's L1 sparsity: ``sum_t |a_t|`` over valid segments, averaged over the videos."""
    return (attention.abs() * mask).sum(-1).mean()


def topk_pool(seg_logits: torch.Tensor, mask: torch.Tensor, ratio: int = 8) -> torch.Tensor:
    """W-TALC's k-max pooling: per class, the mean of the ``k = ceil(T_b / ratio)`` largest segment
    logits of each video ``b`` (``T_b`` its valid length). ``[B, T, C] -> [B, C]``."""
    B, T, C = seg_logits.shape
    length = mask.sum(-1)
    k = torch.clamp(torch.ceil(length.to(torch.float64) / ratio).long(), min=1)   # [B]
    filled = seg_logits.masked_fill(~mask[..., None], torch.finfo(seg_logits.dtype).min)
    top, _ = filled.sort(dim=1, descending=True)
    keep = (torch.arange(T, device=mask.device)[None, :] < k[:, None]).to(seg_logits.dtype)
    top = torch.where(keep[..., None] > 0, top, torch.zeros((), dtype=top.dtype, device=top.device))
    return top.sum(1) / k[:, None].to(seg_logits.dtype)


def co_activity_loss(emb: torch.Tensor, seg_logits: torch.Tensor, labels: torch.Tensor,
                     mask: torch.Tensor, margin: float = 0.5) -> torch.Tensor:
    """W-TALC's co-activity similarity loss on one stream.

    Per video ``b`` and class ``c``, the class attention ``A = softmax_t(seg_logits[b, :, c])`` over
    valid segments gives a high-attention feature ``H = sum_t A_t x_t`` and a low-attention feature
    ``L = sum_t (1 - A_t) x_t / (T_b - 1)``. For every pair of videos (m, n) that share class c, with
    the cosine distance d:
    ``max(0, d(H_m, H_n) - d(H_m, L_n) + margin) + max(0, d(H_m, H_n) - d(L_m, H_n) + margin)``,
    averaged over all such pairs. 0 when no two videos in the batch share a class.
    """
    B = emb.shape[0]
    att = torch.softmax(seg_logits.masked_fill(~mask[..., None], torch.finfo(seg_logits.dtype).min), 1)
    att = att * mask[..., None]                                              # [B, T, C]
    length = mask.sum(-1).to(emb.dtype)
    high = torch.einsum("btc,bte->bce", att, emb)                            # [B, C, e]
    low = torch.einsum("btc,bte->bce", (1 - att) * mask[..., None], emb)
    low = low / (length - 1).clamp_min(1)[:, None, None]
    high, low = F.normalize(high, dim=-1), F.normalize(low, dim=-1)
    d_hh = 1 - torch.einsum("mce,nce->cmn", high, high)                      # [C, B, B]
    d_hl = 1 - torch.einsum("mce,nce->cmn", high, low)                       # d(H_m, L_n)
    pos = labels.t().bool()                                                  # [C, B]
    pair = pos[:, :, None] & pos[:, None, :] & ~torch.eye(B, dtype=torch.bool, device=emb.device)
    if not pair.any():
        return emb.new_zeros(())
    d_lh = d_hl.transpose(1, 2)                                              # d(L_m, H_n)
    terms = F.relu(d_hh - d_hl + margin) + F.relu(d_hh - d_lh + margin)
    return terms[pair].sum() / pair.sum()


def topk_k(length: int, ratio: int) -> int:
    """W-TALC's k for a video of ``length`` segments: ``ceil(length / ratio)``, at least 1."""
    return max(1, math.ceil(length / ratio))
