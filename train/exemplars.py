"""Steps 2 and 3 of the procedure: collect the exemplar database with the network fixed, set the
bandwidth alpha, and fit the representativeness Q.

* **One selection of exemplars, two databases.** A single :class:`ccluster.ExemplarDatabase` holds the
  concatenation ``[phi_rgb | phi_flow]`` of each selected segment, ranked by the fused score
  ``s_i = (p_rgb a_rgb + p_flow a_flow) / 2``, so both streams use the same segments. Each stream gets
  its own slice of it, its own alpha and its own Q (the two embeddings have different geometry).
* **alpha from the data** at each collection when ``cc.alpha: auto``. ``lashkari``: per class
  ``n^2 log n / sum_ij d_ij`` over the class's exemplars (Lashkari & Golland's reference beta_0), the
  median over classes; ``median``: ``1 / median d`` over within-class exemplar pairs. Times
  ``cc.alpha_scale``.
* **Several processes.** Each rank collects from its share of the videos; the databases are merged
  (:func:`train.distributed.all_gather_database`) and the Q fit sums its per-pass statistics over the
  ranks' segments, so every rank ends with the same state.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import torch
from tqdm.auto import tqdm

import ccluster
from . import distributed, interrupt
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


class ExemplarState:
    """The exemplar database, and per stream its slice, alpha and log Q. Empty until :meth:`build`."""

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.db: ccluster.ExemplarDatabase | None = None
        self.log_q: dict = {s: None for s in ctx.streams}
        self.alpha: dict = {s: None for s in ctx.streams}
        self.streams: dict = {}
        # per stream: the loss's mean per video over the training set at collection (cc.scale), and
        # the mean raw phi norm there (the collapse guard's reference)
        self.loss_scale: dict = {s: None for s in ctx.streams}
        self.phi_norm: dict = {s: None for s in ctx.streams}
        self.info: dict | None = None  # the last collection's summary

    @property
    def ready(self) -> bool:
        return self.db is not None

    def state_dict(self) -> dict:
        return {"database": self.db.state_dict() if self.db is not None else None,
                "log_q": dict(self.log_q), "alpha": dict(self.alpha), "loss_scale": dict(self.loss_scale),
                "phi_norm": dict(self.phi_norm), "collection": self.info}

    def load_state_dict(self, state: dict) -> None:
        if state["database"] is not None:
            first = state["database"]["features"]
            self.db = ccluster.ExemplarDatabase(first.shape[0], first.shape[1], first.shape[2])
            self.db.load_state_dict(state["database"])
        self.log_q, self.alpha = dict(state["log_q"]), dict(state["alpha"])
        self.loss_scale, self.phi_norm = dict(state["loss_scale"]), dict(state["phi_norm"])
        self.info = state["collection"]
        self._split()

    def _split(self) -> None:
        if self.db is None:
            return
        self.streams = dict(zip(self.ctx.streams, self._slices(self.db.features)))

    def _slices(self, x: torch.Tensor) -> list:
        """The streams' parts of a concatenation ``[..., sum(stream_dims)]``, contiguous."""
        out, start = [], 0
        for width in self.ctx.stream_dims:
            out.append(x[..., start:start + width].contiguous())
            start += width
        return out

    @torch.no_grad()
    def build(self, name: str) -> dict:
        """Collect the database over the training videos with the network fixed, set alpha, fit Q.
        Returns a summary (fill, alpha, fit passes and gap, Q perplexity per stream)."""
        ctx, c = self.ctx, self.ctx.cfg["cc"]
        ds = ctx.dataset
        ctx.model.eval()
        bg = c["background"]  # one more class: the least-attended segments of the labelled videos
        db = ccluster.ExemplarDatabase(ds.num_classes + bg, c["size"], sum(ctx.stream_dims))
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

        videos = ctx.train_idx if ctx.world == 1 else distributed.shard(ctx.train_idx, ctx.rank, ctx.world)
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
                labels = torch.as_tensor(ds.videos[vi].labels, device=ctx.device) > 0
                score = out["tcam"][0]
                if bg:
                    labels = torch.cat([labels, labels.any()[None]])
                    score = torch.cat([score, -out["attention"][0, :, None]], 1)
                lab = labels[None].expand(T, -1)
                ids = torch.stack([torch.full((T,), vi, dtype=torch.long), torch.arange(T)], 1)
                pending.append((x.cpu(), score.cpu(), lab.cpu(), ids))
                pending_rows += T
                if pending_rows >= 16384:
                    flush()
                if labels.any():
                    parts = self._slices(x)
                    for i, s in enumerate(streams):
                        a = out[f"att_{s}"][0]
                        p = a / a.sum().clamp_min(1e-12)
                        w = p[:, None] * labels[None].to(p.dtype)
                        if bg:  # as ccluster.ClassContrastiveLoss weighs its background term
                            comp = 1 - a / a.max().clamp_min(1e-12)
                            w[:, -1] = comp / comp.sum() if comp.sum() > 0 else 0.0
                        xs[s].append(parts[i].cpu())
                        ws[s].append(w.cpu())
        flush()
        if ctx.world > 1:
            db = distributed.all_gather_database(db)
        self.db = db
        self._split()
        counts = distributed.all_reduce_sum(torch.cat([norm_sum, torch.tensor(
            [float(sum(len(ds.videos[v].features) for v in videos)),
             float(sum(1 for v in videos if np.asarray(ds.videos[v].labels).any()))], dtype=torch.float64)]))
        n_seg, n_videos = float(counts[-2]), max(float(counts[-1]), 1.0)
        info = {"filled": int(db.count.sum()), "empty_classes": int((db.count == 0).sum())}
        log_q = {}
        for s in streams:
            alpha = self._alpha(name, s)
            self.alpha[s] = alpha
            dim = self.streams[s].shape[-1]
            X = torch.cat(xs[s]) if xs[s] else torch.zeros(0, dim)  # a rank may hold no labelled video
            W = torch.cat(ws[s]) if ws[s] else torch.zeros(0, ds.num_classes + bg)
            fit = ccluster.fit_representativeness(
                X.to(ctx.device), self.streams[s].to(ctx.device), W.to(ctx.device), alpha,
                metric=c["metric"], tol=c["fit_tol"], max_iter=c["fit_max_iter"],
                accelerate=c["fit_accelerate"], log_q=db.log_q.to(ctx.device), progress=ctx.progress,
                group=torch.distributed.group.WORLD if ctx.world > 1 else None)
            log_q[s] = fit.log_q
            q = fit.log_q.exp()
            ent = -(torch.where(q > 0, q * fit.log_q, torch.zeros_like(q))).sum(1)
            filled = db.count > 0
            self.phi_norm[s] = float(norm_sum[streams.index(s)]) / max(n_seg, 1.0)
            self.loss_scale[s] = self._mean_loss(X, W, s, alpha, fit.log_q) / n_videos
            info.update({f"alpha_{s}": alpha,
                         f"fit_iters_{s}": int(fit.n_iter.max()),
                         f"fit_gap_{s}": float(fit.gap.max()) if fit.gap.numel() else 0.0,
                         f"fit_unconverged_{s}": int((~fit.converged).sum()),
                         f"q_perplexity_{s}": float(ent.exp().mean()),
                         f"q_uniformity_{s}": float((ent.exp()[filled] / db.count[filled]).median())
                         if filled.any() else float("nan"),
                         f"loss_scale_{s}": self.loss_scale[s],
                         f"phi_norm_{s}": self.phi_norm[s]})
        self.log_q = log_q
        self.info = info
        if ctx.is_main:
            log.info("%s", describe_database(name, info, c["size"] * (ds.num_classes + bg), c["fit_max_iter"],
                                             streams))
        return info

    def _mean_loss(self, x: torch.Tensor, weight: torch.Tensor, stream: str, alpha: float,
                   log_q: torch.Tensor) -> float:
        """``sum_s,c w_sc (-log z_sc)`` over this rank's segments, summed over the ranks: the loss's
        total over the training videos with the fitted Q."""
        dev = self.ctx.device
        total = torch.zeros(1, dtype=torch.float64)
        if x.shape[0]:
            logz = ccluster.exemplar_logsumexp(x.to(dev), self.streams[stream].to(dev), log_q.to(dev), alpha,
                                               metric=self.ctx.cfg["cc"]["metric"], pairs=(weight > 0).to(dev))
            w = weight.to(dev)
            keep = (w > 0) & torch.isfinite(logz)  # a labelled class with no exemplar adds nothing
            total[0] = float(torch.where(keep, -w * logz, torch.zeros_like(logz)).double().sum())
        return float(distributed.all_reduce_sum(total)[0])

    def _alpha(self, name: str, stream: str) -> float:
        c = self.ctx.cfg["cc"]
        if c["alpha"] != "auto":
            return float(c["alpha"])
        a = auto_alpha(self.streams[stream], self.db.count, c["alpha_rule"], c["metric"])
        if not math.isfinite(a):
            log.warning("%s: could not set alpha from the data (fewer than two distinct exemplars per "
                        "class); using 1.0", name)
            a = 1.0
        return a * c["alpha_scale"]
