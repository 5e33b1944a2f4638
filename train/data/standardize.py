"""Per-dimension standardisation of the input features, and checks for badly conditioned inputs.

:class:`FeatureStandardizer` holds the per-dimension mean and standard deviation of a set of feature
vectors (in practice: every segment of every training video, :func:`fit_standardizer`) and maps features
to ``(x - mean) / scale``, zero mean and unit variance per dimension on the data it was fitted on.

Statistics. Videos are added one at a time (:meth:`FeatureStandardizer.update`), never concatenated. Each
chunk's mean and sum of squared deviations are computed in float64 around the chunk's own mean (two
passes), and chunks are merged with Chan, Golub and LeVeque's pairwise update
``M2 = M2_a + M2_b + (mean_b - mean_a)^2 n_a n_b / (n_a + n_b)``, which never subtracts two large sums
(the cancellation that breaks ``E[x^2] - E[x]^2`` when the mean is large against the spread). The
standard deviation is the population one, ``sqrt(M2 / n)`` (numpy's ``std`` default, ddof 0).

Floor. The divisor is ``scale = max(std, min_std_ratio * reference)`` with ``reference`` the median of the
positive per-dimension standard deviations (1.0 if every dimension is constant) and ``min_std_ratio`` 1e-3
by default. A constant dimension (std 0) is therefore only centred (0 on the training data, never inf or
NaN), and a nearly constant one, whose spread may be no more than the rounding noise of float32 storage,
is divided by at least a thousandth of the typical dimension's std instead of by its own tiny std (so its
noise is not blown up to unit variance). The rule is relative: multiplying all features by a constant
does not change the standardised features.

Conditioning. :func:`conditioning_warning` reads the raw statistics and returns a message when they predict
the failure seen with unstandardised inputs, or None; its docstring gives the criteria.
:func:`relu_unit_fractions` measures dead and always-on ReLUs from a layer's pre-activations.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

__all__ = ["FeatureStandardizer", "fit_standardizer", "conditioning_warning", "relu_unit_fractions",
           "dead_unit_fraction"]

_STATE_KEYS = ("count", "mean", "m2", "scale", "min_std_ratio")


def _as_float64(features, where: str) -> np.ndarray:
    """Real-valued features (numpy or torch, float or integer) as a float64 numpy array."""
    if isinstance(features, torch.Tensor):
        if features.is_complex() or features.dtype == torch.bool:
            raise TypeError(f"{where}: features must be real numbers, got {features.dtype}")
        return features.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(features)
    if arr.dtype == np.bool_ or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{where}: features must be real numbers, got dtype {arr.dtype}")
    return arr.astype(np.float64, copy=False)


class FeatureStandardizer:
    """Streamed float64 per-dimension mean and standard deviation, and the z-score map they define.

    ``FeatureStandardizer(dim)`` starts empty (``dim`` None: taken from the first chunk); :meth:`update`
    adds feature vectors ``[..., D]``; :meth:`apply` standardises, :meth:`invert` undoes it;
    :meth:`state_dict` / :meth:`load_state_dict` save and restore it as plain tensors (loadable with
    ``torch.load(..., weights_only=True)``). See the module docstring for the numerics and the floor.
    """

    def __init__(self, dim: int | None = None, *, min_std_ratio: float = 1e-3):
        if dim is not None and (isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim < 1):
            raise ValueError(f"FeatureStandardizer: dim must be a positive integer or None, got {dim!r}")
        if not (isinstance(min_std_ratio, (int, float)) and 0 <= min_std_ratio < 1):
            raise ValueError(f"FeatureStandardizer: min_std_ratio must be in [0, 1), got {min_std_ratio!r}")
        self.dim = None if dim is None else int(dim)
        self.min_std_ratio = float(min_std_ratio)
        self.count = 0
        self._mean = None if dim is None else np.zeros(self.dim)
        self._m2 = None if dim is None else np.zeros(self.dim)
        self._scale: np.ndarray | None = None   # computed on first use after an update, or loaded
        self._cache: dict = {}                  # (device, dtype) -> (mean, scale) torch tensors

    # ---------------------------------------------------------------------------------------------
    # statistics

    @classmethod
    def fit(cls, chunks: Iterable, *, min_std_ratio: float = 1e-3) -> "FeatureStandardizer":
        """A standardizer fitted on every feature vector of ``chunks`` (arrays or tensors ``[..., D]``,
        e.g. one per video), streamed."""
        out = cls(min_std_ratio=min_std_ratio)
        for chunk in chunks:
            out.update(chunk)
        return out

    def update(self, features) -> "FeatureStandardizer":
        """Add the feature vectors ``features [..., D]`` (numpy or torch, any real dtype) to the statistics.
        Empty chunks are ignored; NaN or inf raise. Returns ``self``."""
        x = _as_float64(features, "FeatureStandardizer.update")
        if x.ndim == 0:
            raise ValueError("FeatureStandardizer.update: features must be [..., D], got a scalar")
        if self.dim is None:
            self.dim = int(x.shape[-1])
            self._mean, self._m2 = np.zeros(self.dim), np.zeros(self.dim)
        if x.shape[-1] != self.dim:
            raise ValueError(f"FeatureStandardizer.update: features must have D={self.dim} dimensions, got "
                             f"shape {tuple(x.shape)}")
        x = x.reshape(-1, self.dim)
        n_b = x.shape[0]
        if n_b == 0:
            return self
        if not np.isfinite(x).all():
            raise ValueError(f"FeatureStandardizer.update: features contain {int((~np.isfinite(x)).sum())} "
                             f"NaN or infinite values")
        mean_b = x.mean(axis=0)
        m2_b = np.square(x - mean_b).sum(axis=0)
        n_a, n = self.count, self.count + n_b
        delta = mean_b - self._mean
        self._mean = self._mean + delta * (n_b / n)
        self._m2 = self._m2 + m2_b + np.square(delta) * (n_a * n_b / n)
        self.count = n
        self._scale, self._cache = None, {}
        return self

    def _need_fit(self, where: str) -> None:
        if self.count == 0:
            raise RuntimeError(f"FeatureStandardizer.{where}: no statistics yet (call update/fit first, or "
                               f"load_state_dict)")

    @property
    def mean(self) -> np.ndarray:
        """Per-dimension mean, float64 [D]."""
        self._need_fit("mean")
        return self._mean.copy()

    @property
    def std(self) -> np.ndarray:
        """Per-dimension population standard deviation (ddof 0), float64 [D]."""
        self._need_fit("std")
        return np.sqrt(np.maximum(self._m2, 0.0) / self.count)

    @property
    def scale(self) -> np.ndarray:
        """The divisor of :meth:`apply`: the std raised to the floor ``min_std_ratio x`` median positive
        std (module docstring), float64 [D]. Fixed by :meth:`load_state_dict` to the saved values."""
        self._need_fit("scale")
        if self._scale is None:
            std = self.std
            positive = std[std > 0]
            reference = float(np.median(positive)) if positive.size else 1.0
            self._scale = np.maximum(std, self.min_std_ratio * reference)
            if not (self._scale > 0).all():  # min_std_ratio 0 with a constant dimension
                self._scale = np.where(self._scale > 0, self._scale, 1.0)
        return self._scale.copy()

    # ---------------------------------------------------------------------------------------------
    # the map

    def _params(self, like):
        if isinstance(like, torch.Tensor):
            key = (like.device, like.dtype)
            if key not in self._cache:
                self._cache[key] = (torch.as_tensor(self._mean, dtype=like.dtype, device=like.device),
                                    torch.as_tensor(self.scale, dtype=like.dtype, device=like.device))
            return self._cache[key]
        return self._mean.astype(like.dtype), self.scale.astype(like.dtype)

    def _check_input(self, features, where: str):
        self._need_fit(where)
        is_tensor = isinstance(features, torch.Tensor)
        x = features if is_tensor else np.asarray(features)
        floating = x.is_floating_point() if is_tensor else np.issubdtype(x.dtype, np.floating)
        if not floating:
            raise TypeError(f"FeatureStandardizer.{where}: features must be floating point, got {x.dtype}")
        if x.ndim == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"FeatureStandardizer.{where}: features must be [..., {self.dim}], got shape "
                             f"{tuple(x.shape)}")
        return x

    def apply(self, features, mask=None):
        """``(features - mean) / scale`` for ``features [..., D]``: a numpy array or a torch tensor of a
        floating dtype, returned as the same type, dtype and device (computed in that dtype; a new object,
        the input is not modified). ``mask [...]`` (bool, True on real segments): positions where it is
        False are set to 0, as the zero padding of a batch was before."""
        x = self._check_input(features, "apply")
        mean, scale = self._params(x)
        out = (x - mean) / scale
        if mask is not None:
            if tuple(mask.shape) != tuple(x.shape[:-1]):
                raise ValueError(f"FeatureStandardizer.apply: mask must have shape {tuple(x.shape[:-1])}, got "
                                 f"{tuple(mask.shape)}")
            if isinstance(out, torch.Tensor):
                out = out.masked_fill(~torch.as_tensor(mask, dtype=torch.bool, device=out.device)[..., None], 0)
            else:
                out = np.where(np.asarray(mask, dtype=bool)[..., None], out, out.dtype.type(0))
        return out

    def invert(self, features):
        """The inverse of :meth:`apply`: ``features * scale + mean`` (same types as :meth:`apply`)."""
        x = self._check_input(features, "invert")
        mean, scale = self._params(x)
        return x * scale + mean

    # ---------------------------------------------------------------------------------------------
    # state

    def state_dict(self) -> dict:
        """``{"count", "mean", "m2", "scale", "min_std_ratio"}`` as plain CPU tensors (count int64, the rest
        float64); ``torch.load(weights_only=True)`` reads them."""
        self._need_fit("state_dict")
        return {"count": torch.tensor(self.count, dtype=torch.int64),
                "mean": torch.from_numpy(self._mean.copy()),
                "m2": torch.from_numpy(self._m2.copy()),
                "scale": torch.from_numpy(self.scale),
                "min_std_ratio": torch.tensor(self.min_std_ratio, dtype=torch.float64)}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the saved ``scale`` is used as is (not recomputed)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"FeatureStandardizer.load_state_dict: missing keys {missing} (expected "
                             f"{list(_STATE_KEYS)})")
        mean = torch.as_tensor(state["mean"]).detach().to("cpu", torch.float64).numpy().copy()
        m2 = torch.as_tensor(state["m2"]).detach().to("cpu", torch.float64).numpy().copy()
        scale = torch.as_tensor(state["scale"]).detach().to("cpu", torch.float64).numpy().copy()
        count = int(state["count"])
        if mean.ndim != 1 or m2.shape != mean.shape or scale.shape != mean.shape:
            raise ValueError(f"FeatureStandardizer.load_state_dict: mean, m2 and scale must be [D] of one size, "
                             f"got {mean.shape}, {m2.shape}, {scale.shape}")
        if self.dim is not None and mean.shape[0] != self.dim:
            raise ValueError(f"FeatureStandardizer.load_state_dict: state has D={mean.shape[0]}, this "
                             f"standardizer D={self.dim}")
        if count < 1 or not (np.isfinite(mean).all() and np.isfinite(m2).all() and (scale > 0).all()
                             and np.isfinite(scale).all()):
            raise ValueError("FeatureStandardizer.load_state_dict: count must be >= 1, mean and m2 finite and "
                             "scale finite and > 0")
        self.dim, self.count = int(mean.shape[0]), count
        self._mean, self._m2, self._scale = mean, m2, scale
        self.min_std_ratio = float(state["min_std_ratio"])
        self._cache = {}

    @classmethod
    def from_state_dict(cls, state: dict) -> "FeatureStandardizer":
        """A standardizer restored from :meth:`state_dict`."""
        out = cls()
        out.load_state_dict(state)
        return out

    def __repr__(self) -> str:
        if self.count == 0:
            return f"FeatureStandardizer(dim={self.dim}, empty)"
        return (f"FeatureStandardizer(dim={self.dim}, count={self.count}, mean |.|={np.abs(self._mean).mean():.4g}, "
                f"std={self.std.mean():.4g} on average)")


def fit_standardizer(dataset, indices: Iterable[int], *, min_std_ratio: float = 1e-3) -> FeatureStandardizer:
    """Statistics of every segment of the videos ``dataset.videos[i]`` for i in ``indices`` (the training
    subset), one video at a time. A video with NaN or inf features raises naming it."""
    out = FeatureStandardizer(min_std_ratio=min_std_ratio)
    indices = list(indices)
    if not indices:
        raise ValueError("fit_standardizer: indices is empty (expected the training videos)")
    for i in indices:
        video = dataset.videos[i]
        try:
            out.update(video.features)
        except ValueError as exc:
            raise ValueError(f"fit_standardizer: video {video.name!r}: {exc}") from None
    if out.count == 0:
        raise ValueError(f"fit_standardizer: the {len(indices)} videos have no segment")
    return out


def conditioning_warning(stats: FeatureStandardizer, standardize: str = "none", *,
                         min_spread_ratio: float = 0.5, scale_range: tuple[float, float] = (1e-2, 1e2),
                         max_constant_fraction: float = 0.1) -> str | None:
    """A one-line description of what makes the features (raw statistics ``stats``) hard to train on,
    or None when nothing does. ``standardize``: the ``data.standardize`` in use; with ``"zscore"`` only the
    findings standardisation does not remove are reported.

    Criteria (all on the training subset):

    * spread small against the offset: ``||std|| / ||mean|| < min_spread_ratio`` (0.5), norms over the
      dimensions. A first-layer unit ``w . x + b`` with random ``w`` then sees a segment-independent part
      ``w . mean`` about ``1 / ratio`` times larger than the part that varies over segments, so most units
      start on the same side of zero for every segment (dead or always on) and stay there; with ratio 0.22
      (std 0.22 of the mean in every dimension) training stayed at the class prior. Standardisation removes
      the offset;
    * global scale off: the RMS over dimensions of the std outside ``scale_range`` ([1e-2, 1e2]); the default
      initialisation and learning rate assume inputs of order one. Standardisation removes it;
    * more than ``max_constant_fraction`` (10 %) of the dimensions constant or below the std floor (see the
      module docstring): they carry nothing, which often means a broken extraction. Standardisation keeps it.
    """
    if standardize not in ("none", "zscore"):
        raise ValueError(f"conditioning_warning: standardize must be 'none' or 'zscore', got {standardize!r}")
    mean, std, scale = stats.mean, stats.std, stats.scale
    d = len(mean)
    problems = []
    if standardize == "none":  # both of these are removed by standardisation
        offset = float(np.linalg.norm(mean))
        ratio = float(np.linalg.norm(std)) / offset if offset > 0 else float("inf")
        if ratio < min_spread_ratio:
            problems.append(f"the spread is small against the offset (||std|| / ||mean|| = {ratio:.3g} < "
                            f"{min_spread_ratio:g}; median per-dimension std/|mean| "
                            f"{float(np.median(std / np.maximum(np.abs(mean), 1e-300))):.3g})")
        rms = float(np.sqrt(np.mean(np.square(std))))
        if not scale_range[0] <= rms <= scale_range[1]:
            problems.append(f"the features' scale is far from 1 (RMS std {rms:.3g}, outside "
                            f"[{scale_range[0]:g}, {scale_range[1]:g}])")
    fixable = bool(problems)
    constant = int((std < scale).sum())
    if constant > max_constant_fraction * d:
        problems.append(f"{constant} of {d} dimensions are (nearly) constant (std below the floor "
                        f"{float(scale.min()):.3g})")
    if not problems:
        return None
    advice = ("; data.standardize=zscore standardises the features with training statistics" if fixable
              else "")
    return (f"the input features look badly conditioned on {stats.count} training segments: "
            + "; ".join(problems) + advice)


def relu_unit_fractions(pre_activations, mask=None) -> tuple[float, float]:
    """Fractions of ReLU units that are dead (pre-activation <= 0 on every row) and always on (> 0 on every
    row), from a layer's pre-activations ``[..., H]`` (numpy or torch; e.g. ``[B, T, H]`` of a first Linear).
    ``mask [...]`` (bool) keeps only the rows where it is True (the real segments of a padded batch)."""
    pre = torch.as_tensor(pre_activations).detach()
    if pre.ndim < 2:
        raise ValueError(f"relu_unit_fractions: pre_activations must be [..., H] with at least one row, "
                         f"got shape {tuple(pre.shape)}")
    rows = pre.reshape(-1, pre.shape[-1])
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool, device=pre.device)
        if tuple(mask.shape) != tuple(pre.shape[:-1]):
            raise ValueError(f"relu_unit_fractions: mask must have shape {tuple(pre.shape[:-1])}, got "
                             f"{tuple(mask.shape)}")
        rows = rows[mask.reshape(-1)]
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"relu_unit_fractions: no row or no unit to measure (rows x units {tuple(rows.shape)})")
    if torch.isnan(rows).any():
        raise ValueError("relu_unit_fractions: pre_activations contain NaN")
    on = rows > 0
    dead = float((~on.any(0)).float().mean())
    always = float(on.all(0).float().mean())
    return dead, always


def dead_unit_fraction(pre_activations, mask=None) -> float:
    """Fraction of ReLU units whose pre-activation is <= 0 on every row (see :func:`relu_unit_fractions`)."""
    return relu_unit_fractions(pre_activations, mask)[0]
