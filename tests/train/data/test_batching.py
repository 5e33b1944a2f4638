"""Batches (train/data/batching.py): crops, padding and masks, reproducible orders, W-TALC's similar-pairs
sampler."""
import numpy as np
import pytest
import torch

from train.data import FeatureDataset, VideoRecord, iterate_batches


def _toy_dataset(lengths=(3, 10, 800), dim=6):
    vids = [VideoRecord(name=f"v{i}", subset="test" if i else "validation", duration=t / 1.5625,
                        labels=np.eye(2, dtype=np.float32)[i % 2], segments=[],
                        features=np.arange(t * dim, dtype=np.float32).reshape(t, dim) + 1)
            for i, t in enumerate(lengths)]
    return FeatureDataset(["a", "b"], vids, rgb_dim=3)


def test_batches_crop_pad_and_mask():
    ds = _toy_dataset()
    batches = list(iterate_batches(ds, [0, 1, 2], batch_size=2, max_seqlen=750, shuffle=False,
                                   generator=np.random.default_rng(0)))
    assert [b["features"].shape for b in batches] == [torch.Size([2, 10, 6]), torch.Size([1, 750, 6])]
    b = batches[0]
    assert b["features"].dtype == torch.float32 and b["mask"].dtype == torch.bool
    assert b["labels"].dtype == torch.float32 and b["index"].dtype == torch.int64
    assert b["mask"].sum(1).tolist() == [3, 10] and b["index"].tolist() == [0, 1]
    assert float(b["features"][0, 3:].abs().sum()) == 0.0  # zero padding
    crop = batches[1]["features"][0].numpy()
    full = ds.videos[2].features
    start = int(np.flatnonzero(full[:, 0] == crop[0, 0])[0])
    np.testing.assert_array_equal(crop, full[start:start + 750])  # a contiguous window


def test_batches_full_sequences_and_reproducible_shuffle():
    ds = _toy_dataset()
    full = list(iterate_batches(ds, [2], batch_size=1, max_seqlen=None, shuffle=False))
    assert full[0]["features"].shape == (1, 800, 6) and bool(full[0]["mask"].all())
    order = lambda seed: [int(i) for b in iterate_batches(ds, [0, 1, 2], batch_size=1, shuffle=True,  # noqa: E731
                                                          generator=np.random.default_rng(seed))
                          for i in b["index"]]
    assert order(3) == order(3) and sorted(order(3)) == [0, 1, 2]
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        next(iterate_batches(ds, [0], batch_size=1, shuffle=True, generator=torch.Generator()))
    with pytest.raises(ValueError, match="no video in subset 'train'"):
        ds.indices("train")


def test_similar_pairs_batch_is_wtalcs_sampler():
    from train.data.batching import similar_pairs_batch
    labels = np.zeros((8, 4))
    labels[[0, 1, 2], 0] = 1
    labels[[3, 4], 1] = 1
    labels[[5], 2] = 1                 # class 3 has no training video; video 7 is not for training
    labels[7, 3] = 1
    train = [0, 1, 2, 3, 4, 5, 6]
    for seed in range(20):
        batch = similar_pairs_batch(labels, train, 10, 3, np.random.default_rng(seed))
        assert len(batch) == 10 and set(batch) <= set(train)
        for a, b in zip(batch[0:6:2], batch[1:6:2]):   # each pair shares a class
            assert (labels[a] * labels[b]).sum() >= 1
    again = similar_pairs_batch(labels, train, 10, 3, np.random.default_rng(7))
    assert again == similar_pairs_batch(labels, train, 10, 3, np.random.default_rng(7))
    with pytest.raises(ValueError, match="2 \\* pairs <= batch_size"):
        similar_pairs_batch(labels, train, 4, 3, np.random.default_rng(0))
    with pytest.raises(ValueError, match="no training video has a label"):
        similar_pairs_batch(np.zeros((3, 2)), [0, 1, 2], 4, 1, np.random.default_rng(0))
