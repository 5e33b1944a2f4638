"""Pre-extracted feature datasets: readers for the standard W-TALC layout and our native layout,
batching, and the synthetic benchmark (:mod:`train.data.synthetic`).

``load_dataset(root, name, layout="native")`` reads our safe layout; ``layout="standard"`` reads the
pickled W-TALC release files (``<root>/<Name>-I3D-JOINTFeatures.npy`` + ``<root>/<Name>-Annotations/``)
with an unpickler that builds numpy arrays and plain containers only (:mod:`train.data.npy`): a file that
would run code is refused, naming it.
:class:`FeatureStandardizer` (:mod:`train.data.standardize`) standardises the features per dimension with
training-subset statistics.
"""
from __future__ import annotations

from .batching import collate, iterate_batches
from .dataset import (DEFAULT_FEATURE_RATE, DEFAULT_RGB_DIM, DatasetError, FeatureDataset, VideoRecord,
                      index_to_seconds, seconds_to_index)
from .native import read_native, write_native
from .standard import read_standard, write_standard
from .standardize import (FeatureStandardizer, conditioning_warning, dead_unit_fraction, fit_standardizer,
                          relu_unit_fractions)

__all__ = [
    "VideoRecord", "FeatureDataset", "DatasetError", "load_dataset", "iterate_batches", "collate",
    "read_native", "write_native", "read_standard", "write_standard", "seconds_to_index", "index_to_seconds",
    "DEFAULT_FEATURE_RATE", "DEFAULT_RGB_DIM", "FeatureStandardizer", "fit_standardizer", "conditioning_warning",
    "relu_unit_fractions", "dead_unit_fraction",
]


def load_dataset(root: str, name: str, *, layout: str = "native", feature_rate: float | None = None,
                 rgb_dim: int | None = None) -> FeatureDataset:
    """Load dataset ``name`` from directory ``root``.

    layout: ``"native"`` (default; ``<root>/<name>/annotations.json`` + ``features/*.npy``, no pickle) or
    ``"standard"`` (the W-TALC release: ``<root>/<name>-I3D-JOINTFeatures.npy`` and
    ``<root>/<name>-Annotations/*.npy``, pickles read without running code).
    feature_rate: segments per second (I3D: 25 fps / 16 frames = 25/16; some releases use 10/4);
    rgb_dim: features[:, :rgb_dim] is RGB, the rest flow. Both default to the values stored with the
    dataset when it has them (our files do), else 25/16 and 1024.
    """
    if layout == "native":
        return read_native(root, name, feature_rate=feature_rate, rgb_dim=rgb_dim)
    if layout == "standard":
        return read_standard(root, name, feature_rate=feature_rate, rgb_dim=rgb_dim)
    raise ValueError(f"load_dataset: layout must be 'native' or 'standard', got {layout!r}")
