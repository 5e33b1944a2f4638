"""One tree of defaults, overridden by a YAML file and then by ``key=value`` pairs, validated, saved.

    cfg = load_config("configs/synthetic.yaml", ["train.lr=3e-4", "cc.alpha=0.5"])
    cfg["cc"]["alpha"]          # plain nested dicts, nothing magic
    save_config(cfg, run_dir / "config.yaml")

Every key a YAML file or an override may set is in :data:`DEFAULTS`; an unknown key, a value of the wrong
type or out of range stops with a :class:`ConfigError` that names the key, what was expected and what
arrived.

Values are read as YAML (PyYAML's YAML 1.1 safe loader) with one addition: every float literal Python's
``float()`` accepts is a float (``1e-3``, ``1E-3``, ``-2.5e+3``, ``.5``, ``-.5``, ``5.``, ``1_000.5``,
``inf``, ``nan``), where YAML 1.1 alone would keep ``1e-3`` as a string. Non-finite numbers are then refused
by validation like ``.inf``. At a key whose value is a string (``name``, ``data.root``, ...), an unquoted
value keeps its text: ``data.name=1e-3`` is the string ``"1e-3"``, ``name=2024`` the string ``"2024"``.

Checks that need the data (``cc.k`` against the number of segments, missing feature files) are
in :func:`check_against_data`, run before any training.
"""
from __future__ import annotations

import copy
import math
import os
import re
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key."""


# The whole tree. Comments here are the reference for every option.
DEFAULTS: dict[str, Any] = {
    "name": "run",                 # run name, used for the default run folder runs/<name>
    "seed": 0,                     # seeds model init, batch order, dropout, window crops
    "device": "cpu",               # "cpu" or "cuda"
    "data": {
        "root": "",                # dataset folder (train.data layout); "" with synthetic set -> cache
        "name": "",                # dataset name inside root (given by the synthetic generator if "")
        "synthetic": "",           # "", "tiny", "demo", "calibrated" or "thumos14": generate this preset if
                                   # missing
        "layout": "standard",      # "standard" (rgb|flow concatenated) or "native"
        "feature_rate": 0.0,       # feature vectors per second; 0: from the dataset's files, else 25/16
        "rgb_dim": 0,              # features[:, :rgb_dim] are RGB, the rest flow; 0: from the files/1024
        "max_seqlen": 750,         # training crop length (segments); evaluation uses whole videos
        "batch_size": 16,
        "sampler": "epochs",       # "epochs": every training video once per epoch, in a seeded order |
                                   # "similar_pairs": W-TALC's batches, data.similar_pairs pairs of videos
                                   # that share a random class, the rest drawn at random (with replacement)
        "similar_pairs": 3,        # pairs of same-class videos per batch with the "similar_pairs" sampler
        "train_subset": "",        # "" -> the dataset's convention (THUMOS14: validation; ANet: training)
        "test_subset": "",         # "" -> the dataset's convention (THUMOS14: test; ANet: validation)
        "standardize": "zscore",   # "zscore": subtract the per-dimension mean and divide by the std of the
                                   # training subset's features (float64 statistics, kept in the
                                   # checkpoint, used for every forward: training, database, evaluation)
                                   # | "none": the features as stored
    },
    "model": {
        "streams": "two",          # "two": an RGB and a flow stream, each on its half of the features |
                                   # "joint": one stream on the whole feature vector (W-TALC's model)
        "embed_dim": 512,          # width of the embedding phi (Linear -> ReLU -> Dropout), per stream
        "dropout": 0.5,
        "attention": "untrimmednet",  # "untrimmednet" (softmax over segments) | "stpn" (sigmoid) | "none"
                                   # (no attention branch: video logits by W-TALC's k-max pooling of the
                                   # segment logits, k = ceil(T / loss.topk_ratio))
        "init": "torch",           # "torch": PyTorch's default Linear init | "xavier": Xavier-uniform
                                   # weights and zero biases (W-TALC's)
        "attention_hidden": 0,     # 0: attention is Linear(embed, 1); >0: Linear-ReLU-Linear
    },
    "loss": {
        "classification": "softmax",  # "softmax": CE vs labels/|labels| | "bce": per-class sigmoid BCE
        "topk_mil": 0.0,           # weight of W-TALC's top-k MIL loss, added to the attention MIL loss
        "topk_ratio": 8,           # W-TALC top-k: k = ceil(T / topk_ratio)
        "sparsity": 1.0e-4,        # STPN: weight of the L1 attention sparsity loss (stpn only)
        "casl": 0.0,               # W-TALC co-activity similarity loss weight (0 = off)
        "casl_margin": 0.5,
    },
    "cc": {
        "weight": 0.03,            # lambda in Loss = L_clf + lambda * L_cc (0.03: chosen for "prior", see
                                   # the README's comparison; the poster's literal loss used 1)
        "loss": "prior",           # the exemplar loss: "literal" (the poster's L_cc), or our extensions
                                   # "contrastive" (segments classified by their exemplars, cross-entropy
                                   # toward the video's labels), "prior" (attention trained toward a
                                   # tempered softmax of log z over the video's segments) and
                                   # "tcam_prior" (per labelled class, the T-CAM's softmax over time
                                   # trained toward the softmax of that class's log z: for models
                                   # without attention)
        "background": False,       # add a background class to D (the cc.size least-attended segments of
                                   # the labelled videos); "contrastive" then also pulls unattended
                                   # segments toward it
        "temperature": 1.0,        # tau of "contrastive" (log z / tau) and "prior" (standardised log z / tau)
        "rounds": 1,               # R: repetitions of collect (2) -> fit Q (3) -> train with L_cc (4);
                                   # 0: the baseline alone. weight 0 keeps the stages (a same-batch control)
        "size": 64,                # n: exemplars per class in the database
        "on": "embedding",         # "embedding" (phi, shapes features and attention) | "input"
        "detach_attention": True,  # True: L_cc shapes phi only (p(s|x) as a constant weight); False: the
                                   # literal loss, whose gradient also moves the attention (it collapses
                                   # the attention onto the segments nearest an exemplar). "prior" trains
                                   # the attention by design and ignores this
        "normalize": False,        # L2-normalise what L_cc sees (stops phi from shrinking to cheat L_cc)
        "metric": "sqeuclidean",   # "sqeuclidean" | "euclidean" (the paper's d)
        "alpha": "auto",           # bandwidth: a number > 0, or "auto" (from the data, every collection)
        "alpha_rule": "lashkari",  # auto rule: "lashkari" (log n / mean d) | "median" (1 / median d)
        "alpha_scale": 1.0,        # multiplies the automatic alpha
        "fit_tol": 1.0e-4,         # stop the Q fit when |max log eta - sum q log eta| < tol
        "fit_max_iter": 500,       # kernel passes at most
        "fit_accelerate": True,    # SQUAREM extrapolation of the Q update (same certificate, fewer passes)
        "select": False,           # test-time selection of representative segments (the poster's testing
                                   # step, reported as cls*): off by default, it lowered classification
                                   # mAP in every comparison (README: "Test-time selection")
        "k": 8,                    # test: segments per class kept by select_representative
        "select_by": "distance",   # "distance": closest to the class's exemplars (-log z) | "loss":
                                   # least -p(s|x) log z, the literal L_cc (favours low attention)
        "select_top_classes": 0,   # 0: select for every class; N: only the N top-scored classes
        "reduction": "mean",       # L_cc summed over videos ("sum") or averaged ("mean")
        "scale": "relative",       # "literal" loss only. "relative": each stream's loss divided by its mean
                                   # per video over the training set at collection time, so lambda means
                                   # the same on every dataset and alpha; "none": the raw loss (its size
                                   # follows alpha * d). The extensions are in nats already
        "guard_alpha_jump": 10.0,  # warn when an automatic alpha changes by more than this factor
        "guard_q_uniform": 0.95,   # warn when Q's perplexity / filled slots (median class) is above this
        "guard_fit_gap": "auto",   # warn when a Q fit stops at cc.fit_max_iter with a certificate (gap, in
                                   # nats) above this. "auto": 0.1 for cc.loss "prior" (it standardises
                                   # log z), 0.01 for the losses that use log z as it is; measured: below
                                   # these the final mAPs moved < 0.2 points (README, "Collapse guards")
        "guard_phi_shrink": 100.0, # warn when phi's mean norm falls by more than this factor
    },
    "train": {
        "lr": 1.0e-4,
        "lr_schedule": "constant",  # "constant" | "cosine": in every training stage of S steps, step t uses
                                   # lr x (1 + cos(pi t / S)) / 2 (from lr down to 0; each stage starts again)
        "weight_decay": 5.0e-4,
        "baseline_steps": 1000,    # stage 1 (no L_cc)
        "cc_steps": 500,           # stage 4 steps per round
        "reset_optimizer": False,  # fresh Adam state at each L_cc stage
        "checkpoint_every": 1,     # steps between checkpoints (1: a kill loses no completed step)
        "log_every": 10,
        "eval_every": 0,           # steps between test evaluations (0: only at stage ends)
    },
    "eval": {
        "tiou": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7],
        "figures": 4,              # T-CAM figures of this many test videos at the end
        "smooth": 5,               # centred moving average of this many segments on the T-CAM and the
                                   # attention before proposals and in figures (0 = off; ends renormalised)
        "proposals": "multi",      # "multi": thresholds 0.1-0.9 on the attention-weighted T-CAM, outer-inner
                                   # contrast scores, NMS | "wtalc": W-TALC's rule on the segment logits
                                   # (per class one threshold half way up its range, classes with a
                                   # positive top-T/8 score, score = max + 0.7 x that score)
    },
    "run": {
        "dir": "",                 # run folder; "" -> runs/<name>
        "tensorboard": True,       # also log to TensorBoard when it is installed
        "progress": True,          # tqdm bars
        "threads": 0,              # torch intra-op threads (0: torch's default, one per core). Results
                                   # are bitwise reproducible at a fixed thread count only
    },
}

# Built-in presets (partial trees over DEFAULTS). configs/synthetic.yaml and configs/tiny.yaml hold the
# same values (a test checks it); `python -m train demo` uses PRESETS["synthetic"] so that it works from
# an installed package too.
PRESETS: dict[str, dict] = {
    "synthetic": {
        "name": "synthetic",
        "data": {"synthetic": "demo", "layout": "native", "batch_size": 8, "max_seqlen": 100},
        "model": {"embed_dim": 128, "dropout": 0.5, "attention": "stpn"},
        "cc": {"rounds": 2, "size": 32, "k": 4, "fit_max_iter": 200},
        "train": {"lr": 1.0e-3, "baseline_steps": 200, "cc_steps": 100, "checkpoint_every": 1,
                  "log_every": 10},
        "eval": {"figures": 4},
        "run": {"threads": 1},
    },
    "tiny": {
        "name": "tiny",
        "data": {"synthetic": "tiny", "layout": "native", "batch_size": 4, "max_seqlen": 64},
        "model": {"embed_dim": 16, "dropout": 0.1},
        "cc": {"rounds": 1, "size": 8, "k": 2, "fit_max_iter": 100},
        "train": {"lr": 1.0e-3, "baseline_steps": 6, "cc_steps": 4, "log_every": 2},
        "eval": {"figures": 1},
        "run": {"progress": False, "tensorboard": False, "threads": 1},
    },
}

# Allowed string values, and numeric ranges: (low, high, low inclusive).
CHOICES = {
    "device": ("cpu", "cuda"),
    "data.synthetic": ("", "tiny", "demo", "calibrated", "thumos14"),
    "data.layout": ("standard", "native"),
    "data.standardize": ("none", "zscore"),
    "data.sampler": ("epochs", "similar_pairs"),
    "model.streams": ("two", "joint"),
    "model.attention": ("untrimmednet", "stpn", "none"),
    "model.init": ("torch", "xavier"),
    "eval.proposals": ("multi", "wtalc"),
    "train.lr_schedule": ("constant", "cosine"),
    "loss.classification": ("softmax", "bce"),
    "cc.on": ("embedding", "input"),
    "cc.metric": ("sqeuclidean", "euclidean"),
    "cc.alpha_rule": ("lashkari", "median"),
    "cc.reduction": ("mean", "sum"),
    "cc.select_by": ("distance", "loss"),
    "cc.scale": ("relative", "none"),
    "cc.loss": ("literal", "contrastive", "prior", "tcam_prior"),
}
POSITIVE = {"data.max_seqlen", "data.batch_size",
            "model.embed_dim", "loss.topk_ratio", "cc.size", "cc.k", "cc.alpha_scale", "cc.fit_tol",
            "cc.temperature", "cc.guard_alpha_jump", "cc.guard_q_uniform", "cc.guard_phi_shrink", "cc.guard_fit_gap",
            "cc.fit_max_iter", "train.lr", "train.checkpoint_every", "train.log_every"}
NON_NEGATIVE = {"seed", "data.similar_pairs", "run.threads", "data.feature_rate", "data.rgb_dim", "model.attention_hidden", "loss.sparsity", "loss.topk_mil", "loss.casl", "loss.casl_margin",
                "cc.weight", "cc.rounds", "cc.select_top_classes", "train.weight_decay", "train.baseline_steps", "train.cc_steps",
                "train.eval_every", "eval.figures", "eval.smooth"}

MAX_SEED = 2**64 - 1  # torch.manual_seed's range; the batch and dropout seeds mix it as 64 bits


# Float literals as Python's float() reads them (optional sign; digits with single underscores between them;
# a dot or an exponent; inf / infinity / nan in any case). YAML 1.1 floats need a dot and a signed exponent.
_DIGITS = r"[0-9](?:_?[0-9])*"
_FLOAT_LITERAL = re.compile(
    rf"^[-+]?(?:(?:{_DIGITS})?\.{_DIGITS}(?:[eE][-+]?{_DIGITS})?"   # .5  1.5  1.5e3
    rf"|{_DIGITS}\.(?:[eE][-+]?{_DIGITS})?"                         # 5.  5.e-3
    rf"|{_DIGITS}[eE][-+]?{_DIGITS}"                                # 1e-3  1E+3
    r"|(?i:inf|infinity|nan))$")                                   # inf  -Infinity  NaN
_FLOAT_FIRST = list("-+0123456789.iInN")
_STR_TAG = "tag:yaml.org,2002:str"
_TEXT_KEPT = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float", "tag:yaml.org,2002:bool"}
_STRING_OR_NUMBER = {"cc.alpha", "cc.guard_fit_gap"}  # string-valued defaults ("auto") that also take numbers


class _ConfigLoader(yaml.SafeLoader):
    """The safe loader, plus a resolver that makes every Python float literal a float."""


class _ConfigDumper(yaml.SafeDumper):
    """The safe dumper, quoting the strings that :class:`_ConfigLoader` would read as floats."""


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_LITERAL, _FLOAT_FIRST)
_ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_LITERAL, _FLOAT_FIRST)


def _string_key(key: str) -> bool:
    node = DEFAULTS
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return isinstance(node, str) and key not in _STRING_OR_NUMBER


def _keep_text(node, key: str) -> None:
    """Unquoted numbers and booleans at string-valued keys are read as their text, and so are keys
    that YAML 1.1 would read as booleans (``on``, ``off``, ``yes``, ``no``: ``cc: {on: input}``)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.style is None and k.tag == "tag:yaml.org,2002:bool":
                k.tag = _STR_TAG
            if isinstance(k, yaml.ScalarNode):
                _keep_text(v, f"{key}.{k.value}" if key else str(k.value))
    elif (isinstance(node, yaml.ScalarNode) and node.style is None and node.tag in _TEXT_KEPT
          and _string_key(key)):
        node.tag = _STR_TAG


def load_yaml(stream, key: str = ""):
    """Parse a config YAML document (text or file object) the way config files and overrides are read:
    the safe loader with Python float literals as floats, and the text kept for unquoted values at
    string-valued keys (``key``: the dotted key the document's root stands for; "" for a whole file)."""
    loader = _ConfigLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _keep_text(node, key)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _walk(tree, prefix=""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _walk(value, path + ".")
        else:
            yield path, value


def flatten(tree: dict) -> dict:
    """``{"cc": {"alpha": 1}}`` -> ``{"cc.alpha": 1}`` (dotted keys of every leaf)."""
    return dict(_walk(tree))


def get(cfg: dict, key: str):
    """``get(cfg, "cc.alpha")`` -> the value at a dotted key."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _set(cfg: dict, key: str, value, source: str):
    parts = key.split(".")
    node, default = cfg, DEFAULTS
    for i, part in enumerate(parts):
        if not isinstance(default, dict) or part not in default:
            where = ".".join(parts[:i]) or "the top level"
            known = ", ".join(sorted(default)) if isinstance(default, dict) else "(none: a leaf)"
            raise ConfigError(f"{source}: unknown config key '{key}' ('{part}' is not in {where}; "
                              f"known: {known})")
        if i == len(parts) - 1:
            if isinstance(default[part], dict):
                raise ConfigError(f"{source}: '{key}' is a section, set its keys (e.g. {key}."
                                  f"{next(iter(default[part]))}=...)")
            node[part] = value
        else:
            node, default = node[part], default[part]


def _merge_yaml(cfg: dict, tree: dict, source: str, prefix=""):
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of config keys, got {type(tree).__name__}")
    for key, value in tree.items():
        path = f"{prefix}{key}"
        default = get(DEFAULTS, prefix[:-1]) if prefix else DEFAULTS
        if isinstance(value, dict) and isinstance(default.get(key), dict):
            _merge_yaml(cfg, value, source, path + ".")
        else:
            _set(cfg, path, value, source)


def _coerce(key: str, value, default):
    """Bring a YAML/command-line value to the default's type, or raise naming the key."""
    def bad(expected):
        return ConfigError(f"config key '{key}': expected {expected}, got {value!r} "
                           f"({type(value).__name__})")
    if key in _STRING_OR_NUMBER:  # a number > 0 or "auto"
        if value == "auto":
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number > 0 or 'auto'")
        return float(value)
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("an integer")
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if isinstance(default, str):
        if not isinstance(value, str):
            raise bad("a string")
        return value
    if isinstance(default, list):
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise bad("a list of numbers")
        return [float(v) for v in value]
    raise bad(type(default).__name__)  # pragma: no cover


def validate(cfg: dict) -> dict:
    """Type-check and range-check every key; returns ``cfg`` with values coerced to their types."""
    for key, default in _walk(DEFAULTS):
        value = _coerce(key, get(cfg, key), default)
        _set(cfg, key, value, "validate")
        if key in CHOICES and value not in CHOICES[key]:
            raise ConfigError(f"config key '{key}': expected one of {list(CHOICES[key])}, got {value!r}")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config key '{key}': expected a finite number, got {value}")
            if key in POSITIVE and value <= 0:
                raise ConfigError(f"config key '{key}': expected a value > 0, got {value}")
            if key in NON_NEGATIVE and value < 0:
                raise ConfigError(f"config key '{key}': expected a value >= 0, got {value}")
    if cfg["seed"] > MAX_SEED:
        raise ConfigError(f"config key 'seed': expected an integer in [0, 2**64 - 1], got {cfg['seed']}")
    if cfg["cc"]["alpha"] != "auto" and cfg["cc"]["alpha"] <= 0:
        raise ConfigError(f"config key 'cc.alpha': expected a number > 0 or 'auto', got "
                          f"{cfg['cc']['alpha']}")
    if cfg["cc"]["background"] and cfg["cc"]["loss"] != "contrastive":
        raise ConfigError(f"config key 'cc.background': a background class is used by cc.loss "
                          f"'contrastive' only, got cc.loss '{cfg['cc']['loss']}'")
    tiou = cfg["eval"]["tiou"]
    if not tiou or not all(0 < t < 1 for t in tiou):
        raise ConfigError(f"config key 'eval.tiou': expected a non-empty list of numbers in (0, 1), "
                          f"got {tiou}")
    if cfg["data"]["sampler"] == "similar_pairs" and 2 * cfg["data"]["similar_pairs"] > cfg["data"]["batch_size"]:
        raise ConfigError(f"config key 'data.similar_pairs': expected at most data.batch_size / 2 = "
                          f"{cfg['data']['batch_size'] // 2} pairs, got {cfg['data']['similar_pairs']}")
    if cfg["model"]["attention"] == "none" and cfg["cc"]["loss"] == "prior" and cfg["cc"]["weight"] > 0 \
            and cfg["cc"]["rounds"] > 0:
        raise ConfigError("config key 'cc.loss': 'prior' trains the attention, and model.attention is "
                          "'none'; use 'tcam_prior' (it trains the T-CAM)")
    if cfg["cc"]["k"] > cfg["data"]["max_seqlen"]:
        raise ConfigError(f"config key 'cc.k': expected at most data.max_seqlen="
                          f"{cfg['data']['max_seqlen']} segments, got {cfg['cc']['k']}")
    if not cfg["data"]["root"] and not cfg["data"]["synthetic"]:
        raise ConfigError("config key 'data.root': expected a dataset folder (or set data.synthetic "
                          "to generate one), got ''")
    return cfg


def resolve_subsets(cfg: dict, dataset) -> tuple[list[int], list[int]]:
    """Video indices of the training and test subsets (config, or the dataset's convention). A video of
    neither subset would silently take part in nothing: it is an error naming the file and the video."""
    out, names = [], []
    for key, default in (("data.train_subset", "train_subset"), ("data.test_subset", "test_subset")):
        try:
            name = get(cfg, key) or getattr(dataset, default)
            out.append(list(dataset.indices(name)))
            names.append(name)
        except ValueError as exc:
            raise ConfigError(f"config key '{key}': {exc}") from None
    if names[0] == names[1]:
        raise ConfigError(f"config keys 'data.train_subset' and 'data.test_subset': expected two different "
                          f"subsets, got {names[0]!r} for both")
    for v in dataset.videos:
        if v.subset not in names:
            from .data.dataset import DatasetError
            where = getattr(dataset, "subset_source", "") or dataset.source or dataset.name
            raise DatasetError(f"{where}: video {v.name!r} field 'subset' is {v.subset!r}, neither the training "
                               f"subset {names[0]!r} nor the test subset {names[1]!r}, so it would take part in "
                               f"nothing; give it one of them (or choose the subsets with data.train_subset / "
                               f"data.test_subset)")
    return out[0], out[1]


def check_against_data(cfg: dict, dataset, train_idx, test_idx) -> None:
    """Checks that need the loaded dataset; raise :class:`ConfigError` naming the key."""
    d = cfg["data"]
    if (d["rgb_dim"] and dataset.rgb_dim != d["rgb_dim"]) or not 0 < dataset.rgb_dim < dataset.feature_dim:
        raise ConfigError(f"config key 'data.rgb_dim': expected a split inside the feature width "
                          f"{dataset.feature_dim}, got {d['rgb_dim']}")
    lengths = [(len(dataset.videos[i].features), dataset.videos[i].name) for i in test_idx]
    shortest, name = min(lengths)
    if cfg["cc"]["k"] > shortest:
        raise ConfigError(f"config key 'cc.k': expected at most the number of segments of the shortest "
                          f"test video ({name}: {shortest}), got {cfg['cc']['k']}")


def parse_override(text: str):
    """``"cc.alpha=0.5"`` -> ``("cc.alpha", 0.5)``; the value is parsed as YAML (numbers, lists, bools)
    with every Python float literal a float (``train.lr=1e-3`` -> 0.001) and the text kept at
    string-valued keys (``data.name=1e-3`` -> ``"1e-3"``); see :func:`load_yaml`."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw, key) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse the value ({exc})") from None
    return key, "" if value is None else value


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()) -> dict:
    """Defaults, then the YAML file at ``path`` (if any), then ``key=value`` overrides; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            try:
                tree = load_yaml(f) or {}
            except yaml.YAMLError as exc:
                raise ConfigError(f"config file {path}: invalid YAML ({exc})") from None
        _merge_yaml(cfg, tree, str(path))
    for text in overrides:
        key, value = parse_override(text)
        _set(cfg, key, value, f"override {text!r}")
    return validate(cfg)


def from_dict(tree: dict) -> dict:
    """Validate a config tree saved with a run (e.g. from a checkpoint) against the current defaults."""
    cfg = copy.deepcopy(DEFAULTS)
    _merge_yaml(cfg, tree, "saved config")
    return validate(cfg)


def save_config(cfg: dict, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML to ``path`` (atomically); :func:`load_config` reads it back unchanged."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.dump(cfg, f, Dumper=_ConfigDumper, sort_keys=False)
    os.replace(tmp, path)


def to_yaml(cfg: dict) -> str:
    """``cfg`` as YAML text (strings that would read back as numbers are quoted)."""
    return yaml.dump(cfg, Dumper=_ConfigDumper, sort_keys=False)
