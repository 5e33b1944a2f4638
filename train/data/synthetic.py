"""Synthetic benchmark with planted structure, written in the standard W-TALC layout and the native layout.

What it is: a deterministic (seeded) stand-in for THUMOS14 pre-extracted I3D features. The annotation
statistics follow THUMOS14's 20-class subset (preset "thumos14": 412 labelled videos, 200 "validation" for
training and 212 "test"; ~1.12 labels per video with 50 two-label videos; ~15 instances per video with a long
tail; instance length median 3 s / mean 4.3 s; duration mean ~213 s, 9 s to 28 min; ~31 % of the time inside
actions). Features are 2 x ``stream_dim`` (RGB then flow) at 25/16 segments per second.

How the features are made. A small latent space (``latent_dim``) holds "concepts", each with an RGB and a
flow vector; a segment's latent is the average of the concepts of its 16 frames, plus a per-video offset and
temporally correlated noise; each stream is a fixed random orthonormal projection of its latent to
``stream_dim`` dimensions plus independent noise. Concepts:

- actions: each class is a mixture of ``subclusters`` sub-action clusters around a class mean; an instance
  uses one of them, with a random intensity in [``amplitude_min``, 1] (blended with the scene); actions are
  strong in flow, weaker in RGB;
- context: a class-specific concept (correlated with the class mean, strong in RGB, weak in flow) placed
  just before / after instances (probability ``context_prob``) and as stand-alone chunks in the background
  of videos of the class: it predicts the video label but is not the action, the classic trap for
  attention-based MIL;
- hard negatives: clusters shared by 2-3 classes, near those classes' action means in both streams, placed in
  the background of their classes' videos;
- background scenes (``num_background``), one per video;
- per-video drift (``drift``) of every concept, a per-video offset (``video_offset``), AR(1) noise
  (``latent_noise``, ``temporal_corr``) and per-dimension noise (``feature_noise``);
- distractor videos (``num_distractors`` per subset): no label, only the context and hard negatives of a
  random class;
- a fraction ``ambiguous_frac`` of test instances is written to Ambiguous_test.txt instead of as labels.

What it can show: that the pipeline runs end to end (loading, batching, training, proposals, evaluation),
and the *relative* behaviour of methods on known failure modes (context, hard negatives, multi-modal
classes, long/short videos). What it cannot show: accuracy on THUMOS14 or any real data. The features are
Gaussian mixtures, not I3D activations, and absolute mAP values on them mean nothing for real video.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import lfilter

from .dataset import FeatureDataset, VideoRecord
from .native import native_paths, read_native, write_native
from .standard import standard_paths, write_standard

__all__ = ["SyntheticSpec", "PRESETS", "generate", "build_dataset", "sample_layout", "layout_statistics",
           "VideoPlan"]

FPS = 25  # frames per second of the simulated videos
FRAMES_PER_SEGMENT = 16


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the synthetic benchmark (times in seconds; latent magnitudes relative to unit concepts)."""
    name: str = "SynthTHUMOS14"
    num_classes: int = 20
    num_train: int = 200            # labelled videos of subset "validation" (THUMOS14 trains on validation)
    num_test: int = 212             # labelled videos of subset "test"
    two_label_frac: float = 50 / 412  # fraction of labelled videos with two classes
    num_distractors: int = 3        # unlabelled distractor videos added to each subset
    duration_median: float = 150.0  # video duration: log-normal(median, sigma) clipped to [min, max]
    duration_sigma: float = 0.85
    duration_min: float = 9.0
    duration_max: float = 1680.0
    coverage_a: float = 2.0         # fraction of a video inside actions ~ Beta(a, b) (mean a / (a + b))
    coverage_b: float = 4.45
    max_coverage: float = 0.85      # cap on the action fraction of one video
    instance_median: float = 3.0    # instance length: log-normal(median, sigma) clipped to [min, max]
    instance_sigma: float = 0.85
    instance_min: float = 0.5
    instance_max: float = 120.0
    stream_dim: int = 1024          # dimension of each stream (features are 2 x stream_dim)
    latent_dim: int = 48
    subclusters: int = 3            # sub-action clusters per class
    subcluster_spread: float = 0.8  # spread of sub-clusters around the class mean (relative)
    num_background: int = 8         # background scene clusters
    context_prob: float = 0.7       # probability of a context interval before / after an instance
    context_min: float = 1.0
    context_max: float = 4.0
    context_similarity: float = 0.35  # weight of the class mean in its context concept
    context_groups: int = 1         # classes sharing one context concept (a venue shared by several
                                    # sports): 1 = every class has its own
    standalone_context: float = 0.15  # share of background chunks that show the class context
    hard_negative_rate: float = 0.15  # share of background chunks that show a hard negative
    hard_similarity: float = 0.6    # weight of the shared classes' means in a hard negative
    chunk_min: float = 2.0          # background chunk length range
    chunk_max: float = 8.0
    amplitude_min: float = 0.5
    drift: float = 0.35
    video_offset: float = 0.3
    latent_noise: float = 0.5
    temporal_corr: float = 0.7
    feature_noise: float = 0.5
    ambiguous_frac: float = 0.03
    feature_rate: float = FPS / FRAMES_PER_SEGMENT

    @property
    def feature_dim(self) -> int:
        """Total feature dimension (RGB + flow)."""
        return 2 * self.stream_dim


PRESETS: dict[str, SyntheticSpec] = {
    # full THUMOS14 statistics (about 137k segments: ~1.1 GB per layout at 2 x 1024 dims)
    "thumos14": SyntheticSpec(),
    # same shape, smaller: 10 classes, 60 + 60 labelled videos of ~1 min, 2 x 1024 dims (~100 MB per layout)
    "demo": SyntheticSpec(name="SynthDemo", num_classes=10, num_train=60, num_test=60, num_distractors=2,
                          duration_median=50.0, duration_sigma=0.7, duration_max=300.0),
    # calibrated on the project's STPN baseline to land where published baselines land on THUMOS14 I3D
    # features (classification mAP 80-90 %, detection mAP@0.5 12-20 %, mean over tIoU 0.1-0.5 25-35 %),
    # with the attention inside the actions above their share of time and context still a trap; 20
    # classes, 200 + 200 labelled videos of ~1 min (~380 MB per layout). See the calibration table of
    # docs/data-and-evaluation.md.
    "calibrated": SyntheticSpec(name="SynthCalibrated", num_classes=20, num_train=200, num_test=200,
                                num_distractors=4, duration_median=60.0, duration_sigma=0.7,
                                duration_max=400.0, context_groups=5, context_prob=0.5,
                                hard_negative_rate=0.08, latent_noise=0.9),
    # for tests: 5 classes, 12 + 12 videos of ~25 s, 2 x 32 dims, generated in well under a second
    "tiny": SyntheticSpec(name="SynthTiny", num_classes=5, num_train=12, num_test=12, two_label_frac=0.17,
                          num_distractors=1, duration_median=25.0, duration_sigma=0.4, duration_max=60.0,
                          stream_dim=32, latent_dim=16, num_background=3, ambiguous_frac=0.1),
}


@dataclass
class VideoPlan:
    """Annotation-level description of one synthetic video (before features are rendered).

    instances: (start, end, class, subcluster, amplitude, ambiguous); fillers: (start, end, kind, id) with
    kind "context" (id = class) or "hard" (id = hard-negative cluster); the rest of the video is scene.
    """
    name: str
    subset: str
    duration: float
    classes: list
    distractor: bool
    background: int
    instances: list = field(default_factory=list)
    fillers: list = field(default_factory=list)


def _spec(preset) -> SyntheticSpec:
    if isinstance(preset, SyntheticSpec):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; presets are {sorted(PRESETS)}")
    return PRESETS[preset]


def _hard_groups(rng: np.random.Generator, c: int) -> list[list[int]]:
    """Hard-negative clusters: each shared by 2-3 classes, every class in at least one."""
    n = max(1, c // 2)
    groups = [sorted(rng.choice(c, size=min(c, int(rng.integers(2, 4))), replace=False).tolist()) for _ in range(n)]
    for k in range(c):
        if not any(k in g for g in groups):
            groups[int(rng.integers(n))].append(k)
    return groups


def _split_free(rng, spec, start, end, classes, hard_of, rate_scale=1.0) -> list[tuple]:
    """Cut a free interval into background chunks; some become stand-alone context or hard negatives."""
    out, t = [], start
    while end - t > 1e-6:
        length = min(end - t, rng.uniform(spec.chunk_min, spec.chunk_max))
        r = rng.random()
        if classes and r < spec.hard_negative_rate * rate_scale:
            cands = sorted({h for c in classes for h in hard_of[c]})
            out.append((t, t + length, "hard", int(rng.choice(cands))))
        elif classes and r < (spec.hard_negative_rate + spec.standalone_context) * rate_scale:
            out.append((t, t + length, "context", int(rng.choice(classes))))
        t += length
    return out


def _plan_video(rng, spec: SyntheticSpec, name, subset, classes, distractor, hard_of) -> VideoPlan:
    dur = float(np.clip(rng.lognormal(math.log(spec.duration_median), spec.duration_sigma),
                        spec.duration_min, spec.duration_max))
    dur = round(dur, 2)
    plan = VideoPlan(name=name, subset=subset, duration=dur, classes=[] if distractor else list(classes),
                     distractor=distractor, background=int(rng.integers(spec.num_background)))
    if distractor:
        plan.fillers = _split_free(rng, spec, 0.0, dur, list(classes), hard_of, rate_scale=2.0)
        return plan
    mean_len = math.exp(math.log(spec.instance_median) + spec.instance_sigma ** 2 / 2)
    cover = rng.beta(spec.coverage_a, spec.coverage_b)
    n = max(len(classes), int(rng.poisson(cover * dur / mean_len)))
    lengths = np.clip(rng.lognormal(math.log(spec.instance_median), spec.instance_sigma, n),
                      spec.instance_min, spec.instance_max)
    if lengths.sum() > spec.max_coverage * dur:
        lengths *= spec.max_coverage * dur / lengths.sum()
    labels = list(classes) + [int(rng.choice(classes)) for _ in range(n - len(classes))]
    labels = [labels[i] for i in rng.permutation(n)]
    gaps = rng.dirichlet(np.ones(n + 1)) * (dur - lengths.sum())
    starts = np.cumsum(gaps[:-1]) + np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
    free_from = 0.0
    for i in range(n):
        s, e, c = float(starts[i]), float(starts[i] + lengths[i]), labels[i]
        pre = post = 0.0
        if rng.random() < spec.context_prob:
            pre = min(rng.uniform(spec.context_min, spec.context_max), 0.45 * gaps[i])
        if rng.random() < spec.context_prob:
            post = min(rng.uniform(spec.context_min, spec.context_max), 0.45 * gaps[i + 1])
        plan.fillers += _split_free(rng, spec, free_from, s - pre, classes, hard_of)
        if pre > 0:
            plan.fillers.append((s - pre, s, "context", c))
        if post > 0:
            plan.fillers.append((e, e + post, "context", c))
        ambiguous = subset == "test" and rng.random() < spec.ambiguous_frac
        plan.instances.append((round(s, 2), round(e, 2), c, int(rng.integers(spec.subclusters)),
                               float(rng.uniform(spec.amplitude_min, 1.0)), ambiguous))
        free_from = e + post
    plan.fillers += _split_free(rng, spec, free_from, dur, classes, hard_of)
    return plan


def sample_layout(preset="demo", seed: int = 0) -> tuple[SyntheticSpec, list[VideoPlan], list[list[int]]]:
    """Annotations only (no features): (spec, video plans in file order, hard-negative class groups).

    Cheap even for the "thumos14" preset; :func:`layout_statistics` summarizes it.
    """
    spec = _spec(preset)
    layout_ss = np.random.SeedSequence([seed, 1])
    rng = np.random.default_rng(layout_ss)
    c = spec.num_classes
    groups = _hard_groups(rng, c)
    hard_of = {k: [h for h, g in enumerate(groups) if k in g] for k in range(c)}
    perm = rng.permutation(c)
    pairs = [(int(perm[2 * i]), int(perm[2 * i + 1])) for i in range(max(1, c // 4))]  # co-occurring classes
    plans: list[VideoPlan] = []
    for subset, n in (("validation", spec.num_train), ("test", spec.num_test)):
        n_two = int(round(spec.two_label_frac * n))
        single = [int(perm_k) for perm_k in np.resize(rng.permutation(c), n - n_two)]
        label_sets = [[s] for s in single] + [list(pairs[int(rng.integers(len(pairs)))]) for _ in range(n_two)]
        kinds = [(ls, False) for ls in label_sets] + \
                [([int(rng.integers(c))], True) for _ in range(spec.num_distractors)]
        kinds = [kinds[i] for i in rng.permutation(len(kinds))]
        for i, (classes, distractor) in enumerate(kinds):
            plans.append(_plan_video(rng, spec, f"video_{subset}_{i + 1:07d}", subset, classes, distractor, hard_of))
    return spec, plans, groups


def layout_statistics(plans: list[VideoPlan], feature_rate: float = FPS / FRAMES_PER_SEGMENT) -> dict:
    """Summary of a layout, comparable with THUMOS14's: counts, labels per video, instances per video,
    instance length, duration, fraction of time inside actions (distractors excluded except in counts)."""
    lab = [p for p in plans if not p.distractor]
    lengths = np.array([e - s for p in lab for s, e, *_ in p.instances])
    n_inst = np.array([len(p.instances) for p in lab])
    inside = sum(lengths) / sum(p.duration for p in lab)
    return {
        "videos": len(plans), "labelled_videos": len(lab), "distractors": len(plans) - len(lab),
        "per_subset": {s: sum(p.subset == s for p in plans) for s in dict.fromkeys(p.subset for p in plans)},
        "labels_per_video": float(np.mean([len(p.classes) for p in lab])),
        "two_label_videos": int(sum(len(p.classes) == 2 for p in lab)),
        "instances_per_video": float(n_inst.mean()), "max_instances": int(n_inst.max()),
        "instance_median_s": float(np.median(lengths)), "instance_mean_s": float(lengths.mean()),
        "duration_mean_s": float(np.mean([p.duration for p in lab])),
        "duration_min_s": float(min(p.duration for p in plans)), "duration_max_s": float(max(p.duration for p in plans)),
        "inside_action_frac": float(inside),
        "segments": int(sum(_num_segments(p.duration, feature_rate) for p in plans)),
    }


def _num_segments(duration: float, feature_rate: float) -> int:
    return max(1, int(math.floor(duration * feature_rate)))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class _World:
    """Concept latents (each [2, latent_dim]: RGB, flow) and the stream projections."""
    # (rgb scale, flow scale) per concept kind
    SCALES = {"action": (0.7, 1.0), "context": (1.0, 0.3), "background": (1.0, 0.2), "hard": (0.8, 0.8)}

    def __init__(self, spec: SyntheticSpec, groups: list[list[int]], seed: int):
        rng = np.random.default_rng(np.random.SeedSequence([seed, 2]))
        k, c = spec.latent_dim, spec.num_classes
        scale = lambda kind: np.array(self.SCALES[kind])[:, None]  # noqa: E731
        base = _unit(rng.standard_normal((c, 2, k)))
        self.action = _unit(base[:, None] + spec.subcluster_spread * _unit(
            rng.standard_normal((c, spec.subclusters, 2, k)))) * scale("action")
        own = _unit(rng.standard_normal((c, 2, k)))
        # Classes in one context group share their context (the group's mean direction and the first
        # member's own part); drawn from a separate stream so that context_groups=1 changes nothing.
        order = np.random.default_rng(np.random.SeedSequence([seed, 4])).permutation(c)
        shared_base, shared_own = base.copy(), own.copy()
        for g in (order[i:i + spec.context_groups] for i in range(0, c, spec.context_groups)):
            shared_base[g] = _unit(base[g].mean(0)) if len(g) > 1 else base[g]
            shared_own[g] = own[g[0]]
        self.context = _unit(spec.context_similarity * shared_base + shared_own) * scale("context")
        self.background = _unit(rng.standard_normal((spec.num_background, 2, k))) * scale("background")
        self.hard = np.stack([
            _unit(spec.hard_similarity * _unit(base[g].mean(0)) + (1 - spec.hard_similarity) *
                  _unit(rng.standard_normal((2, k)))) for g in groups]) * scale("hard")
        self.proj = [np.linalg.qr(rng.standard_normal((spec.stream_dim, k)))[0].T for _ in range(2)]  # [k, d]


def _render(spec: SyntheticSpec, world: _World, plan: VideoPlan, rng: np.random.Generator) -> np.ndarray:
    """Features [T, 2 * stream_dim] float32 of one planned video."""
    k, d = spec.latent_dim, spec.stream_dim
    t_len = _num_segments(plan.duration, spec.feature_rate)
    n_frames = t_len * FRAMES_PER_SEGMENT
    cache: dict = {}

    def drifted(kind: str, idx) -> np.ndarray:
        if (kind, idx) not in cache:
            base = getattr(world, kind)[idx]
            cache[kind, idx] = base + spec.drift * np.linalg.norm(base, axis=-1, keepdims=True) * \
                _unit(rng.standard_normal((2, k))) / math.sqrt(2)
        return cache[kind, idx]

    scene = drifted("background", plan.background)
    rows = [scene]
    frame_row = np.zeros(n_frames, dtype=np.int64)

    def paint(s, e, vec):
        rows.append(vec)
        frame_row[int(round(s * FPS)):int(round(e * FPS))] = len(rows) - 1

    for s, e, kind, idx in plan.fillers:
        paint(s, e, drifted(kind, idx))
    for s, e, c, sub, amp, _ in plan.instances:
        paint(s, e, amp * drifted("action", (c, sub)) + (1 - amp) * scene)
    z = np.stack(rows)[frame_row].reshape(t_len, FRAMES_PER_SEGMENT, 2, k).mean(axis=1)
    z = z + spec.video_offset * _unit(rng.standard_normal((2, k)))
    rho = spec.temporal_corr
    eta = rng.standard_normal((t_len, 2, k)) * (spec.latent_noise / math.sqrt(k))
    z = z + lfilter([math.sqrt(1 - rho ** 2)], [1.0, -rho], eta, axis=0)
    gain = 0.5 * math.sqrt(d)  # about 0.5 per dimension for a unit latent
    noise = spec.feature_noise * gain / math.sqrt(k)
    out = np.empty((t_len, 2 * d), dtype=np.float32)
    for stream in range(2):
        out[:, stream * d:(stream + 1) * d] = gain * (z[:, stream] @ world.proj[stream]) + \
            noise * rng.standard_normal((t_len, d))
    return out


def build_dataset(preset="demo", seed: int = 0) -> FeatureDataset:
    """The synthetic dataset in memory (features rendered), without writing anything."""
    spec, plans, groups = sample_layout(preset, seed)
    world = _World(spec, groups, seed)
    render_ss = np.random.SeedSequence([seed, 3]).spawn(len(plans))
    classes = [f"action{c:02d}" for c in range(spec.num_classes)]
    videos, ambiguous = [], {}
    for plan, ss in zip(plans, render_ss):
        labels = np.zeros(spec.num_classes, dtype=np.float32)
        labels[plan.classes] = 1.0
        segs = [(s, e, c) for s, e, c, _, _, amb in plan.instances if not amb]
        amb = [(s, e) for s, e, _, _, _, a in plan.instances if a]
        if amb:
            ambiguous[plan.name] = amb
        videos.append(VideoRecord(name=plan.name, subset=plan.subset, duration=plan.duration, labels=labels,
                                  segments=segs, features=_render(spec, world, plan, np.random.default_rng(ss))))
    return FeatureDataset(classes, videos, feature_rate=spec.feature_rate, rgb_dim=spec.stream_dim,
                          ambiguous=ambiguous, name=spec.name, source=f"synthetic preset, seed {seed}")


def generate(root: str, preset="demo", seed: int = 0, *, overwrite: bool = False) -> tuple[str, str]:
    """Write the synthetic dataset under ``root`` and return ``(root, name)`` for :func:`load_dataset`.

    Writes both layouts: standard (``<root>/<name>-I3D-JOINTFeatures.npy`` and ``<root>/<name>-Annotations/``)
    and native (``<root>/<name>/annotations.json``, which is also the ActivityNet ground-truth JSON for
    ``python -m train.eval``, and ``<root>/<name>/features/``). ``preset``: a name in :data:`PRESETS` or a
    :class:`SyntheticSpec`. If the same preset and seed were already written there, nothing is redone
    unless ``overwrite``.
    """
    spec = _spec(preset)
    stamp = {"spec": dataclasses.asdict(spec), "seed": int(seed)}
    ann_path, _ = native_paths(root, spec.name)
    feat_path, ann_dir = standard_paths(root, spec.name)
    stamp_path = os.path.join(root, spec.name, "synthetic.json")
    if not overwrite and os.path.isfile(stamp_path) and os.path.isfile(ann_path) and os.path.isfile(feat_path):
        with open(stamp_path, "r", encoding="utf-8") as f:
            if json.load(f) == stamp:
                return root, spec.name
    ds = build_dataset(spec, seed)
    write_native(ds, root, spec.name)
    write_standard(ds, root, spec.name)
    with open(stamp_path, "w", encoding="utf-8") as f:
        json.dump(stamp, f)
    return root, spec.name


def _main(argv=None) -> int:
    import argparse
    from ..common import names
    ap = argparse.ArgumentParser(prog=names.module("data.synthetic"),
                                 description="Write the synthetic benchmark (both layouts) and print its statistics.")
    ap.add_argument("root")
    ap.add_argument("--preset", default="demo", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stats-only", action="store_true", help="print the annotation statistics, write nothing")
    args = ap.parse_args(argv)
    spec, plans, _ = sample_layout(args.preset, args.seed)
    print(json.dumps(layout_statistics(plans, spec.feature_rate), indent=1))
    if not args.stats_only:
        root, name = generate(args.root, args.preset, args.seed)
        print(read_native(root, name))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
