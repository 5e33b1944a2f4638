"""Every config key, declared once: its type, its range or choices, a one-line doc and its phase.

The tree of defaults (:data:`DEFAULTS`), the lists validation reads (:data:`CHOICES`, :data:`POSITIVE`,
:data:`NON_NEGATIVE`) and the lists that say when a key acts (:data:`AFTER_STAGE1`,
:data:`EVALUATION_ONLY`, :data:`RESUME_MAY_CHANGE`) are all derived from :data:`KEYS`; so is the config
reference in ``docs/config.md`` (:mod:`train.config.reference`). To add a key, add one :class:`Key` here.

The phase says what a change of the key touches, which is what ``fit --resume`` and ``compare`` rely on:

* ``stage 1``: the baseline stage depends on it (and so does everything after it);
* ``after stage 1``: only the exemplar rounds depend on it: variants that differ in such keys share
  one stage 1 in ``compare``;
* ``evaluation only``: only evaluation depends on it: ``compare`` re-evaluates a trained run instead
  of training again;
* ``label``: it names the run; no result depends on it;
* ``may change on resume``: how a run is executed (its folder, progress bars, threads); the one kind
  of key ``fit --resume`` accepts a new value for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..objectives import OBJECTIVES

STAGE1 = "stage 1"
AFTER_STAGE1_PHASE = "after stage 1"
EVALUATION = "evaluation only"
LABEL = "label"
RESUME = "may change on resume"
PHASES = (STAGE1, AFTER_STAGE1_PHASE, EVALUATION, LABEL, RESUME)

MAX_SEED = 2**64 - 1  # torch.manual_seed's range; the batch and dropout seeds mix it as 64 bits



@dataclass(frozen=True)
class Key:
    """One config key.

    Attributes:
        name: the dotted key, e.g. ``"cc.alpha"``.
        default: its default value; its Python type is the key's type (bool, int, float, str, a list of
            numbers), except for ``auto`` keys.
        doc: one line: what the key does.
        phase: one of :data:`PHASES`.
        choices: the allowed strings (empty: any string, or not a string key).
        low: the lower bound of a number (None: unbounded); ``strict`` excludes it (``> low``).
        auto: the key takes a number > 0 or the string ``"auto"``.
    """
    name: str
    default: Any
    doc: str
    phase: str
    choices: tuple = ()
    low: float | None = None
    strict: bool = False
    auto: bool = False

    @property
    def kind(self) -> str:
        """The key's type in words: ``bool``, ``int``, ``float``, ``str``, ``list of numbers`` or
        ``number or "auto"``."""
        if self.auto:
            return 'number or "auto"'
        if isinstance(self.default, list):
            return "list of numbers"
        return type(self.default).__name__

    @property
    def range(self) -> str:
        """The allowed values in words (``> 0``, ``>= 0``, ``one of ...``), or ``""``."""
        if self.choices:
            return "one of " + ", ".join(f'"{c}"' for c in self.choices)
        if self.name == "seed":
            return "0 to 2**64 - 1"
        if self.auto:
            return '> 0 or "auto"'
        if self.low is not None:
            return f"{'>' if self.strict else '>='} {self.low:g}"
        return ""


def _positive(name, default, doc, phase, **kw) -> Key:
    return Key(name, default, doc, phase, low=0, strict=True, **kw)


def _non_negative(name, default, doc, phase, **kw) -> Key:
    return Key(name, default, doc, phase, low=0, **kw)


# One line per section, for the reference.
SECTIONS = {
    "": "the run as a whole",
    "data": "the dataset, its subsets and the training batches",
    "model": "the two-stream attention network",
    "loss": "the weakly supervised losses besides the exemplar loss",
    "cc": "the exemplar stages: database, bandwidth, Q fit, exemplar loss, test-time selection, guards",
    "train": "optimisation and the stages' lengths",
    "eval": "evaluation on the test subset",
    "run": "the run folder and how the run executes",
}

KEYS: tuple[Key, ...] = (
    Key("name", "run", "run name, used for the default run folder runs/<name>", LABEL),
    Key("seed", 0, "seeds model init, batch order, dropout, window crops", STAGE1, low=0),
    Key("device", "cpu", "where the model runs", STAGE1, choices=("cpu", "cuda")),
    # data
    Key("data.root", "", 'dataset folder (train.data layout); "" with a synthetic set: the cache', STAGE1),
    Key("data.name", "", 'dataset name inside data.root ("": the synthetic generator\'s name)', STAGE1),
    Key("data.synthetic", "", "generate this synthetic preset if missing (\"\": none)", STAGE1,
        choices=("", "tiny", "demo", "calibrated", "thumos14")),
    Key("data.layout", "standard", '"standard": W-TALC\'s release (rgb|flow concatenated) | "native": '
        "annotations.json and one .npy per video", STAGE1, choices=("standard", "native")),
    _non_negative("data.feature_rate", 0.0, "feature vectors per second; 0: from the dataset's files, else 25/16",
                  STAGE1),
    _non_negative("data.rgb_dim", 0, "features[:, :rgb_dim] are RGB, the rest flow; 0: from the files, else 1024",
                  STAGE1),
    _positive("data.max_seqlen", 750, "training crop length (segments); evaluation uses whole videos", STAGE1),
    _positive("data.batch_size", 16, "videos per training step (the global batch with several processes)",
              STAGE1),
    Key("data.sampler", "epochs", '"epochs": every training video once per epoch, in a seeded order | '
        '"similar_pairs": W-TALC\'s batches, data.similar_pairs pairs of videos that share a random class, the '
        "rest drawn at random (with replacement)", STAGE1, choices=("epochs", "similar_pairs")),
    _non_negative("data.similar_pairs", 3, 'pairs of same-class videos per batch with the "similar_pairs" sampler',
                  STAGE1),
    Key("data.train_subset", "", '"": the dataset\'s convention (THUMOS14: validation; ActivityNet: training)',
        STAGE1),
    Key("data.test_subset", "", '"": the dataset\'s convention (THUMOS14: test; ActivityNet: validation)',
        STAGE1),
    Key("data.standardize", "zscore", '"zscore": subtract the per-dimension mean and divide by the std of the '
        "training subset's features (float64 statistics, kept in the checkpoint, used for every forward: "
        'training, database, evaluation) | "none": the features as stored', STAGE1, choices=("none", "zscore")),
    # model
    Key("model.streams", "two", '"two": an RGB and a flow stream, each on its half of the features | "joint": '
        "one stream on the whole feature vector (W-TALC's model)", STAGE1, choices=("two", "joint")),
    _positive("model.embed_dim", 512, "width of the embedding phi (Linear -> ReLU -> Dropout), per stream", STAGE1),
    Key("model.dropout", 0.5, "dropout after the embedding", STAGE1),
    Key("model.attention", "untrimmednet", '"untrimmednet": softmax over segments | "stpn": sigmoid | "none": '
        "no attention branch, video logits by W-TALC's k-max pooling of the segment logits "
        "(k = ceil(T / loss.topk_ratio))", STAGE1, choices=("untrimmednet", "stpn", "none")),
    Key("model.init", "torch", '"torch": PyTorch\'s default Linear init | "xavier": Xavier-uniform weights and '
        "zero biases (W-TALC's)", STAGE1, choices=("torch", "xavier")),
    _non_negative("model.attention_hidden", 0, "0: the attention is Linear(embed, 1); > 0: Linear-ReLU-Linear "
                  "with this many hidden units", STAGE1),
    # loss
    Key("loss.classification", "softmax", '"softmax": cross-entropy against labels/|labels| | "bce": per-class '
        "sigmoid binary cross-entropy", STAGE1, choices=("softmax", "bce")),
    _non_negative("loss.topk_mil", 0.0, "weight of W-TALC's top-k MIL loss, added to the attention MIL loss",
                  STAGE1),
    _positive("loss.topk_ratio", 8, "W-TALC's top-k: k = ceil(T / topk_ratio)", STAGE1),
    _non_negative("loss.sparsity", 1.0e-4, 'weight of STPN\'s L1 attention sparsity loss (model.attention "stpn" '
                  "only)", STAGE1),
    _non_negative("loss.casl", 0.0, "weight of W-TALC's co-activity similarity loss (0: off)", STAGE1),
    _non_negative("loss.casl_margin", 0.5, "margin of the co-activity similarity loss", STAGE1),
    # cc
    _non_negative("cc.weight", 0.03, "lambda in Loss = L_clf + lambda * L_cc (0.03: chosen for \"prior\", "
                  "docs/results.md; the poster's literal loss used 1); 0 keeps the stages: a same-batch control",
                  AFTER_STAGE1_PHASE),
    Key("cc.loss", "prior", "the exemplar objective (train/objectives/, one file each; docs/exemplar-losses.md)",
        AFTER_STAGE1_PHASE, choices=tuple(OBJECTIVES)),
    Key("cc.background", False, "add a background class to the database (the cc.size least-attended segments of "
        'the labelled videos); "contrastive" only, which then also pulls unattended segments toward it',
        AFTER_STAGE1_PHASE),
    _positive("cc.temperature", 1.0, 'tau of "contrastive" (log z / tau) and of the priors (standardised log z / '
              "tau)", AFTER_STAGE1_PHASE),
    _non_negative("cc.rounds", 1, "R: repetitions of collect -> fit Q -> train with L_cc; 0: the baseline alone",
                  AFTER_STAGE1_PHASE),
    _positive("cc.size", 64, "n: exemplars per class in the database", AFTER_STAGE1_PHASE),
    Key("cc.on", "embedding", 'what L_cc and the database see: "embedding" (phi: shapes features and attention) | '
        '"input" (the input features)', AFTER_STAGE1_PHASE, choices=("embedding", "input")),
    Key("cc.detach_attention", True, "true: L_cc shapes phi only (p(s|x) a constant weight); false: the literal "
        "loss's gradient also moves the attention (it collapses it onto the segments nearest an exemplar); the "
        "priors train the attention by design and ignore it", AFTER_STAGE1_PHASE),
    Key("cc.normalize", False, "L2-normalise what L_cc sees (stops phi from shrinking to cheat L_cc)",
        AFTER_STAGE1_PHASE),
    Key("cc.metric", "sqeuclidean", 'the distance d: "sqeuclidean" | "euclidean" (the paper\'s)',
        AFTER_STAGE1_PHASE, choices=("sqeuclidean", "euclidean")),
    Key("cc.alpha", "auto", 'bandwidth: a number > 0, or "auto" (from the data, at every collection)',
        AFTER_STAGE1_PHASE, auto=True),
    Key("cc.alpha_rule", "lashkari", 'the "auto" rule: "lashkari" (n^2 log n / sum of d per class, median over '
        'classes) | "median" (1 / median d)', AFTER_STAGE1_PHASE, choices=("lashkari", "median")),
    _positive("cc.alpha_scale", 1.0, "multiplies the automatic alpha", AFTER_STAGE1_PHASE),
    _positive("cc.fit_tol", 1.0e-4, "stop the Q fit when |max log eta - sum q log eta| < tol (nats)",
              AFTER_STAGE1_PHASE),
    _positive("cc.fit_max_iter", 500, "Q fit: kernel passes at most", AFTER_STAGE1_PHASE),
    Key("cc.fit_accelerate", True, "SQUAREM extrapolation of the Q update (same certificate, fewer passes)",
        AFTER_STAGE1_PHASE),
    Key("cc.select", False, "test-time selection of representative segments (the poster's testing step, "
        "reported as cls*); off by default: it lowered classification mAP in every comparison", EVALUATION),
    _positive("cc.k", 8, "test-time selection: segments per class kept", EVALUATION),
    Key("cc.select_by", "distance", '"distance": closest to the class\'s exemplars (-log z) | "loss": least '
        "-p(s|x) log z, the literal L_cc (favours low attention)", EVALUATION, choices=("distance", "loss")),
    _non_negative("cc.select_top_classes", 0, "0: select for every class; N: only for the N top-scored classes",
                  EVALUATION),
    Key("cc.reduction", "mean", 'L_cc over the videos of a batch: "mean" | "sum"', AFTER_STAGE1_PHASE,
        choices=("mean", "sum")),
    Key("cc.scale", "relative", '"literal" only. "relative": each stream\'s loss divided by its mean per video '
        "over the training set at collection, so lambda means the same on every dataset and alpha | \"none\": "
        "the raw loss (its size follows alpha * d); the other objectives are in nats already", AFTER_STAGE1_PHASE,
        choices=("relative", "none")),
    _positive("cc.guard_alpha_jump", 10.0, "warn when an automatic alpha changes by more than this factor",
              AFTER_STAGE1_PHASE),
    _positive("cc.guard_q_uniform", 0.95, "warn when Q's perplexity / filled slots (median class) is above this",
              AFTER_STAGE1_PHASE),
    _positive("cc.guard_fit_gap", "auto", "warn when a Q fit stops at cc.fit_max_iter with a certificate gap "
              '(nats) above this; "auto": the objective\'s measured value (0.1 for "prior", 0.01 otherwise)',
              AFTER_STAGE1_PHASE, auto=True),
    _positive("cc.guard_phi_shrink", 100.0, "warn when phi's mean norm falls by more than this factor",
              AFTER_STAGE1_PHASE),
    # train
    _positive("train.lr", 1.0e-4, "Adam's learning rate", STAGE1),
    Key("train.lr_schedule", "constant", '"constant" | "cosine": in every training stage of S steps, step t uses '
        "lr x (1 + cos(pi t / S)) / 2 (from lr down to 0; each stage starts again)", STAGE1,
        choices=("constant", "cosine")),
    _non_negative("train.weight_decay", 5.0e-4, "Adam's weight decay", STAGE1),
    _non_negative("train.baseline_steps", 1000, "stage 1: steps without L_cc", STAGE1),
    _non_negative("train.cc_steps", 500, "steps of every exemplar round", AFTER_STAGE1_PHASE),
    Key("train.reset_optimizer", False, "fresh Adam state at the start of every exemplar round", AFTER_STAGE1_PHASE),
    _positive("train.checkpoint_every", 1, "steps between checkpoints (1: a kill loses no completed step)", STAGE1),
    _positive("train.log_every", 10, "steps between lines of metrics.jsonl", STAGE1),
    _non_negative("train.eval_every", 0, "steps between test evaluations during a stage (0: only at stage ends)",
                  AFTER_STAGE1_PHASE),
    # eval
    Key("eval.tiou", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], "tIoU thresholds of detection mAP, each in (0, 1)",
        EVALUATION),
    _non_negative("eval.figures", 4, "T-CAM figures of this many test videos at the end", EVALUATION),
    _non_negative("eval.smooth", 0, "centred moving average of this many segments on the T-CAM and the attention "
                  "before proposals and in figures (0: off; ends renormalised)", EVALUATION),
    # W-TALC's rule by default: +15.4 det avg over "multi" (smoothed 5) on held-out seeds (docs/results.md)
    Key("eval.proposals", "wtalc", '"multi": thresholds 0.1-0.9 on the attention-weighted T-CAM, outer-inner '
        'contrast scores, NMS | "wtalc": W-TALC\'s rule on the segment logits (per class one threshold half way '
        "up its range, classes with a positive top-T/8 score, score = max + 0.7 x that score)", EVALUATION,
        choices=("multi", "wtalc")),
    # run
    Key("run.dir", "", 'run folder; "": runs/<name>', RESUME),
    Key("run.tensorboard", True, "also log to TensorBoard when it is installed", RESUME),
    Key("run.progress", True, "tqdm progress bars", RESUME),
    _non_negative("run.threads", 0, "torch intra-op threads (0: torch's default, one per core); results are "
                  "bitwise reproducible at a fixed thread count only", RESUME),
)

KEY: dict[str, Key] = {k.name: k for k in KEYS}


def _tree() -> dict:
    tree: dict = {}
    for k in KEYS:
        node = tree
        *parents, leaf = k.name.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(k.default) if isinstance(k.default, list) else k.default
    return tree


# The whole tree of defaults (plain nested dicts).
DEFAULTS: dict[str, Any] = _tree()
# Allowed string values; numbers > 0; numbers >= 0; string-valued keys that also take numbers.
CHOICES: dict[str, tuple] = {k.name: k.choices for k in KEYS if k.choices}
POSITIVE = frozenset(k.name for k in KEYS if k.low == 0 and k.strict)
NON_NEGATIVE = frozenset(k.name for k in KEYS if k.low == 0 and not k.strict)
STRING_OR_NUMBER = frozenset(k.name for k in KEYS if k.auto)
# When keys act (see the module docstring): stage 1 depends on none of AFTER_STAGE1, training on none of
# EVALUATION_ONLY; RESUME_MAY_CHANGE may take new values on resume.
AFTER_STAGE1 = tuple(k.name for k in KEYS if k.phase != STAGE1)
EVALUATION_ONLY = tuple(k.name for k in KEYS if k.phase in (EVALUATION, LABEL, RESUME))
RESUME_MAY_CHANGE = tuple(k.name for k in KEYS if k.phase == RESUME)


def string_valued(key: str) -> bool:
    """Whether ``key`` holds text (an unquoted number there keeps its text: ``data.name=2024``)."""
    k = KEY.get(key)
    return k is not None and isinstance(k.default, str) and not k.auto
