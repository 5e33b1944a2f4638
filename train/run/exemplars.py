"""Steps 2 and 3 of the procedure: collect the exemplar database with the network fixed, set the
bandwidth alpha, and fit the representativeness Q.

* **One selection of exemplars, two databases.** A single :class:`ccluster.ExemplarDatabase` holds the
  concatenation ``[phi_rgb | phi_flow]`` of each selected segment, ranked by the fused score
  ``s_i = (p_rgb a_rgb + p_flow a_flow) / 2`` (or what the objective ranks by,
  :meth:`train.objectives.ExemplarObjective.candidates`), so both streams use the same segments. Each
  stream gets its own slice of it, its own alpha and its own Q (the two embeddings have different
  geometry): one :class:`StreamExemplars` per stream holds them, and its Q is the only Q there is (the
  database's own ``log_q``, uniform over the filled slots, is only where every fit starts).
* **alpha from the data** at each collection when ``cc.alpha: auto``. ``lashkari``: per class
  ``n^2 log n / sum_ij d_ij`` over the class's exemplars (Lashkari & Golland's reference beta_0), the
  median over classes; ``median``: ``1 / median d`` over within-class exemplar pairs. Times
  ``cc.alpha_scale``.
* **Several processes.** Each rank collects from its share of the videos; the databases are merged
  (:func:`train.common.distributed.all_gather_database`) and the Q fit sums its per-pass statistics over the
  ranks' segments, so every rank ends with the same state.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

import ccluster
from ..common import distributed, interrupt
from .context import RunContext

log = logging.getLogger("train")


def auto_alpha(features: torch.Tensor, count: torch.Tensor, rule: str = "lashkari",
               metric: str = "sqeuclidean") -> float:
    """Bandwidth from within-class exemplar distances (see the module docstring). ``features``
    ``[C, n, m]``, ``count [C]``. Returns NaN when no class has two distinct exemplars."""
    values = []
    for c in range(features.shape[0]):
        k = int(count[c])
        if k < 2:
            continue
        y = features[c, :k].double()
        d = torch.cdist(y, y).pow(2) if metric == "sqeuclidean" else torch.cdist(y, y)
        off = d[~torch.eye(k, dtype=torch.bool)]
        if rule == "lashkari":
            total = float(d.sum())
            if total > 0:
                values.append(k * k * math.log(k) / total)
        else:
            med = float(off.median())
            if med > 0:
                values.append(1.0 / med)
    return float(np.median(values)) if values else math.nan


def cc_features(ctx: RunContext, out: dict, features: torch.Tensor, stream: str,
                normalize: bool | None = None) -> torch.Tensor:
    """What L_cc and the database see for one stream: phi (``cc.on: embedding``) or the input features
    (``input``), L2-normalised per segment with ``cc.normalize`` (or ``normalize`` when given)."""
    if ctx.cfg["cc"]["on"] == "embedding":
        x = out[f"emb_{stream}"]
    else:
        x = ctx.model.split(features)[ctx.streams.index(stream)]
    normalize = ctx.cfg["cc"]["normalize"] if normalize is None else normalize
    return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def describe_database(name: str, info: dict, slots: int, max_iter: int,
                      streams: tuple = ("rgb", "flow")) -> str:
    """One readable line from the summary :meth:`ExemplarState.build` returns."""
    streams = "; ".join(
        f"{s} alpha {info[f'alpha_{s}']:.3g}, Q fit {info[f'fit_iters_{s}']}/{max_iter} passes "
        f"(gap {info[f'fit_gap_{s}']:.1e}), perplexity {info[f'q_perplexity_{s}']:.1f}"
        for s in streams if f"alpha_{s}" in info)
    empty = info["empty_classes"]
    return (f"{name}: {info['filled']}/{slots} exemplar slots filled"
            + (f" ({empty} classes empty)" if empty else "") + f"; {streams}")


@dataclass
class StreamExemplars:
    """One stream's share of the exemplar state after a collection.

    Attributes:
        features: ``[K, n, m]`` the stream's slice of the database (K classes, n slots).
        log_q: ``[K, n]`` its fitted representativeness Q (log; -inf on empty slots).
        alpha: its bandwidth.
        loss_scale: the exemplar loss's mean per training video at collection, with this Q (the literal
            objective's unit with ``cc.scale: relative``; logged for every objective).
        phi_norm: the mean raw norm of what the loss sees, at collection (the collapse guard's reference).
        criterion: the objective's loss module for this stream's alpha
            (:meth:`train.objectives.ExemplarObjective.stream_loss`).
    """
    features: torch.Tensor
    log_q: torch.Tensor
    alpha: float
    loss_scale: float
    phi_norm: float
    criterion: torch.nn.Module


class ExemplarState:
    """The exemplar database and, per stream, a :class:`StreamExemplars`; empty until :meth:`build` (or
    :meth:`load_state_dict` of a state that has them)."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.objective = ctx.objective
        self.database: ccluster.ExemplarDatabase | None = None
        self._streams: dict[str, StreamExemplars] = {}
        self.info: dict | None = None  # the last collection's summary

    @property
    def ready(self) -> bool:
        """Whether a database was collected (and every stream has its Q and alpha)."""
        return self.database is not None

    def stream(self, name: str) -> StreamExemplars:
        """The exemplar state of stream ``name`` (``"rgb"``, ``"flow"`` or ``"joint"``)."""
        return self._streams[name]

    def _per_stream(self, field: str) -> dict:
        return {s: getattr(self._streams[s], field) if s in self._streams else None for s in self.ctx.streams}

    def phi_norms(self) -> dict:
        """``{stream: mean phi norm at the last collection}`` (None before the first)."""
        return self._per_stream("phi_norm")

    def state_dict(self) -> dict:
        """The database and the per-stream Q, alpha, loss scale and phi norm, as a checkpoint stores them."""
        return {"database": self.database.state_dict() if self.database is not None else None,
                "log_q": self._per_stream("log_q"), "alpha": self._per_stream("alpha"),
                "loss_scale": self._per_stream("loss_scale"), "phi_norm": self._per_stream("phi_norm"),
                "collection": self.info}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (each stream's loss module is built again with its alpha)."""
        self.database, self._streams = None, {}
        if state["database"] is not None:
            first = state["database"]["features"]
            self.database = ccluster.ExemplarDatabase(first.shape[0], first.shape[1], first.shape[2])
            self.database.load_state_dict(state["database"])
            for s, part in zip(self.ctx.streams, self._slices(self.database.features)):
                alpha = state["alpha"][s]
                self._streams[s] = StreamExemplars(part, state["log_q"][s], alpha, state["loss_scale"][s],
                                                   state["phi_norm"][s], self.objective.stream_loss(alpha))
        self.info = state["collection"]

    def _slices(self, x: torch.Tensor) -> list:
        """The streams' parts of a concatenation ``[..., sum(stream_dims)]``, contiguous."""
        out, start = [], 0
        for width in self.ctx.stream_dims:
            out.append(x[..., start:start + width].contiguous())
            start += width
        return out

    @torch.no_grad()
    def build(self, name: str, videos: list | None = None, max_iter: int | None = None) -> dict:
        """Collect the database over the training videos with the network fixed, set alpha, fit Q.
        Returns a summary (fill, alpha, fit passes and gap, Q perplexity per stream). ``videos`` (default:
        the training subset) and ``max_iter`` (default ``cc.fit_max_iter``) restrict the work, for
        ``steptime``, whose step cost depends on the database's shape only."""
        ctx, c, objective = self.ctx, self.ctx.cfg["cc"], self.objective
        ds = ctx.dataset
        ctx.model.eval()
        max_iter = c["fit_max_iter"] if max_iter is None else max_iter
        classes = objective.database_classes(ds.num_classes)
        db = ccluster.ExemplarDatabase(classes, c["size"], sum(ctx.stream_dims))
        streams = ctx.streams
        xs = {s: [] for s in streams}
        ws = {s: [] for s in streams}
        norm_sum = torch.zeros(len(streams), dtype=torch.float64)
        pending, pending_rows = [], 0

        def flush():
            nonlocal pending, pending_rows
            if pending:
                f, sc, lb, ids = (torch.cat(t) for t in zip(*pending))
                db.update(f, sc, lb, ids)
            pending, pending_rows = [], 0

        videos = ctx.train_idx if videos is None else videos
        videos = videos if ctx.world == 1 else distributed.shard(videos, ctx.rank, ctx.world)
        with tqdm(videos, desc=f"{name}: collect", unit="video", dynamic_ncols=True, disable=not ctx.progress,
                  leave=False) as bar:  # closed before an interruption is reported
            for vi in bar:
                interrupt.check()
                feats, mask = ctx.video(vi)
                out = ctx.model(feats, mask)
                x = torch.cat([cc_features(ctx, out, feats, s)[0] for s in streams], -1)
                T = x.shape[0]
                for i, s in enumerate(streams):
                    norm_sum[i] += float(cc_features(ctx, out, feats, s, normalize=False)[0].norm(dim=-1).sum())
                labels, score = objective.candidates(out, torch.as_tensor(ds.videos[vi].labels, device=ctx.device) > 0)
                lab = labels[None].expand(T, -1)
                ids = torch.stack([torch.full((T,), vi, dtype=torch.long), torch.arange(T)], 1)
                pending.append((x.cpu(), score.cpu(), lab.cpu(), ids))
                pending_rows += T
                if pending_rows >= 16384:
                    flush()
                if labels.any():
                    parts = self._slices(x)
                    for i, s in enumerate(streams):
                        xs[s].append(parts[i].cpu())
                        ws[s].append(objective.collection_weights(out[f"att_{s}"][0], labels).cpu())
        flush()
        if ctx.world > 1:
            db = distributed.all_gather_database(db)
        self.database = db
        exemplars = dict(zip(streams, self._slices(db.features)))
        counts = distributed.all_reduce_sum(torch.cat([norm_sum, torch.tensor(
            [float(sum(len(ds.videos[v].features) for v in videos)),
             float(sum(1 for v in videos if np.asarray(ds.videos[v].labels).any()))], dtype=torch.float64)]))
        n_seg, n_videos = float(counts[-2]), max(float(counts[-1]), 1.0)
        info = {"filled": int(db.count.sum()), "empty_classes": int((db.count == 0).sum())}
        fitted = {}
        for s in streams:
            alpha = self._alpha(name, exemplars[s], db.count)
            dim = exemplars[s].shape[-1]
            X = torch.cat(xs[s]) if xs[s] else torch.zeros(0, dim)  # a rank may hold no labelled video
            W = torch.cat(ws[s]) if ws[s] else torch.zeros(0, classes)
            fit = ccluster.fit_representativeness(  # from the database's uniform start
                X.to(ctx.device), exemplars[s].to(ctx.device), W.to(ctx.device), alpha,
                metric=c["metric"], tol=c["fit_tol"], max_iter=max_iter,
                accelerate=c["fit_accelerate"], log_q=db.log_q.to(ctx.device), progress=ctx.progress,
                group=torch.distributed.group.WORLD if ctx.world > 1 else None)
            q = fit.log_q.exp()
            ent = -(torch.where(q > 0, q * fit.log_q, torch.zeros_like(q))).sum(1)
            filled = db.count > 0
            phi_norm = float(norm_sum[streams.index(s)]) / max(n_seg, 1.0)
            loss_scale = self._mean_loss(X, W, exemplars[s], alpha, fit.log_q) / n_videos
            fitted[s] = StreamExemplars(exemplars[s], fit.log_q, alpha, loss_scale, phi_norm,
                                        objective.stream_loss(alpha))
            info.update({f"alpha_{s}": alpha,
                         f"fit_iters_{s}": int(fit.n_iter.max()),
                         f"fit_gap_{s}": float(fit.gap.max()) if fit.gap.numel() else 0.0,
                         f"fit_unconverged_{s}": int((~fit.converged).sum()),
                         f"q_perplexity_{s}": float(ent.exp().mean()),
                         f"q_uniformity_{s}": float((ent.exp()[filled] / db.count[filled]).median())
                         if filled.any() else float("nan"),
                         f"loss_scale_{s}": loss_scale,
                         f"phi_norm_{s}": phi_norm})
        self._streams = fitted
        self.info = info
        if ctx.is_main:
            log.info("%s", describe_database(name, info, c["size"] * classes, max_iter, streams))
        return info

    def _mean_loss(self, x: torch.Tensor, weight: torch.Tensor, exemplars: torch.Tensor, alpha: float,
                   log_q: torch.Tensor) -> float:
        """``sum_s,c w_sc (-log z_sc)`` over this rank's segments, summed over the ranks: the loss's
        total over the training videos with the fitted Q."""
        dev = self.ctx.device
        total = torch.zeros(1, dtype=torch.float64)
        if x.shape[0]:
            logz = ccluster.exemplar_logsumexp(x.to(dev), exemplars.to(dev), log_q.to(dev), alpha,
                                               metric=self.ctx.cfg["cc"]["metric"], pairs=(weight > 0).to(dev))
            w = weight.to(dev)
            keep = (w > 0) & torch.isfinite(logz)  # a labelled class with no exemplar adds nothing
            total[0] = float(torch.where(keep, -w * logz, torch.zeros_like(logz)).double().sum())
        return float(distributed.all_reduce_sum(total)[0])

    def _alpha(self, name: str, exemplars: torch.Tensor, count: torch.Tensor) -> float:
        c = self.ctx.cfg["cc"]
        if c["alpha"] != "auto":
            return float(c["alpha"])
        a = auto_alpha(exemplars, count, c["alpha_rule"], c["metric"])
        if not math.isfinite(a):
            log.warning("%s: could not set alpha from the data (fewer than two distinct exemplars per "
                        "class); using 1.0", name)
            a = 1.0
        return a * c["alpha_scale"]
