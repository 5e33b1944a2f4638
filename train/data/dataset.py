"""In-memory dataset of pre-extracted features: :class:`VideoRecord` and :class:`FeatureDataset`."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["VideoRecord", "FeatureDataset", "DatasetError", "DEFAULT_FEATURE_RATE", "DEFAULT_RGB_DIM",
           "seconds_to_index", "index_to_seconds", "checked_duration", "check_segment", "check_features",
           "checked_feature_rate", "checked_rgb_dim"]


class DatasetError(ValueError):
    """Dataset files that cannot be used (damaged, inconsistent); the message names the file.
    ``argument`` names the reader's argument at fault (``"rgb_dim"``, ``"feature_rate"``) when the value
    came from the caller rather than from the files."""

    def __init__(self, message: str, argument: str | None = None):
        super().__init__(message)
        self.argument = argument

DEFAULT_FEATURE_RATE = 25 / 16  # I3D at 25 fps, one feature per 16 frames
DEFAULT_RGB_DIM = 1024


def seconds_to_index(t: float, feature_rate: float = DEFAULT_FEATURE_RATE) -> int:
    """Segment index of time ``t`` (seconds): ``round(t * feature_rate)``."""
    return int(round(t * feature_rate))


def index_to_seconds(i: float, feature_rate: float = DEFAULT_FEATURE_RATE) -> float:
    """Start time (seconds) of segment ``i``; segment i covers [i / rate, (i + 1) / rate)."""
    return float(i) / feature_rate


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def checked_duration(value, where: str, video: str) -> float:
    """A video's ``duration``: a finite number of seconds > 0, else :class:`DatasetError` naming the
    file (``where``), the video and the field."""
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise DatasetError(f"{where}: video {video!r} field 'duration': expected a number of seconds > 0, "
                           f"got {value!r}")
    return float(value)


def check_segment(start: float, end: float, duration: float, feature_rate: float, where: str, video: str,
                  field: str = "segment") -> None:
    """An annotated instance ``[start, end]`` must lie inside the video: ``0 <= start <= end <= duration``,
    with one feature segment (``1 / feature_rate`` s) of slack at the end for rounding between the tools
    that measured the duration and the annotation. :class:`DatasetError` naming file, video and field."""
    if not (math.isfinite(start) and math.isfinite(end)) or start < 0 or end < start or \
            end > duration + 1.0 / feature_rate:
        raise DatasetError(f"{where}: video {video!r} field '{field}' [{start:g}, {end:g}]: expected "
                           f"0 <= start <= end <= duration ({duration:g} s), fix the {field} or the duration")


def check_features(features: np.ndarray, where: str, video: str, dim: int | None = None) -> None:
    """A video's features: a numeric ``[T, D]`` array with ``T >= 1``, finite, of width ``dim`` (when
    given); else :class:`DatasetError` naming the file and the video."""
    if features.ndim != 2 or features.shape[0] < 1 or not np.issubdtype(features.dtype, np.number):
        raise DatasetError(f"{where}: video {video!r} has features of shape {features.shape} and dtype "
                           f"{features.dtype}; expected a numeric [T, D] array with T >= 1")
    if dim is not None and features.shape[1] != dim:
        raise DatasetError(f"{where}: video {video!r} has {features.shape[1]}-dimensional features, the videos "
                           f"before it {dim}-dimensional; expected one width for every video")
    finite = np.isfinite(features)
    if not finite.all():
        rows = np.flatnonzero(~finite.all(1))
        raise DatasetError(f"{where}: video {video!r} has {int((~finite).sum())} NaN or infinite feature values "
                           f"(in {len(rows)} of {features.shape[0]} segments, first {int(rows[0])}); expected "
                           f"finite features, re-extract or repair them")


def checked_feature_rate(value, where: str, argument: bool = False) -> float:
    """``feature_rate`` (segments per second): a finite number > 0. ``argument``: the value came from
    the caller (the error then carries ``argument="feature_rate"``), else from the file ``where``."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        source = "feature_rate" if argument else f"{where}: field 'feature_rate'"
        raise DatasetError(f"{source}: expected a number of segments per second > 0, got {value!r}",
                           "feature_rate" if argument else None)
    return float(value)


def checked_rgb_dim(value, feature_dim: int, where: str, argument: bool = False) -> int:
    """``rgb_dim``: an integer splitting the ``feature_dim`` features into two non-empty halves (as
    :func:`checked_feature_rate` for ``argument``; None: the file has none, the default 1024 is used)."""
    if value is None:
        if 0 < DEFAULT_RGB_DIM < feature_dim:
            return DEFAULT_RGB_DIM
        raise DatasetError(f"rgb_dim: neither given nor in {where}, and the default {DEFAULT_RGB_DIM} does not "
                           f"split the {feature_dim}-dimensional features into RGB and flow; give it (config key "
                           f"data.rgb_dim)", "rgb_dim")
    if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)) or \
            not 0 < value < feature_dim:
        source = "rgb_dim" if argument else f"{where}: field 'rgb_dim'"
        raise DatasetError(f"{source}: expected an integer in [1, {feature_dim - 1}] (features[:, :rgb_dim] are "
                           f"RGB, the rest flow, of {feature_dim} dimensions), got {value!r}",
                           "rgb_dim" if argument else None)
    return int(value)


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
    (video name -> list of (start, end) seconds), ``name`` and ``source`` (where it was read from), and
    ``subset_source`` (the file that holds the videos' subsets, for error messages; default ``source``).
    """

    def __init__(self, classes, videos, *, feature_rate: float = DEFAULT_FEATURE_RATE,
                 rgb_dim: int = DEFAULT_RGB_DIM, ambiguous=None, name: str = "", source: str = "",
                 subset_source: str = ""):
        self.classes = [str(c) for c in classes]
        self.videos = list(videos)
        self.feature_rate = float(feature_rate)
        self.rgb_dim = int(rgb_dim)
        self.ambiguous = {k: [tuple(map(float, s)) for s in v] for k, v in (ambiguous or {}).items()}
        self.name = name
        self.source = source
        self.subset_source = subset_source or source
        self._validate()

    def _validate(self) -> None:
        where = f" (from {self.source})" if self.source else ""
        if not self.feature_rate > 0:
            raise DatasetError(f"feature_rate must be > 0 segments per second, got {self.feature_rate}")
        if len(set(self.classes)) != len(self.classes):
            raise DatasetError(f"duplicate class names{where}: {self.classes}")
        if not self.videos:
            raise DatasetError(f"dataset{where} has no video")
        dims = {v.features.shape[1] for v in self.videos}
        if len(dims) != 1:
            raise DatasetError(f"videos{where} have different feature dimensions: {sorted(dims)}")
        if not 0 < self.rgb_dim < self.feature_dim:
            raise DatasetError(f"rgb_dim={self.rgb_dim} must split the {self.feature_dim}-dim features into two "
                             f"non-empty halves{where}; pass rgb_dim= for features that are not 2 x 1024")
        names = set()
        for v in self.videos:
            if v.name in names:
                raise DatasetError(f"duplicate video name {v.name!r}{where}")
            names.add(v.name)
            if v.labels.shape != (self.num_classes,):
                raise DatasetError(f"video {v.name!r}{where}: labels shape {v.labels.shape}, expected "
                                 f"({self.num_classes},)")
            for s, e, c in v.segments:
                if not 0 <= c < self.num_classes:
                    raise DatasetError(f"video {v.name!r}{where}: segment class {c} out of range")

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
