"""The exemplar database: per class, the ``n`` highest-scoring training segments.

:class:`ExemplarDatabase` holds ``D`` in R^{C x n x m} together with the representativeness ``Q`` (as
``log_q``), the score each exemplar entered with and its source ``(video, segment)`` id. It is filled by
streaming over a training set chunk by chunk (:meth:`ExemplarDatabase.update`): per class, the new
candidates are merged with the kept exemplars and cut back to the ``n`` best, so memory never grows
beyond the database itself plus one chunk.

The order used everywhere is a total order on ``(score, id)``: higher score first, then the smaller id
``(video, segment)`` in lexicographic order. Because of it, the result of streaming is independent of
how the training set is cut into chunks and in which order the chunks come, and :meth:`merge` of
databases built on disjoint parts equals one pass over the union.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch

__all__ = ["ExemplarDatabase"]

_STATE_KEYS = ("features", "log_q", "scores", "ids", "count")


def _shape(t: torch.Tensor) -> list:
    return list(t.shape)


def _require_tensor(where: str, name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(value).__name__}")


def _require_positive_int(where: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{where}: {name} must be > 0, got {value}")
    return value


def _is_integer_dtype(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


def _lexsort(keys) -> torch.Tensor:
    """Permutation sorting 1-D ``keys`` ascending; the LAST key is the primary one (like numpy)."""
    perm = torch.arange(keys[0].numel(), device=keys[0].device)
    for key in keys:
        perm = perm[torch.sort(key[perm], stable=True).indices]
    return perm


def _row_logsumexp(log_q: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_q.double(), dim=-1)


class ExemplarDatabase:
    r"""Per-class exemplar database ``D`` [C, n, m] with its representativeness ``Q`` (in log space).

    Attributes (all on one device; floats in the database dtype):
        features: ``[C, n, m]`` exemplar features ``y_cj``.
        log_q: ``[C, n]`` log representativeness ``log q_cj``; each class row with filled slots sums to
            one in probability space. ``-inf`` marks an empty slot.
        scores: ``[C, n]`` the score with which each exemplar entered its class.
        ids: ``[C, n, 2]`` int64 ``(video, segment)`` id of each exemplar.
        count: ``[C]`` int64 number of filled slots per class.

    Slots of a class are kept in descending score order (ties: smaller id first) and filled slots form
    a prefix: slot ``j`` of class ``c`` is filled iff ``j < count[c]``. Empty slots hold features 0,
    ``log_q = -inf``, ``scores = -inf`` and ``ids = -1``.

    An id identifies a segment: within a class, entries with the same id are treated as the same
    segment and only the highest-scoring copy is kept (so streaming a segment twice cannot fill a class
    with duplicates). Two copies with the same id *and* the same score are assumed identical; if their
    features differ, which one is kept is unspecified.

    Args:
        num_classes: C, > 0.
        size: n, the number of exemplar slots per class, > 0.
        dim: m, the feature size, > 0.
        dtype: floating dtype of ``features``, ``log_q`` and ``scores`` (default float32).
        device: where the tensors live (default CPU).
    """

    def __init__(self, num_classes: int, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        where = "ExemplarDatabase"
        self.num_classes = _require_positive_int(where, "num_classes", num_classes)
        self.size = _require_positive_int(where, "size", size)
        self.dim = _require_positive_int(where, "dim", dim)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"{where}: dtype must be a floating-point torch.dtype, got {dtype!r}")
        C, n, m = num_classes, size, dim
        device = torch.device("cpu") if device is None else torch.device(device)
        self.features = torch.zeros(C, n, m, dtype=dtype, device=device)
        self.log_q = torch.full((C, n), -torch.inf, dtype=dtype, device=device)
        self.scores = torch.full((C, n), -torch.inf, dtype=dtype, device=device)
        self.ids = torch.full((C, n, 2), -1, dtype=torch.int64, device=device)
        self.count = torch.zeros(C, dtype=torch.int64, device=device)

    # -----------------------------------------------------------------------------------------------
    # Properties and small helpers

    @property
    def device(self) -> torch.device:
        """The device of the database tensors."""
        return self.features.device

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of ``features``, ``log_q`` and ``scores``."""
        return self.features.dtype

    def filled_mask(self) -> torch.Tensor:
        """``[C, n]`` bool mask of the filled slots (``slot < count[class]``)."""
        return torch.arange(self.size, device=self.device)[None, :] < self.count[:, None]

    def reset(self) -> None:
        """Empty every slot (features 0, log_q and scores -inf, ids -1, count 0), in place."""
        self.features.zero_()
        self.log_q.fill_(-torch.inf)
        self.scores.fill_(-torch.inf)
        self.ids.fill_(-1)
        self.count.zero_()

    def _reset_log_q_uniform(self) -> None:
        filled = self.filled_mask()
        uniform = -torch.log(self.count.clamp_min(1).to(torch.float64))[:, None].to(self.dtype)
        self.log_q = torch.where(filled, uniform.expand_as(self.log_q),
                                 torch.full_like(self.log_q, -torch.inf))

    def __repr__(self) -> str:
        filled = int(self.count.sum())
        nonempty = int((self.count > 0).sum())
        return (f"ExemplarDatabase(num_classes={self.num_classes}, size={self.size}, dim={self.dim}, "
                f"filled={filled}/{self.num_classes * self.size}, nonempty_classes={nonempty}, "
                f"dtype={self.dtype}, device={self.device})")

    # -----------------------------------------------------------------------------------------------
    # Streaming update

    def update(self, features: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
               ids: torch.Tensor) -> "ExemplarDatabase":
        r"""Offer a chunk of training segments; keep per class the ``n`` best among kept and new.

        A segment is a candidate for class ``c`` only if ``labels[s, c]`` (its video is labelled with
        ``c``); it competes with ``scores[s, c]``. Per class the candidates are merged with the kept
        exemplars and the ``n`` best by (score descending, id ascending) are kept, so any chunking and
        chunk order of a training set gives the same database. Temporary memory is
        O(C*n*m + N*m + C*n + number of labelled (segment, class) pairs).

        **Q is reset**: after the update ``log_q`` is uniform over each class's filled slots
        (``log(1 / count[c])``; ``-inf`` on empty slots) -- a changed database invalidates Q, which has
        to be refitted afterwards (e.g. with :func:`ccluster.fit_step`).

        Args:
            features: ``[N, m]`` floating segment features (detached and converted to the database
                dtype/device). Must be finite after that conversion: a NaN or infinite exemplar would
                make its class's ``log z`` NaN.
            scores: ``[N, C]`` floating per-class scores (e.g. the fused score). Must not contain NaN and
                must be finite (after conversion to the database dtype) wherever ``labels`` is True.
            labels: ``[N, C]`` bool, the labels of each segment's video.
            ids: ``[N, 2]`` integer ``(video, segment)`` ids, >= 0.

        Returns:
            ``self``. The tensors ``features``, ``scores`` and ``ids`` are modified in place (do not
            update a database whose features are still needed by a pending backward pass).
        """
        where = "ExemplarDatabase.update"
        C, m = self.num_classes, self.dim
        for name, t in (("features", features), ("scores", scores), ("labels", labels), ("ids", ids)):
            _require_tensor(where, name, t)
        if not features.is_floating_point():
            raise TypeError(f"{where}: features must be a floating-point tensor, got {features.dtype}")
        if features.dim() != 2 or features.shape[1] != m:
            raise ValueError(f"{where}: features must be [N, m] with m={m}, got shape {_shape(features)}")
        N = features.shape[0]
        if not scores.is_floating_point():
            raise TypeError(f"{where}: scores must be a floating-point tensor, got {scores.dtype}")
        if _shape(scores) != [N, C]:
            raise ValueError(f"{where}: scores must be [N, C] = {[N, C]}, got shape {_shape(scores)}")
        if labels.dtype != torch.bool:
            raise TypeError(f"{where}: labels must be a bool tensor, got {labels.dtype}")
        if _shape(labels) != [N, C]:
            raise ValueError(f"{where}: labels must be [N, C] = {[N, C]}, got shape {_shape(labels)}")
        if not _is_integer_dtype(ids.dtype):
            raise TypeError(f"{where}: ids must be an integer tensor, got {ids.dtype}")
        if _shape(ids) != [N, 2]:
            raise ValueError(f"{where}: ids must be [N, 2] = {[N, 2]} (video, segment), "
                             f"got shape {_shape(ids)}")

        dev = self.device
        features = features.detach().to(device=dev, dtype=self.dtype)
        scores = scores.detach().to(device=dev, dtype=self.dtype)
        labels = labels.to(dev)
        ids = ids.to(device=dev, dtype=torch.int64)
        bad_features = ~torch.isfinite(features)
        if bad_features.any():
            raise ValueError(f"{where}: features must be finite (after conversion to {self.dtype}), got "
                             f"{int(bad_features.sum())} NaN or infinite entries in "
                             f"{int(bad_features.any(1).sum())} of {N} rows")
        if torch.isnan(scores).any():
            raise ValueError(f"{where}: scores contain NaN (at {int(torch.isnan(scores).sum())} entries)")
        if (ids < 0).any():
            raise ValueError(f"{where}: ids must be >= 0 (-1 marks an empty slot), "
                             f"got min {int(ids.min())}")
        rows, cls = labels.nonzero(as_tuple=True)
        new_scores = scores[rows, cls]
        bad = ~torch.isfinite(new_scores)
        if bad.any():
            raise ValueError(f"{where}: scores must be finite where labels is True (after conversion to "
                             f"{self.dtype}), got {int(bad.sum())} non-finite entries")
        # Exact pre-filter: a candidate scoring below the last kept exemplar of a full class can never
        # enter it (kept exemplars only leave for better ones).
        floor = torch.where(self.count >= self.size, self.scores[:, -1],
                            torch.full_like(self.scores[:, -1], -torch.inf))
        alive = new_scores >= floor[cls]
        if not alive.all():
            rows, cls, new_scores = rows[alive], cls[alive], new_scores[alive]
        self._merge_entries(cls, new_scores, ids[rows], features, rows)
        return self

    def merge(self, other: "ExemplarDatabase") -> "ExemplarDatabase":
        """Merge another database in place: equal to one :meth:`update` pass over both inputs.

        Use it to combine databases collected on disjoint parts of the training set (e.g. in several
        processes). ``other`` must have the same ``num_classes``, ``size`` and ``dim``; its tensors are
        converted to this database's dtype and device. As after :meth:`update`, ``log_q`` is reset to
        uniform over the filled slots.

        Returns:
            ``self``, updated in place (``merge(self)`` leaves it unchanged but for the log_q reset).
        """
        where = "ExemplarDatabase.merge"
        if not isinstance(other, ExemplarDatabase):
            raise TypeError(f"{where}: other must be an ExemplarDatabase, got {type(other).__name__}")
        mine = (self.num_classes, self.size, self.dim)
        theirs = (other.num_classes, other.size, other.dim)
        if mine != theirs:
            raise ValueError(f"{where}: other must have (num_classes, size, dim) = {mine}, got {theirs}")
        filled = other.filled_mask().to(self.device)
        cls = torch.arange(self.num_classes, device=self.device)[:, None].expand_as(filled)[filled]
        feats = other.features.to(device=self.device, dtype=self.dtype)[filled]
        self._merge_entries(cls, other.scores.to(device=self.device, dtype=self.dtype)[filled],
                            other.ids.to(self.device)[filled], feats,
                            torch.arange(feats.shape[0], device=self.device))
        return self

    def _merge_entries(self, new_cls: torch.Tensor, new_scores: torch.Tensor, new_ids: torch.Tensor,
                       new_feats: torch.Tensor, new_rows: torch.Tensor) -> None:
        """Merge flat candidates (class, score, id, row of new_feats) with the kept exemplars."""
        C, n, m = self.num_classes, self.size, self.dim
        dev = self.device
        filled = self.filled_mask()
        kept_slot = filled.reshape(-1).nonzero().squeeze(1)               # flat slot c*n + j
        K = kept_slot.numel()
        cls = torch.cat([kept_slot // n, new_cls])
        score = torch.cat([self.scores.reshape(-1)[kept_slot], new_scores])
        ids = torch.cat([self.ids.reshape(-1, 2)[kept_slot], new_ids])
        src = torch.cat([kept_slot, new_rows])                            # kept slot or new row
        is_new = torch.arange(cls.numel(), device=dev) >= K
        neg_score = -score  # finite, so negation is exact and ascending order = score descending
        id0, id1 = ids[:, 0], ids[:, 1]

        # 1. Drop duplicates of (class, id): keep the highest-scoring copy.
        perm = _lexsort([neg_score, id1, id0, cls])
        c_p, a_p, b_p = cls[perm], id0[perm], id1[perm]
        dup = torch.zeros_like(c_p, dtype=torch.bool)
        dup[1:] = (c_p[1:] == c_p[:-1]) & (a_p[1:] == a_p[:-1]) & (b_p[1:] == b_p[:-1])
        keep = perm[~dup]
        cls, neg_score, id0, id1 = cls[keep], neg_score[keep], id0[keep], id1[keep]
        src, is_new, score = src[keep], is_new[keep], score[keep]

        # 2. Order by (class, score desc, id0, id1) and keep the first n of each class.
        perm = _lexsort([id1, id0, neg_score, cls])
        cls, id0, id1, src, is_new, score = (t[perm] for t in (cls, id0, id1, src, is_new, score))
        counts = torch.bincount(cls, minlength=C)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(cls.numel(), device=dev) - starts[cls]
        sel = rank < n
        cls, rank, id0, id1, src, is_new, score = (
            t[sel] for t in (cls, rank, id0, id1, src, is_new, score))
        slot = cls * n + rank

        # In place. Filled slots stay filled (count never decreases), and every filled slot is
        # rewritten below, so nothing stale remains. Kept rows that move are gathered first.
        flat = self.features.view(C * n, m)
        moved = ~is_new & (src != slot)
        moved_rows = flat[src[moved]]               # advanced indexing copies: safe even if new_feats
        new_rows = new_feats[src[is_new]]           # aliases self.features
        flat[slot[moved]] = moved_rows
        flat[slot[is_new]] = new_rows
        self.scores.view(-1)[slot] = score
        self.ids.view(-1, 2)[slot] = torch.stack([id0, id1], 1)
        self.count = torch.minimum(counts, torch.full_like(counts, n))
        self._reset_log_q_uniform()

    # -----------------------------------------------------------------------------------------------
    # Q

    def set_log_q(self, log_q: torch.Tensor, atol: float = 1e-4) -> None:
        """Set the log representativeness after validating it.

        Args:
            log_q: ``[C, n]`` floating tensor, finite exactly on the filled slots and ``-inf`` on the
                empty ones, each class with filled slots normalised: ``logsumexp(log_q[c]) ~ 0``.
            atol: tolerance on ``|logsumexp(log_q[c])|``.

        Raises:
            TypeError/ValueError naming what is wrong. The stored copy has the database dtype/device.
        """
        self.log_q = self._checked_log_q("ExemplarDatabase.set_log_q", log_q, self.filled_mask(), atol)

    def _checked_log_q(self, where: str, log_q, filled: torch.Tensor, atol: float = 1e-4):
        _require_tensor(where, "log_q", log_q)
        if not log_q.is_floating_point():
            raise TypeError(f"{where}: log_q must be a floating-point tensor, got {log_q.dtype}")
        shape = [self.num_classes, self.size]
        if _shape(log_q) != shape:
            raise ValueError(f"{where}: log_q must be [C, n] = {shape}, got shape {_shape(log_q)}")
        log_q = log_q.to(device=self.device, dtype=self.dtype).clone()
        finite = torch.isfinite(log_q)
        if (finite != filled).any():
            bad = int((finite != filled).sum())
            raise ValueError(f"{where}: log_q must be finite exactly on the filled slots (j < count[c]) "
                             f"and -inf elsewhere; {bad} slots disagree")
        if (~finite & (log_q != -torch.inf)).any():
            raise ValueError(f"{where}: log_q must be -inf on empty slots, got +inf or NaN")
        nonempty = filled.any(-1)
        if nonempty.any():
            err = _row_logsumexp(log_q)[nonempty].abs()
            if (err > atol).any():
                raise ValueError(f"{where}: each filled class row of log_q must be normalised "
                                 f"(logsumexp ~ 0 within {atol}), "
                                 f"got max |logsumexp| = {float(err.max()):.3g}")
        return log_q

    # -----------------------------------------------------------------------------------------------
    # Serialisation and devices

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """A dict of (cloned) tensors: ``features``, ``log_q``, ``scores``, ``ids``, ``count``."""
        return {k: getattr(self, k).clone() for k in _STATE_KEYS}

    def load_state_dict(self, state: Dict[str, torch.Tensor]) -> None:
        """Load a :meth:`state_dict` after validating it (shapes, dtypes and internal consistency).

        The tensors are copied (never aliased) into this database's dtype and device. Shapes must
        match its ``(num_classes, size, dim)``.
        """
        where = "ExemplarDatabase.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"{where}: state must be a dict of tensors, got {type(state).__name__}")
        missing = [k for k in _STATE_KEYS if k not in state]
        unexpected = [k for k in state if k not in _STATE_KEYS]
        if missing or unexpected:
            raise ValueError(f"{where}: expected keys {list(_STATE_KEYS)}, missing {missing}, "
                             f"unexpected {unexpected}")
        for k in _STATE_KEYS:
            _require_tensor(where, k, state[k])
        C, n, m = self.num_classes, self.size, self.dim
        expected = {"features": [C, n, m], "log_q": [C, n], "scores": [C, n], "ids": [C, n, 2],
                    "count": [C]}
        for k, shape in expected.items():
            if _shape(state[k]) != shape:
                raise ValueError(f"{where}: {k} must have shape {shape}, got {_shape(state[k])}")
        for k in ("features", "log_q", "scores"):
            if not state[k].is_floating_point():
                raise TypeError(f"{where}: {k} must be a floating-point tensor, got {state[k].dtype}")
        for k in ("ids", "count"):
            if not _is_integer_dtype(state[k].dtype):
                raise TypeError(f"{where}: {k} must be an integer tensor, got {state[k].dtype}")

        dev = self.device
        # Private contiguous copies: updates later write into them in place.
        count = state["count"].to(device=dev, dtype=torch.int64).clone()
        if (count < 0).any() or (count > n).any():
            raise ValueError(f"{where}: count must be in [0, {n}], got {count.tolist()}")
        filled = torch.arange(n, device=dev)[None, :] < count[:, None]
        features = state["features"].to(device=dev, dtype=self.dtype).clone(
            memory_format=torch.contiguous_format)
        scores = state["scores"].to(device=dev, dtype=self.dtype).clone(
            memory_format=torch.contiguous_format)
        ids = state["ids"].to(device=dev, dtype=torch.int64).clone(memory_format=torch.contiguous_format)
        if not torch.isfinite(scores[filled]).all() or not (scores[~filled] == -torch.inf).all():
            raise ValueError(f"{where}: scores must be finite on the filled slots and -inf elsewhere")
        if not (ids[filled] >= 0).all() or not (ids[~filled] == -1).all():
            raise ValueError(f"{where}: ids must be >= 0 on the filled slots and -1 elsewhere")
        if not (features[~filled] == 0).all():
            raise ValueError(f"{where}: features must be 0 on the empty slots")
        # Strict (score desc, id asc) order between consecutive filled slots.
        pair = filled[:, 1:]
        s0, s1 = scores[:, :-1], scores[:, 1:]
        a0, a1 = ids[:, :-1, 0], ids[:, 1:, 0]
        b0, b1 = ids[:, :-1, 1], ids[:, 1:, 1]
        ordered = (s0 > s1) | ((s0 == s1) & ((a0 < a1) | ((a0 == a1) & (b0 < b1))))
        if (pair & ~ordered).any():
            raise ValueError(f"{where}: filled slots must be in strictly descending (score, -id) order "
                             "with distinct ids")
        log_q = self._checked_log_q(where, state["log_q"], filled)
        self.features, self.scores, self.ids, self.count, self.log_q = features, scores, ids, count, log_q

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Save with ``torch.save`` as a plain dict of CPU tensors (loads with ``weights_only=True``)."""
        torch.save({k: v.cpu() for k, v in self.state_dict().items()}, path)

    @classmethod
    def load(cls, path: Union[str, os.PathLike],
             device: Optional[Union[str, torch.device]] = None) -> "ExemplarDatabase":
        """Load a database written by :meth:`save` (``torch.load(weights_only=True)``, no pickle of
        arbitrary objects). The dtype is the saved one; ``device`` defaults to CPU."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        where = "ExemplarDatabase.load"
        if not isinstance(state, dict) or not isinstance(state.get("features"), torch.Tensor) \
                or state["features"].dim() != 3:
            raise ValueError(f"{where}: {os.fspath(path)!r} does not hold an ExemplarDatabase state "
                             "(a dict with a [C, n, m] 'features' tensor)")
        C, n, m = state["features"].shape
        if not state["features"].is_floating_point():
            raise TypeError(f"{where}: features must be floating-point, got {state['features'].dtype}")
        db = cls(int(C), int(n), int(m), dtype=state["features"].dtype, device=device)
        db.load_state_dict(state)
        return db

    def to(self, device: Optional[Union[str, torch.device]] = None,
           dtype: Optional[torch.dtype] = None) -> "ExemplarDatabase":
        """Move (and/or cast the floating tensors) in place, like ``nn.Module.to``; returns ``self``."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError("ExemplarDatabase.to: dtype must be a floating-point torch.dtype, "
                            f"got {dtype!r}")
        for k in ("features", "log_q", "scores"):
            setattr(self, k, getattr(self, k).to(device=device, dtype=dtype))
        for k in ("ids", "count"):
            setattr(self, k, getattr(self, k).to(device=device))
        return self
