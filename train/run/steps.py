"""One training step: the batch of step ``t`` of stage ``i``, the loss terms, the update.

* **Determinism.** The batch of step ``t`` of stage ``i`` and its dropout/crop randomness derive from
  ``(seed, i, t)`` only, so a run resumed from any checkpoint is bitwise the same as one that never
  stopped (on CPU, at a fixed thread count), and runs that share a stage-1 checkpoint see the same
  batches in their later stages (``python -m train compare``).
* **Loss.** Per stream, ``L_clf + lambda L_cc (+ sparsity, W-TALC terms)``; the streams' terms are
  summed.
* **Several processes.** The global batch of a step is the one a single process would draw (same videos,
  same crops); rank ``r`` takes a contiguous block of its rows, the model is wrapped in
  DistributedDataParallel and each rank's loss terms are weighted by its share of the batch so that the
  averaged gradient is the gradient of the global batch's loss (L_cc with ``cc.reduction: sum`` is a sum
  over videos and is not weighted; ``loss.casl`` only pairs videos of the same rank). Dropout masks are
  drawn per rank (seed ``(seed, i, t, rank)``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..common import distributed
from .context import RunContext, mix_seed
from .exemplars import ExemplarState, cc_features
from ..models.losses import classification_loss, co_activity_loss, sparsity_loss, topk_pool


class StepRunner:
    """Batches, loss terms and optimisation steps of one run (see the module docstring)."""

    def __init__(self, ctx: RunContext, exemplars: ExemplarState):
        self.ctx = ctx
        self.exemplars = exemplars
        self.diagnostics: dict = {}  # of the last forward with the exemplar loss: phi's mean norm per stream
        self._labels = None  # [V, C] labels of every video, for the similar-pairs sampler

    def batch(self, stage: int, step: int) -> dict:
        """The batch of step ``step`` of stage ``stage``: an epoch-wise permutation seeded by
        ``(seed, stage, epoch)``; crops seeded by ``(seed, stage, step)``."""
        from ..data import iterate_batches
        from ..data.batching import similar_pairs_batch
        ctx, cfg = self.ctx, self.ctx.cfg
        n = len(ctx.train_idx)
        if cfg["data"]["sampler"] == "similar_pairs":  # W-TALC's: drawn with replacement, per step
            bs = cfg["data"]["batch_size"]
            if self._labels is None:
                self._labels = ctx.dataset.label_matrix()
            chosen = similar_pairs_batch(self._labels, ctx.train_idx, bs, cfg["data"]["similar_pairs"],
                                         np.random.default_rng(mix_seed(cfg["seed"], stage, step, 3)))
        else:
            bs = min(cfg["data"]["batch_size"], n)
            per_epoch = n // bs
            epoch, pos = divmod(step, per_epoch)
            g = torch.Generator().manual_seed(mix_seed(cfg["seed"], stage, epoch))
            perm = torch.randperm(n, generator=g)[pos * bs:(pos + 1) * bs]
            chosen = [ctx.train_idx[i] for i in perm.tolist()]
        crop = np.random.default_rng(mix_seed(cfg["seed"], stage, step, 1))
        batch = next(iter(iterate_batches(ctx.dataset, chosen, batch_size=bs,
                                          max_seqlen=cfg["data"]["max_seqlen"], shuffle=False,
                                          generator=crop)))
        if ctx.world > 1:  # this rank's block of the global batch (crops drawn as in one process)
            lo, hi = distributed.shard_bounds(bs, ctx.rank, ctx.world)
            t = int(batch["mask"][lo:hi].sum(1).max())
            batch = {k: v[lo:hi, :t] if k in ("features", "mask") else v[lo:hi] for k, v in batch.items()}
            batch["share"] = (hi - lo) / bs
        batch = {k: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        batch["features"] = ctx.prepare(batch["features"], batch["mask"])
        return batch

    def losses(self, batch: dict, use_cc: bool, scale: dict | None = None) -> dict:
        """Forward one batch; returns the loss terms (tensors) and ``total``. ``scale`` multiplies
        terms (by name) before they are summed (a rank's share of the global batch)."""
        cfg = self.ctx.cfg
        lc = cfg["loss"]
        feats, mask, labels = batch["features"], batch["mask"], batch["labels"]
        out = self.ctx.net(feats, mask)
        terms = {"clf": 0.0}
        if lc["topk_mil"] > 0:
            terms["topk_mil"] = 0.0
        if cfg["model"]["attention"] == "stpn" and lc["sparsity"] > 0:
            terms["sparsity"] = 0.0
        if lc["casl"] > 0:
            terms["casl"] = 0.0
        if use_cc:
            terms["cc"] = 0.0
        for s in self.ctx.streams:
            terms["clf"] = terms["clf"] + classification_loss(out[f"video_{s}"], labels, lc["classification"])
            if "topk_mil" in terms:
                pooled = topk_pool(out[f"seg_{s}"], mask, lc["topk_ratio"])
                terms["topk_mil"] = terms["topk_mil"] + classification_loss(pooled, labels,
                                                                            lc["classification"])
            if "sparsity" in terms:
                terms["sparsity"] = terms["sparsity"] + sparsity_loss(out[f"att_{s}"], mask)
            if "casl" in terms:
                terms["casl"] = terms["casl"] + co_activity_loss(out[f"emb_{s}"], out[f"seg_{s}"], labels,
                                                                 mask, lc["casl_margin"])
            if use_cc:
                terms["cc"] = terms["cc"] + self.cc_term(out, feats, mask, labels, s)
        weights = {"clf": 1.0, "topk_mil": lc["topk_mil"], "sparsity": lc["sparsity"], "casl": lc["casl"],
                   "cc": cfg["cc"]["weight"]}
        if scale:
            terms = {k: v * scale.get(k, 1.0) for k, v in terms.items()}
        terms["total"] = sum(weights[k] * v for k, v in terms.items())
        return terms

    def cc_term(self, out: dict, feats: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                stream: str) -> torch.Tensor:
        """The exemplar loss of one stream on one batch (the objective's, :mod:`train.objectives`), on what
        the loss sees: phi or the input features, L2-normalised with ``cc.normalize``."""
        raw = cc_features(self.ctx, out, feats, stream, normalize=False)
        with torch.no_grad():
            self.diagnostics[f"phi_norm_{stream}"] = float(raw.norm(dim=-1)[mask].mean()) if mask.any() else 0.0
        x = torch.nn.functional.normalize(raw, dim=-1) if self.ctx.cfg["cc"]["normalize"] else raw
        return self.exemplars.objective.loss(x, out, labels, mask, stream, self.exemplars.stream(stream))

    def train_step(self, optimizer: torch.optim.Optimizer, stage: int, step: int, use_cc: bool) -> dict:
        """One optimisation step on the batch of ``(stage, step)``; returns the loss terms as floats
        (summed over the ranks' shares when several processes run)."""
        ctx = self.ctx
        batch = self.batch(stage, step)
        if ctx.world == 1:
            torch.manual_seed(mix_seed(ctx.cfg["seed"], stage, step, 2))  # dropout
        else:
            torch.manual_seed(mix_seed(ctx.cfg["seed"], stage, step, 2, ctx.rank))
        ctx.model.train()
        if ctx.world == 1:
            terms = self.losses(batch, use_cc)
            optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            optimizer.step()
            return {**{k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                       for k, v in terms.items()}, **(self.diagnostics if use_cc else {})}
        # Each term is a mean over the videos of the rank's block: weighted by the block's share of the
        # batch, the terms of all ranks sum to those of the global batch. DDP averages the gradients
        # over the ranks, hence the factor world.
        share = batch["share"]
        sum_cc = ctx.cfg["cc"]["reduction"] == "sum"
        scale = {k: 1.0 if (k == "cc" and sum_cc) else share
                 for k in ("clf", "topk_mil", "sparsity", "casl", "cc")}
        terms = self.losses(batch, use_cc, scale)
        optimizer.zero_grad(set_to_none=True)
        (terms["total"] * ctx.world).backward()
        optimizer.step()
        keys = list(terms)
        local = torch.stack([torch.as_tensor(terms[k], dtype=torch.float64).detach().cpu().reshape(())
                             for k in keys])
        total = distributed.all_reduce_sum(local)
        return {**{k: float(v) for k, v in zip(keys, total.tolist())}, **(self.diagnostics if use_cc else {})}
