"""Evaluation on the test subset: video classification mAP (plain and with test-time selection) and
detection mAP from the T-CAM.

* **Plain video score:** the fused attention-pooled class probabilities.
* **Selection score:** per stream, :func:`ccluster.select_representative` picks per class the ``cc.k``
  segments with least L_cc (``cc.select_by: loss``, the literal ``-p(s|x) log z``) or closest to the
  class's exemplars (``distance``, ``-log z``); the union is re-scored by the classifier and attention
  of that stream and the two streams' probabilities are averaged.
* **Localization** uses the T-CAM (the fused score) of the *full* video with the plain video scores, so
  detection measures what training did to the network, not the selection.
* **Attention diagnostics:** ``att_in_gt`` is the share of the (common-scale) attention mass on
  segments inside ground-truth instances, ``gt_share`` the share of such segments, both averaged over
  the test videos with instances; weak labels carry a localisation signal when the first is well
  above the second.
* **Several processes:** each rank predicts its share of the videos; the per-video results are gathered
  in the test subset's order and every rank computes the same metrics. Figures are drawn by rank 0.
* **Outputs** (rank 0, when asked): ``predictions-<tag>.json``, the detections as an ActivityNet result
  file (for ``python -m train.eval --predictions`` or the official evaluation code), and
  ``cams-<tag>.npz``, per test video its T-CAM ``tcam/<video>`` ``[T, C]`` and attention
  ``attention/<video>`` ``[T]``, with ``classes``, ``videos``, ``feature_rate`` and the evaluation's
  settings ``smooth`` (``eval.smooth``) and ``tiou`` (``eval.tiou``), for ``python -m train.eval.plot
  --cam``, which draws the curves smoothed as the proposals were. ``predictions.json`` and ``cams.npz`` are copies of the latest.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import ccluster
from . import distributed, interrupt
from .context import RunContext
from .exemplars import ExemplarState, cc_features


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
                if c["select_by"] == "loss":
                    a = out[f"att_{s}"][0]
                    weight = a / a.sum().clamp_min(1e-12)
                else:
                    weight = torch.full((T,), 1.0 / T, device=x.device)
                sel = ccluster.select_representative(x, weight, ex.streams[s], ex.log_q[s], ex.alpha[s],
                                                     c["k"], metric=c["metric"], classes=classes)
                idx = sel.indices if sel.indices.numel() else torch.arange(T, device=x.device)
                kept += idx.numel()
                logits = ctx.model.rescore(s, out[f"emb_{s}"][0, idx])
                probs.append(ctx.model.class_probabilities(logits))
            res["video_select"] = sum(probs) / len(probs)
            res["selected"] = kept / len(probs)
        return res

    @torch.no_grad()
    def evaluate(self, run_dir: Path, tag: str, progress: bool | None = None, figures: int = 0,
                 outputs: bool = False) -> dict:
        """Classification mAP (plain and selection-based) and detection mAP on the test subset.
        ``figures``: T-CAM figures of the first test videos, into ``run_dir/figures/tcam-<tag>-*.png``.
        ``outputs``: also write the detections and the T-CAMs into ``run_dir`` (module docstring)."""
        from .eval import classification_map, detection_map, plot_video, tcam_proposals, wtalc_proposals
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
            save_outputs(Path(run_dir), tag, ds, [ds.videos[ctx.test_idx[rec["j"]]].name for rec in records],
                         predictions, [rec["figure"] for rec in records], settings=cfg["eval"])
        if ctx.is_main:
            for rec in records:
                if "figure" not in rec or rec["j"] >= figures:
                    continue
                v = ds.videos[ctx.test_idx[rec["j"]]]
                fig_dir = Path(run_dir) / "figures"
                fig_dir.mkdir(parents=True, exist_ok=True)
                tcam, att = rec["figure"]
                plot_video(str(fig_dir / f"tcam-{tag}-{v.name}.png"), tcam, att / max(float(att.max()), 1e-12),
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


def save_outputs(run_dir: Path, tag: str, dataset, videos: list, predictions: list, cams: list,
                 settings: dict | None = None) -> None:
    """Write ``predictions-<tag>.json`` and ``cams-<tag>.npz`` into ``run_dir`` and copy them to
    ``predictions.json`` and ``cams.npz`` (see the module docstring); every file appears whole.
    ``settings``: the config's ``eval`` section, whose ``smooth`` and ``tiou`` the npz records."""
    import shutil
    from .eval import write_predictions_json
    run_dir.mkdir(parents=True, exist_ok=True)
    pred = run_dir / f"predictions-{tag}.json"
    write_predictions_json(str(pred), predictions, class_names=list(dataset.classes), videos=videos)
    arrays = {"classes": np.array([str(c) for c in dataset.classes]), "videos": np.array(videos),
              "feature_rate": np.array(float(dataset.feature_rate))}
    if settings is not None:
        arrays["smooth"] = np.array(int(settings["smooth"]))
        arrays["tiou"] = np.array([float(t) for t in settings["tiou"]])
    for name, (tcam, att) in zip(videos, cams):
        arrays[f"tcam/{name}"] = np.asarray(tcam, dtype=np.float32)
        arrays[f"attention/{name}"] = np.asarray(att, dtype=np.float32)
    cam = run_dir / f"cams-{tag}.npz"
    tmp = cam.with_name(f".{cam.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, cam)
    for src, dst in ((pred, run_dir / "predictions.json"), (cam, run_dir / "cams.npz")):
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
