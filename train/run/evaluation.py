"""Evaluation on the test subset: video classification mAP (plain and with test-time selection) and
detection mAP from the T-CAM.

* **Plain video score:** the fused attention-pooled class probabilities.
* **Selection score:** per stream, the objective's selection
  (:meth:`train.objectives.ExemplarObjective.select`) picks per class the ``cc.k`` segments with least
  L_cc (``cc.select_by: loss``, the literal ``-p(s|x) log z``) or closest to the class's exemplars
  (``distance``, ``-log z``); the union is re-scored by the classifier and attention of that stream and
  the two streams' probabilities are averaged.
* **Localization** uses the T-CAM (the fused score) of the *full* video with the plain video scores, so
  detection measures what training did to the network, not the selection.
* **Attention diagnostics:** ``att_in_gt`` is the share of the (common-scale) attention mass on
  segments inside ground-truth instances, ``gt_share`` the share of such segments, both averaged over
  the test videos with instances; weak labels carry a localisation signal when the first is well
  above the second.
* **Several processes:** each rank predicts its share of the videos; the per-video results are gathered
  in the test subset's order and every rank computes the same metrics. Figures are drawn by rank 0.
* **Outputs** (rank 0, when asked): the detections and the T-CAMs of the test videos, written into the
  run folder by :meth:`train.run.folder.RunFolder.write_outputs`.
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from ..common import distributed, interrupt
from .context import RunContext
from .exemplars import ExemplarState, cc_features
from .folder import RunFolder


def inside_ground_truth(segments, length: int, feature_rate: float) -> np.ndarray:
    """``[length]`` bool: whether each feature segment's centre lies inside a ground-truth instance
    (``segments``: ``(start_s, end_s, label)``)."""
    centre = (np.arange(length) + 0.5) / feature_rate
    inside = np.zeros(length, dtype=bool)
    for start, end, _ in segments:
        inside |= (centre >= start) & (centre < end)
    return inside


class Evaluator:
    """Predictions and metrics of the model of ``ctx`` with the exemplars of ``exemplars``."""

    def __init__(self, ctx: RunContext, exemplars: ExemplarState):
        self.ctx = ctx
        self.exemplars = exemplars

    @torch.no_grad()
    def predict(self, index: int, selection: bool) -> dict:
        """Plain and (optionally) selection-based video scores, T-CAM and attention of one video."""
        ctx, ex = self.ctx, self.exemplars
        feats, mask = ctx.video(index)
        ctx.model.eval()
        out = ctx.model(feats, mask)
        res = {"video": out["video"][0], "tcam": out["tcam"][0], "attention": out["attention"][0],
               "logits": out["logits"][0]}
        if selection and ex.ready:
            c = ctx.cfg["cc"]
            T = feats.shape[1]
            classes = torch.arange(ctx.dataset.num_classes, device=feats.device)  # never background
            if c["select_top_classes"] > 0:
                classes = torch.topk(res["video"], min(c["select_top_classes"], len(res["video"]))).indices
            probs, kept = [], 0
            for s in ctx.streams:
                x = cc_features(ctx, out, feats, s)[0]
                sel = ex.objective.select(x, out, s, ex.stream(s), classes)
                idx = sel.indices if sel.indices.numel() else torch.arange(T, device=x.device)
                kept += idx.numel()
                logits = ctx.model.rescore(s, out[f"emb_{s}"][0, idx])
                probs.append(ctx.model.class_probabilities(logits))
            res["video_select"] = sum(probs) / len(probs)
            res["selected"] = kept / len(probs)
        return res

    @torch.no_grad()
    def evaluate(self, folder: RunFolder, tag: str, progress: bool | None = None, figures: int = 0,
                 outputs: bool = False) -> dict:
        """Classification mAP (plain and selection-based) and detection mAP on the test subset.
        ``figures``: T-CAM figures of the first test videos, into ``folder/figures/tcam-<tag>-*.png``.
        ``outputs``: also write the detections and the T-CAMs into ``folder``
        (:meth:`train.run.folder.RunFolder.write_outputs`)."""
        from ..eval import classification_map, detection_map, plot_video, tcam_proposals, wtalc_proposals
        ctx = self.ctx
        ds, cfg = ctx.dataset, ctx.cfg
        progress = ctx.progress if progress is None else (progress and ctx.is_main)
        selection = self.exemplars.ready and cfg["cc"]["select"]
        positions = list(range(len(ctx.test_idx)))
        if ctx.world > 1:
            positions = distributed.shard(positions, ctx.rank, ctx.world)
        records = []
        with tqdm(positions, desc="evaluate", unit="video", dynamic_ncols=True, disable=not progress,
                  leave=False) as bar:  # closed before an interruption is reported
            for j in bar:
                interrupt.check()
                vi = ctx.test_idx[j]
                v = ds.videos[vi]
                r = self.predict(vi, selection)
                rec = {"j": j, "plain": r["video"].cpu().numpy()}
                if selection:
                    rec["select"], rec["kept"] = r["video_select"].cpu().numpy(), r["selected"]
                if cfg["eval"]["proposals"] == "wtalc":
                    rec["props"] = wtalc_proposals(r["logits"].double().cpu().numpy(), ds.feature_rate,
                                                   duration=v.duration, smooth=cfg["eval"]["smooth"])
                else:
                    rec["props"] = tcam_proposals(r["tcam"].cpu().numpy(), rec["plain"], ds.feature_rate,
                                                  duration=v.duration, smooth=cfg["eval"]["smooth"])
                att = r["attention"].cpu().numpy()
                inside = inside_ground_truth(v.segments, len(att), ds.feature_rate)
                if inside.any():
                    rec["att_in_gt"] = float(att[inside].sum() / max(float(att.sum()), 1e-12))
                    rec["gt_share"] = float(inside.mean())
                if j < figures or outputs:
                    rec["figure"] = (r["tcam"].cpu().numpy(), r["attention"].cpu().numpy())
                records.append(rec)
        if ctx.world > 1:
            records = sorted((rec for part in distributed.all_gather_objects(records) for rec in part),
                             key=lambda rec: rec["j"])
        plain = [rec["plain"] for rec in records]
        labels = np.stack([np.asarray(ds.videos[ctx.test_idx[rec["j"]]].labels) for rec in records])
        predictions = [dict(video=ds.videos[ctx.test_idx[rec["j"]]].name, **p)
                       for rec in records for p in rec["props"]]
        if ctx.is_main and outputs:
            folder.write_outputs(tag, ds, [ds.videos[ctx.test_idx[rec["j"]]].name for rec in records],
                                 predictions, [rec["figure"] for rec in records], settings=cfg["eval"])
        if ctx.is_main:
            for rec in records:
                if "figure" not in rec or rec["j"] >= figures:
                    continue
                v = ds.videos[ctx.test_idx[rec["j"]]]
                tcam, att = rec["figure"]
                plot_video(str(folder.figure_path(tag, v.name)), tcam, att / max(float(att.max()), 1e-12),
                           list(v.segments), list(rec["props"]), ds.feature_rate, list(ds.classes),
                           title=v.name, smooth=cfg["eval"]["smooth"])
        res = {"cls_map": float(classification_map(np.stack(plain), labels)[0])}
        if selection:
            res["cls_map_select"] = float(classification_map(np.stack([rec["select"] for rec in records]),
                                                             labels)[0])
            res["selected_segments"] = float(np.mean([rec["kept"] for rec in records]))
        located = [rec for rec in records if "att_in_gt" in rec]
        if located:  # the share of attention inside the actions, against the actions' share of time
            res["att_in_gt"] = float(np.mean([rec["att_in_gt"] for rec in located]))
            res["gt_share"] = float(np.mean([rec["gt_share"] for rec in located]))
        per_tiou, avg = detection_map(predictions, ds.ground_truth(ds.videos[ctx.test_idx[0]].subset),
                                      cfg["eval"]["tiou"], ambiguous=getattr(ds, "ambiguous", None))
        for t, m in zip(cfg["eval"]["tiou"], per_tiou):
            res[f"det_map@{t:g}"] = float(m)
        res["det_map_avg"] = float(avg)
        return res
