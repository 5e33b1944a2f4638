"""Mini-batches of variable-length feature sequences as padded torch tensors with a validity mask."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from .dataset import FeatureDataset

__all__ = ["iterate_batches", "collate", "similar_pairs_batch"]


def collate(arrays: Sequence[np.ndarray], labels: Sequence[np.ndarray], indices: Sequence[int]) -> dict:
    """Zero-pad [T_i, D] arrays to the longest one: dict(features [B, T, D] float32, mask [B, T] bool,
    labels [B, C] float32, index [B] int64)."""
    t_max = max(a.shape[0] for a in arrays)
    feats = np.zeros((len(arrays), t_max, arrays[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(arrays), t_max), dtype=bool)
    for b, a in enumerate(arrays):
        feats[b, :a.shape[0]] = a
        mask[b, :a.shape[0]] = True
    return {"features": torch.from_numpy(feats), "mask": torch.from_numpy(mask),
            "labels": torch.from_numpy(np.stack(labels).astype(np.float32)),
            "index": torch.as_tensor(np.asarray(indices, dtype=np.int64))}


def similar_pairs_batch(labels: np.ndarray, indices: Sequence[int], batch_size: int, pairs: int,
                        rng: np.random.Generator) -> list[int]:
    """W-TALC's training batch: ``pairs`` times a random class and two random videos of it, then
    ``batch_size - 2 * pairs`` random videos; every draw uniform and with replacement (a video may come
    twice). ``labels [V, C]`` are the multi-hot labels of all videos, ``indices`` the training videos.
    Classes without a training video are never drawn. Returns ``batch_size`` video indices, the pairs
    first (``[a1, b1, a2, b2, ..., rest]``)."""
    indices = np.asarray(list(indices), dtype=np.int64)
    if indices.size == 0:
        raise ValueError("similar_pairs_batch: indices is empty (expected the training videos)")
    if not 0 <= 2 * pairs <= batch_size:
        raise ValueError(f"similar_pairs_batch: expected 0 <= 2 * pairs <= batch_size, got pairs={pairs}, "
                         f"batch_size={batch_size}")
    members = [indices[labels[indices, c] > 0.5] for c in range(labels.shape[1])]
    classes = [c for c, m in enumerate(members) if m.size]
    if pairs and not classes:
        raise ValueError("similar_pairs_batch: no training video has a label, so no pair can be drawn")
    out: list[int] = []
    for c in rng.choice(len(classes), size=pairs):
        out += rng.choice(members[classes[c]], size=2).tolist()
    out += rng.choice(indices, size=batch_size - 2 * pairs).tolist()
    return out


def iterate_batches(dataset: FeatureDataset, indices: Sequence[int], *, batch_size: int,
                    max_seqlen: int | None = 750, shuffle: bool = False,
                    generator: np.random.Generator | None = None) -> Iterator[dict]:
    """Yield batches over ``dataset.videos[i]`` for i in ``indices``.

    Each batch is a dict of torch tensors: ``features`` float32 [B, T, D], ``mask`` bool [B, T] (True on real
    segments, zero padding elsewhere), ``labels`` float32 [B, C], ``index`` int64 [B] (dataset indices).
    T is the longest (cropped) sequence in the batch. A video longer than ``max_seqlen`` is cut to a random
    contiguous window of ``max_seqlen`` segments (training); ``max_seqlen=None`` keeps full sequences (test
    time, use ``batch_size=1`` to avoid padding). The last batch may be smaller.

    generator: a ``numpy.random.Generator`` driving both the shuffling and the crops; pass
    ``np.random.default_rng(seed)`` once and reuse it across epochs for reproducible, varying epochs.
    None uses a fresh, unseeded generator (not reproducible).
    """
    if batch_size < 1:
        raise ValueError(f"iterate_batches: batch_size must be >= 1, got {batch_size}")
    if max_seqlen is not None and max_seqlen < 1:
        raise ValueError(f"iterate_batches: max_seqlen must be >= 1 or None, got {max_seqlen}")
    if generator is not None and not isinstance(generator, np.random.Generator):
        raise TypeError(f"iterate_batches: generator must be a numpy.random.Generator or None, "
                        f"got {type(generator).__name__}")
    rng = generator if generator is not None else np.random.default_rng()
    order = np.asarray(list(indices), dtype=np.int64)
    if order.size and (order.min() < 0 or order.max() >= len(dataset.videos)):
        raise IndexError(f"iterate_batches: indices must be in [0, {len(dataset.videos)}), "
                         f"got range [{order.min()}, {order.max()}]")
    if shuffle:
        order = order[rng.permutation(order.size)]
    for b in range(0, order.size, batch_size):
        idx = order[b:b + batch_size]
        arrays = []
        for i in idx:
            f = dataset.videos[i].features
            if max_seqlen is not None and f.shape[0] > max_seqlen:
                start = int(rng.integers(0, f.shape[0] - max_seqlen + 1))
                f = f[start:start + max_seqlen]
            arrays.append(f)
        yield collate(arrays, [dataset.videos[i].labels for i in idx], idx)
