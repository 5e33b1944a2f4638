"""In-memory dataset of pre-extracted features: :class:`VideoRecord` and :class:`FeatureDataset`."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["VideoRecord", "FeatureDataset", "DatasetError", "DEFAULT_FEATURE_RATE", "DEFAULT_RGB_DIM",
           "seconds_to_index", "index_to_seconds"]


class DatasetError(ValueError):
    """Dataset files that cannot be used (damaged, inconsistent); the message names the file."""

DEFAULT_FEATURE_RATE = 25 / 16  # I3D at 25 fps, one feature per 16 frames
DEFAULT_RGB_DIM = 1024


def seconds_to_index(t: float, feature_rate: float = DEFAULT_FEATURE_RATE) -> int:
    """Segment index of time ``t`` (seconds): ``round(t * feature_rate)``."""
    return int(round(t * feature_rate))


def index_to_seconds(i: float, feature_rate: float = DEFAULT_FEATURE_RATE) -> float:
    """Start time (seconds) of segment ``i``; segment i covers [i / rate, (i + 1) / rate)."""
    return float(i) / feature_rate


@dataclass
class VideoRecord:
    """One video: features [T, D] float32 (RGB half first), video labels [C] multi-hot float32, and the
    annotated instances as (start_s, end_s, class index). ``subset`` is the split name of the source files
    (THUMOS14: "validation" is used for training, "test" for testing)."""
    name: str
    subset: str
    duration: float
    labels: np.ndarray
    segments: list = field(default_factory=list)
    features: np.ndarray = None

    @property
    def num_segments(self) -> int:
        """Number of feature segments T."""
        return int(self.features.shape[0])


class FeatureDataset:
    """Videos with features and annotations, plus class names, feature rate and the RGB/flow split.

    Attributes: ``classes`` (list of names), ``videos`` (list of :class:`VideoRecord`), ``feature_rate``
    (segments per second), ``rgb_dim`` (features[:, :rgb_dim] is RGB, the rest flow), ``ambiguous``
    (video name -> list of (start, end) seconds), ``name`` and ``source`` (where it was read from).
    """

    def __init__(self, classes, videos, *, feature_rate: float = DEFAULT_FEATURE_RATE,
                 rgb_dim: int = DEFAULT_RGB_DIM, ambiguous=None, name: str = "", source: str = ""):
        self.classes = [str(c) for c in classes]
        self.videos = list(videos)
        self.feature_rate = float(feature_rate)
        self.rgb_dim = int(rgb_dim)
        self.ambiguous = {k: [tuple(map(float, s)) for s in v] for k, v in (ambiguous or {}).items()}
        self.name = name
        self.source = source
        self._validate()

    def _validate(self) -> None:
        where = f" (from {self.source})" if self.source else ""
        if not self.feature_rate > 0:
            raise ValueError(f"feature_rate must be > 0 segments per second, got {self.feature_rate}")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"duplicate class names{where}: {self.classes}")
        if not self.videos:
            raise ValueError(f"dataset{where} has no video")
        dims = {v.features.shape[1] for v in self.videos}
        if len(dims) != 1:
            raise ValueError(f"videos{where} have different feature dimensions: {sorted(dims)}")
        if not 0 < self.rgb_dim < self.feature_dim:
            raise ValueError(f"rgb_dim={self.rgb_dim} must split the {self.feature_dim}-dim features into two "
                             f"non-empty halves{where}; pass rgb_dim= for features that are not 2 x 1024")
        names = set()
        for v in self.videos:
            if v.name in names:
                raise ValueError(f"duplicate video name {v.name!r}{where}")
            names.add(v.name)
            if v.labels.shape != (self.num_classes,):
                raise ValueError(f"video {v.name!r}{where}: labels shape {v.labels.shape}, expected "
                                 f"({self.num_classes},)")
            for s, e, c in v.segments:
                if not 0 <= c < self.num_classes:
                    raise ValueError(f"video {v.name!r}{where}: segment class {c} out of range")

    @property
    def num_classes(self) -> int:
        """Number of classes C."""
        return len(self.classes)

    @property
    def feature_dim(self) -> int:
        """Feature dimension D (RGB + flow)."""
        return int(self.videos[0].features.shape[1])

    @property
    def subsets(self) -> list[str]:
        """Subset names in order of first appearance."""
        return list(dict.fromkeys(v.subset for v in self.videos))

    @property
    def test_subset(self) -> str:
        """Conventional evaluation subset: "test" if present (THUMOS14), else "validation" (ActivityNet1.2)."""
        subs = self.subsets
        for s in ("test", "validation"):
            if s in subs:
                return s
        raise ValueError(f"no 'test' or 'validation' subset in {self.source or self.name}: {subs}")

    @property
    def train_subset(self) -> str:
        """Conventional training subset: the other one ("validation" for THUMOS14, "training" for ActivityNet)."""
        test = self.test_subset
        for s in ("training", "train", "validation"):
            if s in self.subsets and s != test:
                return s
        raise ValueError(f"no training subset besides {test!r} in {self.source or self.name}: {self.subsets}")

    def indices(self, subset: str) -> list[int]:
        """Indices of the videos of ``subset``; ValueError naming the known subsets if there is none."""
        idx = [i for i, v in enumerate(self.videos) if v.subset == subset]
        if not idx:
            raise ValueError(f"no video in subset {subset!r}; subsets are {self.subsets}")
        return idx

    def ground_truth(self, subset: str | None = None) -> list[dict]:
        """Annotated instances as dicts (video, label (class index), start, end) for :func:`detection_map`."""
        vids = self.videos if subset is None else [self.videos[i] for i in self.indices(subset)]
        return [{"video": v.name, "label": int(c), "start": float(s), "end": float(e)}
                for v in vids for s, e, c in v.segments]

    def label_matrix(self, indices=None) -> np.ndarray:
        """Video labels [V, C] of the given video indices (all videos by default)."""
        idx = range(len(self.videos)) if indices is None else indices
        return np.stack([self.videos[i].labels for i in idx])

    def __len__(self) -> int:
        return len(self.videos)

    def __repr__(self) -> str:
        counts = {s: len(self.indices(s)) for s in self.subsets}
        return (f"FeatureDataset({self.name!r}, {len(self.videos)} videos {counts}, {self.num_classes} classes, "
                f"D={self.feature_dim} (rgb {self.rgb_dim}), {self.feature_rate:g} segments/s)")
