"""The method's training procedure, stage by stage, resumable at any step.

Stages (all counts from the config):

1. ``baseline``: train the two-stream attention model without L_cc (``train.baseline_steps``);
2. + 3. ``db<r>``: with the network fixed, run every training video whole, rank its segments by the fused
   score ``s_i = (p_rgb a_rgb + p_flow a_flow) / 2`` and keep per class the top ``cc.size`` segments among
   the videos labelled with it (:class:`ccluster.ExemplarDatabase`, streamed); set the bandwidth alpha
   (``cc.alpha``, or from the data); fit Q (:func:`ccluster.fit_representativeness`, weights p(s|x) of
   the segments of the videos labelled with each class);
4. ``cc<r>``: fix Q and train with ``L = L_clf + lambda * L_cc`` (``train.cc_steps``);
5. repeat 2-4 for ``cc.rounds`` rounds.

Design choices (documented in the README's training section):

* **One selection of exemplars, two databases.** A single :class:`ccluster.ExemplarDatabase` holds the
  concatenation ``[phi_rgb | phi_flow]`` of each selected segment, ranked by the fused score, so both
  streams use the same segments. Each stream gets its own slice of it, its own alpha and its own Q (the
  two embeddings have different geometry), and its own L_cc term.
* **L_cc on the embedding phi** (``cc.on: embedding``) so it shapes both the features and the attention;
  ``cc.on: input`` uses the I3D features instead (then only the attention receives its gradient).
* **Per stream**, ``loss = L_clf + lambda L_cc (+ sparsity, W-TALC terms)``; the streams' losses are summed.
* **alpha from the data** at each collection when ``cc.alpha: auto``. ``lashkari``: per class
  ``n^2 log n / sum_ij d_ij`` over the class's exemplars (Lashkari & Golland's reference beta_0), the
  median over classes; ``median``: ``1 / median d`` over within-class exemplar pairs. Times
  ``cc.alpha_scale``; logged.
* **Test.** Plain video score: the fused attention-pooled class probabilities. Selection score: per stream,
  :func:`ccluster.select_representative` picks per class the ``cc.k`` segments with least L_cc
  (``cc.select_by: loss``, the literal ``-p(s|x) log z``) or closest to the class's exemplars
  (``distance``, ``-log z``); the union is re-scored by the classifier and attention of that stream and
  the two streams' probabilities are averaged. Localization uses the T-CAM (the fused score) of the
  *full* video with the plain video scores, so detection measures what L_cc did to the network, not the
  selection.
* **Determinism / resume.** The batch of step ``t`` of stage ``i`` and its dropout/crop randomness derive
  from ``(seed, i, t)`` only, so a run resumed from any checkpoint is bitwise the same as one that never
  stopped (on CPU). A checkpoint is written after every ``train.checkpoint_every`` steps (default every
  step: a SIGKILL loses no completed step) and at the end of every stage.
* **Several processes** (``torchrun``, :mod:`train.distributed`). The global batch of a step is the one a
  single process would draw (same videos, same crops); rank ``r`` takes a contiguous block of its rows,
  the model is wrapped in DistributedDataParallel and each rank's loss terms are weighted by its share
  of the batch so that the averaged gradient is the gradient of the global batch's loss (L_cc with
  ``cc.reduction: sum`` is a sum over videos and is not weighted; ``loss.casl`` only pairs videos of the
  same rank). Dropout masks are drawn per rank (seed ``(seed, i, t, rank)``). Exemplar collection,
  the Q fit and the evaluation are sharded over the videos and combined (all_gather + merge, all_reduce,
  all_gather); every rank ends each stage with the same state. Only rank 0 writes files. A checkpoint
  holds no trace of the world size: a run resumes with any number of processes up to the batch size.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import ccluster
from . import checkpoint as ckpt
from . import distributed
from .config import ConfigError, check_against_data, from_dict, resolve_subsets, save_config
from .models import TwoStreamAttention
from .models.losses import classification_loss, co_activity_loss, sparsity_loss, topk_pool

log = logging.getLogger("train")
STREAMS = ("rgb", "flow")


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (deterministic across runs and platforms)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def stage_plan(cfg: dict) -> list[tuple[str, str]]:
    """``[(name, kind)]``: ``("baseline", "train")``, then per round ``("db<r>", "database")`` and
    ``("cc<r>", "train")``."""
    plan = [("baseline", "train")]
    if cfg["cc"]["weight"] > 0:
        for r in range(1, cfg["cc"]["rounds"] + 1):
            plan += [(f"db{r}", "database"), (f"cc{r}", "train")]
    return plan


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


def open_dataset(cfg: dict):
    """Load (and, for a synthetic preset, first generate) the dataset named by the config."""
    from . import data as tdata
    d = cfg["data"]
    root, name = d["root"], d["name"]
    if d["synthetic"]:  # generated once into the cache (generate() skips an identical earlier run)
        from .data import synthetic
        root = root or str(default_cache() / f"synthetic-{d['synthetic']}")
        gen = None
        for turn in range(3 if distributed.world_size() > 1 else 1):  # one writer at a time
            if turn == distributed.generation_turn():
                gen = synthetic.generate(root, preset=d["synthetic"], seed=0)
            distributed.barrier()
        root, gen_name = gen
        name = name or gen_name
    if not Path(root).exists():
        raise ConfigError(f"config key 'data.root': dataset folder not found: {root}")
    try:
        kwargs = {"layout": d["layout"]}
        if d["feature_rate"]:
            kwargs["feature_rate"] = d["feature_rate"]
        if d["rgb_dim"]:
            kwargs["rgb_dim"] = d["rgb_dim"]
        return tdata.load_dataset(root, name, **kwargs)
    except FileNotFoundError as exc:
        raise ConfigError(f"config key 'data.root' ({root}, dataset '{name}'): missing file: "
                          f"{exc.filename or exc}") from None


def default_cache() -> Path:
    return Path(os.environ.get("CCLUSTER_CACHE", Path.home() / ".cache" / "ccluster"))


class Trainer:
    """Runs (or resumes) the staged procedure in ``run_dir``; see the module docstring.

    ``Trainer(cfg, run_dir)`` starts a run; :meth:`Trainer.resume` continues one from its latest
    checkpoint. :meth:`run` trains to the end and returns the evaluation results per train stage.
    """

    def __init__(self, cfg: dict, run_dir: str | os.PathLike, dataset=None):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.dataset = dataset if dataset is not None else open_dataset(cfg)
        ds = self.dataset
        self.train_idx, self.test_idx = resolve_subsets(cfg, ds)
        check_against_data(cfg, ds, self.train_idx, self.test_idx)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.is_main = self.rank == 0
        if self.world > 1 and min(cfg["data"]["batch_size"], len(self.train_idx)) < self.world:
            raise ConfigError(f"config key 'data.batch_size': expected at least one video per process "
                              f"({self.world} processes), got a batch of "
                              f"{min(cfg['data']['batch_size'], len(self.train_idx))}")
        self.device = torch.device(cfg["device"])
        if self.world > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", torch.cuda.current_device())
        torch.manual_seed(cfg["seed"])
        m = cfg["model"]
        self.model = TwoStreamAttention(
            ds.feature_dim, ds.rgb_dim, ds.num_classes, embed_dim=m["embed_dim"], dropout=m["dropout"],
            attention=m["attention"], attention_hidden=m["attention_hidden"],
            probabilities=cfg["loss"]["classification"]).to(self.device)
        self.net = self.model  # what the training forward runs through: DDP when several processes
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            self.net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if cfg["loss"]["casl"] > 0 and self.is_main:
                log.warning("loss.casl > 0 with %d processes: the co-activity loss pairs videos of the "
                            "same process only", self.world)
        self.optimizer = self._new_optimizer()
        c = cfg["cc"]
        self.cc_loss = {s: ccluster.ConvexClusteringLoss(1.0, metric=c["metric"], reduction=c["reduction"])
                        for s in STREAMS}
        self.db: ccluster.ExemplarDatabase | None = None
        self.log_q = {s: None for s in STREAMS}
        self.alpha = {s: None for s in STREAMS}
        self.plan = stage_plan(cfg)
        self.stage, self.step, self.global_step = 0, 0, 0
        self.results: dict = {}
        self.metrics_offset = 0
        self.stream_dims = ((ds.rgb_dim, ds.feature_dim - ds.rgb_dim) if c["on"] == "input"
                            else (m["embed_dim"], m["embed_dim"]))
        self._db_stream = {}
        self._writer = None

    # ------------------------------------------------------------------------------------------------
    # state

    def _new_optimizer(self):
        t = self.cfg["train"]
        return torch.optim.Adam(self.model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "database": self.db.state_dict() if self.db is not None else None,
            "log_q": {s: v for s, v in self.log_q.items()},
            "alpha": dict(self.alpha),
            "stage": self.stage, "stage_name": self.plan[min(self.stage, len(self.plan) - 1)][0],
            "step": self.step, "global_step": self.global_step,
            "rng": ckpt.rng_state(),
            "config": self.cfg,
            "results": self.results,
            "metrics_offset": self.metrics_offset,
            "classes": list(self.dataset.classes),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if state["database"] is not None:
            first = state["database"]["features"]
            self.db = ccluster.ExemplarDatabase(first.shape[0], first.shape[1], first.shape[2])
            self.db.load_state_dict(state["database"])
        self.log_q, self.alpha = dict(state["log_q"]), dict(state["alpha"])
        self._refresh_streams()
        self.stage, self.step, self.global_step = state["stage"], state["step"], state["global_step"]
        self.results = state["results"]
        self.metrics_offset = state["metrics_offset"]
        ckpt.set_rng_state(state["rng"])

    @classmethod
    def resume(cls, run_dir: str | os.PathLike, dataset=None, state: dict | None = None) -> "Trainer":
        """Continue the run in ``run_dir`` from its latest checkpoint (or from ``state``, that
        checkpoint already loaded, e.g. by rank 0 and broadcast)."""
        if state is None:
            state = ckpt.load(Path(run_dir) / ckpt.LATEST)
        trainer = cls(from_dict(state["config"]), run_dir, dataset)
        trainer.load_state_dict(state)
        return trainer

    def save(self, stage_copy: str | None = None) -> None:
        if not self.is_main:
            return
        state = self.state_dict()
        ckpt.save_atomic(state, self.run_dir / ckpt.LATEST)
        if stage_copy:
            ckpt.save_atomic(state, self.run_dir / f"stage-{stage_copy}.pt")

    # ------------------------------------------------------------------------------------------------
    # logging

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            self.metrics_offset = f.tell()
        if self._writer is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self._writer.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record["step"])

    def _open_logs(self) -> None:
        if not self.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.cfg, self.run_dir / "config.yaml")
        path = self.run_dir / "metrics.jsonl"
        # Drop lines written after the checkpoint we resume from (their steps are redone).
        if path.exists():
            with open(path, "r+") as f:
                f.truncate(self.metrics_offset)
        if self.cfg["run"]["tensorboard"] and self._writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self._writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self._writer = None

    # ------------------------------------------------------------------------------------------------
    # batches

    def _batch(self, stage: int, step: int) -> dict:
        """The batch of step ``step`` of stage ``stage``: an epoch-wise permutation seeded by
        ``(seed, stage, epoch)``; crops seeded by ``(seed, stage, step)``."""
        from .data import iterate_batches
        n = len(self.train_idx)
        bs = min(self.cfg["data"]["batch_size"], n)
        per_epoch = n // bs
        epoch, pos = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(mix_seed(self.cfg["seed"], stage, epoch))
        perm = torch.randperm(n, generator=g)[pos * bs:(pos + 1) * bs]
        chosen = [self.train_idx[i] for i in perm.tolist()]
        crop = np.random.default_rng(mix_seed(self.cfg["seed"], stage, step, 1))
        batch = next(iter(iterate_batches(self.dataset, chosen, batch_size=bs,
                                          max_seqlen=self.cfg["data"]["max_seqlen"], shuffle=False,
                                          generator=crop)))
        if self.world > 1:  # this rank's block of the global batch (crops drawn as in one process)
            lo, hi = distributed.shard_bounds(bs, self.rank, self.world)
            t = int(batch["mask"][lo:hi].sum(1).max())
            batch = {k: v[lo:hi, :t] if k in ("features", "mask") else v[lo:hi] for k, v in batch.items()}
            batch["share"] = (hi - lo) / bs
        return {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def _video(self, index: int):
        feats = torch.as_tensor(self.dataset.videos[index].features, dtype=torch.float32)
        feats = feats[None].to(self.device)
        return feats, torch.ones(feats.shape[:2], dtype=torch.bool, device=self.device)

    # ------------------------------------------------------------------------------------------------
    # training

    def _stream_input(self, out: dict, features: torch.Tensor, stream: str) -> torch.Tensor:
        """What L_cc and the database see for one stream: phi (default) or the input features,
        L2-normalised per segment with ``cc.normalize``."""
        if self.cfg["cc"]["on"] == "embedding":
            x = out[f"emb_{stream}"]
        else:
            rgb, flow = self.model.split(features)
            x = rgb if stream == "rgb" else flow
        return torch.nn.functional.normalize(x, dim=-1) if self.cfg["cc"]["normalize"] else x

    def losses(self, batch: dict, use_cc: bool, scale: dict | None = None) -> dict:
        """Forward one batch; returns the loss terms (tensors) and ``total``. ``scale`` multiplies
        terms (by name) before they are summed (a rank's share of the global batch)."""
        lc, cfg = self.cfg["loss"], self.cfg
        feats, mask, labels = batch["features"], batch["mask"], batch["labels"]
        out = self.net(feats, mask)
        terms = {"clf": 0.0}
        if lc["topk_mil"] > 0:
            terms["topk_mil"] = 0.0
        if cfg["model"]["attention"] == "stpn" and lc["sparsity"] > 0:
            terms["sparsity"] = 0.0
        if lc["casl"] > 0:
            terms["casl"] = 0.0
        if use_cc:
            terms["cc"] = 0.0
        for s in STREAMS:
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
                x = self._stream_input(out, feats, s)
                att = out[f"att_{s}"].detach() if cfg["cc"]["detach_attention"] else out[f"att_{s}"]
                terms["cc"] = terms["cc"] + self.cc_loss[s](x, att, labels, mask, self._db_stream[s],
                                                            self.log_q[s])
        weights = {"clf": 1.0, "topk_mil": lc["topk_mil"], "sparsity": lc["sparsity"], "casl": lc["casl"],
                   "cc": cfg["cc"]["weight"]}
        if scale:
            terms = {k: v * scale.get(k, 1.0) for k, v in terms.items()}
        terms["total"] = sum(weights[k] * v for k, v in terms.items())
        return terms

    def train_step(self, stage: int, step: int, use_cc: bool) -> dict:
        batch = self._batch(stage, step)
        if self.world == 1:
            torch.manual_seed(mix_seed(self.cfg["seed"], stage, step, 2))  # dropout
        else:
            torch.manual_seed(mix_seed(self.cfg["seed"], stage, step, 2, self.rank))
        self.model.train()
        if self.world == 1:
            terms = self.losses(batch, use_cc)
            self.optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            self.optimizer.step()
            return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
                    for k, v in terms.items()}
        # Each term is a mean over the videos of the rank's block: weighted by the block's share of the
        # batch, the terms of all ranks sum to those of the global batch. DDP averages the gradients
        # over the ranks, hence the factor world.
        share = batch["share"]
        sum_cc = self.cfg["cc"]["reduction"] == "sum"
        scale = {k: 1.0 if (k == "cc" and sum_cc) else share
                 for k in ("clf", "topk_mil", "sparsity", "casl", "cc")}
        terms = self.losses(batch, use_cc, scale)
        self.optimizer.zero_grad(set_to_none=True)
        (terms["total"] * self.world).backward()
        self.optimizer.step()
        keys = list(terms)
        local = torch.stack([torch.as_tensor(terms[k], dtype=torch.float64).detach().cpu().reshape(())
                             for k in keys])
        total = distributed.all_reduce_sum(local)
        return {k: float(v) for k, v in zip(keys, total.tolist())}

    def _train_stage(self, name: str, steps: int, use_cc: bool) -> None:
        t = self.cfg["train"]
        if self.step == 0 and use_cc and t["reset_optimizer"]:
            self.optimizer = self._new_optimizer()
        bar = tqdm(total=steps, initial=self.step, desc=name, unit="step", dynamic_ncols=True,
                   disable=not (self.cfg["run"]["progress"] and self.is_main))
        running = {}
        while self.step < steps:
            t0 = time.perf_counter()
            terms = self.train_step(self.stage, self.step, use_cc)
            dt = time.perf_counter() - t0
            self.step += 1
            self.global_step += 1
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + v
            running["n"] = running.get("n", 0) + 1
            if self.step % t["log_every"] == 0 or self.step == steps:
                n = running.pop("n")
                rec = {k: v / n for k, v in running.items()}
                self._log({"kind": "train", "stage": name, "step": self.global_step, "stage_step": self.step,
                           "step_time": dt, **rec})
                bar.set_postfix(loss=f"{rec['total']:.3f}")
                running = {}
            if t["eval_every"] and self.step % t["eval_every"] == 0 and self.step < steps:
                self._log({"kind": "eval", "stage": name, "step": self.global_step,
                           **self.evaluate(progress=False)})
            if self.step % t["checkpoint_every"] == 0 or self.step == steps:
                self.save()
            bar.update(1)
        bar.close()

    # ------------------------------------------------------------------------------------------------
    # database + Q

    def _refresh_streams(self) -> None:
        if self.db is None:
            return
        e0 = self.stream_dims[0]
        self._db_stream = {"rgb": self.db.features[:, :, :e0].contiguous(),
                           "flow": self.db.features[:, :, e0:].contiguous()}
        for s in STREAMS:
            if self.alpha[s] is not None:
                self.cc_loss[s].alpha = self.alpha[s]

    @torch.no_grad()
    def build_database(self, name: str) -> dict:
        """Steps 2 and 3: collect the exemplar database with the network fixed, set alpha, fit Q.

        With several processes each rank runs its share of the videos; the databases are merged across
        ranks and the Q fit sums its per-pass statistics over the ranks' segments."""
        c, ds = self.cfg["cc"], self.dataset
        progress = self.cfg["run"]["progress"] and self.is_main
        self.model.eval()
        db = ccluster.ExemplarDatabase(ds.num_classes, c["size"], sum(self.stream_dims))
        xs = {s: [] for s in STREAMS}
        ws = {s: [] for s in STREAMS}
        pending, pending_rows = [], 0
        e0 = self.stream_dims[0]

        def flush():
            nonlocal pending, pending_rows
            if pending:
                f, sc, lb, ids = (torch.cat(t) for t in zip(*pending))
                db.update(f, sc, lb, ids)
            pending, pending_rows = [], 0

        videos = self.train_idx if self.world == 1 else distributed.shard(self.train_idx, self.rank,
                                                                          self.world)
        for vi in tqdm(videos, desc=f"{name}: collect", unit="video", dynamic_ncols=True,
                       disable=not progress):
            feats, mask = self._video(vi)
            out = self.model(feats, mask)
            x = torch.cat([self._stream_input(out, feats, s)[0] for s in STREAMS], -1)
            T = x.shape[0]
            labels = torch.as_tensor(ds.videos[vi].labels, device=self.device) > 0
            lab = labels[None].expand(T, -1)
            ids = torch.stack([torch.full((T,), vi, dtype=torch.long), torch.arange(T)], 1)
            pending.append((x.cpu(), out["tcam"][0].cpu(), lab.cpu(), ids))
            pending_rows += T
            if pending_rows >= 16384:
                flush()
            if labels.any():
                for s in STREAMS:
                    a = out[f"att_{s}"][0]
                    p = a / a.sum().clamp_min(1e-12)
                    xs[s].append((x[:, :e0] if s == "rgb" else x[:, e0:]).cpu())
                    ws[s].append((p[:, None] * labels[None].to(p.dtype)).cpu())
        flush()
        if self.world > 1:
            db = distributed.all_gather_database(db)
        self.db = db
        info = {"filled": int(db.count.sum()), "empty_classes": int((db.count == 0).sum())}
        self._refresh_streams()
        log_q = {}
        for s in STREAMS:
            if c["alpha"] == "auto":
                a = auto_alpha(self._db_stream[s], db.count, c["alpha_rule"], c["metric"])
                if not math.isfinite(a):
                    log.warning("%s: could not set alpha from the data (fewer than two distinct "
                                "exemplars per class); using 1.0", name)
                    a = 1.0
                alpha = a * c["alpha_scale"]
            else:
                alpha = float(c["alpha"])
            self.alpha[s] = alpha
            dim = self._db_stream[s].shape[-1]
            X = torch.cat(xs[s]) if xs[s] else torch.zeros(0, dim)  # a rank may hold no labelled video
            W = torch.cat(ws[s]) if ws[s] else torch.zeros(0, ds.num_classes)
            fit = ccluster.fit_representativeness(
                X.to(self.device), self._db_stream[s].to(self.device), W.to(self.device), alpha,
                metric=c["metric"], tol=c["fit_tol"], max_iter=c["fit_max_iter"],
                accelerate=c["fit_accelerate"], log_q=db.log_q.to(self.device), progress=progress,
                group=torch.distributed.group.WORLD if self.world > 1 else None)
            log_q[s] = fit.log_q
            q = fit.log_q.exp()
            ent = -(torch.where(q > 0, q * fit.log_q, torch.zeros_like(q))).sum(1)
            info.update({f"alpha_{s}": alpha,
                         f"fit_iters_{s}": int(fit.n_iter.max()),
                         f"fit_gap_{s}": float(torch.nan_to_num(fit.gap, nan=0.0).max()),
                         f"q_perplexity_{s}": float(ent.exp().mean())})
        self.log_q = log_q
        self._refresh_streams()
        if self.is_main:
            log.info("%s: %s", name, info)
        return info

    # ------------------------------------------------------------------------------------------------
    # evaluation

    @torch.no_grad()
    def predict(self, index: int, selection: bool) -> dict:
        """Plain and (optionally) selection-based video scores, T-CAM and attention of one video."""
        feats, mask = self._video(index)
        self.model.eval()
        out = self.model(feats, mask)
        res = {"video": out["video"][0], "tcam": out["tcam"][0], "attention": out["attention"][0]}
        if selection and self.db is not None:
            c = self.cfg["cc"]
            T = feats.shape[1]
            classes = None
            if c["select_top_classes"] > 0:
                classes = torch.topk(res["video"], min(c["select_top_classes"], len(res["video"]))).indices
            probs, kept = [], 0
            for s in STREAMS:
                x = self._stream_input(out, feats, s)[0]
                if c["select_by"] == "loss":
                    a = out[f"att_{s}"][0]
                    weight = a / a.sum().clamp_min(1e-12)
                else:
                    weight = torch.full((T,), 1.0 / T, device=x.device)
                sel = ccluster.select_representative(x, weight, self._db_stream[s], self.log_q[s],
                                                     self.alpha[s], c["k"], metric=c["metric"],
                                                     classes=classes)
                idx = sel.indices if sel.indices.numel() else torch.arange(T, device=x.device)
                kept += idx.numel()
                logits = self.model.rescore(s, out[f"emb_{s}"][0, idx])
                probs.append(self.model.class_probabilities(logits))
            res["video_select"] = sum(probs) / 2
            res["selected"] = kept / 2
        return res

    @torch.no_grad()
    def evaluate(self, progress: bool | None = None, figures: int = 0) -> dict:
        """Classification mAP (plain and selection-based) and detection mAP on the test subset.

        With several processes each rank predicts its share of the videos; the per-video results are
        gathered (in the test subset's order) and every rank computes the same metrics. Figures are
        drawn by rank 0."""
        from .eval import classification_map, detection_map, plot_video, tcam_proposals
        ds, cfg = self.dataset, self.cfg
        progress = (cfg["run"]["progress"] if progress is None else progress) and self.is_main
        selection = self.db is not None
        positions = list(range(len(self.test_idx)))
        if self.world > 1:
            positions = distributed.shard(positions, self.rank, self.world)
        records = []
        for j in tqdm(positions, desc="evaluate", unit="video", dynamic_ncols=True, disable=not progress,
                      leave=False):
            vi = self.test_idx[j]
            v = ds.videos[vi]
            r = self.predict(vi, selection)
            rec = {"j": j, "plain": r["video"].cpu().numpy()}
            if selection:
                rec["select"], rec["kept"] = r["video_select"].cpu().numpy(), r["selected"]
            rec["props"] = tcam_proposals(r["tcam"].cpu().numpy(), rec["plain"], ds.feature_rate,
                                          duration=v.duration)
            if j < figures:
                rec["figure"] = (r["tcam"].cpu().numpy(), r["attention"].cpu().numpy())
            records.append(rec)
        if self.world > 1:
            records = sorted((rec for part in distributed.all_gather_objects(records) for rec in part),
                             key=lambda rec: rec["j"])
        plain = [rec["plain"] for rec in records]
        labels = np.stack([np.asarray(ds.videos[self.test_idx[rec["j"]]].labels) for rec in records])
        predictions = [dict(video=ds.videos[self.test_idx[rec["j"]]].name, **p)
                       for rec in records for p in rec["props"]]
        if self.is_main:
            fig_dir = self.run_dir / "figures"
            for rec in records:
                if "figure" not in rec:
                    continue
                v = ds.videos[self.test_idx[rec["j"]]]
                fig_dir.mkdir(exist_ok=True)
                gt = [(s, e, lab) for s, e, lab in v.segments]
                tcam, att = rec["figure"]
                plot_video(str(fig_dir / f"tcam-{self.plan[min(self.stage, len(self.plan) - 1)][0]}-"
                                         f"{v.name}.png"),
                           tcam, att / max(float(att.max()), 1e-12), gt,
                           [p for p in rec["props"]], ds.feature_rate, list(ds.classes), title=v.name)
        res = {"cls_map": float(classification_map(np.stack(plain), labels)[0])}
        if selection:
            res["cls_map_select"] = float(classification_map(np.stack([rec["select"] for rec in records]),
                                                             labels)[0])
            res["selected_segments"] = float(np.mean([rec["kept"] for rec in records]))
        per_tiou, avg = detection_map(predictions, ds.ground_truth(ds.videos[self.test_idx[0]].subset),
                                      cfg["eval"]["tiou"], ambiguous=getattr(ds, "ambiguous", None))
        for t, m in zip(cfg["eval"]["tiou"], per_tiou):
            res[f"det_map@{t:g}"] = float(m)
        res["det_map_avg"] = float(avg)
        return res

    # ------------------------------------------------------------------------------------------------
    # the whole procedure

    def run(self) -> dict:
        """Train every remaining stage; returns ``{stage name: evaluation results}`` of train stages."""
        distributed.barrier()  # every rank has built (or loaded) its state before rank 0 writes
        self._open_logs()
        if self.stage == 0 and self.step == 0 and self.global_step == 0:
            self._log({"kind": "start", "config": self.cfg, "train_videos": len(self.train_idx),
                       "test_videos": len(self.test_idx), "compiled_ops": ccluster.has_compiled_ops()})
            self.save()
        t = self.cfg["train"]
        while self.stage < len(self.plan):
            name, kind = self.plan[self.stage]
            if kind == "database":
                info = self.build_database(name)
                self._log({"kind": "database", "stage": name, "step": self.global_step, **info})
            else:
                use_cc = name != "baseline"
                self._train_stage(name, t["baseline_steps"] if not use_cc else t["cc_steps"], use_cc)
                last = self.stage == len(self.plan) - 1
                res = self.evaluate(figures=self.cfg["eval"]["figures"] if last else 0)
                self.results[name] = res
                self._log({"kind": "eval", "stage": name, "step": self.global_step, **res})
            self.stage += 1
            self.step = 0
            self.save(stage_copy=name)
        self.finish()
        distributed.barrier()  # the files are complete when any rank returns
        return self.results

    def finish(self) -> None:
        if not self.is_main:
            return
        with open(self.run_dir / "results.json", "w") as f:
            json.dump(self.results, f, indent=2)
        try:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        except Exception as exc:  # figures are a convenience, never a reason to fail a finished run
            log.warning("could not draw the curves: %s", exc)
        if self._writer is not None:
            self._writer.close()


def plot_curves(metrics: Path, out: Path) -> None:
    """Loss terms against the global step, one panel per term, stages shaded."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [json.loads(line) for line in open(metrics)]
    train = [r for r in rows if r.get("kind") == "train"]
    if not train:
        return
    keys = [k for k in ("total", "clf", "cc", "topk_mil", "sparsity", "casl") if k in
            set().union(*(r.keys() for r in train))]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    stages = list(dict.fromkeys(r["stage"] for r in train))
    for ax, k in zip(axes[0], keys):
        for i, stage in enumerate(stages):
            pts = [(r["step"], r[k]) for r in train if r["stage"] == stage and k in r]
            if pts:
                ax.plot(*zip(*pts), label=stage, color=f"C{i % 10}")
        ax.set_title(k)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
